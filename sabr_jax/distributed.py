"""Multi-host set-up shared by the console scripts that run on every host (sabr-train, sabr-prepare).

Importing this module defines the flags below; a script that calls `initialize` adopts them
(`flags.adopt_module_key_flags(distributed)`) so that its `--help` lists them:

    --distributed auto|on|off   'auto' (default) joins a multi-host job when --coordinator_address
                                is given, SLURM runs several tasks or a multi-host TPU slice is
                                detected; 'on' always (jax.distributed then finds the other
                                processes itself on TPU pods, SLURM, Open MPI and Kubernetes);
                                'off' never
    --coordinator_address HOST:PORT --num_processes N --process_id I
                                an explicit job outside TPU pods and SLURM (one process per host)
    --local_device_ids 0,1,..|all
                                the devices this process drives
"""

from __future__ import annotations

import os

import jax
from absl import app, flags

DISTRIBUTED = flags.DEFINE_enum(
    "distributed",
    "auto",
    ["auto", "on", "off"],
    "Call jax.distributed.initialize: 'auto' does when --coordinator_address is given, SLURM runs several tasks "
    "or a multi-host TPU slice is detected (TPU_WORKER_HOSTNAMES); 'on' always (it then finds the other processes "
    "itself on TPU pods, SLURM, Open MPI and Kubernetes); 'off' never.",
)
COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-host runs outside TPU pods and SLURM."
)
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
LOCAL_DEVICES = flags.DEFINE_string(
    "local_device_ids",
    None,
    "Devices this process drives, e.g. '0,1,2,3', or 'all' (SLURM_GPUS_ON_NODE of them). Under SLURM, JAX's "
    "default is one device per process (the task's SLURM_LOCALID): use 'all' with one task per node.",
)


def local_device_ids() -> list[int] | None:
    """--local_device_ids as a list (None: JAX's default)."""
    value = LOCAL_DEVICES.value
    if value is None:
        return None
    if value == "all":
        count = os.environ.get("SLURM_GPUS_ON_NODE")
        if count is None:
            raise app.UsageError("--local_device_ids=all needs SLURM_GPUS_ON_NODE; give the ids instead")
        return list(range(int(count)))
    try:
        return [int(i) for i in value.split(",")]
    except ValueError:
        raise app.UsageError(f"--local_device_ids={value}: expected device ids such as 0,1,2,3, or 'all'") from None


def multihost_environment() -> bool:
    """Whether the environment says this is one of several processes: SLURM with several
    tasks, or a TPU slice with several workers."""
    slurm = int(os.environ.get("SLURM_NTASKS", os.environ.get("SLURM_NPROCS", "1"))) > 1
    tpu_pod = len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1
    return slurm or tpu_pod


def initialize() -> bool:
    """Join the multi-host job the flags (or the environment, see the module docstring) describe:
    call `jax.distributed.initialize` before any other JAX call. Returns whether it did."""
    explicit = COORDINATOR.value is not None
    if DISTRIBUTED.value == "off" or (DISTRIBUTED.value == "auto" and not (explicit or multihost_environment())):
        return False
    if explicit:
        jax.distributed.initialize(
            COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value, local_device_ids=local_device_ids()
        )
    else:
        jax.distributed.initialize(local_device_ids=local_device_ids())
    return True
