"""Ancestral (DDPM) and DDIM samplers as one `lax.scan` each, with motion completion
and classifier-free guidance.

A denoiser is a function (x_t [B, L, F], t [B] on the 1000-step scale) -> model output
[B, L, 2F] (predicted x0, variance value). `denoiser` binds a DiT and one batch of video
to that form, computing the video keys/values once for all steps; `make_sampler` jits
the whole thing and returns what users want: each example's motion frames, and nothing
from its context (route image) or padded positions.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sabr_jax.diffusion import GaussianDiffusion, at_step
from sabr_jax.motion import MOTION_DIM

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]


def sample(
    denoise: Denoiser,
    diffusion: GaussianDiffusion,
    key: jax.Array,
    shape: tuple[int, ...],
    *,
    method: str = "ddpm",
    eta: float = 0.0,
    known: jax.Array | None = None,
    known_mask: jax.Array | None = None,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Draw x0 of `shape` [B, L, F] by running the reverse process over all steps of `diffusion`.

    method: 'ddpm' (learned variance) or 'ddim' (eta = 0 is deterministic).
    known [B, L, F] and known_mask [B, L] bool: motion completion. The known frames are
    replaced by q(x_t | known) before every step and by `known` in every x0 prediction,
    and are returned exactly. mask [B, L] bool: the positions to generate; the output is
    exactly zero elsewhere (the values there are not a sample of anything). The same key
    gives the same output.
    """
    if method not in ("ddpm", "ddim"):
        raise ValueError(f"sampling method must be 'ddpm' or 'ddim', got {method!r}")
    if (known is None) != (known_mask is None):
        raise ValueError("motion completion needs both `known` and `known_mask`")
    keep = None if known_mask is None else known_mask[:, :, None]
    init_key, loop_key = jax.random.split(key)
    model_timesteps = jnp.asarray(diffusion.timesteps, jnp.int32)

    def step(x, i):
        t = jnp.full((shape[0],), i, jnp.int32)
        replace_key, noise_key = jax.random.split(jax.random.fold_in(loop_key, i))
        if keep is not None:
            x = jnp.where(keep, diffusion.q_sample(known, t, jax.random.normal(replace_key, shape)), x)
        x0, log_var = diffusion.split_output(denoise(x, model_timesteps[t]), x, t, clamp=True)
        if keep is not None:
            x0 = jnp.where(keep, known, x0)
        noise = jax.random.normal(noise_key, shape) * (i > 0)
        if method == "ddpm":
            mean, _, _ = diffusion.q_posterior_mean_variance(x0, x, t)
            x = mean + jnp.exp(0.5 * log_var) * noise
        else:
            eps = diffusion.predict_eps(x0, x, t)
            alpha, alpha_prev = at_step(diffusion.alphas_cumprod, t, x), at_step(diffusion.alphas_cumprod_prev, t, x)
            sigma = eta * jnp.sqrt((1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev))
            x = x0 * jnp.sqrt(alpha_prev) + jnp.sqrt(1 - alpha_prev - sigma**2) * eps + sigma * noise
        return x, None

    x = jax.random.normal(init_key, shape)
    x, _ = jax.lax.scan(step, x, jnp.arange(diffusion.num_steps - 1, -1, -1))
    x = x if keep is None else jnp.where(keep, known, x)
    return x if mask is None else jnp.where(mask[:, :, None], x, 0.0)


def guided(conditional: Denoiser, unconditional: Denoiser, scale: float) -> Denoiser:
    """Classifier-free guidance on the x0 prediction; the variance comes from the conditional."""

    def denoise(x, t):
        cond, uncond = conditional(x, t), unconditional(x, t)
        x0_c, v_c = jnp.split(cond, 2, axis=-1)
        x0_u, _ = jnp.split(uncond, 2, axis=-1)
        return jnp.concatenate([x0_u + scale * (x0_c - x0_u), v_c], axis=-1)

    return denoise


def denoiser(
    graphdef, params, video, frame_mask, context_mask, *, guidance_scale: float = 1.0, cache_kv: bool = True
) -> Denoiser:
    """Bind a DiT (graphdef, params) to one batch: video [B, L, P, Dv], masks [B, L].

    With cache_kv the cross-attention keys/values of every block are computed here, once,
    and reused by every step; without it each step recomputes them (less memory).
    guidance_scale != 1 adds the unconditional branch (null video tokens). The model is
    merged anew inside each step: NNX modules may not cross the sampler's scan boundary.
    """

    def bind(drop):
        model = nnx.merge(graphdef, params)
        emb = model.embed_video(video, jnp.full(video.shape[:1], drop))
        cond = (
            {"kv": model.video_kv(emb), "route": model.route_vector(emb, context_mask)}
            if cache_kv
            else {"video_emb": emb}
        )
        return lambda x, t: nnx.merge(graphdef, params)(x, t, frame_mask, context_mask, **cond)

    if guidance_scale == 1.0:
        return bind(False)
    return guided(bind(False), bind(True), guidance_scale)


def motion_frames(batch) -> jax.Array:
    """[B, L] bool: the motion frames of a batch (real frames that are not context frames)."""
    return batch["frame_mask"] & ~batch["context_mask"]


class Sampler:
    """Samples motion for batches of video; made by `make_sampler`.

    `sampler(params, batch, key, known=None, known_mask=None)` -> a list over the batch's
    examples of their motion frames, numpy [T_i, 161] in time order (T_i: the example's
    motion frames, frame_mask & ~context_mask), normalised: undo it with the run's NormStats
    (`[stats.denormalize(m) for m in motions]`). Context (route image) and padded positions
    are not in it. known [B, L, 161] (normalised, in the batch's layout) and known_mask
    [B, L] bool complete a partial climb; the known frames come back exactly.

    `sampler.padded(...)`, same arguments, is the jitted function itself, with fixed shapes
    for use inside other jitted code or with sharded (multi-host) batches: it returns
    (x0 [B, L, 161], motion_frames(batch) [B, L]) with x0 exactly zero off the motion frames.
    """

    def __init__(self, graphdef, cfg):
        d, s = cfg.diffusion, cfg.sample
        diffusion = GaussianDiffusion.create(d.num_steps, d.beta_start, d.beta_end, respace=s.steps)

        @jax.jit
        def padded(params, batch, key, known=None, known_mask=None):
            denoise = denoiser(
                graphdef,
                params,
                batch["video"],
                batch["frame_mask"],
                batch["context_mask"],
                guidance_scale=s.guidance_scale,
                cache_kv=s.cache_kv,
            )
            shape, mask = batch["frame_mask"].shape + (MOTION_DIM,), motion_frames(batch)
            x0 = sample(
                denoise,
                diffusion,
                key,
                shape,
                method=s.method,
                eta=s.eta,
                known=known,
                known_mask=known_mask,
                mask=mask,
            )
            return x0, mask

        self.padded = padded

    def __call__(self, params, batch, key, known=None, known_mask=None) -> list[np.ndarray]:
        x0, mask = jax.device_get(self.padded(params, batch, key, known, known_mask))
        return [np.asarray(x[m]) for x, m in zip(x0, mask)]


def make_sampler(graphdef, cfg) -> Sampler:
    """A `Sampler` for the DiT graph `graphdef` (nnx.split) and the run config cfg (its
    diffusion and sample sections). A batch holds video [B, L, P, Dv], frame_mask and
    context_mask [B, L] (sabr_jax.data.pipeline lays examples out so)."""
    return Sampler(graphdef, cfg)
