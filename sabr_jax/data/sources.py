"""Open the clip source a config names, with its normalisation statistics."""

from __future__ import annotations

import ml_collections

from sabr_jax.data import pipeline
from sabr_jax.data.synthetic import SyntheticClips
from sabr_jax.motion import NormStats


def open_source(cfg: ml_collections.ConfigDict, split: str = "train") -> tuple[pipeline.ClipSource, NormStats]:
    """cfg is the whole config; split 'train' or 'validation'.

    The statistics always come from the train split, whichever split is opened.
    """
    data = cfg.data
    if data.source == "synthetic":

        def clips(first_clip):
            return SyntheticClips(
                data.num_clips, seed=cfg.seed, first_clip=first_clip, min_frames=data.min_clip_frames, max_frames=data.max_clip_frames,
                context_frames=data.context_frames, num_patches=data.num_patches, video_dim=cfg.model.video_dim,
            )

        train = clips(0)
        source = train if split == "train" else clips(data.num_clips)  # new clips, same world
        return source, pipeline.compute_stats(train)
    if data.source == "tfds":
        from sabr_jax.data.tfds_source import open_tfds

        return open_tfds(data.dir, split, cfg=cfg)
    raise ValueError(f"data.source must be 'synthetic' or 'tfds', got {data.source!r}")
