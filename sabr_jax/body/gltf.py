"""glTF 2.0 (.glb) export of the 24-joint skeleton's motion, optionally with the skinned SMPL mesh.

Note: the glTF world is y up, metres, right-handed: world = WORLD_FROM_CAMERA @ camera point +
shift, with WORLD_FROM_CAMERA = (x, -y, -z) of our camera frame (x right, y DOWN, z away from
the camera; sabr_jax.body.camera) and shift = sabr_jax.body.bvh.placement (frame 0's root at
x = z = 0, frame 0's lowest joint on the floor y = 0): the same world as motion.bvh.

The file holds (written with pygltflib, one binary buffer):
  nodes 0..J-1   the joints (node k = joint k, named after it) as a hierarchy under the root
                 (joint 0): each joint's translation its rest offset from its parent, the root's
                 its world position; no scale
  skin 0         the joints with their inverse bind matrices (the rest pose: joint k at
                 rest_joints[k], no rotation), so importers (Blender) build an armature
  animation 0    "motion": per joint a rotation channel (unit quaternions x, y, z, w; the root's
                 WORLD_FROM_CAMERA @ global orient), the root's translation channel, LINEAR, at
                 times k / fps seconds
  camera node    the full-image perspective camera (focal length and image size of the video) at
                 the shift, looking down -z, y up (glTF's camera convention is our camera's,
                 turned by WORLD_FROM_CAMERA)
  mesh node      with `mesh`: the rest-pose mesh (positions, normals, triangles), skinned by
                 skin 0 with each vertex's 4 largest blend weights renormalised (JOINTS_0 unsigned
                 short, WEIGHTS_0 float summing to 1); linear blend skinning only, so SMPL's pose
                 blend shapes are left out
"""

from __future__ import annotations

import os

import numpy as np
import pygltflib
from scipy.spatial.transform import Rotation

from sabr_jax.body import skeleton
from sabr_jax.body.bvh import WORLD_FROM_CAMERA, placement

FLOAT, UNSIGNED_SHORT, UNSIGNED_INT = 5126, 5123, 5125
ARRAY_BUFFER, ELEMENT_ARRAY_BUFFER = 34962, 34963
_TYPES = {1: "SCALAR", 3: "VEC3", 4: "VEC4", 16: "MAT4"}
_COMPONENTS = {FLOAT: np.float32, UNSIGNED_SHORT: np.uint16, UNSIGNED_INT: np.uint32}
INFLUENCES = 4  # JOINTS_0 / WEIGHTS_0: at most 4 joints per vertex
MESH_COLOUR = (0.62, 0.72, 0.86, 1.0)  # a light blue, linear RGBA


class _Buffer:
    """The file's one binary buffer and its bufferViews / accessors, each 4-byte aligned."""

    def __init__(self, gltf: pygltflib.GLTF2):
        self.gltf, self.blob = gltf, bytearray()

    def accessor(self, array: np.ndarray, component: int, target: int | None = None, bounds: bool = False) -> int:
        """Append array [N] or [N, C] (C in 3, 4, 16; stored as `component`); returns its accessor index."""
        data = np.ascontiguousarray(array, _COMPONENTS[component])
        rows = data.reshape(len(data), -1)
        self.blob += b"\0" * (-len(self.blob) % 4)
        view = pygltflib.BufferView(buffer=0, byteOffset=len(self.blob), byteLength=data.nbytes, target=target)
        self.blob += data.tobytes()
        self.gltf.bufferViews.append(view)
        accessor = pygltflib.Accessor(
            bufferView=len(self.gltf.bufferViews) - 1,
            componentType=component,
            count=len(rows),
            type=_TYPES[rows.shape[1]],
        )
        if bounds:  # required for POSITION and for animation inputs
            accessor.min, accessor.max = rows.min(0).tolist(), rows.max(0).tolist()
        self.gltf.accessors.append(accessor)
        return len(self.gltf.accessors) - 1

    def finish(self) -> None:
        self.blob += b"\0" * (-len(self.blob) % 4)
        self.gltf.buffers = [pygltflib.Buffer(byteLength=len(self.blob))]
        self.gltf.set_binary_blob(bytes(self.blob))


def _quaternions(rotations: np.ndarray) -> np.ndarray:
    """[T, J, 3, 3] -> [T, J, 4] unit quaternions (x, y, z, w), each joint's sign kept continuous
    over time (q and -q are the same rotation; LINEAR interpolation between them would not be)."""
    quats = Rotation.from_matrix(rotations.reshape(-1, 3, 3)).as_quat().reshape(*rotations.shape[:2], 4)
    for t in range(1, len(quats)):
        flip = np.sum(quats[t] * quats[t - 1], axis=-1) < 0
        quats[t, flip] *= -1
    return quats / np.linalg.norm(quats, axis=-1, keepdims=True)


def _vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """[V, 3] unit area-weighted vertex normals; +y for a vertex of no (or only degenerate) faces."""
    corners = vertices[faces]  # [F, 3, 3]
    face_normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    normals = np.zeros_like(vertices)
    for i in range(3):
        np.add.at(normals, faces[:, i], face_normals)
    length = np.linalg.norm(normals, axis=-1, keepdims=True)
    return np.where(length > 1e-12, normals / np.maximum(length, 1e-12), np.array([0.0, 1.0, 0.0]))


def top_weights(weights, count: int = INFLUENCES) -> tuple[np.ndarray, np.ndarray]:
    """Blend weights [V, J] -> (joints [V, count] uint16, weights [V, count] float32): each vertex's
    `count` largest weights renormalised to sum to 1 (largest first; a vertex without any positive
    weight follows joint 0); joints of zero weight are 0."""
    weights = np.clip(np.asarray(weights, np.float64), 0.0, None)
    joints = np.argsort(-weights, axis=1, kind="stable")[:, :count]
    kept = np.take_along_axis(weights, joints, axis=1)
    total = kept.sum(1, keepdims=True)
    kept = np.where(total > 0, kept / np.where(total > 0, total, 1.0), np.eye(1, count))
    joints = np.where(kept > 0, joints, 0)
    kept = kept.astype(np.float32)
    kept[:, 0] += 1.0 - kept.sum(1, dtype=np.float32)  # the float32 sum exactly 1 (to rounding)
    return joints.astype(np.uint16), kept


def mean_shape_mesh(body) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(rest vertices [V, 3] metres, faces [F, 3], blend weights [V, 24]) of a sabr_jax.body.smpl
    model in its mean shape (zero betas, as the overlay draws it), or None for the built-in skeleton."""
    if body.faces is None:
        return None
    betas = np.zeros((1, body.num_betas), np.float32)
    rest_pose = np.broadcast_to(np.eye(3, dtype=np.float32), (1, skeleton.NUM_JOINTS, 3, 3))
    vertices = np.asarray(body(betas, rest_pose)["vertices"])[0]
    return vertices, np.asarray(body.faces), np.asarray(body.weights)


def write(
    path: str | os.PathLike,
    rotations,
    rest_joints,
    root_translation,
    fps: float,
    image_hw: tuple[int, int],
    focal: float,
    mesh: tuple | None = None,
    world_shift=None,
    names=skeleton.JOINT_NAMES,
    parents=skeleton.PARENTS,
) -> None:
    """Write a binary glTF (.glb) of the motion (module docstring).

    rotations [T, J, 3, 3] (T >= 1), rest_joints [J, 3], root_translation [T, 3], fps, names,
    parents: as sabr_jax.body.bvh.write (the pelvis at rest_joints[0] + root_translation in the
    camera frame); image_hw = (H, W) pixels and focal (pixels): the full-image camera (yfov =
    2 atan(H / 2 focal), aspect W / H); mesh: None (the skeleton only) or (rest vertices [V, 3]
    metres in the frame of rest_joints, faces [F, 3], blend weights [V, J]); world_shift [3]
    metres (default sabr_jax.body.bvh.placement(...)).
    """
    rotations = np.asarray(rotations, np.float64)
    rest = np.asarray(rest_joints, np.float64)
    translation = np.asarray(root_translation, np.float64)
    parents = list(parents)
    n_frames, n_joints = rotations.shape[:2]
    if n_frames < 1 or rotations.shape[2:] != (3, 3) or rest.shape != (n_joints, 3):
        raise ValueError(
            f"gltf.write: expected rotations [T >= 1, J, 3, 3], rest_joints [J, 3]; got {rotations.shape}, {rest.shape}"
        )
    if translation.shape != (n_frames, 3) or len(names) != n_joints or len(parents) != n_joints:
        raise ValueError(
            f"gltf.write: {n_frames} frames of {n_joints} joints need root_translation [T, 3], "
            f"J names and parents; got {translation.shape}, {len(names)}, {len(parents)}"
        )
    if parents[0] != -1 or any(not 0 <= p < k for k, p in enumerate(parents) if k):
        raise ValueError("gltf.write: joint 0 must be the root and every parent come before its children")
    shift = placement(rotations, rest, translation, parents) if world_shift is None else np.asarray(world_shift)

    gltf = pygltflib.GLTF2(asset=pygltflib.Asset(generator="sabr_jax.body.gltf (pygltflib)"))
    buffer = _Buffer(gltf)
    world_rotations = rotations.copy()
    world_rotations[:, 0] = WORLD_FROM_CAMERA @ rotations[:, 0]
    quats = _quaternions(world_rotations)  # [T, J, 4]
    root_position = (rest[0] + translation) @ WORLD_FROM_CAMERA.T + shift  # [T, 3]
    for k in range(n_joints):  # node k = joint k, posed as in frame 0
        local = root_position[0] if k == 0 else rest[k] - rest[parents[k]]
        node = pygltflib.Node(name=str(names[k]), translation=local.tolist(), rotation=quats[0, k].tolist())
        node.children = [c for c, p in enumerate(parents) if p == k]
        gltf.nodes.append(node)

    bind = np.tile(np.eye(4), (n_joints, 1, 1))
    bind[:, :3, 3] = -rest  # the inverse of joint k's rest transform: a translation to rest[k], no rotation
    ibm = buffer.accessor(bind.transpose(0, 2, 1).reshape(n_joints, 16), FLOAT)  # glTF matrices: column-major
    gltf.skins.append(
        pygltflib.Skin(name="skeleton", joints=list(range(n_joints)), skeleton=0, inverseBindMatrices=ibm)
    )

    times = buffer.accessor(np.arange(n_frames) / fps, FLOAT, bounds=True)
    animation = pygltflib.Animation(name="motion")
    outputs = [(k, "rotation", quats[:, k]) for k in range(n_joints)] + [(0, "translation", root_position)]
    for node, property_path, values in outputs:
        animation.samplers.append(
            pygltflib.AnimationSampler(input=times, output=buffer.accessor(values, FLOAT), interpolation="LINEAR")
        )
        target = pygltflib.AnimationChannelTarget(node=node, path=property_path)
        animation.channels.append(pygltflib.AnimationChannel(sampler=len(animation.samplers) - 1, target=target))
    gltf.animations.append(animation)

    height, width = image_hw
    distance = np.linalg.norm(root_position - shift, axis=-1).max()
    perspective = pygltflib.Perspective(
        yfov=float(2 * np.arctan(height / (2 * focal))),
        aspectRatio=width / height,
        znear=0.05,
        zfar=float(2 * distance + 10),
    )
    gltf.cameras.append(pygltflib.Camera(name="video camera", type="perspective", perspective=perspective))
    gltf.nodes.append(pygltflib.Node(name="camera", camera=0, translation=shift.tolist()))
    scene_nodes = [0, len(gltf.nodes) - 1]

    if mesh is not None:
        vertices, faces, weights = (np.asarray(a) for a in mesh)
        if vertices.ndim != 2 or vertices.shape[1] != 3 or weights.shape != (len(vertices), n_joints):
            raise ValueError(
                f"gltf.write: mesh needs vertices [V, 3] and weights [V, {n_joints}]; got "
                f"{vertices.shape}, {weights.shape}"
            )
        joints, blend = top_weights(weights)
        attributes = pygltflib.Attributes(
            POSITION=buffer.accessor(vertices, FLOAT, ARRAY_BUFFER, bounds=True),
            NORMAL=buffer.accessor(_vertex_normals(vertices.astype(np.float64), faces), FLOAT, ARRAY_BUFFER),
            JOINTS_0=buffer.accessor(joints, UNSIGNED_SHORT, ARRAY_BUFFER),
            WEIGHTS_0=buffer.accessor(blend, FLOAT, ARRAY_BUFFER),
        )
        indices = buffer.accessor(np.asarray(faces).reshape(-1), UNSIGNED_INT, ELEMENT_ARRAY_BUFFER)
        colour = pygltflib.PbrMetallicRoughness(baseColorFactor=list(MESH_COLOUR), metallicFactor=0.0)
        gltf.materials.append(pygltflib.Material(name="body", pbrMetallicRoughness=colour, doubleSided=True))
        primitive = pygltflib.Primitive(attributes=attributes, indices=indices, material=0)
        gltf.meshes.append(pygltflib.Mesh(name="body", primitives=[primitive]))
        gltf.nodes.append(pygltflib.Node(name="body", mesh=0, skin=0))  # at the scene's root: skinned, no transform
        scene_nodes.append(len(gltf.nodes) - 1)

    gltf.scenes.append(pygltflib.Scene(name="motion", nodes=scene_nodes))
    gltf.scene = 0
    buffer.finish()
    gltf.save_binary(os.fspath(path))
