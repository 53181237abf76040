"""The sampler's video key/value cache: how many block pairs cache theirs, and the memory plan.

The sampler (sabr_jax.diffusion.sampling) computes the cross-attention keys/values of the
first k block pairs once per video and reuses them for every step; the other pairs
recompute theirs every step. Caching every block costs 2 x B x L x P x D values per block
(about 76 GB in bf16 for sabr_l at 1116 frames x 700 patches), recomputing them costs one
video projection per block and step. cfg.sample.kv_cache chooses (`kv_policy`); 'auto'
takes the largest k whose compiled memory fits the device (`plan_kv_cache`, `device_budget`).

A plan for a device one does not have (`sabr-sample --dry_run`, `sampling.plan`): the whole
jitted sampler caching no block is compiled ahead of time for abstract shapes
(jax.ShapeDtypeStruct; nnx.eval_shape builds no parameters) on this machine's CPU backend,
and XLA's memory_analysis gives its bytes (arguments + outputs + temporaries - aliased).
Caching the first k block pairs adds their keys/values, whose size is exact: k x 2 blocks x
(K, V) x B x L x P x D x the dtype's bytes (twice with guidance). The cache is not compiled
on the CPU because the CPU's figure is wrong for a GPU: XLA's CPU backend writes into a
bfloat16 stack in float32 (it converts the whole stack), so a bf16 cache shows up at about
1.8 times its size; a GPU keeps it in bf16. The compiled part is an upper bound on a GPU
too: the CPU backend materialises the attention score matrices, which cuDNN flash attention
does not, and converts bf16 arrays to float32 in places (as above). On the device itself,
`Sampler` with kv_cache='auto' compiles for that device instead.

A device's budget is its memory less HEADROOM (CUDA context, kernel workspaces,
fragmentation); it assumes JAX may grow into the whole device (its default since the
0.75+ policy; with an explicit XLA_CLIENT_MEM_FRACTION, give the bytes that leaves).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

from sabr_jax.errors import UserError
from sabr_jax.parallel.flops import GIB


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
    resident = sum(
        a.nbytes for a in jax.tree.leaves(args) if isinstance(a, jax.Array) and not isinstance(a, jax.core.Tracer)
    )
    return int((stats["bytes_limit"] - stats.get("bytes_in_use", 0) + resident) * (1 - HEADROOM))


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
