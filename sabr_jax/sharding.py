"""Device mesh and how every array is laid out on it, declared once.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters and
optimiser state sharded), `tensor` (tensor parallel over heads and MLP width). The batch
is split over data x fsdp. Parameters carry logical axis names (sabr_jax.model); RULES
maps each name to a mesh axis. A dimension that does not divide by its mesh axis size, or
whose mesh axis an earlier dimension already uses, stays replicated.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")

# logical parameter axis -> mesh axis (names not listed are replicated)
RULES = {
    "embed": "fsdp",
    "heads": "tensor",
    "mlp": "tensor",
    "mod": "tensor",
}


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one size may be -1 (all remaining devices)."""
    devices = jax.devices() if devices is None else devices
    sizes = [int(mesh_cfg[a]) for a in AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices are not divisible by {dict(zip(AXES, sizes))}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(sizes), AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, P(BATCH))


def batch_shards(mesh: Mesh) -> int:
    """How many ways the batch is split: mesh data x fsdp."""
    return math.prod(mesh.shape[a] for a in BATCH)


def process_rows(batch_size: int, mesh: Mesh) -> tuple[int, int]:
    """The rows [start, stop) of a global batch that this process's devices hold.

    `jax.make_array_from_process_local_data` takes exactly these rows from each process.
    Processes whose devices hold the same rows (the batch replicated across processes,
    e.g. over a 'tensor' axis spanning hosts) get the same range and load the same data.
    """
    index_map = batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
    rows = sorted({r for idx in index_map.values() for r in range(*idx[0].indices(batch_size))})
    start, stop = rows[0], rows[-1] + 1
    if rows != list(range(start, stop)) or batch_size % (stop - start) or start % (stop - start):
        raise ValueError(
            f"process {jax.process_index()} holds rows {rows} of the batch: not one aligned contiguous block. "
            "Order the mesh devices by process (sharding.make_mesh does)."
        )
    return start, stop


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_specs(abstract_params: nnx.State, mesh: Mesh):
    """PartitionSpecs for a State of Variables (shapes suffice), as a pure dict."""

    def spec(var):
        names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
        axes = []
        for dim, name in zip(var.shape, names):
            axis = RULES.get(name)
            usable = axis is not None and axis not in axes and dim % mesh.shape[axis] == 0
            axes.append(axis if usable else None)
        return P(*axes)

    specs = jax.tree.map(spec, abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(specs)
