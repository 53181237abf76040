"""`sabr-train --dry_run`: compile the real train step without training and report its size.

Prints the parameter count, FLOPs per step, the compiled memory per device, which
attention kernels the step uses and how many collectives (all-gather, all-reduce, ...) it
runs, in total and in the block scan's loop bodies. With a TPU topology name (e.g. "v5p:2x2x2") the
step is compiled ahead of time for that pod slice on any machine (needs libtpu: the
`tpu` extra), so a team learns before launch whether a config fits.

FLOPs are `sabr_jax.parallel.flops.jaxpr_flops` of the traced step (matrix multiplies, loop bodies
times their trip counts; XLA's own count, also printed, sees each loop body once).
"""

from __future__ import annotations

import collections
import functools
import math
import re

import jax
from jax.experimental import topologies

from sabr_jax.data.pipeline import abstract_batch
from sabr_jax.errors import UserError, one_line
from sabr_jax.parallel import sharding
from sabr_jax.parallel.flops import GIB, compile_abstract, compiled_bytes, jaxpr_flops
from sabr_jax.training.trainer import Trainer

# HBM per chip, by TPU generation (public figures), for the "fits" verdict.
HBM_GIB = {
    "v4": 16,  # v4 topologies list each TensorCore (16 GiB) as a device
    "v5e": 16,
    "v5 lite": 16,
    "v5p": 95,
    "v5": 95,
    "v6e": 32,
    "v6 lite": 32,
}


def topology_devices(name: str):
    """Devices of a TPU topology such as 'v5p:2x2x1', for ahead-of-time compilation."""
    try:
        return topologies.get_topology_desc(name, "tpu").devices
    except Exception as e:  # libtpu missing or an unknown topology name
        raise UserError(
            f"--topology {name}: cannot describe this TPU topology ({one_line(e)}); "
            "ahead-of-time TPU compiles need libtpu: pip install 'sabr_jax[tpu]'"
        ) from e


# ---------------------------------------------------------------------- collectives
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_COLLECTIVE = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")  # an async op counts once, at -start
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{$")
_CALLEE = re.compile(r"(body|condition|to_apply|calls|branch_computations)=(\{[^}]*\}|%?[\w.\-]+)")


def collective_counts(hlo_text: str) -> dict[str, int]:
    """Collective ops in compiled HLO text (`compiled.as_text()`), each once per call site (a loop
    body once, whatever its trip count): one count per kind, their 'total', and 'in_loops': how
    many of them sit in while-loop bodies (the block scan's: per block pair, forward and backward).
    """
    computations, entry, current = {}, None, None
    for line in hlo_text.splitlines():
        if current is None:
            match = _COMPUTATION.match(line)
            if match and "(" in line:
                current = match.group(2)
                computations[current] = []
                entry = current if match.group(1) else entry
        elif line.startswith("}"):
            current = None
        else:
            computations[current].append(line)

    @functools.cache
    def count(name: str) -> tuple[collections.Counter, int]:
        ops, in_loops = collections.Counter(), 0
        for line in computations.get(name, ()):
            ops.update(m.group(1) for m in _COLLECTIVE.finditer(line))
            for role, callees in _CALLEE.findall(line):
                for callee in re.findall(r"[\w.\-]+", callees):
                    sub_ops, sub_loops = count(callee)
                    ops += sub_ops
                    in_loops += sum(sub_ops.values()) if role == "body" else sub_loops
        return ops, in_loops

    if entry is None:
        raise ValueError("collective_counts: no ENTRY computation in the HLO text")
    ops, in_loops = count(entry)
    return {**{op: ops[op] for op in COLLECTIVES}, "total": sum(ops.values()), "in_loops": in_loops}


def kernel_counts(hlo_text: str) -> dict[str, int]:
    """Attention kernels in lowered (StableHLO) text: Mosaic (splash) custom calls."""
    return {"splash (Mosaic custom calls)": hlo_text.count("tpu_custom_call")}


# ---------------------------------------------------------------------- compile
def compile_step(cfg, devices=None):
    """-> (trainer, compiled train step, FLOPs per step, lowered text) for cfg on `devices`."""
    mesh = sharding.make_mesh(cfg.mesh, devices)
    trainer = Trainer(cfg, mesh)
    batch = abstract_batch(cfg, trainer.batch_sharding)
    traced, lowered, compiled = compile_abstract(trainer.jit_train_step, trainer.abstract_state(), batch, mesh=mesh)
    return trainer, compiled, jaxpr_flops(traced.jaxpr), lowered.as_text()


def hbm_gib(device) -> float | None:
    kind = device.device_kind.lower()
    for name, gib in sorted(HBM_GIB.items(), key=lambda kv: -len(kv[0])):
        if kind.startswith(f"tpu {name}") or kind.startswith(name):
            return gib
    return None


def report(cfg, topology: str | None = None) -> dict:
    devices = topology_devices(topology) if topology else None
    try:
        trainer, compiled, flops, text = compile_step(cfg, devices)
    except Exception as e:  # XLA refuses a step whose buffers exceed the device memory
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        print(f"target: {topology or jax.devices()[0].platform}, mesh {dict(cfg.mesh)}")
        print(f"fits: NO (the compiler says: {str(e).splitlines()[0][:300]})")
        return {"fits": False, "error": str(e)}
    params = sum(math.prod(x.shape) for x in jax.tree.leaves(trainer.abstract_state()["params"]))
    mem = compiled.memory_analysis()
    per_device = compiled_bytes(compiled)
    n = trainer.mesh.size
    device = trainer.mesh.devices.flat[0]
    hbm = hbm_gib(device) if device.platform == "tpu" else None
    kernels = kernel_counts(text)
    collectives = collective_counts(compiled.as_text())
    figures = {
        "parameters": params,
        "devices": n,
        "flops_per_step": flops,
        "flops_per_device": flops / n,
        "xla_flops_per_device": float((compiled.cost_analysis() or {}).get("flops", 0.0)),
        "memory_per_device_gib": per_device / GIB,
        "hbm_per_device_gib": hbm,
        "fits": None if hbm is None else per_device / GIB <= hbm,
        "splash_calls": kernels["splash (Mosaic custom calls)"],
        "collectives": collectives,
    }
    where = topology or f"{n} x {jax.devices()[0].platform}"
    print(
        f"config: layout={cfg.model.layout} width={cfg.model.width} depth={cfg.model.depth} "
        f"frames={cfg.data.max_frames} patches={cfg.data.num_patches} global batch={cfg.batch_size} "
        f"grad_accum={cfg.grad_accum} dtype={cfg.model.dtype} remat={cfg.model.remat}"
    )
    print(f"target: {where} ({device.device_kind}), mesh {dict(trainer.mesh.shape)}")
    print(f"parameters: {params}")
    print(f"flops per step: {flops:.4g} ({flops / n:.4g} per device; matmuls incl. backward and remat)")
    print(
        f"memory per device: {per_device / GIB:.2f} GiB (arguments {mem.argument_size_in_bytes / GIB:.2f}, "
        f"temporaries {mem.temp_size_in_bytes / GIB:.2f}, outputs {mem.output_size_in_bytes / GIB:.2f}, "
        f"aliased {mem.alias_size_in_bytes / GIB:.2f})"
    )
    print("attention kernels: " + ", ".join(f"{k} {v}" for k, v in kernels.items()))
    kinds = ", ".join(f"{op} {collectives[op]}" for op in COLLECTIVES)
    print(
        f"collectives: {collectives['total']} ({kinds}); {collectives['in_loops']} of them in loop bodies "
        "(the block scan: per block pair, forward and backward)"
    )
    if hbm is not None:
        print(f"fits: {'yes' if figures['fits'] else 'NO'} ({per_device / GIB:.2f} of {hbm} GiB HBM per chip)")
    return figures
