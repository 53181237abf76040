"""The paper's two evaluation metrics, one video at a time, in numpy.

**Movement adherence** (`movement_mse`): the mean squared error between a sampled and
the true motion over the video's motion frames, averaged over the 161 values of a frame.
The paper reports it on the raw 161-value vectors (sabr_jax.motion); we also report it in
normalised units (per-feature NormStats of the training set), where 1.0 is what
predicting the training mean scores on data like the training set's.

**Route trajectory adherence** (`route_adherence`): the fraction of the route's holds
that the climber touches. A hold is *touched* when one of the four end effectors (both
hands and both feet, `sabr_jax.body.skeleton.END_EFFECTORS`), projected to pixels, lies
within `radius_scale * r` of the hold's centre (both in the frame's pixels, see `view`
below) in at least `min_frames` frames in total (not necessarily consecutive).
Defaults: radius_scale = 2.0, min_frames = 3. The same rule counts the distractor holds
(holds not on the route) that the climber touches: fewer is better.

The joint pixels come from a callable (vectors [T, 161] raw, image_hw) -> [T, 24, 2];
the default is `sabr_jax.body.camera.joint_pixels` (jitted; forward kinematics of the built-in
skeleton, then the tracker's weak-perspective camera inside the bounding box). A SMPL
body model can be passed in its place.

## Annotating a clip: holds.json

Each clip folder may hold a `holds.json` (sabr-prepare stores it with the clip):

    {
      "image_size": [H, W],                  # the size of the image the pixels below refer to
      "route":       [[x, y, r], ...],       # the route's holds: centre and radius, pixels
      "distractors": [[x, y, r], ...],       # other holds on the wall (may be empty)
      "view":        [[s, dx, dy], ...]      # optional, one per 24-FPS frame
    }

x is the column and y the row, from the top-left corner of the image, in pixels of an
`image_size` frame: the video's own size, or any size of the same aspect ratio (the
motion's bbox is stored as a fraction of the frame, so it scales to any size). Without
`view` the camera is static and the hold coordinates are the frame's pixels. With
`view`, the holds are given in one reference image of the wall (e.g. the first frame, or
a panorama) and frame t shows hold (x, y, r) at pixel s_t * (x, y) + (dx_t, dy_t) with
radius s_t * r: `view` must then list every 24-FPS frame of the clip (the frames
sabr-prepare keeps).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import numpy as np

from sabr_jax.body import camera, skeleton
from sabr_jax.errors import UserError
from sabr_jax.motion import MOTION_DIM, NormStats

RADIUS_SCALE = 2.0
MIN_FRAMES = 3

# (vectors [T, 161] raw, image_hw (H, W)) -> joint pixels [T, 24, 2] (x, y)
JointPixels = Callable[[np.ndarray, tuple[int, int]], np.ndarray]


def movement_mse(pred: np.ndarray, truth: np.ndarray, stats: NormStats | None = None) -> float:
    """MSE between motions pred and truth [T, 161] (raw vectors, motion frames only).

    With `stats` both are normalised first (normalised units); without, raw units.
    """
    pred, truth = np.asarray(pred, np.float64), np.asarray(truth, np.float64)
    if pred.shape != truth.shape or pred.ndim != 2 or pred.shape[1] != MOTION_DIM or not len(pred):
        raise ValueError(
            f"movement_mse: expected two motions [T, {MOTION_DIM}] of the same T > 0, got {pred.shape} and {truth.shape}"
        )
    if stats is not None:
        pred, truth = stats.normalize(pred), stats.normalize(truth)
    return float(np.mean(np.square(pred - truth)))


@dataclasses.dataclass(frozen=True)
class Holds:
    """A clip's hold annotation (see the module docstring); all values in pixels."""

    image_size: tuple[int, int]  # (H, W)
    route: np.ndarray  # [R, 3] x, y, r
    distractors: np.ndarray  # [D, 3] x, y, r
    view: np.ndarray | None = None  # [N, 3] s, dx, dy per 24-FPS frame; None: static camera
    where: str = "holds.json"  # where it came from, for error messages

    @classmethod
    def from_json(cls, data: dict, where: str = "holds.json") -> Holds:
        """Parse and check a holds.json dict; UserError, naming `where` and the field, if it is invalid."""
        if not isinstance(data, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(data).__name__}")
        size = data.get("image_size")
        if not (
            isinstance(size, (list, tuple))
            and len(size) == 2
            and all(isinstance(v, (int, float)) and v > 0 for v in size)
        ):
            raise UserError(
                f"{where}: field 'image_size' must be [H, W] in pixels (the size of the image the holds' pixels refer to), got {size!r}"
            )
        route = _rows(data.get("route"), 3, where, "route", "[[x, y, r], ...]")
        distractors = _rows(data.get("distractors", []), 3, where, "distractors", "[[x, y, r], ...]")
        view = (
            None
            if data.get("view") is None
            else _rows(data["view"], 3, where, "view", "[[s, dx, dy], ...] per 24-FPS frame")
        )
        for name, holds in (("route", route), ("distractors", distractors)):
            if (holds[:, 2] <= 0).any():
                raise UserError(f"{where}: field '{name}': every radius r must be > 0")
        if view is not None and (view[:, 0] <= 0).any():
            raise UserError(f"{where}: field 'view': every scale s must be > 0")
        return cls((int(size[0]), int(size[1])), route, distractors, view, where)

    def in_frames(self, holds: np.ndarray, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """holds [K, 3] seen in 24-FPS frames [T] -> (centres [T, K, 2], radii [T, K]) in pixels."""
        frames = np.asarray(frames)
        if self.view is None:
            return np.broadcast_to(holds[None, :, :2], (len(frames), len(holds), 2)), np.broadcast_to(
                holds[None, :, 2], (len(frames), len(holds))
            )
        if len(frames) and (frames.min() < 0 or frames.max() >= len(self.view)):
            raise UserError(
                f"{self.where}: field 'view' lists {len(self.view)} frames, but frames {frames.min()}..{frames.max()} are evaluated"
            )
        s, shift = self.view[frames, :1], self.view[frames, 1:]  # [T, 1], [T, 2]
        return s[:, None] * holds[None, :, :2] + shift[:, None], s * holds[None, :, 2]


def mirror_holds(data: dict) -> dict:
    """A holds.json dict (see the module docstring) of the left-right mirror image of the clip:
    x -> W - x for every hold, and with `view`, dx -> W (1 - s) - dx, so that frame t shows the
    mirrored hold at W - (its pixel in the original). Mirroring twice gives the dict back."""
    width = data["image_size"][1]
    out = dict(data)
    for field in ("route", "distractors"):
        out[field] = [[width - x, y, r] for x, y, r in data.get(field, [])]
    if data.get("view") is not None:
        out["view"] = [[s, width * (1 - s) - dx, dy] for s, dx, dy in data["view"]]
    return out


def _rows(value, width: int, where: str, field: str, expected: str) -> np.ndarray:
    if value is None:
        raise UserError(f"{where}: missing field '{field}' (expected {expected})")
    try:
        rows = np.asarray(value, np.float64)
    except (TypeError, ValueError):
        raise UserError(f"{where}: field '{field}' must be {expected}, got {value!r:.80}") from None
    if rows.size == 0:
        rows = np.zeros((0, width))
    if rows.ndim != 2 or rows.shape[1] != width or not np.isfinite(rows).all():
        raise UserError(f"{where}: field '{field}' must be {expected} of finite numbers, got shape {rows.shape}")
    return rows


@functools.partial(jax.jit, static_argnums=1)
def _jitted_joint_pixels(vectors, image_hw):
    return camera.joint_pixels(vectors, image_hw)


def default_joint_pixels(vectors: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """camera.joint_pixels of raw vectors [T, 161] -> [T, 24, 2] pixels, jitted; T is padded
    (repeating the last frame) to a power of two, so that clips of any length share few compiles."""
    size = max(16, 1 << (len(vectors) - 1).bit_length())
    padded = np.concatenate([vectors, np.repeat(vectors[-1:], size - len(vectors), axis=0)])
    return np.asarray(_jitted_joint_pixels(padded, tuple(int(v) for v in image_hw)))[: len(vectors)]


def touched(
    effectors: np.ndarray,
    centres: np.ndarray,
    radii: np.ndarray,
    *,
    radius_scale: float = RADIUS_SCALE,
    min_frames: int = MIN_FRAMES,
) -> np.ndarray:
    """Which holds are touched: bool [K].

    effectors [T, E, 2] end-effector pixels; centres [T, K, 2] and radii [T, K] the holds
    in the same frames. Hold k is touched when some effector lies within radius_scale *
    radius of its centre in at least min_frames of the T frames.
    """
    distance = np.linalg.norm(effectors[:, :, None] - centres[:, None], axis=-1)  # [T, E, K]
    near = (distance <= radius_scale * radii[:, None]).any(axis=1)  # [T, K]
    return near.sum(axis=0) >= min_frames


def route_adherence(
    vectors: np.ndarray,
    holds: Holds,
    frames: np.ndarray | None = None,
    *,
    radius_scale: float = RADIUS_SCALE,
    min_frames: int = MIN_FRAMES,
    joint_pixels: JointPixels | None = None,
) -> dict:
    """Route trajectory adherence of one motion.

    vectors [T, 161] raw motion (motion frames only); frames [T] their 24-FPS frame
    indices into holds.view (default 0..T-1; unused for a static camera). Returns
    {"route_adherence": touched route holds / route holds (None when the route is empty),
     "route_touched": int, "route_holds": int, "distractors_touched": int,
     "distractor_holds": int}.
    """
    joint_pixels = default_joint_pixels if joint_pixels is None else joint_pixels
    vectors = np.asarray(vectors, np.float32)
    frames = np.arange(len(vectors)) if frames is None else np.asarray(frames)
    if frames.shape != (len(vectors),):
        raise ValueError(f"route_adherence: {len(vectors)} motion frames but frame indices of shape {frames.shape}")
    pixels = np.asarray(joint_pixels(vectors, holds.image_size), np.float64)  # [T, 24, 2]
    effectors = pixels[:, list(skeleton.END_EFFECTORS.values())]
    counts = {}
    for name, hold_rows in (("route", holds.route), ("distractors", holds.distractors)):
        centres, radii = holds.in_frames(hold_rows, frames)
        counts[name] = int(touched(effectors, centres, radii, radius_scale=radius_scale, min_frames=min_frames).sum())
    route = len(holds.route)
    return {
        "route_adherence": counts["route"] / route if route else None,
        "route_touched": counts["route"],
        "route_holds": route,
        "distractors_touched": counts["distractors"],
        "distractor_holds": len(holds.distractors),
    }


def paired_difference(a, b, *, resamples: int = 10_000, seed: int = 0, level: float = 0.95) -> dict | None:
    """The mean over videos of a_i - b_i (two rows' per-video scores, paired by video; pairs where
    either is None are left out) and its bootstrap interval: the (1 - level) / 2 and (1 + level) / 2
    quantiles of the mean over `resamples` resamplings of the videos with replacement (seeded).
    -> {"mean", "low", "high", "videos"}, or None when no pair is complete."""
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    if not pairs:
        return None
    d = np.array([x - y for x, y in pairs], np.float64)
    picks = np.random.default_rng(seed).integers(0, len(d), (resamples, len(d)))
    means = d[picks].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"mean": float(d.mean()), "low": float(low), "high": float(high), "videos": len(d)}
