"""BVH export of the 24-joint skeleton's motion, for Blender and other animation tools.

Note: the BVH world is y up: world = (x, -y, -z) of our camera frame (x right, y DOWN, z away
from the camera; sabr_jax.camera), a half turn about x, so a climber stands upright, the
camera sits at the origin looking down -z, and the wall is at negative z. Lengths are in
metres times `scale` (1: metres, which Blender's importer reads at its default Scale 1.0
as true size; 100: centimetres). The ROOT (pelvis) has OFFSET 0 0 0, so its position
channels are its absolute position whichever way a reader combines the two. Every joint's
rotation channels are `Zrotation Xrotation Yrotation` in degrees: the local rotation is
Rz(z) Rx(x) Ry(y), and a joint's world transform is its parent's composed with
(translation by its OFFSET, its rotation), as in sabr_jax.skeleton.forward_kinematics.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from sabr_jax import skeleton

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
) -> None:
    """Write a BVH file of the motion.

    rotations [T, J, 3, 3]: local joint rotations (index 0 = global orient, in our camera
    frame); rest_joints [J, 3] metres: the rest pose (the SMPL model's joints for the mean
    shape, or sabr_jax.skeleton.REST_JOINTS); root_translation [T, 3] metres: the body's
    translation in our camera frame (SMPL's transl, e.g. crop_to_full's cam_t; zeros keep the
    pelvis at its rest position), so the pelvis is at rest_joints[0] + root_translation;
    fps: frames per second (Frame Time = 1 / fps); names, parents: the joints (each parent
    before its children, joint 0 the root); scale: file units per metre.
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
    position = scale * (rest[0] + translation) @ WORLD_FROM_CAMERA.T
    values = np.concatenate([position, angles.reshape(n_frames, -1)], axis=1)
    lines += ["MOTION", f"Frames: {n_frames}", f"Frame Time: {1 / fps:.8f}"]
    lines += [" ".join(f"{v:.6f}" for v in row) for row in values]
    with open(path, "w") as file:
        file.write("\n".join(lines) + "\n")
