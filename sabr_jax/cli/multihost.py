"""The multi-host flags of the console scripts that run on every host (sabr-train, sabr-prepare).

Importing this module defines them; a script that calls `initialize` adopts them
(`flags.adopt_module_key_flags(multihost)`) so that its `--help` lists them:

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

from absl import flags

from sabr_jax.parallel import distributed

DISTRIBUTED = flags.DEFINE_enum(
    "distributed",
    "auto",
    list(distributed.MODES),
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


def initialize() -> bool:
    """Join the multi-host job the flags describe (sabr_jax.parallel.distributed.initialize)."""
    return distributed.initialize(
        DISTRIBUTED.value, COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value, LOCAL_DEVICES.value
    )
