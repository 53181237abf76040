"""`sabr-sample --dry_run`: the sampler's memory plan for a config, a frame count and a device.

The sampler's video key/value cache (cfg.sample.kv_cache, sabr_jax.sampling) is the one
large choice: caching every block's keys/values costs 2 x B x L x P x D values per block,
recomputing them costs a video projection per block and step.

Method: the whole jitted sampler (every step, as `Sampler` runs it) caching no block is
compiled ahead of time for abstract shapes (jax.ShapeDtypeStruct; nnx.eval_shape builds
no parameters) on this machine's CPU backend, and XLA's memory_analysis gives its bytes
(arguments + outputs + temporaries - aliased). Caching the first k block pairs adds their
keys/values, whose size is exact: k x 2 blocks x (K, V) x B x L x P x D x the dtype's
bytes (twice with guidance). `sampling.plan_kv_cache` takes the largest k that fits.
The cache is not compiled on the CPU because the CPU's figure is wrong for a GPU: XLA's
CPU backend writes into a bfloat16 stack in float32 (it converts the whole stack), so a
bf16 cache shows up at about 1.8 times its size; a GPU keeps it in bf16. The compiled
part is an upper bound on a GPU too: the CPU backend materialises the attention score
matrices, which cuDNN flash attention does not, and converts bf16 arrays to float32 in
places (as above). On the
device itself, `Sampler` with kv_cache='auto' compiles for that device instead.

A device's budget is its memory less HEADROOM (CUDA context, kernel workspaces,
fragmentation); it assumes JAX may grow into the whole device (its default since the
0.75+ policy; with an explicit XLA_CLIENT_MEM_FRACTION, give the bytes that leaves).
"""

from __future__ import annotations

import copy
import dataclasses
import time

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sabr_jax import sharding
from sabr_jax.cli import UserError
from sabr_jax.data.sources import resolve_shapes
from sabr_jax.dry_run import GIB, abstract_batch
from sabr_jax.flops import compiled_bytes
from sabr_jax.sampling import HEADROOM, KvPlan, make_sampler, plan_kv_cache
from sabr_jax.trainer import abstract_model

# Device memory in GiB, as nvidia-smi reports it; None: no limit (a CPU's host memory).
DEVICES = {
    "h100-80gb": 81559 / 1024,
    "a100-80gb": 80.0,
    "a100-40gb": 40.0,
    "l4-24gb": 23034 / 1024,
    "t4-16gb": 15.0,
    "colab": 15.0,  # Colab's T4: 15 GB usable
    "cpu": None,
}


def device_bytes(device: str | int) -> int | None:
    """A device name of DEVICES, or its memory in bytes (an int or digits) -> bytes (None: no limit)."""
    if isinstance(device, int) or (isinstance(device, str) and device.isdigit()):
        return int(device)
    if device not in DEVICES:
        raise UserError(f"--device {device!r}: expected one of {', '.join(DEVICES)} or the device's memory in bytes")
    gib = DEVICES[device]
    return None if gib is None else int(gib * GIB)


@dataclasses.dataclass(frozen=True)
class SamplePlan:
    """The plan for sampling `samples` clips of `num_frames` time positions at once on a device
    of `device_bytes` (None: no limit). kv: the policy and the bytes of each variant (the compiled
    sampler caching none + the cached pairs' keys/values); pair_bytes: one block pair's video
    keys/values (both branches with guidance), exact; compile_seconds: the CPU compile's."""

    description: str
    device: str
    device_bytes: int | None
    kv: KvPlan
    pair_bytes: int
    compile_seconds: float

    @property
    def kv_cache(self) -> str | int | None:
        """The chosen cfg.sample.kv_cache value ('all', 'none', a block count; None: nothing fits)."""
        chosen, pairs = self.kv.chosen, self.kv.pairs
        return None if chosen is None else "all" if chosen == pairs else "none" if chosen == 0 else 2 * chosen

    def on(self, device: str | int) -> SamplePlan:
        """The same sampler planned for another device (nothing compiled again)."""
        limit, recompute = device_bytes(device), self.kv.measured[0]
        budget = None if limit is None else int(limit * (1 - HEADROOM))
        kv = plan_kv_cache(lambda k: recompute + k * self.pair_bytes, self.kv.pairs, budget, every=True)
        return dataclasses.replace(self, device=str(device), device_bytes=limit, kv=kv)

    def text(self) -> str:
        kv = self.kv
        gib = lambda b: f"{b / GIB:.1f} GiB" if b >= GIB / 10 else f"{b / 2**20:.2f} MiB"
        budget = "no limit" if kv.budget is None else f"{gib(kv.budget)} budget ({HEADROOM:.0%} headroom)"
        device = f"{self.device}, {'no limit' if self.device_bytes is None else gib(self.device_bytes)}"
        lines = [
            f"sample plan: {self.description}",
            f"device: {device}; {budget}",
            "method: the sampler caching no block compiled ahead of time on the CPU backend for abstract shapes "
            f"({self.compile_seconds:.0f} s; XLA memory_analysis: arguments + outputs + temporaries, an upper bound "
            "on a GPU), plus the exact size of the cached keys/values",
            f"video keys/values: {gib(self.pair_bytes)} per block pair",
            f"{'policy':<12} {'cached blocks':>13} {'memory':>10}  fits",
        ]
        for pairs, size in sorted(kv.measured.items(), key=lambda item: -item[0]):
            name = "all" if pairs == kv.pairs else "none" if pairs == 0 else "chunked"
            fits = "yes" if kv.budget is None or size <= kv.budget else "no"
            mark = "  <- chosen" if pairs == kv.chosen else ""
            lines.append(f"{name:<12} {2 * pairs:>13} {gib(size):>10}  {fits}{mark}")
        if kv.chosen is None:
            lines.append(
                "chosen: nothing fits, not even recomputing every block's keys/values per step: sample fewer clips "
                "at once, fewer frames, or use a larger device"
            )
        else:
            lines.append(
                f"chosen: kv_cache={self.kv_cache!r} (video keys/values of the first {2 * kv.chosen} of "
                f"{2 * kv.pairs} blocks cached, the other {2 * (kv.pairs - kv.chosen)} recomputed every step)"
            )
        return "\n".join(lines)


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
