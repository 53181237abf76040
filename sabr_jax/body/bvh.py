"""BVH export of the 24-joint skeleton's motion, for Blender and other animation tools.

Note: the BVH world is y up: world = (x, -y, -z) of our camera frame (x right, y DOWN, z away
from the camera; sabr_jax.body.camera), a half turn about x, so a climber stands upright and the
camera looks down -z at the wall, then shifted by `placement` (shared with sabr_jax.body.gltf):
frame 0's root at x = z = 0, frame 0's lowest joint on the floor y = 0, the camera kept at that
shift (~100 m away for a 4D-Humans full-image focal length). Lengths are in
metres times `scale` (1: metres, which Blender's importer reads at its default Scale 1.0
as true size; 100: centimetres). The ROOT (pelvis) has OFFSET 0 0 0, so its position
channels are its absolute position whichever way a reader combines the two. Every joint's
rotation channels are `Zrotation Xrotation Yrotation` in degrees: the local rotation is
Rz(z) Rx(x) Ry(y), and a joint's world transform is its parent's composed with
(translation by its OFFSET, its rotation), as in sabr_jax.body.skeleton.forward_kinematics.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from sabr_jax.body import skeleton

WORLD_FROM_CAMERA = np.diag([1.0, -1.0, -1.0])  # our camera frame (y down, z away) -> the BVH world (y up)
EULER_ORDER = "ZXY"  # scipy's intrinsic order, the order of the rotation channels


def _euler_degrees(rotations: np.ndarray) -> np.ndarray:
    """[..., 3, 3] rotation matrices -> [..., 3] intrinsic ZXY Euler angles in degrees."""
    from scipy.spatial.transform import Rotation

    flat = rotations.reshape(-1, 3, 3)
    with warnings.catch_warnings():  # at gimbal lock scipy still returns angles of the same rotation
        warnings.filterwarnings("ignore", "Gimbal lock detected")
        angles = Rotation.from_matrix(flat).as_euler(EULER_ORDER, degrees=True)
    return angles.reshape(*rotations.shape[:-2], 3)


def placement(rotations, rest_joints, root_translation, parents=skeleton.PARENTS) -> np.ndarray:
    """The world shift [3] metres that the exports (this BVH, sabr_jax.body.gltf) add to every
    point after WORLD_FROM_CAMERA: world = WORLD_FROM_CAMERA @ camera point + shift. It puts frame
    0's root (joint 0, at rest_joints[0] + root_translation[0]) at x = z = 0 and frame 0's lowest
    joint at y = 0 (the climber starts on the floor); the camera's centre lands at the shift.

    rotations [T, J, 3, 3], rest_joints [J, 3], root_translation [T, 3]: as `write` (T = 0: zeros).
    """
    if len(rotations) == 0:
        return np.zeros(3)
    rotations = np.asarray(rotations, np.float64)[0]
    rest = np.asarray(rest_joints, np.float64)
    world_rot, joints = [rotations[0]], [rest[0]]
    for k in range(1, len(parents)):  # frame 0's forward kinematics, camera frame, untranslated
        p = parents[k]
        joints.append(joints[p] + world_rot[p] @ (rest[k] - rest[p]))
        world_rot.append(world_rot[p] @ rotations[k])
    world = (np.stack(joints) + np.asarray(root_translation, np.float64)[0]) @ WORLD_FROM_CAMERA.T
    return -np.array([world[0, 0], world[:, 1].min(), world[0, 2]])


def _hierarchy(offsets: np.ndarray, names, parents) -> tuple[list[str], list[int]]:
    """(the HIERARCHY lines, the joints in the order they list them): depth first from the root
    (joint 0), children in index order, End Sites for the leaves. offsets [J, 3] file units."""
    children = {k: [c for c, p in enumerate(parents) if p == k] for k in range(len(parents))}
    lines, order = ["HIERARCHY"], []

    def joint(k: int, depth: int) -> None:
        order.append(k)
        pad = "  " * depth
        x, y, z = offsets[k]
        kind, channels = ("ROOT", "6 Xposition Yposition Zposition") if k == 0 else ("JOINT", "3")
        lines.extend([f"{pad}{kind} {names[k]}", f"{pad}{{", f"{pad}  OFFSET {x:.6f} {y:.6f} {z:.6f}"])
        lines.append(f"{pad}  CHANNELS {channels} Zrotation Xrotation Yrotation")
        for c in children[k]:
            joint(c, depth + 1)
        if not children[k]:  # the leaf's tip: half its bone again, in the bone's direction
            x, y, z = offsets[k] / 2
            lines.extend([f"{pad}  End Site", f"{pad}  {{", f"{pad}    OFFSET {x:.6f} {y:.6f} {z:.6f}", f"{pad}  }}"])
        lines.append(f"{pad}}}")

    joint(0, 0)
    return lines, order


def write(
    path: str | os.PathLike,
    rotations,
    rest_joints,
    root_translation,
    fps: float,
    names=skeleton.JOINT_NAMES,
    parents=skeleton.PARENTS,
    scale: float = 1.0,
    world_shift=None,
) -> None:
    """Write a BVH file of the motion.

    rotations [T, J, 3, 3]: local joint rotations (index 0 = global orient, in our camera
    frame); rest_joints [J, 3] metres: the rest pose (the SMPL model's joints for the mean
    shape, or sabr_jax.body.skeleton.REST_JOINTS); root_translation [T, 3] metres: the body's
    translation in our camera frame (SMPL's transl, e.g. crop_to_full's cam_t; zeros keep the
    pelvis at its rest position), so the pelvis is at rest_joints[0] + root_translation;
    fps: frames per second (Frame Time = 1 / fps); names, parents: the joints (each parent
    before its children, joint 0 the root); scale: file units per metre; world_shift [3] metres:
    added to the root's world position (default `placement(...)`; zeros keep the camera at the
    origin).
    """
    rotations = np.asarray(rotations, np.float64)
    rest = np.asarray(rest_joints, np.float64)
    translation = np.asarray(root_translation, np.float64)
    parents = list(parents)
    n_frames, n_joints = rotations.shape[:2]
    if rotations.shape[2:] != (3, 3) or rest.shape != (n_joints, 3) or translation.shape != (n_frames, 3):
        raise ValueError(
            f"bvh.write: expected rotations [T, J, 3, 3], rest_joints [J, 3], root_translation [T, 3]; got "
            f"{rotations.shape}, {rest.shape}, {translation.shape}"
        )
    if (
        len(names) != n_joints
        or len(parents) != n_joints
        or parents[0] != -1
        or any(not 0 <= p < k for k, p in enumerate(parents) if k)
    ):
        raise ValueError(f"bvh.write: {n_joints} joints need as many names and parents, root 0, parents first")
    offsets = scale * (rest - rest[[max(p, 0) for p in parents]])  # the root's: 0
    lines, order = _hierarchy(offsets, names, parents)
    world_rotations = rotations.copy()
    world_rotations[:, 0] = WORLD_FROM_CAMERA @ rotations[:, 0]
    angles = _euler_degrees(world_rotations[:, order])  # [T, J, 3] as (z, x, y), the channel order
    shift = placement(rotations, rest, translation, parents) if world_shift is None else np.asarray(world_shift)
    position = scale * ((rest[0] + translation) @ WORLD_FROM_CAMERA.T + shift)
    values = np.concatenate([position, angles.reshape(n_frames, -1)], axis=1)
    lines += ["MOTION", f"Frames: {n_frames}", f"Frame Time: {1 / fps:.8f}"]
    lines += [" ".join(f"{v:.6f}" for v in row) for row in values]
    with open(path, "w") as file:
        file.write("\n".join(lines) + "\n")
