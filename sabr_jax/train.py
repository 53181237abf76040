"""sabr-train: train SABR-CLIMB on one device, one host or a multi-host pod.

    sabr-train --config configs/demo.py --workdir runs/demo
    sabr-train --config configs/sabr_l.py --config.data.source=tfds --config.data.dir=DATA --workdir W
    sabr-train --config configs/sabr_l.py --dry_run [--topology v5p:4x4x4]
    sabr-train ... --coordinator_address HOST0:1234 --num_processes N --process_id I   (multi-host)

A workdir that holds a checkpoint is resumed from it (any mesh, any device count, any
number of processes). SIGTERM (preemption) saves a checkpoint and exits with status 0;
rerun the same command to go on. A non-finite step with on_nonfinite='stop' (or
max_consecutive_skips of them in a row with 'skip') exits with status 1 without saving it.
A second run on a workdir in use, a checkpoint written by another model, or a failed save
(a full disk) stop with one line and status 1; an unreadable newest checkpoint is set
aside and the one before it resumed (README, "Training"). See launch/ for TPU pod, SLURM and single-host scripts.

The config is checked first (sabr_jax.config.validate); errors in the input are one line
on stderr, `sabr-train: error: ...` (`--verbose` shows the traceback; see sabr_jax.cli).
"""

from __future__ import annotations

import os
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from sabr_jax import checkpoint, cli
from sabr_jax import config as config_lib
from sabr_jax.loop import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/*.py); override keys with --config.KEY=VALUE."
)
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Checkpoints, metrics.jsonl and TensorBoard events go here.")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Compile one train step and print parameters, FLOPs and memory; do not train."
)
_TOPOLOGY = flags.DEFINE_string(
    "topology",
    None,
    "With --dry_run: compile for this TPU topology (e.g. v5p:2x2x2) on any machine; needs the `tpu` extra.",
)
_EXPORT = flags.DEFINE_string(
    "export", None, "After training, write the EMA parameters (for sampling) to this directory."
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-host runs outside TPU pods and SLURM."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed",
    "auto",
    ["auto", "on", "off"],
    "Call jax.distributed.initialize: 'auto' does when --coordinator_address is given, SLURM runs several tasks "
    "or a multi-host TPU slice is detected (TPU_WORKER_HOSTNAMES); 'on' always (it then finds the other processes "
    "itself on TPU pods, SLURM, Open MPI and Kubernetes); 'off' never.",
)


_LOCAL_DEVICES = flags.DEFINE_string(
    "local_device_ids",
    None,
    "Devices this process drives, e.g. '0,1,2,3', or 'all' (SLURM_GPUS_ON_NODE of them). Under SLURM, JAX's "
    "default is one device per process (the task's SLURM_LOCALID): use 'all' with one task per node.",
)


def _local_device_ids() -> list[int] | None:
    value = _LOCAL_DEVICES.value
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


def _multihost_environment() -> bool:
    slurm = int(os.environ.get("SLURM_NTASKS", os.environ.get("SLURM_NPROCS", "1"))) > 1
    tpu_pod = len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1
    return slurm or tpu_pod


def initialize_distributed() -> None:
    explicit = _COORDINATOR.value is not None
    if _DISTRIBUTED.value == "off" or (_DISTRIBUTED.value == "auto" and not (explicit or _multihost_environment())):
        return
    if explicit:
        jax.distributed.initialize(
            _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, local_device_ids=_local_device_ids()
        )
    else:
        jax.distributed.initialize(local_device_ids=_local_device_ids())


def main(argv) -> None:
    cfg = _CONFIG.value
    if cfg is None:
        raise app.UsageError("--config is required, e.g. --config configs/demo.py")
    config_lib.validate(cfg, data_dir=not _DRY_RUN.value)
    if _DRY_RUN.value:
        from sabr_jax.dry_run import report

        report(cfg, _TOPOLOGY.value)
        return
    initialize_distributed()
    result = train(cfg, _WORKDIR.value)
    if _EXPORT.value and result["status"] == "done":
        checkpoint.export_ema(_EXPORT.value, result["state"]["ema"], result["meta"])
        print(f"EMA parameters exported to {os.path.abspath(_EXPORT.value)}")
    if result["status"] == "nonfinite":  # (the loop has printed why, and which checkpoint is newest)
        sys.exit(1)


def run() -> None:
    """Console-script entry point."""
    cli.run(main, "sabr-train")


if __name__ == "__main__":
    run()
