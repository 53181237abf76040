"""The per-clip intermediate of `sabr-prepare`: one folder per finished source clip.

`sabr-prepare` first turns each user clip into a *prepared clip* (motion vectors and
DINOv2 tokens), then writes the TFDS dataset from the prepared clips. A prepared clip is
a folder `DATA_DIR/prepared/<clip_id>/`, created under a temporary name and renamed into
place only when complete (an atomic rename on one file system), so a folder that exists is
finished and a rerun skips it:

    meta.json        everything below the arrays: frame counts, dtype, patch grid, settings
    motion.npy       [F, 161] float32 motion vectors (unnormalised), one per kept 24-FPS frame;
                     zeros where the climber is not tracked
    motion_mask.npy  [F] bool: True where the tracker has the climber (the frame's motion is
                     known); False frames keep their place and video tokens, and are left out
                     of the loss and the normalisation statistics
    video.bin        [F, P, Dv] raw tokens in `meta["dtype"]` (bfloat16 or float32), C order
    context.bin      [C, P, Dv] raw tokens of the route frames

The F frames are consecutive 24-FPS frames (from the first to the last frame where the
climber is tracked): video and motion stay aligned in time. FORMAT numbers this layout
(in meta.json and in the settings fingerprint, so that clips of an older format are
prepared again; format 1 dropped the untracked frames, splicing the video in time).

Tokens are raw binary (not .npy) so that they can be written batch by batch as the video
decodes, without holding a 45-s clip in memory, and read back memory-mapped.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import ml_dtypes
import numpy as np

FORMAT = 2
META = "meta.json"
FAILED_DIR = "_failed"  # DATA_DIR/prepared/_failed/<clip_id>.json: why a clip was skipped
TMP_PREFIX = ".tmp-"

DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}


def dtype_of(name: str) -> np.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"precision must be one of {sorted(DTYPES)}, got {name!r}") from None


class PreparedClip:
    """Read access to one finished prepared clip folder."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with open(self.path / META) as f:
            self.meta = json.load(f)
        self.clip_id: str = self.meta["clip_id"]
        self.num_frames: int = self.meta["num_frames"]
        self.num_context: int = self.meta["num_context"]
        self.num_patches: int = self.meta["num_patches"]
        self.video_dim: int = self.meta["video_dim"]
        self.dtype = dtype_of(self.meta["dtype"])

    def motion(self) -> np.ndarray:
        """[F, 161] float32, unnormalised; zeros on untracked frames."""
        return np.load(self.path / "motion.npy")

    def motion_mask(self) -> np.ndarray:
        """[F] bool: True where the climber is tracked."""
        return np.load(self.path / "motion_mask.npy")

    def _tokens(self, name: str, count: int) -> np.ndarray:
        shape = (count, self.num_patches, self.video_dim)
        if count == 0:
            return np.zeros(shape, self.dtype)
        return np.memmap(self.path / name, dtype=self.dtype, mode="r", shape=shape)

    def video(self) -> np.ndarray:
        return self._tokens("video.bin", self.num_frames)

    def context(self) -> np.ndarray:
        return self._tokens("context.bin", self.num_context)


class ClipWriter:
    """Writes one prepared clip into a temporary folder; `commit` renames it into place."""

    def __init__(self, prepared_dir: str | os.PathLike, clip_id: str, dtype: np.dtype):
        self.final = Path(prepared_dir) / clip_id
        self.tmp = Path(prepared_dir) / f"{TMP_PREFIX}{clip_id}-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir(parents=True)
        self.dtype = dtype
        self._files = {name: open(self.tmp / name, "wb") for name in ("video.bin", "context.bin")}
        self.counts = {"video.bin": 0, "context.bin": 0}
        self.token_shape: tuple[int, int] | None = None

    def append(self, name: str, tokens: np.ndarray) -> None:
        """Append [n, P, Dv] tokens to 'video.bin' or 'context.bin'."""
        if self.token_shape is None:
            self.token_shape = tuple(tokens.shape[1:])
        elif tuple(tokens.shape[1:]) != self.token_shape:
            raise AssertionError(f"token shape changed within a clip: {tokens.shape[1:]} != {self.token_shape}")
        self._files[name].write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self.counts[name] += len(tokens)

    def commit(self, motion: np.ndarray, meta: dict, motion_mask: np.ndarray | None = None) -> Path:
        """Write motion [F, 161], motion_mask [F] bool (None: every frame tracked) and meta (plus
        FORMAT); rename the folder into place."""
        for f in self._files.values():
            f.close()
        if motion_mask is None:
            motion_mask = np.ones(len(motion), bool)
        if not self.counts["video.bin"] == len(motion) == len(motion_mask):
            raise AssertionError(
                f"{self.counts['video.bin']} token frames for {len(motion)} motion frames, {len(motion_mask)} mask values"
            )
        np.save(self.tmp / "motion.npy", np.asarray(motion, np.float32))
        np.save(self.tmp / "motion_mask.npy", np.asarray(motion_mask, bool))
        meta = {"format": FORMAT, **meta}
        with open(self.tmp / META, "w") as f:
            json.dump(meta, f, indent=1)
        if self.final.exists():  # a stale result (other settings): replace it
            shutil.rmtree(self.final)
        os.replace(self.tmp, self.final)
        return self.final

    def abort(self) -> None:
        for f in self._files.values():
            f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)
