"""`sabr-train --dry_run`: compile the real train step without training and report its size.

Prints `parameters: N`, FLOPs per step (XLA's cost analysis) and the compiled memory
estimate per device. With a TPU topology name (e.g. "v5p:2x2x2") the step is compiled
ahead of time for that pod slice on any machine (needs libtpu: the `tpu` extra), so a
team learns before launch whether a config fits.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental import topologies

from sabr_jax import sharding
from sabr_jax.motion import MOTION_DIM
from sabr_jax.trainer import Trainer

GIB = 2**30


def abstract_batch(cfg, batch_sharding) -> dict:
    """ShapeDtypeStructs of one global batch; video tokens in the compute dtype."""
    b, l, p = cfg.batch_size, cfg.data.max_frames, cfg.data.num_patches

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)

    return {
        "motion": spec((b, l, MOTION_DIM), jnp.float32),
        "video": spec((b, l, p, cfg.model.video_dim), jnp.dtype(cfg.model.dtype)),
        "frame_mask": spec((b, l), jnp.bool_),
        "context_mask": spec((b, l), jnp.bool_),
    }


def topology_devices(name: str):
    """Devices of a TPU topology such as 'v5p:2x2x1', for ahead-of-time compilation."""
    try:
        return topologies.get_topology_desc(name, "tpu").devices
    except Exception as e:  # libtpu missing or an unknown topology name
        raise SystemExit(
            f"cannot describe TPU topology {name!r}: {e}\n"
            "Ahead-of-time TPU compiles need libtpu: pip install 'sabr_jax[tpu]'."
        ) from e


def compile_step(cfg, devices=None):
    """-> (trainer, compiled train step) for cfg on `devices` (default: this machine's)."""
    mesh = sharding.make_mesh(cfg.mesh, devices)
    trainer = Trainer(cfg, mesh)
    with jax.set_mesh(mesh):
        compiled = trainer.jit_train_step.lower(trainer.abstract_state(), abstract_batch(cfg, trainer.batch_sharding)).compile()
    return trainer, compiled


def report(cfg, topology: str | None = None) -> dict:
    devices = topology_devices(topology) if topology else None
    trainer, compiled = compile_step(cfg, devices)
    params = sum(math.prod(x.shape) for x in jax.tree.leaves(trainer.abstract_state()["params"]))
    flops = float((compiled.cost_analysis() or {}).get("flops", 0.0))
    mem = compiled.memory_analysis()
    per_device = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    n = trainer.mesh.size
    figures = {
        "parameters": params,
        "devices": n,
        "flops_per_device": flops,
        "flops_per_step": flops * n,
        "memory_per_device_gib": per_device / GIB,
    }
    where = topology or f"{n} x {jax.devices()[0].platform}"
    print(f"config: layout={cfg.model.layout} width={cfg.model.width} depth={cfg.model.depth} "
          f"frames={cfg.data.max_frames} patches={cfg.data.num_patches} global batch={cfg.batch_size} "
          f"dtype={cfg.model.dtype} remat={cfg.model.remat}")
    print(f"target: {where}, mesh {dict(trainer.mesh.shape)}")
    print(f"parameters: {params}")
    print(f"flops per step: {flops * n:.4g} ({flops:.4g} per device)")
    print(f"memory per device: {per_device / GIB:.2f} GiB (arguments {mem.argument_size_in_bytes / GIB:.2f}, "
          f"temporaries {mem.temp_size_in_bytes / GIB:.2f}, outputs {mem.output_size_in_bytes / GIB:.2f}, "
          f"aliased {mem.alias_size_in_bytes / GIB:.2f})")
    return figures
