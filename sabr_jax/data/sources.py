"""Open the clip source a config names, with its normalisation statistics; fill in the
token shapes a config leaves to the dataset."""

from __future__ import annotations

import ml_collections

from sabr_jax import config as config_lib
from sabr_jax.data import pipeline
from sabr_jax.data.synthetic_source import SyntheticClips
from sabr_jax.motion import NormStats


def resolve_shapes(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Fill in cfg's unset (0) data.num_patches and model.video_dim, in place; return cfg.

    With data.source='tfds' and a data.dir they are the prepared dataset's (tokens per
    frame, token width; read from its index), and a set value that disagrees with the
    dataset is a DatasetMismatchError. Otherwise (the in-memory synthetic source, a dry
    run without data) an unset value stands for the paper's shapes, config.PAPER_SHAPES.
    Idempotent: the Trainer calls it, so that the model, the pipeline and the saved
    checkpoint config all see the values the model is built with.
    """
    data = cfg.data
    values = dict(config_lib.PAPER_SHAPES)
    if data.source == "tfds" and data.dir:
        from sabr_jax.data.store import tfds_source

        source = tfds_source.TfdsClips(data.dir, "train")
        tfds_source.check(cfg, source)
        values = {"data.num_patches": source.num_patches, "model.video_dim": source.video_dim}
    with cfg.unlocked():
        for key, value in values.items():
            group, name = key.split(".")
            if cfg[group][name] == config_lib.UNSET:
                cfg[group][name] = value
    return cfg


def open_source(cfg: ml_collections.ConfigDict, split: str = "train") -> tuple[pipeline.ClipSource, NormStats]:
    """cfg is the whole config (its unset shapes are resolved in place: `resolve_shapes`);
    split 'train' or 'validation'.

    The statistics always come from the train split, whichever split is opened.
    """
    resolve_shapes(cfg)
    data = cfg.data
    if data.source == "synthetic":

        def clips(first_clip):
            return SyntheticClips(
                data.num_clips,
                seed=cfg.seed,
                first_clip=first_clip,
                min_frames=data.min_clip_frames,
                max_frames=data.max_clip_frames,
                context_frames=data.context_frames,
                num_patches=data.num_patches,
                video_dim=cfg.model.video_dim,
            )

        train = clips(0)
        source = train if split == "train" else clips(data.num_clips)  # new clips, same world
        return source, pipeline.compute_stats(train)
    if data.source == "tfds":
        from sabr_jax.data.store.tfds_source import open_tfds

        return open_tfds(data.dir, split, cfg=cfg)
    raise ValueError(f"data.source must be 'synthetic' or 'tfds', got {data.source!r}")
