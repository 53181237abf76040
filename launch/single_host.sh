#!/usr/bin/env bash
# Train on one machine: all its accelerators (GPUs, or a single-host TPU VM), one process.
#
#   launch/single_host.sh configs/sabr_l.py runs/sabr_l --config.data.source=tfds --config.data.dir=DATA
#
# Rerunning the same command resumes from the newest checkpoint in the workdir (a finished
# run restarts, sees total_steps reached, and exits). SIGTERM (a preemptible VM's shutdown)
# saves a checkpoint and exits with status 0.
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG WORKDIR [--config.KEY=VALUE ...]}
WORKDIR=${2:?usage: $0 CONFIG WORKDIR [--config.KEY=VALUE ...]}
shift 2
exec sabr-train --config "$CONFIG" --workdir "$WORKDIR" --distributed=off "$@"
