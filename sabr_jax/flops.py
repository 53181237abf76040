"""What a program costs: matrix-multiply FLOPs of its jaxpr, device bytes of its compiled form.

XLA's cost analysis counts the body of a loop once, whatever its trip count, and the model
scans over its blocks (and the train step over grad_accum micro-batches), so it under-reports
by about depth/2. `jaxpr_flops` counts matrix-multiply FLOPs on the traced program instead,
multiplying loop bodies by their lengths: forward, backward and rematerialised recomputation,
i.e. what the hardware executes. The dry run (sabr_jax.dry_run) and the training loop's MFU
(sabr_jax.loop) use it; `compile_abstract` and `compiled_bytes` serve any memory plan made
ahead of time (the dry run's, the sampler's).
"""

from __future__ import annotations

import contextlib
import math

import jax


def _sub_jaxprs(params):
    for value in params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, jax.extend.core.ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, jax.extend.core.Jaxpr):
                yield v


def jaxpr_flops(jaxpr) -> float:
    """Matrix-multiply FLOPs (2 per multiply-add) of a (closed) jaxpr, whole program.

    Loops count their length times (scan; a while loop, whose length is unknown, once),
    a cond its most expensive branch, a shard_map body once per shard, a Pallas kernel
    once per grid point.
    """
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name, params = eqn.primitive.name, eqn.params
        if name == "dot_general":
            (contract, _), _ = params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
            continue
        if name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape  # (out features, in features / groups, *window), permuted
            out_dim = params["dimension_numbers"].rhs_spec[0]
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) / rhs[out_dim]
            continue
        subs = [jaxpr_flops(j) for j in _sub_jaxprs(params)]
        if not subs:
            continue
        if name == "cond":
            total += max(subs)
        elif name == "scan":
            total += params["length"] * sum(subs)
        elif name == "shard_map":
            mesh, axes = params["mesh"], params.get("manual_axes") or params.get("axis_names") or ()
            total += math.prod(mesh.shape[a] for a in axes) * sum(subs)
        elif name == "pallas_call":
            grid = getattr(params.get("grid_mapping"), "grid", ()) or ()
            total += math.prod(int(g) for g in grid) * sum(subs)
        else:  # jit, remat, custom_jvp/vjp, while (body once), ...
            total += sum(subs)
    return total


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
