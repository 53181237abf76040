"""The per-frame motion vector, its token slots, rotation converters and normalisation.

One frame of motion is 161 values, in the order of the authors' code:

    [0:4]     bbox [x0, y0, w, h] divided by the image size [W, H, W, H]   (unitless)
    [4:7]     weak-perspective camera [s, tx, ty] (the tracker's `camera_bbox`)
    [7:151]   24 rotations (global orient + 23 body joints), 6D each: the first two
              columns of the 3x3 matrix, column-major (col0 then col1)
    [151:161] SMPL betas (10)

For `layout="slots"` the vector is split into 27 token slots (bbox, camera, 24 joints,
betas), each zero-padded to `SLOT_WIDTH` values. `pack` and `unpack` are exact inverses.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

NUM_JOINTS = 24
NUM_BETAS = 10
BBOX = slice(0, 4)
CAMERA = slice(4, 7)
ROTATIONS = slice(7, 7 + 6 * NUM_JOINTS)
BETAS = slice(7 + 6 * NUM_JOINTS, 7 + 6 * NUM_JOINTS + NUM_BETAS)
MOTION_DIM = BETAS.stop  # 161
Array = jax.Array | np.ndarray

# (name, width) of each token slot, in vector order.
SLOTS: tuple[tuple[str, int], ...] = (
    ("bbox", 4),
    ("camera", 3),
    *((f"joint{j:02d}", 6) for j in range(NUM_JOINTS)),
    ("betas", NUM_BETAS),
)
NUM_SLOTS = len(SLOTS)  # 27
SLOT_WIDTH = max(width for _, width in SLOTS)  # 10


def _pack_index() -> np.ndarray:
    """[NUM_SLOTS, SLOT_WIDTH] indices into the vector; MOTION_DIM marks a zero pad."""
    index = np.full((NUM_SLOTS, SLOT_WIDTH), MOTION_DIM, dtype=np.int32)
    start = 0
    for s, (_, width) in enumerate(SLOTS):
        index[s, :width] = np.arange(start, start + width)
        start += width
    assert start == MOTION_DIM
    return index


_PACK_INDEX = _pack_index()
_UNPACK_INDEX = np.flatnonzero(_PACK_INDEX.reshape(-1) < MOTION_DIM)  # [161] into the flat slots
SLOT_VALID = _PACK_INDEX < MOTION_DIM  # [NUM_SLOTS, SLOT_WIDTH] bool


def pack(motion: jnp.ndarray) -> jnp.ndarray:
    """[..., 161] -> [..., 27, 10] slots, zero-padded."""
    padded = jnp.concatenate([motion, jnp.zeros_like(motion[..., :1])], axis=-1)
    return padded[..., _PACK_INDEX]


def unpack(slots: jnp.ndarray) -> jnp.ndarray:
    """[..., 27, 10] slots -> [..., 161]; the pad positions are ignored."""
    flat = slots.reshape(*slots.shape[:-2], NUM_SLOTS * SLOT_WIDTH)
    return flat[..., _UNPACK_INDEX]


# ---------------------------------------------------------------- rotations
# The converters run on numpy arrays with numpy (data preparation: no per-shape compiles)
# and on JAX arrays, traced or not, with jax.numpy.
def _xp(x):
    return jnp if isinstance(x, jax.Array) else np


def rot6d_to_matrix(r6: Array) -> Array:
    """[..., 6] (col0, col1) -> [..., 3, 3] rotation by Gram-Schmidt."""
    xp = _xp(r6)
    a1, a2 = r6[..., 0:3], r6[..., 3:6]
    b1 = a1 / xp.linalg.norm(a1, axis=-1, keepdims=True)
    a2 = a2 - xp.sum(b1 * a2, axis=-1, keepdims=True) * b1
    b2 = a2 / xp.linalg.norm(a2, axis=-1, keepdims=True)
    b3 = xp.cross(b1, b2)
    return xp.stack([b1, b2, b3], axis=-1)  # columns


def matrix_to_rot6d(m: Array) -> Array:
    """[..., 3, 3] -> [..., 6]: the first two columns, column-major."""
    xp = _xp(m)
    return xp.concatenate([m[..., :, 0], m[..., :, 1]], axis=-1)


def axis_angle_to_matrix(aa: Array) -> Array:
    """[..., 3] axis * angle (radians) -> [..., 3, 3] by Rodrigues' formula."""
    xp = _xp(aa)
    angle = xp.linalg.norm(aa, axis=-1, keepdims=True)[..., None]  # [..., 1, 1]
    small = angle < 1e-8
    k = _skew(aa / xp.where(small, 1.0, angle)[..., 0])
    eye = xp.eye(3, dtype=aa.dtype)
    rot = eye + xp.sin(angle) * k + (1.0 - xp.cos(angle)) * (k @ k)
    return xp.where(small, eye + _skew(aa), rot)


def _skew(v: Array) -> Array:
    """[..., 3] -> [..., 3, 3] cross-product matrix (first-order rotation near zero)."""
    xp = _xp(v)
    x, y, z = v[..., 0], v[..., 1], v[..., 2]
    zero = xp.zeros_like(x)
    return xp.stack([xp.stack([zero, -z, y], -1), xp.stack([z, zero, -x], -1), xp.stack([-y, x, zero], -1)], axis=-2)


def matrix_to_axis_angle(m: Array) -> Array:
    """[..., 3, 3] rotation -> [..., 3] axis * angle, angle in [0, pi], via a unit quaternion."""
    xp = _xp(m)
    q = _matrix_to_quaternion(m)  # [..., 4] (w, x, y, z), w >= 0
    w, xyz = q[..., :1], q[..., 1:]
    sin_half = xp.linalg.norm(xyz, axis=-1, keepdims=True)
    angle = 2.0 * xp.arctan2(sin_half, w)
    small = sin_half < 1e-8
    scale = xp.where(small, 2.0 / xp.maximum(w, 1e-8), angle / xp.where(small, 1.0, sin_half))
    return xyz * scale


def _matrix_to_quaternion(m: Array) -> Array:
    """[..., 3, 3] -> [..., 4] unit quaternion (w, x, y, z) with w >= 0.

    Computes all four candidate forms and keeps the best-conditioned one (largest
    diagonal term), which is exact to float precision for every rotation.
    """
    xp = _xp(m)
    m00, m11, m22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
    m01, m02, m10, m12, m20, m21 = m[..., 0, 1], m[..., 0, 2], m[..., 1, 0], m[..., 1, 2], m[..., 2, 0], m[..., 2, 1]
    candidates = xp.stack(
        [
            xp.stack([1 + m00 + m11 + m22, m21 - m12, m02 - m20, m10 - m01], -1),
            xp.stack([m21 - m12, 1 + m00 - m11 - m22, m01 + m10, m02 + m20], -1),
            xp.stack([m02 - m20, m01 + m10, 1 - m00 + m11 - m22, m12 + m21], -1),
            xp.stack([m10 - m01, m02 + m20, m12 + m21, 1 - m00 - m11 + m22], -1),
        ],
        axis=-2,
    )  # [..., 4 candidates, 4]; candidate i has 4 q_i^2 at component i
    diag = xp.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], -1)
    best = xp.argmax(diag, axis=-1)
    q = xp.take_along_axis(candidates, best[..., None, None], axis=-2)[..., 0, :]
    q = q / xp.linalg.norm(q, axis=-1, keepdims=True)
    return xp.where(q[..., :1] < 0, -q, q)


# ---------------------------------------------------------------- untracked frames
def fill_gaps(x: np.ndarray, known: np.ndarray) -> np.ndarray:
    """x [n, F] with its unknown frames (known [n] bool False) replaced by values made from
    its known ones (numpy; what the pipeline puts at frames where the tracker lost the climber).

    An unknown frame gets the linear interpolation in time between the nearest known frames
    before and after it, or the one known neighbour's value where only one side has one;
    zeros when no frame is known. Known frames are returned unchanged (bitwise), so a clip
    without gaps comes back as it went in.
    """
    known = np.asarray(known, bool)
    if known.all():
        return x
    if not known.any():
        return np.zeros_like(x)
    t = np.arange(len(x))
    k = np.flatnonzero(known)
    after = np.searchsorted(k, t)  # index into k of the first known frame >= t
    # the known frames around t (both the first known one before it, the last one after it)
    t0, t1 = k[np.clip(after - 1, 0, len(k) - 1)], k[np.clip(after, 0, len(k) - 1)]
    frac = np.where(t1 > t0, (t - t0) / np.maximum(t1 - t0, 1), 0.0)[:, None].astype(x.dtype)
    return np.where(known[:, None], x, (1 - frac) * x[t0] + frac * x[t1])


# ---------------------------------------------------------------- normalisation
@dataclasses.dataclass(frozen=True)
class NormStats:
    """Per-feature mean and standard deviation of the 161-value motion vector.

    Computed from the training data, saved with every checkpoint, applied on the way
    into the model and undone on the way out.
    """

    mean: np.ndarray  # [161] float32
    std: np.ndarray  # [161] float32, floored at `min_std`

    @classmethod
    def from_data(cls, motion: np.ndarray, mask: np.ndarray | None = None, min_std: float = 1e-3) -> NormStats:
        """motion [..., 161]; mask [...] bool selects the frames that count (default: all)."""
        flat = np.asarray(motion, np.float64).reshape(-1, MOTION_DIM)
        if mask is not None:
            flat = flat[np.asarray(mask).reshape(-1).astype(bool)]
        if flat.shape[0] == 0:
            raise ValueError("NormStats.from_data: no frames selected to compute statistics from")
        return cls(mean=flat.mean(0).astype(np.float32), std=np.maximum(flat.std(0), min_std).astype(np.float32))

    @classmethod
    def identity(cls) -> NormStats:
        return cls(np.zeros(MOTION_DIM, np.float32), np.ones(MOTION_DIM, np.float32))

    def normalize(self, motion):
        return (motion - self.mean) / self.std

    def denormalize(self, motion):
        return motion * self.std + self.mean

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> NormStats:
        mean, std = np.asarray(d["mean"], np.float32), np.asarray(d["std"], np.float32)
        if mean.shape != (MOTION_DIM,) or std.shape != (MOTION_DIM,):
            raise ValueError(
                f"NormStats: expected mean and std of shape ({MOTION_DIM},), got {mean.shape}, {std.shape}"
            )
        return cls(mean, std)
