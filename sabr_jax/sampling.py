"""Ancestral (DDPM) and DDIM samplers as one `lax.scan` each, with motion completion
and classifier-free guidance.

A denoiser is a function (x_t [B, L, F], t [B] on the 1000-step scale) -> model output
[B, L, 2F] (predicted x0, variance value). `denoiser` binds a DiT and one batch of video
to that form, computing the video keys/values of the first k block pairs once for all
steps (the others recompute theirs every step); `make_sampler` jits the whole thing and
returns what users want: each example's motion frames, and nothing from its context
(route image) or padded positions.

The video key/value cache (cfg.sample.kv_cache) trades memory for speed: the keys/values
of every block cost 2 x B x L x P x D values per block (about 76 GB in bf16 for sabr_l at
1116 frames x 700 patches), recomputing them costs one video projection per block and step.
'auto' compiles the sampler for the batch's shapes and takes the largest k whose compiled
memory fits the device (`plan_kv_cache`); sabr_jax.sample_plan reports the plan for a device
one does not have.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sabr_jax.cli import UserError
from sabr_jax.diffusion import GaussianDiffusion, at_step
from sabr_jax.flops import compiled_bytes
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


def guided(out: jax.Array, scale: float) -> jax.Array:
    """Classifier-free guidance on the x0 prediction: out [2B, L, 2F] is the model's output for
    the conditional (first B) and the unconditional (last B) branch -> [B, L, 2F]; the variance
    comes from the conditional."""
    cond, uncond = jnp.split(out, 2, axis=0)
    x0_c, v_c = jnp.split(cond, 2, axis=-1)
    x0_u, _ = jnp.split(uncond, 2, axis=-1)
    return jnp.concatenate([x0_u + scale * (x0_c - x0_u), v_c], axis=-1)


def denoiser(
    graphdef, params, video, frame_mask, context_mask, *, guidance_scale: float = 1.0, kv_pairs: int | None = None
) -> Denoiser:
    """Bind a DiT (graphdef, params) to one batch: video [B, L, P, Dv], masks [B, L].

    kv_pairs: the cross-attention keys/values of the first kv_pairs block pairs (None: all)
    are computed here, once, and reused by every step; the other pairs recompute theirs
    every step (less memory, more time). guidance_scale != 1 adds the unconditional branch
    (null video tokens, with a cache of its own) as a second half of the batch: both branches
    run in one forward per step. The model is merged anew inside each step: NNX modules may
    not cross the sampler's scan boundary.
    """
    model = nnx.merge(graphdef, params)
    batch = video.shape[0]
    branches = 1 if guidance_scale == 1.0 else 2
    both = lambda a: jnp.concatenate([a] * branches) if branches > 1 else a
    frame_mask, context_mask = both(frame_mask), both(context_mask)
    emb = model.embed_video(both(video), jnp.arange(branches * batch) >= batch)  # the second half: null video
    pairs = model.cfg.depth // 2
    cached = pairs if kv_pairs is None else kv_pairs
    cond = {"video_emb": emb} if cached < pairs else {}
    if cached:
        cond.update(kv=model.video_kv(emb, cached), route=model.route_vector(emb, context_mask))

    def denoise(x, t):
        out = nnx.merge(graphdef, params)(both(x), both(t), frame_mask, context_mask, **cond)
        return out if branches == 1 else guided(out, guidance_scale)

    return denoise


def motion_frames(batch) -> jax.Array:
    """[B, L] bool: the motion frames of a batch (real frames that are not context frames)."""
    return batch["frame_mask"] & ~batch["context_mask"]


def kv_policy(sample_cfg, depth: int) -> str | int:
    """cfg.sample's video key/value cache policy for a model of `depth` blocks: 'auto', or the
    number of block pairs cached (kv_cache 'all': depth / 2, 'none': 0, an even number of
    blocks k, an int or its digits (`--config.sample.kv_cache=14`): k / 2).

    A config from before kv_cache has the boolean cache_kv instead: True reads as 'auto'
    (which caches every block wherever that fits, as True did), False as 'none'.
    """
    policy = sample_cfg.get("kv_cache")
    if policy is None:
        policy = "auto" if sample_cfg.get("cache_kv", True) else "none"
    named = {"auto": "auto", "all": depth // 2, "none": 0}
    if isinstance(policy, str) and policy in named:
        return named[policy]
    blocks = int(policy) if isinstance(policy, str) and policy.isdigit() else policy
    if isinstance(blocks, int) and not isinstance(blocks, bool) and 0 <= blocks <= depth and blocks % 2 == 0:
        return blocks // 2
    raise UserError(
        f"config.sample.kv_cache={policy!r}: expected 'auto', 'all', 'none' or an even number of blocks in "
        f"0..{depth} (blocks come in spatial/temporal pairs)"
    )


@dataclasses.dataclass(frozen=True)
class KvPlan:
    """The cache policy for one sampler call. pairs: the model's block pairs; budget: bytes the
    call may use (None: no limit); measured: {cached pairs: compiled bytes} of every variant
    compiled; chosen: the pairs to cache, the most that fit (None: not even 0 fits)."""

    pairs: int
    budget: int | None
    measured: dict[int, int]
    chosen: int | None


def plan_kv_cache(measure: Callable[[int], int], pairs: int, budget: int | None, *, every: bool = False) -> KvPlan:
    """Choose how many of `pairs` block pairs cache their video keys/values.

    measure(k) -> the compiled bytes of the sampler caching the first k pairs. Caching all is
    measured first and taken when it fits (no limit: nothing is compiled). Otherwise caching
    none is measured; if it fits, k is where the line through the two reaches the budget
    (the cache grows by one pair's keys/values per pair), and k is compiled and stepped down
    until it fits. every=True also measures caching all and none when the choice is clear.
    """
    measured = {}

    def bytes_for(k):
        if k not in measured:
            measured[k] = measure(k)
        return measured[k]

    if not every and (budget is None or bytes_for(pairs) <= budget):
        return KvPlan(pairs, budget, measured, pairs)
    full, none = bytes_for(pairs), bytes_for(0)
    if budget is None or full <= budget:
        return KvPlan(pairs, budget, measured, pairs)
    if none > budget:
        return KvPlan(pairs, budget, measured, None)
    k = min(pairs - 1, (budget - none) * pairs // max(full - none, 1))
    while k > 0 and bytes_for(k) > budget:
        k -= 1
    return KvPlan(pairs, budget, measured, k)


HEADROOM = 0.1  # the share of a device's memory a plan leaves free (runtime, kernel workspaces, fragmentation)


def device_budget(args) -> int | None:
    """Bytes a sampler call with `args` may use on this process's first device: its free memory
    (memory_stats' bytes_limit - bytes_in_use) plus what the call's device-resident arguments
    already occupy, less HEADROOM; None where the device reports no limit (CPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        return None
    resident = sum(a.nbytes for a in jax.tree.leaves(args) if isinstance(a, jax.Array) and not _traced(a))
    return int((stats["bytes_limit"] - stats.get("bytes_in_use", 0) + resident) * (1 - HEADROOM))


def _traced(a) -> bool:
    return isinstance(a, jax.core.Tracer)


class Sampler:
    """Samples motion for batches of video; made by `make_sampler`.

    `sampler(params, batch, key, known=None, known_mask=None)` -> a list over the batch's
    examples of their motion frames, numpy [T_i, 161] in time order (T_i: the example's
    motion frames, frame_mask & ~context_mask), normalised: undo it with the run's NormStats
    (`[stats.denormalize(m) for m in motions]`). Context (route image) and padded positions
    are not in it. known [B, L, 161] (normalised, in the batch's layout) and known_mask
    [B, L] bool complete a partial climb; the known frames come back exactly.

    `sampler.padded(...)`, same arguments, is the jitted sampler with fixed shapes, for use
    inside other jitted code or with sharded (multi-host) batches: it returns (x0 [B, L, 161],
    motion_frames(batch) [B, L]) with x0 exactly zero off the motion frames.

    The video key/value cache follows cfg.sample.kv_cache (`kv_policy`); with 'auto' the
    first call for each set of shapes compiles the sampler for them, plans the cache for
    this device (`plan_kv_cache`; `device_budget`, or `memory` bytes less HEADROOM when
    given), keeps the plan in `sampler.plans` and runs the executable it compiled.
    """

    def __init__(self, graphdef, cfg, memory: int | None = None):
        d, s = cfg.diffusion, cfg.sample
        self.memory = memory
        diffusion = GaussianDiffusion.from_config(d, respace=s.steps)
        self.pairs = cfg.model.depth // 2
        self.policy = kv_policy(s, cfg.model.depth)
        self.plans: dict = {}  # shapes of a call -> its KvPlan ('auto')
        self._compiled: dict = {}  # (shapes, cached pairs) -> an executable `compile` made

        def padded(params, batch, key, known, known_mask, kv_pairs):
            denoise = denoiser(
                graphdef,
                params,
                batch["video"],
                batch["frame_mask"],
                batch["context_mask"],
                guidance_scale=s.guidance_scale,
                kv_pairs=kv_pairs,
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

        self._jitted = jax.jit(padded, static_argnames="kv_pairs")

    def kv_pairs(self, params, batch, key, known=None, known_mask=None) -> int:
        """The block pairs whose video keys/values a call with these arguments caches."""
        if self.policy != "auto":
            return self.policy
        args = (params, batch, key, known, known_mask)
        shapes = _signature(args)
        if shapes not in self.plans:
            abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)

            def measure(k):
                return compiled_bytes(self.compile(abstract, k))

            budget = device_budget(args) if self.memory is None else int(self.memory * (1 - HEADROOM))
            self.plans[shapes] = plan_kv_cache(measure, self.pairs, budget)
        plan = self.plans[shapes]
        if plan.chosen is None:
            raise UserError(
                f"sampling a batch of {batch['video'].shape[0]} x {batch['video'].shape[1]} frames needs "
                f"{plan.measured[0] / 2**30:.1f} GiB even recomputing every block's video keys/values, and this "
                f"device has {plan.budget / 2**30:.1f} GiB to spare: sample fewer examples or frames at once"
            )
        return plan.chosen

    def compile(self, abstract_args: tuple, kv_pairs: int):
        """The jitted sampler compiled ahead of time for (params, batch, key, known, known_mask)
        given as ShapeDtypeStructs (None for no completion), caching kv_pairs block pairs. Kept:
        `padded` runs it for arguments of these shapes."""
        key = _signature(abstract_args), kv_pairs
        if key not in self._compiled:
            self._compiled[key] = self._jitted.lower(*abstract_args, kv_pairs=kv_pairs).compile()
        return self._compiled[key]

    def padded(self, params, batch, key, known=None, known_mask=None):
        args = (params, batch, key, known, known_mask)
        k = self.kv_pairs(*args)
        compiled = self._compiled.get((_signature(args), k))
        if compiled is not None and not any(_traced(a) for a in jax.tree.leaves(args)):
            return compiled(*args)
        return self._jitted(*args, kv_pairs=k)

    def __call__(self, params, batch, key, known=None, known_mask=None) -> list[np.ndarray]:
        x0, mask = jax.device_get(self.padded(params, batch, key, known, known_mask))
        return [np.asarray(x[m]) for x, m in zip(x0, mask)]


def _signature(args) -> tuple:
    """A hashable key of the shapes and dtypes of a pytree of arrays."""
    leaves, treedef = jax.tree.flatten(args)
    return treedef, tuple((tuple(a.shape), str(a.dtype)) for a in leaves)


def make_sampler(graphdef, cfg, memory: int | None = None) -> Sampler:
    """A `Sampler` for the DiT graph `graphdef` (nnx.split) and the run config cfg (its
    model depth and its diffusion and sample sections). A batch holds video [B, L, P, Dv],
    frame_mask and context_mask [B, L] (sabr_jax.data.pipeline lays examples out so).
    memory: the device bytes kv_cache='auto' plans for (default: what the device reports)."""
    return Sampler(graphdef, cfg, memory)
