"""The one input pipeline: clips from a source -> random windows -> padded, masked batches.

A *clip source* is a random-access collection of clips (the in-memory synthetic one, the
TFDS one) with this interface:

    len(source)                       number of clips
    source.num_frames(i)              motion frames of clip i
    source.num_context(i)             context (route) frames of clip i
    source.read(i, start, stop)       {"motion": [n, 161] float32, "video": [n, P, Dv],
                                       "context": [C, P, Dv], "motion_mask": [n] bool}
                                      for frames start..stop-1; motion_mask (optional,
                                      absent: all True) is False on frames where the
                                      tracker lost the climber (motion unknown)

A training example has a fixed number L = max_frames of time positions: the clip's
context frames first (at most `context_frames`), then a random window of its motion
frames, then padding:

    motion        [L, 161] float32   normalised motion; zero on context and padding; on untracked
                                     frames the interpolation of the window's tracked ones
                                     (motion.fill_gaps: a plausible noised input, never a target)
    video         [L, P, Dv]         video tokens of the context frames and the window
    frame_mask    [L] bool           True on context and motion frames (untracked ones too)
    context_mask  [L] bool           True on context frames
    motion_mask   [L] bool           True on motion frames whose motion is known (tracked):
                                     the frames the loss counts (sabr_jax.training.trainer)

An untracked frame keeps its time position and video tokens (frame_mask True), so the
window is not spliced in time; only the loss leaves it out. Its stored motion (zeros) is
never used.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import grain
import jax
import jax.numpy as jnp
import numpy as np

from sabr_jax.motion import MOTION_DIM, NormStats, fill_gaps


class ClipSource(Protocol):
    def __len__(self) -> int: ...

    def num_frames(self, index: int) -> int: ...

    def num_context(self, index: int) -> int: ...

    def read(self, index: int, start: int, stop: int) -> dict[str, np.ndarray]: ...


@dataclasses.dataclass(frozen=True)
class Windowing(grain.transforms.RandomMap):
    """clip index -> one fixed-shape example (see the module docstring)."""

    source: ClipSource
    max_frames: int
    context_frames: int
    stats: NormStats

    def random_map(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        total = self.source.num_frames(index)
        num_context = min(self.source.num_context(index), self.context_frames)
        length = min(total, self.max_frames - num_context)
        start = int(rng.integers(0, total - length + 1))
        clip = self.source.read(index, start, start + length)
        return assemble(clip, self.max_frames, num_context, self.stats)


def assemble(clip: dict[str, np.ndarray], max_frames: int, num_context: int, stats: NormStats) -> dict[str, np.ndarray]:
    """Lay out context, motion window and padding on `max_frames` positions."""
    motion, video, context = clip["motion"], clip["video"], clip["context"][:num_context]
    length = len(motion)
    tracked = np.asarray(clip.get("motion_mask", np.ones(length, bool)), bool)
    used = num_context + length
    if used > max_frames:
        raise ValueError(f"{num_context} context + {length} motion frames exceed max_frames={max_frames}")
    tokens = np.zeros((max_frames, *video.shape[1:]), video.dtype)
    tokens[:num_context], tokens[num_context:used] = context, video
    out_motion = np.zeros((max_frames, MOTION_DIM), np.float32)
    out_motion[num_context:used] = fill_gaps(stats.normalize(motion), tracked)
    motion_mask = np.zeros(max_frames, bool)
    motion_mask[num_context:used] = tracked
    positions = np.arange(max_frames)
    return {
        "motion": out_motion,
        "video": tokens,
        "frame_mask": positions < used,
        "context_mask": positions < num_context,
        "motion_mask": motion_mask,
    }


def dataset(
    source: ClipSource,
    *,
    stats: NormStats,
    max_frames: int,
    context_frames: int,
    batch_size: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
    num_workers: int = 0,
    start_batch: int = 0,
) -> grain.IterDataset:
    """An endless, checkpointable iterator over one host's part of every global batch.

    There is one global stream of examples, whatever the number of hosts: the clips are
    shuffled anew every epoch from `seed`, each visit draws a random window (seeded by its
    position in the stream), and global batch g is examples g*G .. (g+1)*G - 1 with
    G = batch_size * shard_count. Host `shard_index` of `shard_count` reads only rows
    shard_index*batch_size .. (shard_index+1)*batch_size - 1 of each global batch, so
    the global batches (content and row order) do not depend on how many hosts read
    them, and neither does the iterator position: after k batches every host is at
    global batch k. `start_batch` starts at global batch k (how a resumed run
    re-creates its iterator, on any number of hosts). batch_size is the per-host batch;
    num_workers > 0 reads in that many worker processes.
    """
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} is not in [0, {shard_count})")
    if len(source) == 0:
        raise ValueError("the clip source has no clips")
    examples = (
        grain.MapDataset.range(len(source))
        .shuffle(seed=seed)
        .repeat()
        .random_map(Windowing(source, max_frames, context_frames, stats), seed=seed + 1)
    )
    # Lazy: element j of `chunks` is rows of global batch j // shard_count; a host
    # touches only its own chunks' examples.
    chunks = examples.batch(batch_size, drop_remainder=True)
    # Bounded read-ahead: Grain's defaults (16 threads, 500 batches) would hold hundreds of GB
    # at full-size shapes (one sabr_s example is ~0.6 GB).
    read = grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)
    ds = chunks[shard_index + start_batch * shard_count :: shard_count].to_iter_dataset(read)
    if num_workers > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return ds


def compute_stats(source: ClipSource) -> NormStats:
    """Normalisation statistics over every tracked motion frame of every clip of the source."""
    clips = [source.read(i, 0, source.num_frames(i)) for i in range(len(source))]
    masks = [c.get("motion_mask", np.ones(len(c["motion"]), bool)) for c in clips]
    return NormStats.from_data(np.concatenate([c["motion"] for c in clips]), np.concatenate(masks))


def motion_frames(batch) -> jax.Array:
    """[B, L] bool: the motion frames of a batch (real frames that are not context frames)."""
    return batch["frame_mask"] & ~batch["context_mask"]


def abstract_batch(cfg, batch_sharding) -> dict:
    """ShapeDtypeStructs of one global batch of cfg (batch_size x data.max_frames positions), as
    `dataset` lays it out; video tokens in the compute dtype (what ahead-of-time compiles take)."""
    b, frames, p = cfg.batch_size, cfg.data.max_frames, cfg.data.num_patches

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)

    return {
        "motion": spec((b, frames, MOTION_DIM), jnp.float32),
        "video": spec((b, frames, p, cfg.model.video_dim), jnp.dtype(cfg.model.dtype)),
        "frame_mask": spec((b, frames), jnp.bool_),
        "context_mask": spec((b, frames), jnp.bool_),
        "motion_mask": spec((b, frames), jnp.bool_),
    }
