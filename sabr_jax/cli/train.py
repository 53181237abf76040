"""sabr-train: train SABR-CLIMB on one device, one host or a multi-host pod.

    sabr-train --config configs/demo.py --workdir runs/demo
    sabr-train --config configs/sabr_l.py --config.data.source=tfds --config.data.dir=DATA --workdir W
    sabr-train --config configs/sabr_l.py --dry_run [--topology v5p:4x4x4]
    sabr-train ... --coordinator_address HOST0:1234 --num_processes N --process_id I   (multi-host)
    sabr-train ... --profile_steps 10:13   (a jax.profiler trace of steps 10-12 in WORKDIR/profile)

A workdir that holds a checkpoint is resumed from it (any mesh, any device count, any
number of processes). SIGTERM (preemption) saves a checkpoint and exits with status 0;
rerun the same command to go on. A non-finite step with on_nonfinite='stop' (or
max_consecutive_skips of them in a row with 'skip') exits with status 1 without saving it.
A second run on a workdir in use, a checkpoint written by another model, or a failed save
(a full disk) stop with one line and status 1; an unreadable newest checkpoint is set
aside and the one before it resumed (README, "Training at scale"). See launch/ for TPU pod, SLURM and single-host scripts.

The config is checked first (sabr_jax.config.validate); errors in the input are one line
on stderr, `sabr-train: error: ...` (`--verbose` shows the traceback; see sabr_jax.cli.console).
"""

from __future__ import annotations

import re
import sys

from absl import app, flags
from ml_collections import config_flags

from sabr_jax import config as config_lib
from sabr_jax.cli import console, multihost
from sabr_jax.training import checkpoint
from sabr_jax.training.loop import train


class StepRange(flags.ArgumentParser):
    """absl parser of a step range `START:STOP` (1-based steps, STOP excluded) -> (START, STOP)."""

    def parse(self, argument) -> tuple[int, int]:
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(argument))
        if not match or not 1 <= int(match[1]) < int(match[2]):
            raise ValueError(f"expected START:STOP with 1 <= START < STOP, e.g. 10:13, got {argument!r}")
        return int(match[1]), int(match[2])

    def flag_type(self) -> str:
        return "START:STOP"


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
_PROFILE = flags.DEFINE(
    StepRange(),
    "profile_steps",
    None,
    "START:STOP: write a jax.profiler trace of steps START .. STOP-1 (1-based, as logged) to WORKDIR/profile, "
    "for TensorBoard's profile tab (process 0 only), e.g. 10:13.",
)
flags.adopt_module_key_flags(multihost)


def main(argv) -> None:
    cfg = _CONFIG.value
    if cfg is None:
        raise app.UsageError("--config is required, e.g. --config configs/demo.py")
    config_lib.validate(cfg, data_dir=not _DRY_RUN.value)
    if _DRY_RUN.value:
        from sabr_jax.training.dry_run import report

        report(cfg, _TOPOLOGY.value)
        return
    multihost.initialize()
    result = train(cfg, _WORKDIR.value, _PROFILE.value)
    if _EXPORT.value and result["status"] == "done":
        print(checkpoint.export_trained(_EXPORT.value, _WORKDIR.value, result, cfg.export_from))
    if result["status"] == "nonfinite":  # (the loop has printed why, and which checkpoint is newest)
        sys.exit(1)


def run() -> None:
    """Console-script entry point."""
    console.run(main, "sabr-train")


if __name__ == "__main__":
    run()
