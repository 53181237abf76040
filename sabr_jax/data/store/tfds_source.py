"""The prepared TFDS dataset as a `ClipSource` (see sabr_jax.data.pipeline).

    source, stats = open_tfds("DATA_DIR", "train")        # DATA_DIR as given to sabr-prepare
    check(cfg, source)                                    # shapes match the config?

`read(i, start, stop)` reads exactly the clip's context records and motion records
start..stop-1 (a contiguous record range, see sabr_jax.data.store.tfds_builder) through
`tfds.data_source` random access: a 48-frame window of a 45-s clip reads 48 frames'
tokens, not 1100. Tokens come back in their stored dtype (bfloat16 by default); motion
is float32, unnormalised, with `motion_mask` [n] bool False on frames where the tracker
lost the climber (their motion is zeros). A damaged ArrayRecord file (missing, not the size
written, unreadable: tfds_builder.damaged_files) is a one-line DatasetMismatchError naming it
and the fix (rerun sabr-prepare, which rebuilds it), when the split is opened. The source pickles without its open files (Grain workers
reopen them), so it works with any number of Grain worker processes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from absl import logging

from sabr_jax import config as config_lib
from sabr_jax.data.route_oracle import RouteOracle
from sabr_jax.data.store import tfds_builder
from sabr_jax.errors import UserError, one_line
from sabr_jax.motion import MOTION_DIM, NormStats

REBUILD = (
    "rerun sabr-prepare on the same clips with the same --data_dir: it rebuilds the dataset from its prepared clips"
)


class DatasetMismatchError(UserError):
    """The dataset's shapes do not match the config (or the file layout is broken)."""


def find_dataset(data_dir: str | os.PathLike) -> Path:
    """DATA_DIR (as given to sabr-prepare), DATA_DIR/sabr_clips or the version folder itself."""
    data_dir = Path(data_dir)
    for candidate in (data_dir, data_dir / tfds_builder.VERSION, data_dir / tfds_builder.NAME / tfds_builder.VERSION):
        if (candidate / tfds_builder.INDEX_FILE).is_file():
            return candidate
    raise FileNotFoundError(
        f"{data_dir}: no prepared SABR dataset ({tfds_builder.NAME}/{tfds_builder.VERSION}/{tfds_builder.INDEX_FILE}); "
        "make one with sabr-prepare CLIPS --data_dir DIR"
    )


class TfdsClips:
    """A ClipSource over one split of a prepared dataset."""

    def __init__(self, data_dir: str | os.PathLike, split: str = "train"):
        self.path = find_dataset(data_dir)
        try:
            self.index = json.loads((self.path / tfds_builder.INDEX_FILE).read_text())
        except ValueError as e:
            raise DatasetMismatchError(
                f"{self.path / tfds_builder.INDEX_FILE}: not valid JSON ({e}); rerun sabr-prepare"
            ) from None
        if self.index.get("format") != tfds_builder.INDEX_FORMAT:
            raise DatasetMismatchError(
                f"{self.path}: dataset format {self.index.get('format')}, this sabr_jax reads format {tfds_builder.INDEX_FORMAT} "
                "(format 2 keeps the frames where the tracker lost the climber, masked, instead of splicing them out); "
                "rebuild it: rerun sabr-prepare on the same clips with the same --data_dir (its clips are prepared again)"
            )
        splits = self.index["splits"]
        if split not in splits:
            raise UserError(
                f"{self.path}: no split {split!r} (has {sorted(splits)}; validation is empty when there are too few clips)"
            )
        damaged = tfds_builder.damaged_files(self.path, self.index, [split])
        if damaged:
            raise DatasetMismatchError(f"{damaged[0][0]}: damaged ({damaged[0][1]}); {REBUILD}")
        self.split = split
        self.clips: list[dict] = splits[split]
        self.num_patches: int = self.index["num_patches"]
        self.video_dim: int = self.index["video_dim"]
        self.precision: str = self.index["precision"]
        self._records = None

    # ClipSource
    def __len__(self) -> int:
        return len(self.clips)

    def num_frames(self, index: int) -> int:
        return self.clips[index]["num_frames"]

    def num_context(self, index: int) -> int:
        return self.clips[index]["num_context"]

    def clip_id(self, index: int) -> str:
        return self.clips[index]["clip_id"]

    def read(self, index: int, start: int, stop: int) -> dict[str, np.ndarray]:
        clip = self.clips[index]
        num_context, frames = clip["num_context"], clip["num_frames"]
        if not 0 <= start <= stop <= frames:
            raise IndexError(
                f"frames {start}:{stop} out of range for clip {index} ({clip['clip_id']}) of {frames} frames"
            )
        first = clip["first_record"]
        keys = list(range(first, first + num_context)) + list(
            range(first + num_context + start, first + num_context + stop)
        )
        try:
            records = self._source().__getitems__(keys) if keys else []
        except RuntimeError as error:  # ArrayRecord's read errors (a file damaged after the dataset was opened)
            raise DatasetMismatchError(
                f"{self.path}: split {self.split!r} cannot be read ({one_line(error)}); {REBUILD}"
            ) from None
        expected = [(1, c) for c in range(num_context)] + [(0, t) for t in range(start, stop)]
        for record, (is_context, frame) in zip(records, expected):
            if int(record["clip"]) != index or int(record["is_context"]) != is_context or int(record["frame"]) != frame:
                raise DatasetMismatchError(
                    f"{self.path}: record layout broken: clip {index} expected (context={is_context}, frame={frame}), "
                    f"found (clip={int(record['clip'])}, context={int(record['is_context'])}, frame={int(record['frame'])})"
                )
        dtype = records[0]["tokens"].dtype if records else np.float32
        tokens = (
            np.stack([r["tokens"] for r in records])
            if records
            else np.zeros((0, self.num_patches, self.video_dim), dtype)
        )
        motion = (
            np.stack([r["motion"] for r in records[num_context:]])
            if stop > start
            else np.zeros((0, MOTION_DIM), np.float32)
        )
        mask = np.array([int(r["tracked"]) for r in records[num_context:]], bool)
        return {
            "motion": motion.astype(np.float32, copy=False),
            "motion_mask": mask,
            "video": tokens[num_context:],
            "context": tokens[:num_context],
        }

    def stats(self) -> NormStats:
        return NormStats.from_dict(self.index["norm_stats"])

    # pickling for Grain workers: drop the open files
    def _source(self):
        if self._records is None:
            import tensorflow_datasets as tfds

            self._records = tfds.builder_from_directory(os.fspath(self.path)).as_data_source(split=self.split)
        return self._records

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_records"] = None
        return state

    def __repr__(self) -> str:
        return f"TfdsClips({self.path}, split={self.split!r}, clips={len(self)}, P={self.num_patches}, Dv={self.video_dim}, {self.precision})"


def check(cfg, source: TfdsClips) -> None:
    """Raise DatasetMismatchError unless the config's shapes match the dataset's.

    Checks the config's token shapes against the dataset's (sabr_jax.config.shape_mismatches;
    unset ones take the dataset's: sabr_jax.data.sources.resolve_shapes), and that
    cfg.data.max_frames leaves room for a motion frame after the context frames.
    """
    problems = config_lib.shape_mismatches(cfg, source.num_patches, source.video_dim, "the dataset's")
    contexts = [source.num_context(i) for i in range(len(source))]
    if cfg.data.max_frames <= min(cfg.data.context_frames, max(contexts, default=0)):
        problems.append(
            f"data.max_frames={cfg.data.max_frames} leaves no room for motion after data.context_frames={cfg.data.context_frames}"
        )
    if problems:
        pool = source.index.get("pool", 1)
        raise DatasetMismatchError(
            f"config does not match the dataset {source.path} (P={source.num_patches}, Dv={source.video_dim}, pool={pool}): "
            + "; ".join(problems)
            + f". Set --config.data.num_patches={source.num_patches} --config.model.video_dim={source.video_dim} "
            "(or 0 to take the dataset's), or prepare the data with the matching encoder/--pool."
        )


def warn_unused_context(cfg, source: TfdsClips) -> None:
    """Log a warning naming the clips with more route images than data.context_frames."""
    cut = [source.clip_id(i) for i in range(len(source)) if source.num_context(i) > cfg.data.context_frames]
    if cut:
        logging.warning(
            "%s: %d clips of split %r have more route images than data.context_frames=%d; only their first %d (in "
            "natural name order) are used: %s",
            source.path,
            len(cut),
            source.split,
            cfg.data.context_frames,
            cfg.data.context_frames,
            ", ".join(cut[:10]) + (", ..." if len(cut) > 10 else ""),
        )


def open_tfds(data_dir: str | os.PathLike, split: str = "train", cfg=None) -> tuple[TfdsClips, NormStats]:
    """(source over `split`, normalisation statistics of the train split); checks cfg if given
    (and warns when clips have more route images than it uses); with cfg.data.train_clips N the
    train split is its first N clips (the statistics stay the whole split's); with
    cfg.data.route_tokens 'oracle' the source gives the route as exact tokens
    (sabr_jax.data.route_oracle)."""
    if not data_dir:
        raise UserError("data.dir is empty: point it at the --data_dir of sabr-prepare")
    source = TfdsClips(data_dir, split)
    stats = source.stats()
    if cfg is not None:
        check(cfg, source)
        warn_unused_context(cfg, source)
        if split == "train" and cfg.data.train_clips:
            source.clips = source.clips[: cfg.data.train_clips]
        if cfg.data.route_tokens == "oracle":
            source = RouteOracle(source)
    return source, stats
