"""Attention pooling of video tokens: learned queries that read many tokens into a few.

Notation as in sabr_jax.model.dit: B batch, L time positions, C route images, P video tokens per
frame, N latent tokens per frame, D model width, H heads, Dh = D / H.

- `RouteEmbedder` (`model.route_adaln`): every route image's tokens -> one vector [B, D].
- `VideoResampler` (`model.video_latents` N > 0): each frame's P tokens -> N latent tokens,
  once per forward (once per video when sampling). The blocks' cross-attention then projects
  keys and values from N tokens per frame instead of P: at sabr_s shapes (700 patches) those
  projections are most of a train step's FLOPs, and of the sampler's key/value cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange, repeat
from flax import nnx

from sabr_jax.model.attention import dot_product_attention
from sabr_jax.model.layers import Mlp, from_heads, layer_norm, logical, to_heads, zeros


class RouteEmbedder(nnx.Module):
    """The route images' tokens -> one vector [B, D]: attention from learned queries (one per
    head) over every route token, then a projection. Zero-initialised output: it starts as no
    conditioning at all."""

    def __init__(self, cfg, rngs: nnx.Rngs):
        query = logical(nnx.initializers.normal(1.0), ("heads", "head_dim"))
        self.query = nnx.Param(query(rngs.params(), (cfg.heads, cfg.width // cfg.heads)))
        self.kv = to_heads(cfg, 2, rngs)
        self.out = from_heads(cfg, rngs, init=zeros)
        self.attention = cfg.attention

    def __call__(self, route_emb: jax.Array, route_mask: jax.Array) -> jax.Array:
        """route_emb [B, C, P, D] (from `DiT.embed_video`), route_mask [B, C] -> [B, D]."""
        k, v = (rearrange(a, "b c p h d -> b (c p) h d") for a in self.kv(route_emb))
        q = jnp.broadcast_to(self.query.astype(k.dtype), (k.shape[0], 1, *self.query.shape))
        mask = repeat(route_mask, "b c -> b (c p)", p=route_emb.shape[2])
        return self.out(dot_product_attention(q, k, v, mask, implementation=self.attention)[:, 0])


class VideoResampler(nnx.Module):
    """Each frame's tokens [B, L, P, D] -> N latent tokens [B, L, N, D] (a one-layer Perceiver
    resampler): N learned queries, shared by all frames, attend over the frame's P tokens
    (which carry the frame's time and, with `patch_grid`, their 2D position), then a residual
    MLP. The latents start as the learned queries plus the attention's output, so every frame's
    latents differ from the first step on."""

    def __init__(self, cfg, rngs: nnx.Rngs):
        init = logical(nnx.initializers.normal(0.02), ("slots", "embed_vec"))
        self.latents = nnx.Param(init(rngs.params(), (cfg.video_latents, cfg.width)))
        self.q = to_heads(cfg, None, rngs)
        self.kv = to_heads(cfg, 2, rngs)
        self.out = from_heads(cfg, rngs)
        self.norm = layer_norm(cfg, affine=True, rngs=rngs)
        self.mlp = Mlp(cfg, rngs)
        self.attention = cfg.attention

    def __call__(self, video_emb: jax.Array) -> jax.Array:
        """video_emb [B, L, P, D] -> [B, L, N, D]."""
        b, length = video_emb.shape[:2]
        latents = self.latents.astype(video_emb.dtype)
        q = self.q(latents)  # [N, H, Dh], the same for every frame
        q = jnp.broadcast_to(q, (b * length, *q.shape))
        k, v = (rearrange(a, "b l p h d -> (b l) p h d") for a in self.kv(video_emb))
        read = self.out(dot_product_attention(q, k, v, implementation=self.attention))
        x = latents + rearrange(read, "(b l) n d -> b l n d", b=b)
        return x + self.mlp(self.norm(x))
