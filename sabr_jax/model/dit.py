"""The SABR-CLIMB diffusion transformer (DiT) in Flax NNX, both token layouts.

Notation: B batch, L time positions (C context frames, then motion frames, then padding),
S token slots per frame (27 for `layout="slots"`, 1 for `layout="frame"`), P video tokens
per frame, D model width, H heads, Dh = D / H, Dv video-token width.

`layout="slots"` (default): each frame is split into 27 slots (bbox, camera, 24 joints,
betas). Blocks alternate: *spatial* blocks self-attend over the slots of one frame,
*temporal* blocks self-attend over time for each slot. Cross-attention is frame-aligned:
the slots of frame t attend to the video tokens of frames t-w..t+w (`cross_window` w) on
t's side of the prompt boundary (route images only see route images, motion frames video).

`layout="frame"` (the authors' code): one token per frame; every block self-attends over
time. Even blocks cross-attend frame-aligned ("spatial"); odd blocks broadcast each frame
token to every patch position, attend over time at that position and average the P
results ("temporal").

Every block: adaLN-Zero self-attention, ungated cross-attention, adaLN-Zero MLP, each
after a LayerNorm without parameters (eps 1e-6), modulated by the diffusion timestep
(adaLN order: shift, scale, gate of the attention, then of the MLP). Context frames are a
prompt: their motion tokens are a learned embedding, never the (noised) input. Padded
frames are masked out of every attention and their outputs are zero.

With `layout="frame"` and the options below off, the block, the final layer (LayerNorm
without parameters, adaLN shift/scale, zero-initialised linear), the timestep embedding
(256 frequencies, cos then sin, SiLU MLP, normal(0.02) init), the 1D sin-cos time embedding
(sin then cos) added to the motion and the video tokens, and the initialisation (xavier-
uniform kernels, zero biases, zero adaLN) are the authors' (agent-mitra/virtual-avatar-
generation, model/architecture/diffusion_transformer.py). What differs, and why:
- Masks. Padded frames are masked out of the self-attention and of the temporal cross-
  attention's keys, and the output is zero there; the authors attend to every position
  (their padding is the DINOv2 tokens of a black frame, and its motion is in their loss).
- The prompt. At context positions the motion token is the learned `prompt_embed`; the
  authors feed their motion sequence from frame 0 there, under the route images' tokens.
- `video_embedder`: a trainable [Dv, D] projection of the video tokens, before the time
  embedding is added. The authors feed DINOv2-L's tokens (Dv = D = 1024) to the key/value
  projections as they are; ours lets any encoder width meet any model width.
- `slot_embed` (one learned [D] vector with S = 1): added to every motion token; the
  authors have none (the x_embedder's bias can absorb it; it is kept so that both layouts
  share one embedding path).
- `null_video`: the learned token that condition dropout puts in place of the video
  (classifier-free guidance); the authors have no condition dropout.
- Layout of the weights, not the function: q/k/v and k/v are fused [D, n, H, Dh] kernels
  (the authors' [n*D, D] Linear reshaped; the same xavier fan-in and fan-out), and the
  block pairs are stacked and scanned (the authors loop over a list of blocks).
- Attention runs through sabr_jax.model.attention (cuDNN, splash or XLA: the same softmax and
  scale) where the authors call flash-attn; the time embedding is computed for the batch's
  length instead of a fixed 1100-long table (the same values).

Every parameter dimension has a logical axis name (`einsum`; sabr_jax.parallel.sharding.RULES maps
them to mesh axes): FSDP over the width, tensor parallelism over whole heads (the fused
q/k/v kernel is [D, 3, H, Dh]) and the MLP's hidden width.

Options beyond the paper (off in the paper configs, on for SynthClimb; see README):
`patch_grid` adds a fixed 2D sin-cos position to the video tokens (the model otherwise has
no way to tell where a token sits in the frame); `cross_route` lets every frame's
frame-aligned cross-attention also read the route images' tokens (the first `route_frames`
positions); `route_adaln` pools the route images' tokens into one vector (attention with a
learned query) that joins the timestep embedding in every adaLN, as DiT conditions on a
class label; `video_norm` standardises each channel of a frame's tokens over its patches;
`cross_norm_affine` gives the LayerNorm before the cross-attention a learned scale and bias
(measured on SynthClimb's demo, README: with it the model reads the video within 2000 CPU
steps, without it, the authors' block, it does not yet).

Cheaper video conditioning (off in the paper configs; docs/performance.md): projecting every
video token to keys and values in every block is most of a step's FLOPs at 700 patches per
frame. `video_latents` N condenses each frame's tokens to N latents once per forward
(`sabr_jax.model.pooling.VideoResampler`) and the blocks read those; `kv_share` lets the two blocks
of a pair share one key/value projection.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from einops import rearrange, repeat
from flax import nnx

from sabr_jax import motion
from sabr_jax.model.attention import dot_product_attention, group_mean_attention
from sabr_jax.model.cross_attention import VideoTokens, absorbed_attention, absorbs, frame_attention, window
from sabr_jax.model.dit_config import REMAT_POLICIES, DiTConfig
from sabr_jax.model.layers import (
    Mlp,
    Modulation,
    dense,
    einsum,
    from_heads,
    layer_norm,
    logical,
    modulate,
    sincos_2d_embedding,
    sincos_embedding,
    to_heads,
    zeros,
)
from sabr_jax.model.pooling import RouteEmbedder, VideoResampler
from sabr_jax.parallel.sharding import whole


class TimestepEmbedder(nnx.Module):
    """Diffusion step -> [B, D]: ADM's sinusoidal embedding (cos, sin) and a 2-layer MLP."""

    frequency_dim = 256

    def __init__(self, cfg: DiTConfig, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.mlp_in = dense(cfg, self.frequency_dim, cfg.width, ("freq", "embed"), rngs, init)
        self.mlp_out = dense(cfg, cfg.width, cfg.width, ("embed", "embed_out"), rngs, init)

    def __call__(self, t: jax.Array) -> jax.Array:
        half = self.frequency_dim // 2
        freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
        args = t.astype(jnp.float32)[:, None] * freqs[None]
        emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
        return self.mlp_out(nnx.silu(self.mlp_in(emb)))


class Block(nnx.Module):
    """One DiT block on x [B, L, S, D].

    self_axis: 'slots' (attend within a frame) or 'time' (attend over frames per slot).
    cross: 'frame' (frame-aligned, optional window) or 'patch_time' (per patch position
    over time, averaged over the P positions: the authors' temporal block).
    """

    def __init__(self, cfg: DiTConfig, self_axis: str, cross: str, rngs: nnx.Rngs, own_kv: bool = True):
        self.cfg, self.self_axis, self.cross = cfg, self_axis, cross
        self.norm1 = layer_norm(cfg, affine=False, rngs=rngs)
        self.qkv = to_heads(cfg, 3, rngs)
        self.attn_out = from_heads(cfg, rngs)
        self.norm2 = layer_norm(cfg, affine=cfg.cross_norm_affine, rngs=rngs)
        self.cross_q = to_heads(cfg, None, rngs)
        self.cross_kv = to_heads(cfg, 2, rngs) if own_kv else None  # None: the pair's other block projects them
        self.cross_out = from_heads(cfg, rngs)
        self.norm3 = layer_norm(cfg, affine=False, rngs=rngs)
        self.mlp = Mlp(cfg, rngs)
        self.adaLN_modulation = Modulation(cfg, 6, rngs)

    def video_kv(self, video_emb: jax.Array):
        """video_emb [B, L, P, D] -> keys, values [B, L, P, H, Dh] for the cross-attention."""
        return VideoTokens(video_emb, self.cross_kv).project()

    def absorbs(self, patches: int) -> bool:
        """Whether, given the video tokens (`VideoTokens`, `patches` per frame), the cross-attention
        absorbs the key/value projection: where that costs fewer FLOPs (sabr_jax.model.cross_attention)."""
        cfg = self.cfg
        if self.cross == "patch_time":
            return False
        keys = patches * (2 * cfg.cross_window + 1 + (cfg.route_frames if cfg.cross_route else 0))  # per frame
        return absorbs(cfg.num_slots, cfg.heads, keys, cfg.width, patches)

    def self_attention(self, x, frame_mask):
        b, _, s, _ = x.shape
        q, k, v = self.qkv(x)  # each [B, L, S, H, Dh]
        if self.self_axis == "slots":
            fold = lambda a: rearrange(a, "b l s h d -> (b l) s h d")
            out = dot_product_attention(fold(q), fold(k), fold(v), implementation=self.cfg.attention)
            out = rearrange(out, "(b l) s h d -> b l s h d", b=b)
        else:
            fold = lambda a: rearrange(a, "b l s h d -> (b s) l h d")
            mask = repeat(frame_mask, "b l -> (b s) l", s=s)
            out = dot_product_attention(fold(q), fold(k), fold(v), mask, implementation=self.cfg.attention)
            out = rearrange(out, "(b s) l h d -> b l s h d", b=b)
        return self.attn_out(out)

    def cross_attention(self, x, kv, frame_mask, context_mask):
        """kv: the keys and values (k, v), each [B, L, P, H, Dh], or the `VideoTokens` to make them
        of; a frame-aligned cross-attention then absorbs the projection instead where that costs
        fewer FLOPs (sabr_jax.model.cross_attention)."""
        cfg, tokens = self.cfg, kv if isinstance(kv, VideoTokens) else None
        q = self.cross_q(x)  # [B, L, S, H, Dh]
        if self.cross == "patch_time":  # S == 1; the P patch positions are the key groups
            k, v = kv if tokens is None else tokens.project()
            out = group_mean_attention(q[:, :, 0], k, v, frame_mask, implementation=cfg.attention)
            return self.cross_out(out[:, :, None])
        absorbed = tokens is not None and self.absorbs(tokens.emb.shape[2])
        if tokens is not None:  # absorbed, the tokens stand for the keys and the values
            kv = (tokens.emb,) if absorbed else tokens.project()
        route_frames = cfg.route_frames if cfg.cross_route else 0
        route = (*(a[:, :route_frames] for a in kv), context_mask[:, :route_frames]) if route_frames else None
        mask = None
        if cfg.cross_window:
            kv, masks = zip(*(window(a, frame_mask, context_mask, cfg.cross_window) for a in kv))
            mask = masks[0]
        if absorbed:
            out = absorbed_attention(q, VideoTokens(kv[0], tokens.projection), mask, route)
        elif route is not None:
            out = frame_attention(q, *kv, mask, route, scale=q.shape[-1] ** -0.5)
        else:
            fold = lambda a: rearrange(a, "b l n h d -> (b l) n h d")
            mask = None if mask is None else rearrange(mask, "b l k -> (b l) k")
            out = dot_product_attention(*(fold(a) for a in (q, *kv)), mask, implementation=cfg.attention)
            out = rearrange(out, "(b l) s h d -> b l s h d", b=x.shape[0])
        return self.cross_out(out)

    def __call__(self, x, c, kv, frame_mask, context_mask):
        """x [B, L, S, D]; c [B, D] timestep embedding; kv from `video_kv`, or `VideoTokens`; frame_mask and
        context_mask [B, L] (the route images are where context_mask is True)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c)
        # `whole`: each layer's input is whole on every tensor shard (Megatron; sabr_jax.parallel.sharding)
        x = x + gate1[:, None, None] * self.self_attention(whole(modulate(self.norm1(x), shift1, scale1)), frame_mask)
        x = x + self.cross_attention(whole(self.norm2(x)), kv, frame_mask, context_mask)
        x = x + gate2[:, None, None] * self.mlp(whole(modulate(self.norm3(x), shift2, scale2)))
        return x


class BlockPair(nnx.Module):
    """A spatial block followed by a temporal block: the unit that is stacked and scanned.
    With `kv_share` the spatial block's key/value projection serves both."""

    def __init__(self, cfg: DiTConfig, rngs: nnx.Rngs):
        temporal = ("time", "frame") if cfg.layout == "slots" else ("time", "patch_time")
        self.spatial = Block(cfg, "slots" if cfg.layout == "slots" else "time", "frame", rngs)
        self.temporal = Block(cfg, *temporal, rngs, own_kv=not cfg.kv_share)

    def video_kv(self, video_emb):
        """-> ((k, v) of the spatial block, (k, v) of the temporal block), each [B, L, P, H, Dh];
        with `kv_share` one (k, v) for both."""
        if self.temporal.cross_kv is None:
            return (self.spatial.video_kv(video_emb),)
        return self.spatial.video_kv(video_emb), self.temporal.video_kv(video_emb)

    def __call__(self, x, c, kv, frame_mask, context_mask):
        """kv from `video_kv`, or the video tokens [B, L, P, D]: then each block reads them
        through its own key/value projection (or, with `kv_share`, the spatial block's)."""
        if isinstance(kv, jax.Array):
            patches = kv.shape[2]
            if self.temporal.cross_kv is None and not (
                self.spatial.absorbs(patches) and self.temporal.absorbs(patches)
            ):
                kv = (self.spatial.video_kv(kv),)  # kv_share: a block projects, so both read that projection
            else:
                own = self.spatial.cross_kv if self.temporal.cross_kv is None else self.temporal.cross_kv
                kv = (VideoTokens(kv, self.spatial.cross_kv), VideoTokens(kv, own))
        x = self.spatial(x, c, kv[0], frame_mask, context_mask)
        return self.temporal(x, c, kv[-1], frame_mask, context_mask)


class FinalLayer(nnx.Module):
    """adaLN (shift, scale) + zero-initialised projection to x0 and the variance value, per slot."""

    def __init__(self, cfg: DiTConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.norm = layer_norm(cfg, affine=False, rngs=rngs)
        self.adaLN_modulation = Modulation(cfg, 2, rngs)
        if cfg.layout == "slots":
            shape = (motion.NUM_SLOTS, cfg.width, 2 * motion.SLOT_WIDTH)
            self.linear = einsum(cfg, "blsd,sdo->blso", shape, ("slots", "embed", "slot_out"), rngs, zeros)
        else:
            self.linear = dense(cfg, cfg.width, 2 * motion.MOTION_DIM, ("embed", "motion_out"), rngs, init=zeros)

    def __call__(self, x, c):
        """x [B, L, S, D] -> [B, L, 2 * 161] (x0, then the variance value v)."""
        shift, scale = self.adaLN_modulation(c)
        out = self.linear(modulate(self.norm(x), shift, scale)).astype(jnp.float32)
        if self.cfg.layout == "frame":
            return out[:, :, 0]
        x0, v = jnp.split(out, 2, axis=-1)
        return jnp.concatenate([motion.unpack(x0), motion.unpack(v)], axis=-1)


def first_pairs(blocks, start: int, stop: int):
    """The stacked block pairs [start, stop) of `blocks` (DiT.blocks) as a stack of their own."""
    if (start, stop) == (0, jax.tree.leaves(nnx.state(blocks))[0].shape[0]):
        return blocks
    graphdef, state = nnx.split(blocks)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[start:stop], state))


class DiT(nnx.Module):
    """Video-conditioned motion diffusion transformer.

    Use: `emb = model.embed_video(video)`; then either `model(x, t, masks..., video_emb=emb)`
    (training: each block reads the tokens through its key/value projection, or absorbs the
    projection where that is cheaper: sabr_jax.model.cross_attention) or `kv = model.video_kv(emb)`
    once per video and `model(x, t, masks..., kv=kv)` for every sampling step.
    """

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        s, d = cfg.num_slots, cfg.width
        self.t_embedder = TimestepEmbedder(cfg, rngs)
        if cfg.layout == "slots":
            shape = (s, motion.SLOT_WIDTH, d)
            self.x_embedder = einsum(cfg, "blsw,swd->blsd", shape, ("slots", "slot_in", "embed"), rngs)
        else:
            self.x_embedder = dense(cfg, motion.MOTION_DIM, d, ("motion_in", "embed"), rngs)
        init = nnx.initializers.normal(0.02)
        self.slot_embed = nnx.Param(logical(init, ("slots", "embed_vec"))(rngs.params(), (s, d)))
        self.prompt_embed = nnx.Param(logical(init, ("slots", "embed_vec"))(rngs.params(), (s, d)))
        self.video_embedder = dense(cfg, cfg.video_dim, d, ("video", "embed"), rngs)
        self.null_video = nnx.Param(logical(init, ("embed_vec",))(rngs.params(), (d,)))
        self.resampler = VideoResampler(cfg, rngs) if cfg.video_latents else None

        @nnx.split_rngs(splits=cfg.depth // 2)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def stacked_pairs(rngs):
            return BlockPair(cfg, rngs)

        self.blocks = stacked_pairs(rngs)
        self.route_embedder = RouteEmbedder(cfg, rngs) if cfg.route_adaln else None
        self.final_layer = FinalLayer(cfg, rngs)

    # -------------------------------------------------------------- conditioning
    def embed_video(self, video: jax.Array, drop: jax.Array | None = None) -> jax.Array:
        """video [B, L, P, Dv] tokens -> [B, L, P, D] (N, not P, with `video_latents` N: the
        resampler's latents). drop [B] bool replaces an example's tokens by the learned null
        token (condition dropout for classifier-free guidance). A fixed sine-cosine time embedding
        is added, and with `patch_grid` a 2D one over the patches. With `video_norm` every
        channel of a frame's tokens is first standardised over its patches."""
        if self.cfg.video_norm:  # what differs between a frame's patches, at unit scale
            video = video.astype(jnp.float32)
            mean, var = video.mean(axis=2, keepdims=True), video.var(axis=2, keepdims=True)
            video = (video - mean) * jax.lax.rsqrt(var + 1e-3)
        emb = self.video_embedder(video.astype(self.cfg.compute_dtype))
        if drop is not None:
            emb = jnp.where(drop[:, None, None, None], self.null_video.astype(emb.dtype), emb)
        emb = emb + sincos_embedding(video.shape[1], self.cfg.width)[None, :, None].astype(emb.dtype)
        if self.cfg.patch_grid is not None:
            rows, cols = self.cfg.patch_grid
            if rows * cols != video.shape[2]:
                raise ValueError(
                    f"model.patch_grid {rows}x{cols} does not match {video.shape[2]} video tokens per frame"
                )
            emb = emb + sincos_2d_embedding(rows, cols, self.cfg.width)[None, None].astype(emb.dtype)
        return emb if self.resampler is None else self.resampler(emb)

    def video_kv(self, video_emb: jax.Array, pairs: int | None = None):
        """The cross-attention keys/values of the first `pairs` block pairs (default: all), stacked
        over pairs (the sampler computes them once per video and reuses them for every step)."""
        blocks = self.blocks if pairs is None else first_pairs(self.blocks, 0, pairs)
        # a scan, not a vmap: one pair's projection at a time is written into the stack
        return nnx.scan(
            lambda _, pair: (None, pair.video_kv(video_emb)), in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0)
        )(None, blocks)[1]

    # -------------------------------------------------------------- forward
    def embed_motion(self, x: jax.Array, context_mask: jax.Array) -> jax.Array:
        """x [B, L, 161] -> tokens [B, L, S, D]; context positions get the prompt embedding."""
        dtype = self.cfg.compute_dtype
        tokens = self.x_embedder(motion.pack(x) if self.cfg.layout == "slots" else x[:, :, None])
        tokens = tokens.astype(dtype) + self.slot_embed.astype(dtype)
        prompt = jnp.broadcast_to(self.prompt_embed.astype(dtype), tokens.shape)
        tokens = jnp.where(context_mask[:, :, None, None], prompt, tokens)
        return tokens + sincos_embedding(x.shape[1], self.cfg.width)[None, :, None].astype(dtype)

    def route_vector(self, video_emb: jax.Array, context_mask: jax.Array) -> jax.Array | None:
        """The route conditioning [B, D] with `route_adaln` (else None), from video_emb
        [B, L, P, D]; with `kv`, the sampler computes it once per video and passes `route`."""
        if self.route_embedder is None:
            return None
        n = self.cfg.route_frames
        return self.route_embedder(video_emb[:, :n], context_mask[:, :n])

    def __call__(self, x, t, frame_mask, context_mask, *, video_emb=None, kv=None, route=None):
        """Predict x0 and the variance value. x [B, L, 161] noisy normalised motion (ignored at
        context and padded positions); t [B] diffusion steps on the 1000-step scale; frame_mask
        [B, L] True on real (context or motion) frames; context_mask [B, L] True on context
        frames. Give video_emb [B, L, P, D] from `embed_video` or kv from `video_kv` (then, with
        `route_adaln`, also route from `route_vector`), or both: kv of the first n < depth/2 pairs
        (`video_kv(emb, n)`) and video_emb for the others. Returns [B, L, 322] float32, zero on
        padded frames."""
        pairs = self.cfg.depth // 2
        cached = 0 if kv is None else jax.tree.leaves(kv)[0].shape[0]
        if (video_emb is None) != (cached == pairs):
            raise ValueError(f"DiT: give video_emb, or kv of all {pairs} block pairs, or kv of fewer and video_emb")
        c = self.t_embedder(t).astype(self.cfg.compute_dtype)
        if self.route_embedder is not None:
            if route is None:
                if video_emb is None:
                    raise ValueError(
                        "DiT with route_adaln: pass route=model.route_vector(video_emb, context_mask) with kv"
                    )
                route = self.route_vector(video_emb, context_mask)
            c = c + route.astype(c.dtype)
        h = self.embed_motion(x, context_mask)

        def step(h, pair, i):
            from_cache = lambda: jax.tree.map(lambda a: a[jnp.minimum(i, cached - 1)], kv)
            if cached in (0, pairs):
                pair_kv = from_cache() if cached else video_emb  # the blocks read video_emb themselves
            else:  # the first `cached` pairs read the cache, the others compute their keys/values
                pair_kv = jax.lax.cond(i < cached, from_cache, lambda: pair.video_kv(video_emb))
            return pair(h, c, pair_kv, frame_mask, context_mask)

        if self.cfg.remat != "none":
            step = nnx.remat(step, policy=REMAT_POLICIES[self.cfg.remat])
        h = nnx.scan(step, in_axes=(nnx.Carry, 0, 0), out_axes=nnx.Carry)(h, self.blocks, jnp.arange(pairs))
        out = self.final_layer(h, c)
        return jnp.where(frame_mask[:, :, None], out, 0.0)
