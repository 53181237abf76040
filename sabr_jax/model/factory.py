"""The one place a DiT is built from a run config (training, sampling, plans and dry runs)."""

from __future__ import annotations

import ml_collections
from flax import nnx

from sabr_jax import config as config_lib
from sabr_jax.errors import UserError
from sabr_jax.model.dit import DiT
from sabr_jax.model.dit_config import DiTConfig


def model_config(cfg: ml_collections.ConfigDict) -> DiTConfig:
    """cfg's model section (checked: `config.validate_model`) as a DiTConfig; model.video_dim must
    be set (the dataset's, sabr_jax.data.sources.resolve_shapes fills it in)."""
    config_lib.validate_model(cfg)
    if cfg.model.video_dim == config_lib.UNSET:
        raise UserError(
            "model.video_dim is unset (0): take it from the dataset first (sabr_jax.data.sources.resolve_shapes)"
        )
    fields = dict(cfg.model)
    fields["attention"] = None if fields["attention"] == "auto" else fields["attention"]
    fields["route_frames"] = cfg.data.context_frames
    fields["patch_grid"] = tuple(fields["patch_grid"]) if fields["patch_grid"] else None
    return DiTConfig(**fields)


def build_model(cfg: ml_collections.ConfigDict, seed: int) -> DiT:
    """cfg's DiT with parameters initialised from `seed`."""
    return DiT(model_config(cfg), rngs=nnx.Rngs(seed))


def abstract_model(cfg: ml_collections.ConfigDict) -> DiT:
    """cfg's model with abstract parameters (nnx.eval_shape: nothing is allocated); its graph
    (nnx.split / nnx.graphdef) is what the train step and the sampler run."""
    return nnx.eval_shape(lambda: build_model(cfg, 0))
