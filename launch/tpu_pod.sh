#!/usr/bin/env bash
# Train on a multi-host Cloud TPU slice (e.g. v5p-64 = v5p:4x4x4, 16 hosts): the same
# command on every worker; jax.distributed.initialize finds the other workers itself.
#
#   TPU_NAME=my-v5p ZONE=us-east5-a launch/tpu_pod.sh configs/sabr_l.py /mnt/shared/runs/sabr_l \
#       --config.mesh.data=1 --config.mesh.fsdp=16 --config.mesh.tensor=4 \
#       --config.data.source=tfds --config.data.dir=/mnt/shared/data --config.peak_flops_per_device=459e12
#
# Requirements:
# * The repository is at $REPO (default ~/sabr_jax) on every worker with `pip install -e '.[tpu]'` done,
#   e.g. once:  gcloud compute tpus tpu-vm ssh $TPU_NAME --zone $ZONE --worker=all \
#                 --command="git clone URL ~/sabr_jax && pip install -e '~/sabr_jax[tpu]'"
# * WORKDIR (checkpoints, metrics) and the data are on storage all workers share, mounted at the
#   same path (Filestore/NFS, or a gcsfuse mount of a bucket).
# * Check the memory first, on any machine:  sabr-train --config C --dry_run --topology v5p:4x4x4 ...
# Rerunning the script resumes; a preempted slice saves a checkpoint on SIGTERM.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
CONFIG=${1:?usage: $0 CONFIG WORKDIR [--config.KEY=VALUE ...]}
WORKDIR=${2:?usage: $0 CONFIG WORKDIR [--config.KEY=VALUE ...]}
shift 2
REPO=${REPO:-'~/sabr_jax'}
ARGS=$(printf ' %q' --config "$CONFIG" --workdir "$WORKDIR" --distributed=on "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"} --worker=all \
  --command="cd $REPO && sabr-train$ARGS 2>&1 | tee -a \$HOME/sabr_train_worker.log"
