"""The DiT's hyperparameters, and the value sets of the model keys that name a choice.

`DiTConfig` has no defaults of its own: it is always made from a run config's `model`
section by `sabr_jax.model.factory.model_config` (sabr_jax.config documents every key and
holds its default; `config.validate` checks the values).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from sabr_jax import motion

LAYOUTS = ("slots", "frame")
DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = {  # model.remat: what each block keeps for the backward pass
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """The model section of a run config (same names, same meanings), with two changes: route_frames
    is the config's data.context_frames (the first route_frames positions hold the route images),
    and 'none' values are None (patch_grid () and attention 'auto')."""

    layout: Literal["slots", "frame"]
    width: int
    heads: int
    depth: int  # blocks; spatial and temporal alternate, so it is even
    mlp_ratio: float
    video_dim: int  # width of the video tokens
    cross_window: int
    route_frames: int
    cross_route: bool
    route_adaln: bool
    patch_grid: tuple[int, int] | None
    video_norm: bool
    cross_norm_affine: bool
    video_latents: int
    kv_share: bool
    dtype: str  # compute dtype; parameters are always float32
    remat: str  # a key of REMAT_POLICIES
    attention: str | None  # an attention kernel (sabr_jax.model.attention.IMPLEMENTATIONS); None picks per platform

    @property
    def num_slots(self) -> int:
        return motion.NUM_SLOTS if self.layout == "slots" else 1

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)
