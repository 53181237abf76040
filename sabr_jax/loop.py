"""The training loop: data -> sharded train step -> metrics, checkpoints, preemption.

`train(cfg, workdir)` is what `sabr-train` and `sabr-demo` run.
"""

from __future__ import annotations

import os
import signal
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from sabr_jax import checkpoint, sharding
from sabr_jax.data import pipeline
from sabr_jax.data.sources import open_source
from sabr_jax.metrics_log import MetricsLog
from sabr_jax.trainer import Trainer


class Preemption:
    """Turns SIGTERM into a flag that every process agrees on at the same step."""

    def __init__(self):
        self.flag = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.flag = True

    def requested(self) -> bool:
        if jax.process_count() == 1:
            return self.flag
        return bool(multihost_utils.process_allgather(np.int32(self.flag)).max())


def nonfinite_ok(step: int, metrics: dict, cfg, say) -> bool:
    """Report a step whose update was withheld; False when training must stop."""
    if metrics["finite"]:
        return True
    quantity = "loss" if not metrics["loss_finite"] else "gradients"
    say(f"step {step}: non-finite {quantity}; its update was not applied (on_nonfinite={cfg.on_nonfinite!r})")
    return cfg.on_nonfinite != "stop"


def summarize(pending: list[dict], elapsed: float, flops: float, cfg) -> dict[str, float]:
    """Mean metrics over the steps since the last log, plus throughput and MFU."""
    host = jax.tree.map(lambda *xs: float(np.mean(xs)), *jax.device_get(pending))
    record = {k: host[k] for k in ("loss", "mse", "vlb", "grad_norm")}
    record["steps_per_s"] = len(pending) / elapsed
    record["examples_per_s"] = record["steps_per_s"] * cfg.batch_size
    if cfg.peak_flops_per_device > 0 and flops > 0:
        record["mfu"] = flops * record["steps_per_s"] / cfg.peak_flops_per_device
    return record


def train(cfg, workdir: str) -> dict:
    """Train until cfg.total_steps (or preemption). Returns the final state."""
    if cfg.batch_size % jax.process_count():
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {jax.process_count()} processes")
    mesh = sharding.make_mesh(cfg.mesh)
    trainer = Trainer(cfg, mesh)
    source, stats = open_source(cfg, "train")
    data_iter = iter(pipeline.dataset(
        source, stats=stats, max_frames=cfg.data.max_frames, context_frames=cfg.data.context_frames,
        batch_size=cfg.batch_size // jax.process_count(), seed=cfg.seed,
        shard_index=jax.process_index(), shard_count=jax.process_count(), num_workers=cfg.data.num_workers,
    ))
    mngr = checkpoint.manager(workdir, cfg.keep_checkpoints)
    restored = checkpoint.restore(mngr, trainer.abstract_state(), data_iter)
    if restored is None:
        state = trainer.init_state(cfg.seed)
    else:
        state, meta = restored
        _, stats = checkpoint.read_meta(meta)  # normalisation must stay what the run started with
    meta = checkpoint.meta(cfg, stats)
    step = int(state["step"])
    say = tqdm.write if jax.process_index() == 0 else (lambda *_: None)
    say(f"{'resuming from step ' + str(step) if restored else 'starting'} in {os.path.abspath(workdir)} "
        f"on {jax.device_count()} devices, mesh {dict(mesh.shape)}")

    def to_global(local):
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(trainer.batch_sharding, x), local)

    batch = to_global(next(data_iter))
    with jax.set_mesh(mesh):
        step_fn = trainer.jit_train_step.lower(state, batch).compile()
    flops = float((step_fn.cost_analysis() or {}).get("flops", 0.0))  # per device

    log = MetricsLog(workdir, step)
    preemption = Preemption()
    progress = tqdm(total=cfg.total_steps, initial=step, disable=jax.process_index() != 0, desc="train", unit="step")
    pending, unchecked, last_saved, status = [], None, step, "done"
    t_log = time.perf_counter()
    while step < cfg.total_steps:
        batch = batch if batch is not None else to_global(next(data_iter))
        state, metrics = step_fn(state, batch)
        batch, step = None, step + 1
        pending.append(metrics)
        progress.update(1)
        # Check the previous step's flags now that the next step is queued (keeps the device busy).
        if unchecked is not None and not nonfinite_ok(*unchecked, cfg, say):
            status = "nonfinite"
            break
        unchecked = (step, metrics)
        if step % cfg.log_every == 0 or step == cfg.total_steps:
            record = summarize(pending, time.perf_counter() - t_log, flops, cfg)
            t_log, pending = time.perf_counter(), []
            log.write(step, record)
            progress.set_postfix(loss=f"{record['loss']:.4f}")
            say(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in record.items()))
        if step % cfg.checkpoint_every == 0 and step < cfg.total_steps:
            checkpoint.save(mngr, step, state, data_iter, meta)
            last_saved = step
        if preemption.requested():
            status = "preempted"
            break
    if status == "done" and unchecked is not None and not nonfinite_ok(*unchecked, cfg, say):
        status = "nonfinite"
    progress.close()
    if status != "nonfinite" and last_saved != step:
        checkpoint.save(mngr, step, state, data_iter, meta)
    mngr.wait_until_finished()
    mngr.close()
    log.close()
    say(f"{status} at step {step}; checkpoints in {mngr.directory}")
    if status == "nonfinite":
        raise SystemExit(f"training stopped at step {step}: non-finite loss or gradients (config on_nonfinite='stop')")
    return {"state": state, "meta": meta, "status": status}
