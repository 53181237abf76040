"""The built-in 24-joint body: SMPL's joint order and kinematic tree, a rest pose, forward kinematics.

Note: the rest joints are our own plausible values for a ~1.7 m adult (close to SMPL's
neutral template with zero betas), not read from any SMPL file. Units are metres, in
SMPL's canonical frame: y up, z forward out of the body's front, x towards the body's left.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

JOINT_NAMES: tuple[str, ...] = (
    "pelvis", "L_hip", "R_hip", "spine1", "L_knee", "R_knee", "spine2", "L_ankle",
    "R_ankle", "spine3", "L_foot", "R_foot", "neck", "L_collar", "R_collar", "head",
    "L_shoulder", "R_shoulder", "L_elbow", "R_elbow", "L_wrist", "R_wrist", "L_hand", "R_hand",
)  # fmt: skip
PARENTS: tuple[int, ...] = (-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 20, 21)
NUM_JOINTS = len(JOINT_NAMES)
END_EFFECTORS: dict[str, int] = {"left_hand": 22, "right_hand": 23, "left_foot": 10, "right_foot": 11}
# joint k's mirror image: the same joint on the other side (L_ <-> R_), the centre joints themselves
MIRRORED: tuple[int, ...] = tuple(
    JOINT_NAMES.index({"L_": "R_", "R_": "L_"}.get(name[:2], name[:2]) + name[2:]) for name in JOINT_NAMES
)

# One side's joints (x >= 0, the body's left); the right side mirrors x.
_LEFT = {
    "hip": (0.070, -0.090, 0.000),
    "knee": (0.105, -0.460, -0.010),
    "ankle": (0.090, -0.860, -0.050),
    "foot": (0.115, -0.920, 0.070),
    "collar": (0.075, 0.420, -0.030),
    "shoulder": (0.190, 0.460, -0.040),
    "elbow": (0.450, 0.445, -0.070),
    "wrist": (0.720, 0.450, -0.070),
    "hand": (0.800, 0.445, -0.085),
}
_CENTRE = {
    "pelvis": (0.0, 0.0, 0.0),
    "spine1": (0.0, 0.120, -0.015),
    "spine2": (0.0, 0.250, 0.000),
    "spine3": (0.0, 0.300, 0.000),
    "neck": (0.0, 0.510, -0.030),
    "head": (0.0, 0.570, 0.030),
}


def _rest_joints() -> np.ndarray:
    """[24, 3] float32 metres from the tables above, in JOINT_NAMES order."""
    rows = []
    for name in JOINT_NAMES:
        if name in _CENTRE:
            rows.append(_CENTRE[name])
        else:
            x, y, z = _LEFT[name[2:].lower()]
            rows.append((x if name.startswith("L_") else -x, y, z))
    return np.asarray(rows, np.float32)


REST_JOINTS: np.ndarray = _rest_joints()  # [24, 3] metres, pelvis at the origin


def forward_kinematics(rotations, rest_joints=REST_JOINTS) -> jnp.ndarray:
    """Posed joint positions, exactly as SMPL with zero betas and zero translation.

    rotations [..., 24, 3, 3]: local joint rotations (index 0 = global orient);
    rest_joints [24, 3] metres. Joint k's world transform is its parent's composed with
    (rotations[k], rest offset from the parent); joint 0 stays at rest_joints[0].
    Returns [..., 24, 3] metres. Pure jax.numpy (jit/grad/vmap-able); accepts numpy input.
    """
    rotations = jnp.asarray(rotations)
    rest = jnp.asarray(rest_joints, rotations.dtype)
    world_rot = [rotations[..., 0, :, :]]
    world_pos = [jnp.broadcast_to(rest[0], rotations.shape[:-3] + (3,))]
    for k in range(1, NUM_JOINTS):
        p = PARENTS[k]
        offset = rest[k] - rest[p]
        world_pos.append(world_pos[p] + jnp.einsum("...ij,j->...i", world_rot[p], offset))
        world_rot.append(world_rot[p] @ rotations[..., k, :, :])
    return jnp.stack(world_pos, axis=-2)
