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
memory fits the device (sabr_jax.diffusion.kv_cache); `plan` reports the plan for a device one
does not have (`sabr-sample --dry_run`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sabr_jax.data.pipeline import abstract_batch, motion_frames
from sabr_jax.data.sources import resolve_shapes
from sabr_jax.diffusion.gaussian import SAMPLING_METHODS, GaussianDiffusion
from sabr_jax.diffusion.kv_cache import HEADROOM, KvPlan, SamplePlan, device_budget, kv_policy, plan_kv_cache
from sabr_jax.errors import UserError
from sabr_jax.model.factory import abstract_model
from sabr_jax.motion import MOTION_DIM
from sabr_jax.parallel import sharding
from sabr_jax.parallel.flops import compiled_bytes

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
    if method not in SAMPLING_METHODS:
        raise ValueError(f"sampling method must be one of {SAMPLING_METHODS}, got {method!r}")
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
        return diffusion.reverse_step(x0, x, t, log_var, noise, method, eta), None

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
        if compiled is not None and not any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(args)):
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


def _pair_kv_bytes(graphdef, params, video) -> int:
    """Bytes of one block pair's cached video keys/values for `video` (abstract): what
    `DiT.video_kv(emb, 1)` makes, whatever the conditioning options."""

    def first_pair(params, video):
        model = nnx.merge(graphdef, params)
        return model.video_kv(model.embed_video(video), 1)

    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(jax.eval_shape(first_pair, params, video)))


def plan(
    cfg: ml_collections.ConfigDict, num_frames: int, device: str | int, samples: int = 1, name: str = ""
) -> SamplePlan:
    """The memory plan for sampling `samples` clips of `num_frames` time positions (context +
    motion frames) at once with cfg on `device` (a DEVICES name or bytes). cfg is not changed;
    its unset shapes are the dataset's or the paper's (sources.resolve_shapes)."""
    cfg = resolve_shapes(copy.deepcopy(cfg))
    with cfg.unlocked():
        cfg.batch_size, cfg.data.max_frames = samples, num_frames
    cpu = jax.devices("cpu")[0]
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, [cpu])
    whole = NamedSharding(mesh, P())
    graphdef, state = nnx.split(abstract_model(cfg))
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=whole), nnx.to_pure_dict(state))
    batch = abstract_batch(cfg, whole)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=whole)
    sampler = make_sampler(graphdef, cfg)
    m, s = cfg.model, cfg.sample
    branches = 1 if s.guidance_scale == 1.0 else 2
    pair_bytes = branches * _pair_kv_bytes(graphdef, params, batch["video"])
    start = time.perf_counter()
    with jax.set_mesh(mesh):  # attention picks the CPU's kernel whatever this machine's default device
        recompute = compiled_bytes(sampler.compile((params, batch, key, None, None), 0))
    seconds = time.perf_counter() - start
    measured = KvPlan(sampler.pairs, None, {0: recompute}, None)
    description = (
        f"{name + ': ' if name else ''}layout {m.layout}, width {m.width}, depth {m.depth}, {m.dtype}; {samples} x "
        f"{num_frames} frames x {cfg.data.num_patches} patches x {m.video_dim}; {s.steps} {s.method} steps, "
        f"guidance {s.guidance_scale}"
    )
    return SamplePlan(description, "", None, measured, pair_bytes, seconds).on(device)


def dry_run(cfg: ml_collections.ConfigDict, num_frames: int, device: str | int, samples: int = 1) -> str:
    """`sabr-sample --dry_run`: the plan (`plan`) as printable text."""
    return plan(cfg, num_frames, device, samples).text()
