"""Device mesh and how every array is laid out on it, declared once.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters and
optimiser state sharded), `tensor` (tensor parallel over heads and MLP width). The batch
is split over data x fsdp. Parameters carry logical axis names (sabr_jax.model.dit); RULES
maps each name to a mesh axis. A dimension that does not divide by its mesh axis size, or
whose mesh axis an earlier dimension already uses, stays replicated. Activations: `whole`
pins the model's activations between its sharded layers to the batch's layout.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sabr_jax.errors import UserError

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")

# Logical axis name (sabr_jax.model.dit tags every parameter dimension with one) -> mesh axis, or
# None: replicated. Every name the model uses is listed (tests/test_tensor_parallel.py checks). Tensor
# parallelism is Megatron's: q/k/v and MLP-in kernels split by output (whole heads), output
# projections by input, so one all-reduce closes each attention and MLP.
RULES = {
    "layers": None,  # the stacked block pairs (nnx.scan over them): every device holds its part of every layer
    "embed": "fsdp",  # the width D as a kernel's input or output: FSDP shards every kernel over it
    "embed_vec": None,  # the width D of a vector applied elementwise (bias, LayerNorm, learned token): tiny, and
    # sharded it would make XLA shard the activations it is added to
    "heads": "tensor",  # attention heads: each tensor shard holds whole heads of q, k, v and the output projection
    "head_dim": None,  # the size of one head (a head is never split)
    "fused": None,  # which of the projections fused in one kernel (q/k/v, k/v, adaLN shift/scale/gate):
    # never split, every shard holds its heads (or width) of each
    "mlp": "tensor",  # the MLP's hidden width: fc1 split by output, fc2 by input
    "mod": "tensor",  # the width of each adaLN modulation (the small [chunks, B, D] output is then gathered whole)
    "freq": None,  # the 256 sinusoidal frequencies of the timestep embedding
    "embed_out": None,  # the timestep MLP's output width: the conditioning vector c stays whole
    "video": None,  # the video-token width Dv (DINOv2's) going into video_embedder
    "slots": None,  # the 27 token slots of the slots layout (bbox, camera, 24 joints, betas)
    "slot_in": None,  # one slot's motion values (at most 10)
    "slot_out": None,  # one slot's outputs (x0 and variance values)
    "motion_in": None,  # the 161 motion values (frame layout)
    "motion_out": None,  # the 322 outputs: x0 and variance values (frame layout)
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
            raise UserError(f"mesh: {len(devices)} devices are not divisible by {dict(zip(AXES, sizes))}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise UserError(f"mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, have {len(devices)}")
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


def whole(x: jax.Array, batch_axis: int = 0) -> jax.Array:
    """Inside jit under `jax.set_mesh`: constrain an activation to the batch's layout, its batch
    axis over data x fsdp and every other axis whole on every device (never split by width, as
    Megatron keeps the activations between its tensor-parallel layers). Without a mesh (one
    device) x is returned as is; a batch that does not divide is left to XLA."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    axes = tuple(a for a in BATCH if a in mesh.axis_names)
    batch = axes if axes and x.shape[batch_axis] % math.prod(mesh.shape[a] for a in axes) == 0 else P.UNCONSTRAINED
    return jax.lax.with_sharding_constraint(x, P(*(batch if i == batch_axis else None for i in range(x.ndim))))


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
