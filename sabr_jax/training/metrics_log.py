"""Training metrics to the console, TensorBoard event files and WORKDIR/metrics.jsonl.

Only process 0 writes. One JSON object per logged step: {"step": ..., "loss": ..., ...}.
A resumed run appends; records of steps past the resume point (written by the
interrupted run after its last checkpoint) are dropped on open, so the file always
reads as one uninterrupted run. The file is strict JSON: a non-finite value is `null`.

The workdir lock (sabr_jax.training.workdir_lock) is taken before the log opens, so the records it
drops are never those of another live run.
"""

from __future__ import annotations

import json
import math
import os

import jax
from tensorboardX import SummaryWriter


class MetricsLog:
    def __init__(self, workdir: str, resume_step: int = 0):
        self.active = jax.process_index() == 0
        if not self.active:
            return
        self.path = os.path.join(workdir, "metrics.jsonl")
        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(kept)
        self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        with open(self.path, "a") as f:
            finite = {k: v if math.isfinite(v) else None for k, v in metrics.items()}
            f.write(json.dumps({"step": step, **finite}, allow_nan=False) + "\n")
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.active:
            self.writer.close()
