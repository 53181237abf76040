"""PHALP / 4D-Humans tracks: safe loading, choosing the climber's track, motion vectors.

File format (what PHALP and 4D-Humans write with `joblib.dump(results, path, compress=3)`):
a dict keyed by frame name; per frame a dict of lists over the people listed in that frame:

    tid           track ids of the listed people (detected ones and predicted "ghosts")
    tracked_ids   the ids actually detected in this frame (optional; default: all of tid)
    bbox          [x0, y0, w, h] in pixels
    smpl          {"global_orient": (1, 3, 3), "body_pose": (23, 3, 3), "betas": (10,)}
    camera_bbox   [s, tx, ty] weak-perspective camera of the person crop
    size          [H, W] of the image the tracker saw (optional; default: the video's size)

Other keys (camera, conf, 2d/3d joints, masks, ...) are ignored.

Rules:

* Frame order: frame names sorted naturally (runs of digits compare as numbers, so
  "frame_9.jpg" < "frame_10.jpg"); the i-th name is the i-th decoded video frame.
* The climber's track is the track id *detected* (in `tracked_ids`) in the most frames;
  ties go to the smallest id. Ghost entries (listed in `tid`, not detected) neither count
  nor are used: a frame where the climber is not detected has no motion (`present` False,
  zeros); so has, for sabr-prepare, a frame whose values cannot be used (NaN, inf: BadValues). sabr-prepare keeps such frames in place, masked out of the loss (see
  sabr_jax.data.prepare.build), so that the video is not spliced in time.
  Never by list position: people are listed in any order.
* The motion vector of a frame (see sabr_jax.motion): bbox / [W, H, W, H], camera_bbox,
  (global_orient, body_pose) as 6D, betas.

Pickles are read by `load_tracks`, a restricted unpickler (sabr_jax.safe_pickle): only numpy
arrays, dtypes and scalars, joblib's array wrapper and plain builtin containers and values are
constructed.
Anything else (e.g. a `__reduce__` calling `os.system`) is refused before it runs.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping

import numpy as np

from sabr_jax import motion as M
from sabr_jax import safe_pickle
from sabr_jax.data import video as vid


class TrackError(ValueError):
    """Tracks that cannot be read or used; the message names the file, frame and field."""


class BadValues(TrackError):
    """A frame whose values cannot be used (non-finite, or matrices that are not rotations), in a file
    that is otherwise well-formed: `climber_motion(..., bad=...)` masks such frames."""


# ---------------------------------------------------------------- restricted unpickler
_ALLOWED = safe_pickle.PLAIN | {("joblib.numpy_pickle", "NumpyArrayWrapper")}


def _restricted_unpickler_class():
    from joblib.numpy_pickle import NumpyUnpickler

    class RestrictedUnpickler(NumpyUnpickler):
        """joblib's unpickler (array payloads inline) with sabr_jax.safe_pickle's allow-list `find_class`."""

        def find_class(self, module, name):
            return safe_pickle.find_class(module, name, _ALLOWED)

    return RestrictedUnpickler


def load_tracks(path: str | os.PathLike):
    """Load a PHALP/4D-Humans `.pkl` (joblib, compressed or not, or a plain pickle) safely.

    Raises TrackError naming the file when it is unreadable or tries to build anything
    but numpy arrays and plain values.
    """
    from joblib.numpy_pickle_utils import _validate_fileobject_and_memmap

    path = os.fspath(path)
    unpickler_cls = _restricted_unpickler_class()
    try:
        with open(path, "rb") as f, _validate_fileobject_and_memmap(f, path, None) as (fobj, _):
            if isinstance(fobj, str):
                raise TrackError(f"{path}: joblib < 0.10 pickles with side files are not supported")
            return unpickler_cls(path, fobj, ensure_native_byte_order=True).load()
    except TrackError:
        raise
    except pickle.UnpicklingError as e:
        raise TrackError(f"{path}: unsafe or invalid pickle: {e}") from None
    except Exception as e:  # EOFError, zlib.error, ValueError, ...
        raise TrackError(f"{path}: cannot read tracks ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------- selection and conversion
def check_frame_count(
    tracks_path, track_frames: int, video_path, video_frames: int, tolerance: int, verb: str = "decodes to"
) -> None:
    """TrackError unless the tracks' frame count is within `tolerance` of the video's (the i-th sorted
    frame name is the i-th video frame); verb says how the video's count is known ('declares')."""
    if abs(track_frames - video_frames) <= tolerance:
        return
    if track_frames > video_frames:
        what = f"tracks for {track_frames - video_frames} frames the video lacks"
    else:
        what = f"{video_frames - track_frames} video frames have no track entry"
    raise TrackError(
        f"{tracks_path} lists {track_frames} frames but {video_path} {verb} {video_frames} frames: {what} "
        f"(tolerance --frame_tolerance={tolerance}); the i-th sorted frame name must be the i-th video frame"
    )


def frame_names(tracks: Mapping, path: str = "tracks.pkl") -> list:
    if not isinstance(tracks, Mapping):
        raise TrackError(f"{path}: expected a dict keyed by frame name, got {type(tracks).__name__}")
    if not tracks:
        raise TrackError(f"{path}: no frames")
    return sorted(tracks, key=vid.natural_key)


def _ids(frame: Mapping, field: str, path: str, name) -> list[int]:
    values = frame.get(field)
    if values is None:
        raise TrackError(f"{path}: frame {name!r}: missing field '{field}'")
    try:
        return [int(np.asarray(v).reshape(())) for v in values]
    except Exception:
        raise TrackError(f"{path}: frame {name!r}: field '{field}' is not a list of track ids") from None


def detections(tracks: Mapping, path: str = "tracks.pkl") -> tuple[list, dict[int, int]]:
    """(sorted frame names, {track id: number of frames where it is detected})."""
    names = frame_names(tracks, path)
    counts: dict[int, int] = {}
    for name in names:
        frame = tracks[name]
        if not isinstance(frame, Mapping):
            raise TrackError(f"{path}: frame {name!r}: expected a dict, got {type(frame).__name__}")
        listed = _ids(frame, "tid", path, name)
        detected = _ids(frame, "tracked_ids", path, name) if "tracked_ids" in frame else listed
        for tid in set(detected) & set(listed):
            counts[tid] = counts.get(tid, 0) + 1
    return names, counts


def choose_track(counts: Mapping[int, int]) -> int | None:
    """The climber: the id detected in the most frames; ties to the smallest id."""
    if not counts:
        return None
    return min(counts, key=lambda tid: (-counts[tid], tid))


def _entry(frame: Mapping, key: str, pos: int, path: str, name, tid: int):
    """frame[key][pos]: the track's entry of a per-frame list field."""
    values = frame.get(key)
    if values is None:
        raise TrackError(f"{path}: frame {name!r}, track {tid}: missing field '{key}'")
    try:
        return values[pos]
    except (IndexError, KeyError, TypeError):
        raise TrackError(
            f"{path}: frame {name!r}, track {tid}: field '{key}' has no entry {pos} (lists of unequal length)"
        ) from None


def _field(frame: Mapping, key: str, pos: int, path: str, name, tid: int, shape: tuple):
    return _array(_entry(frame, key, pos, path, name, tid), path, name, tid, key, shape)


def _array(value, path, name, tid, label, shape) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except Exception:
        raise TrackError(f"{path}: frame {name!r}, track {tid}: field '{label}' is not numeric") from None
    if arr.shape != shape:
        # tolerate a leading batch axis of 1 (e.g. betas (1, 10))
        if arr.shape == (1, *shape):
            arr = arr[0]
        else:
            raise TrackError(
                f"{path}: frame {name!r}, track {tid}: field '{label}' has shape {arr.shape}, expected {shape}"
            )
    if not np.all(np.isfinite(arr)):
        raise BadValues(f"{path}: frame {name!r}, track {tid}: field '{label}' has non-finite values (NaN or inf)")
    return arr


def motion_vector(frame: Mapping, tid: int, path: str, name, image_hw: tuple[int, int] | None) -> np.ndarray:
    """The 161-value motion vector of track `tid` in one frame (validated)."""
    pos = _ids(frame, "tid", path, name).index(tid)
    bbox = _field(frame, "bbox", pos, path, name, tid, (4,))
    camera = _field(frame, "camera_bbox", pos, path, name, tid, (3,))
    if "size" in frame:
        h, w = _field(frame, "size", pos, path, name, tid, (2,))
        problem = image_hw is not None and vid.orientation_mismatch((h, w), image_hw)
        if problem:
            raise TrackError(f"{path}: frame {name!r}, track {tid}: field 'size' {problem}")
    elif image_hw is not None:
        h, w = image_hw
    else:
        raise TrackError(f"{path}: frame {name!r}, track {tid}: missing field 'size' and no video size to fall back on")
    if h <= 0 or w <= 0:
        raise TrackError(f"{path}: frame {name!r}, track {tid}: field 'size' is not positive: {[h, w]}")
    smpl = _entry(frame, "smpl", pos, path, name, tid)
    if not isinstance(smpl, Mapping):
        raise TrackError(f"{path}: frame {name!r}, track {tid}: field 'smpl' is not a dict")
    parts = {}
    for key, shape in (("global_orient", (1, 3, 3)), ("body_pose", (23, 3, 3)), ("betas", (M.NUM_BETAS,))):
        if key not in smpl:
            raise TrackError(f"{path}: frame {name!r}, track {tid}: missing field 'smpl.{key}'")
        parts[key] = _array(smpl[key], path, name, tid, f"smpl.{key}", shape)
    rotations = np.concatenate([parts["global_orient"], parts["body_pose"]])  # [24, 3, 3]
    error = np.abs(np.swapaxes(rotations, -1, -2) @ rotations - np.eye(3)).max()
    if error > 1e-2:
        raise BadValues(
            f"{path}: frame {name!r}, track {tid}: 'smpl' holds matrices that are not rotations (|R^T R - I| = {error:.3g})"
        )
    rot6d = M.matrix_to_rot6d(rotations).reshape(-1)
    vector = np.concatenate([bbox / np.array([w, h, w, h]), camera, rot6d, parts["betas"]])
    assert vector.shape == (M.MOTION_DIM,)
    return vector.astype(np.float32)


def climber_motion(
    tracks: Mapping, path: str = "tracks.pkl", image_hw: tuple[int, int] | None = None, bad: dict | None = None
) -> tuple[int, list, np.ndarray, np.ndarray]:
    """(track id, sorted frame names, present [N] bool, motion [N, 161] float32).

    Frame i of the result is the i-th sorted frame name; `present[i]` is False where the
    climber is not detected (motion is zero there). Raises TrackError with the file, frame
    and field of the first problem. With `bad` (a dict), a detected frame whose values cannot
    be used (BadValues: NaN, inf, matrices that are not rotations) is not an error: it is
    treated as a frame where the tracker lost the climber (present False, zeros) and
    bad[i] gets the reason; other faults (a missing field, a wrong shape) still raise.
    """
    names, counts = detections(tracks, path)
    tid = choose_track(counts)
    if tid is None:
        raise TrackError(f"{path}: no track is detected in any of its {len(names)} frames")
    present = np.zeros(len(names), bool)
    vectors = np.zeros((len(names), M.MOTION_DIM), np.float32)
    for i, name in enumerate(names):
        frame = tracks[name]
        listed = _ids(frame, "tid", path, name)
        detected = _ids(frame, "tracked_ids", path, name) if "tracked_ids" in frame else listed
        if tid in detected and tid in listed:
            try:
                vectors[i] = motion_vector(frame, tid, path, name, image_hw)
            except BadValues as error:
                if bad is None:
                    raise
                bad[i] = str(error)
                continue
            present[i] = True
    return tid, names, present, vectors
