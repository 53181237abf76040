"""The TFDS dataset builder: prepared clips -> ArrayRecord shards, one record per frame.

Layout (what makes a training window read only its own frames):

* Each split is a sequence of ArrayRecord records, **one per frame**, in clip order. A
  clip occupies a contiguous record range: its C context (route) frames first, then its
  F motion frames:

      record first + c       context frame c      (c < C)
      record first + C + t   motion frame t       (t < F)

  so motion frames start..stop-1 of a clip are records first+C+start .. first+C+stop-1.
* Every record holds `clip` (the clip's ordinal in its split), `frame` (t, or c for a
  context frame), `is_context`, `tracked` (1 on a motion frame where the climber is
  tracked; 0 on context frames and on motion frames where the tracker lost the climber:
  those keep their place and tokens, their motion is zeros and is out of the loss),
  `motion` [161] float32 (zeros on context and untracked frames) and `tokens` [P, Dv]
  (bfloat16 or float32, stored as raw bytes).
* The per-clip index, `sabr_index.json` in the dataset's version folder, lists for every
  clip of every split: clip_id, source_clip, part, first_record, num_context, num_frames,
  masked_frames (and the patch grid, holds, ...), and under `files` the name and byte size of
  every ArrayRecord file of every split as written (`damaged_files` checks them). Readers need only this file and `tfds`:
  see `sabr_jax.data.store.tfds_source`. Its `format` is INDEX_FORMAT; readers refuse any other
  (format 1, before `tracked`, had dropped the untracked frames, splicing clips in time).

Why not the stock `GeneratorBasedBuilder` writer: with `disable_shuffling` (which a
contiguous layout needs) it buffers the whole split and sorts it in memory, and a dataset
of DINOv2 tokens is hundreds of GB. This builder keeps the TFDS machinery (DatasetInfo,
features, `download_and_prepare` with its atomic `incomplete` folder) but overrides
`_download_and_prepare` to stream the records, in order, straight into ArrayRecord shards
(`group_size:1`, as TFDS writes them for random access). No TensorFlow is needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from etils import epath
from tensorflow_datasets.core import example_serializer

from sabr_jax.data.store.prepared import PreparedClip, dtype_of
from sabr_jax.motion import MOTION_DIM

NAME = "sabr_clips"
VERSION = "1.0.0"
INDEX_FILE = "sabr_index.json"
INDEX_FORMAT = 2
DEFAULT_SHARD_BYTES = 1 << 30  # ~1 GiB per ArrayRecord shard


@dataclasses.dataclass(frozen=True)
class ClipPart:
    """A range of motion frames of one prepared clip that becomes one dataset clip."""

    path: str  # the prepared clip folder
    clip_id: str  # dataset clip id: the source clip id, with "#k" for part k of a cut clip
    source_clip: str
    part: int
    start: int  # motion frames start..stop-1 of the prepared clip
    stop: int


def features(num_patches: int, video_dim: int, precision: str) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
        {
            "clip": tfds.features.Scalar(np.int32),
            "frame": tfds.features.Scalar(np.int32),
            "is_context": tfds.features.Scalar(np.int32),
            "tracked": tfds.features.Scalar(np.int32),
            "motion": tfds.features.Tensor(shape=(MOTION_DIM,), dtype=np.float32, encoding="bytes"),
            "tokens": tfds.features.Tensor(shape=(num_patches, video_dim), dtype=dtype_of(precision), encoding="bytes"),
        }
    )


class SabrClips(tfds.core.GeneratorBasedBuilder):
    """SABR-CLIMB clips: per-frame DINOv2 tokens and 161-value motion vectors.

    Build with `SabrClips(data_dir=DIR, splits={...}, ...).download_and_prepare()`; the
    dataset lands in DIR/sabr_clips/1.0.0/. Read it with `tfds.builder_from_directory`
    (no need for this class), e.g. through `sabr_jax.data.store.tfds_source.open_tfds`.
    """

    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = {
        str(
            VERSION
        ): "One record per frame; per-clip index in sabr_index.json (its `format` numbers the record layout)."
    }

    def __init__(
        self,
        *,
        splits: Mapping[str, Sequence[ClipPart]] | None = None,
        num_patches: int = 700,
        video_dim: int = 1024,
        precision: str = "bfloat16",
        index_extra: Mapping | None = None,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        **kwargs,
    ):
        self._splits = {k: list(v) for k, v in (splits or {}).items() if len(v)}
        self._num_patches, self._video_dim, self._precision = num_patches, video_dim, precision
        self._index_extra = dict(index_extra or {})
        self._shard_bytes = shard_bytes
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # TFDS finds the builder's file through importlib.resources, which fails on a
        # namespace or editable-installed package; this is where it is.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=features(self._num_patches, self._video_dim, self._precision),
            disable_shuffling=True,  # record order is the layout
            homepage="https://arxiv.org/abs/2406.01056",
        )

    # TFDS prints "Downloading and preparing dataset Unknown size ..." and "Dataset ... downloaded and
    # prepared to ..." around download_and_prepare: nothing is downloaded, and sabr-prepare reports
    # what it wrote itself.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass

    # GeneratorBasedBuilder's abstract interface: the same records, for completeness (the
    # stock writer would buffer them in memory; _download_and_prepare streams them).
    def _split_generators(self, dl_manager):
        return {name: self._generate_examples(parts) for name, parts in self._splits.items()}

    def _generate_examples(self, parts: Sequence[ClipPart]):
        key = 0
        for clip_index, part in enumerate(parts):
            for example in _records(clip_index, part):
                yield key, example
                key += 1

    def _download_and_prepare(self, dl_manager, download_config=None) -> None:
        if not self._splits:
            raise ValueError("SabrClips: no clips to write")
        feats = self.info.features
        serializer = example_serializer.ExampleSerializer(feats.get_serialized_info())
        record_bytes = self._num_patches * self._video_dim * dtype_of(self._precision).itemsize + 4 * MOTION_DIM + 64
        per_shard = max(1, self._shard_bytes // record_bytes)
        split_infos, index, files = [], {}, {}
        for name, parts in self._splits.items():
            lengths = [_num_context(p) + p.stop - p.start for p in parts]
            total = sum(lengths)
            num_shards = max(1, math.ceil(total / per_shard))
            template = tfds.core.ShardedFileTemplate(
                data_dir=self.data_path, dataset_name=self.name, split=name, filetype_suffix="array_record"
            )
            records = (
                serializer.serialize_example(feats.encode_example(example))
                for clip_index, part in enumerate(parts)
                for example in _records(clip_index, part)
            )
            shard_lengths, num_bytes = [], 0
            for shard in range(num_shards):
                count = min(per_shard, total - shard * per_shard)
                path = template.sharded_filepath(shard_index=shard, num_shards=num_shards)
                writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
                try:
                    for _ in range(count):
                        record = next(records)
                        writer.write(record)
                        num_bytes += len(record)
                except BaseException:  # (a full disk): the writer's close fails too; the first error is the one
                    with contextlib.suppress(Exception):
                        writer.close()
                    raise
                writer.close()
                shard_lengths.append(count)
                files.setdefault(name, []).append({"name": path.name, "bytes": os.path.getsize(path)})
            if next(records, None) is not None:
                raise AssertionError("more records than planned")
            split_infos.append(
                tfds.core.SplitInfo(
                    name=name, shard_lengths=shard_lengths, num_bytes=num_bytes, filename_template=template
                )
            )
            first, entries = 0, []
            for clip_index, (part, length) in enumerate(zip(parts, lengths)):
                clip = PreparedClip(part.path)
                entries.append(
                    {
                        "clip": clip_index,
                        "clip_id": part.clip_id,
                        "source_clip": part.source_clip,
                        "part": part.part,
                        "source_frames": [part.start, part.stop],
                        "first_record": first,
                        "num_context": clip.num_context,
                        "num_frames": part.stop - part.start,
                        "masked_frames": int((~clip.motion_mask()[part.start : part.stop]).sum()),
                        "grid": clip.meta.get("grid"),
                        "holds": clip.meta.get("holds"),
                    }
                )
                first += length
            index[name] = entries
        self.info.set_splits(tfds.core.SplitDict(split_infos))
        with open(self.data_path / INDEX_FILE, "w") as f:
            json.dump(
                {
                    "format": INDEX_FORMAT,
                    "num_patches": self._num_patches,
                    "video_dim": self._video_dim,
                    "precision": self._precision,
                    **self._index_extra,
                    "files": files,
                    "splits": index,
                },
                f,
                indent=1,
            )


def _num_context(part: ClipPart) -> int:
    return PreparedClip(part.path).num_context


def _records(clip_index: int, part: ClipPart):
    """The records of one clip, in layout order: context frames, then motion frames."""
    clip = PreparedClip(part.path)
    zeros = np.zeros(MOTION_DIM, np.float32)
    context = clip.context()
    for c in range(clip.num_context):
        yield {
            "clip": clip_index,
            "frame": c,
            "is_context": 1,
            "tracked": 0,
            "motion": zeros,
            "tokens": np.asarray(context[c]),
        }
    motion, mask, video = clip.motion(), clip.motion_mask(), clip.video()
    for t in range(part.start, part.stop):
        yield {
            "clip": clip_index,
            "frame": t - part.start,
            "is_context": 0,
            "tracked": int(mask[t]),
            "motion": motion[t],
            "tokens": np.asarray(video[t]),
        }


def damaged_files(path: str | os.PathLike, index: Mapping, splits: Sequence[str]) -> list[tuple[Path, str]]:
    """[(file, what is wrong)] for the ArrayRecord files of `splits` in the dataset folder `path`
    (index: its sabr_index.json): missing, not the byte size the index says was written (an index
    without `files`, from before it was recorded, is checked for readability only), or not a
    readable ArrayRecord file (its footer and index cannot be read). Cheap: a stat and a footer."""
    path, problems = Path(path), []
    for split in splits:
        recorded = index.get("files", {}).get(split)
        if recorded is None:
            recorded = [{"name": f.name} for f in sorted(path.glob(f"{NAME}-{split}.array_record-*"))]
        for entry in recorded:
            file = path / entry["name"]
            if not file.is_file():
                problems.append((file, "missing"))
                continue
            size = file.stat().st_size
            if entry.get("bytes") is not None and size != entry["bytes"]:
                problems.append((file, f"{size} bytes, {entry['bytes']} were written"))
                continue
            try:
                reader = array_record_module.ArrayRecordReader(str(file), "readahead_buffer_size:0")
                readable = reader.ok()
                reader.close()
            except Exception as error:  # any failure to open it is the same finding
                readable, why = False, str(error).splitlines()[0] if str(error) else type(error).__name__
            else:
                why = "its footer cannot be read"
            if not readable:
                problems.append((file, f"not a readable ArrayRecord file: {why}"))
    return problems
