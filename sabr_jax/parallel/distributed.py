"""Joining a multi-host job: one process per host, `jax.distributed.initialize` before any other
JAX call. The console scripts that run on every host (sabr-train, sabr-prepare) take the choice
from their flags (sabr_jax.cli.multihost).
"""

from __future__ import annotations

import os

import jax

from sabr_jax.errors import UserError

MODES = ("auto", "on", "off")


def local_device_ids(value: str | None) -> list[int] | None:
    """A device list '0,1,2,3' or 'all' (SLURM_GPUS_ON_NODE of them) as a list (None: JAX's default)."""
    if value is None:
        return None
    if value == "all":
        count = os.environ.get("SLURM_GPUS_ON_NODE")
        if count is None:
            raise UserError("--local_device_ids=all needs SLURM_GPUS_ON_NODE; give the ids instead")
        return list(range(int(count)))
    try:
        return [int(i) for i in value.split(",")]
    except ValueError:
        raise UserError(f"--local_device_ids={value}: expected device ids such as 0,1,2,3, or 'all'") from None


def multihost_environment() -> bool:
    """Whether the environment says this is one of several processes: SLURM with several
    tasks, or a TPU slice with several workers."""
    slurm = int(os.environ.get("SLURM_NTASKS", os.environ.get("SLURM_NPROCS", "1"))) > 1
    tpu_pod = len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1
    return slurm or tpu_pod


def initialize(
    mode: str = "auto",
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    devices: str | None = None,
) -> bool:
    """Join the multi-host job: mode 'auto' does when a coordinator is given, SLURM runs several
    tasks or a multi-host TPU slice is detected; 'on' always (jax.distributed then finds the other
    processes itself on TPU pods, SLURM, Open MPI and Kubernetes); 'off' never. coordinator
    'host:port' of process 0 with num_processes and process_id: an explicit job; devices: the
    local device ids (`local_device_ids`). Returns whether it joined one."""
    if mode not in MODES:
        raise UserError(f"--distributed={mode}: expected one of {', '.join(MODES)}")
    explicit = coordinator is not None
    if mode == "off" or (mode == "auto" and not (explicit or multihost_environment())):
        return False
    ids = local_device_ids(devices)
    if explicit:
        jax.distributed.initialize(coordinator, num_processes, process_id, local_device_ids=ids)
    else:
        jax.distributed.initialize(local_device_ids=ids)
    return True
