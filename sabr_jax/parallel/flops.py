"""What a program costs: matrix-multiply FLOPs of its jaxpr, device bytes of its compiled form.

XLA's cost analysis counts the body of a loop once, whatever its trip count, and the model
scans over its blocks (and the train step over grad_accum micro-batches), so it under-reports
by about depth/2. `jaxpr_flops` counts matrix-multiply FLOPs on the traced program instead,
multiplying loop bodies by their lengths: forward, backward and rematerialised recomputation,
i.e. what the hardware executes. The dry run (sabr_jax.training.dry_run) and the training loop's MFU
(sabr_jax.training.loop) use it; `compile_abstract` and `compiled_bytes` serve any memory plan made
ahead of time (the dry run's, the sampler's).
"""

from __future__ import annotations

import collections
import contextlib
import math
from typing import NamedTuple

import jax
import jax.extend

GIB = 2**30  # bytes in a GiB, for memory reports


def _sub_jaxprs(params):
    for value in params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, jax.extend.core.ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, jax.extend.core.Jaxpr):
                yield v


class Matmul(NamedTuple):
    """One matrix multiply of a program: a dot_general's operand shapes, dimension numbers and
    dtypes (a convolution: `dimension_numbers` None, only `flops` is meaningful)."""

    lhs: tuple[int, ...]
    rhs: tuple[int, ...]
    dimension_numbers: tuple | None
    dtype: str
    out_dtype: str
    flops: float  # 2 per multiply-add


def matmuls(jaxpr) -> collections.Counter[Matmul]:
    """The matrix multiplies of a (closed) jaxpr, whole program -> how many times each runs.

    Loops count their length times (scan; a while loop, whose length is unknown, once),
    a cond its most expensive branch, a shard_map body once per shard, a Pallas kernel
    once per grid point.
    """
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    counts = collections.Counter()
    for eqn in jaxpr.eqns:
        name, params = eqn.primitive.name, eqn.params
        if name in ("dot_general", "conv_general_dilated"):
            lhs, rhs, out = eqn.invars[0].aval, eqn.invars[1].aval, eqn.outvars[0].aval
            if name == "dot_general":
                dims = params["dimension_numbers"]  # ((lhs, rhs contracting), (lhs, rhs batch))
                flops = 2.0 * math.prod(out.shape) * math.prod(lhs.shape[d] for d in dims[0][0])
            else:  # rhs: (out features, in features / groups, *window), permuted
                dims = None
                flops = (
                    2.0
                    * math.prod(out.shape)
                    * math.prod(rhs.shape)
                    / rhs.shape[params["dimension_numbers"].rhs_spec[0]]
                )
            counts[Matmul(lhs.shape, rhs.shape, dims, str(lhs.dtype), str(out.dtype), flops)] += 1
            continue
        subs = [matmuls(j) for j in _sub_jaxprs(params)]
        if not subs:
            continue
        if name == "cond":
            counts += max(subs, key=total_flops)
            continue
        times = 1
        if name == "scan":
            times = params["length"]
        elif name == "shard_map":
            mesh, axes = params["mesh"], params.get("manual_axes") or params.get("axis_names") or ()
            times = math.prod(mesh.shape[a] for a in axes)
        elif name == "pallas_call":
            times = math.prod(int(g) for g in getattr(params.get("grid_mapping"), "grid", ()) or ())
        for sub in subs:  # jit, remat, custom_jvp/vjp, while (body once), ...
            for m, n in sub.items():
                counts[m] += times * n
    return counts


def total_flops(counts: collections.Counter[Matmul]) -> float:
    """The FLOPs of `matmuls`' counts."""
    return sum(m.flops * n for m, n in counts.items())


def jaxpr_flops(jaxpr) -> float:
    """Matrix-multiply FLOPs (2 per multiply-add) of a (closed) jaxpr, whole program (`matmuls`)."""
    return total_flops(matmuls(jaxpr))


def compile_abstract(jitted, *args, mesh=None):
    """Trace, lower and compile `jitted` (a jax.jit function) for `args` (arrays or
    jax.ShapeDtypeStructs, with their shardings), under `mesh` if given (attention picks its
    kernel for the mesh's platform). -> (traced, lowered, compiled); nothing runs.

    FLOPs: `jaxpr_flops(traced.jaxpr)`; bytes: `compiled_bytes(compiled)`.
    """
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        traced = jitted.trace(*args)
        lowered = traced.lower()
        compiled = lowered.compile()
    return traced, lowered, compiled


def compiled_bytes(compiled) -> int:
    """Device bytes a compiled program needs while it runs (per device): arguments + outputs +
    temporaries - aliased (donated arguments reused as outputs)."""
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
