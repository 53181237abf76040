"""The training loop: data -> sharded train step -> metrics, checkpoints, preemption.

`train(cfg, workdir)` is what `sabr-train` and `sabr-demo` run. The same code runs on one
device, on one host with many, and on every host of a multi-host job (one process per
host, after `jax.distributed.initialize`):

* Each process reads only the rows of every global batch that its devices hold
  (`sharding.process_rows`; the pipeline's global example order does not depend on the
  number of hosts) and `jax.make_array_from_process_local_data` assembles the global,
  sharded batch.
* A workdir with a checkpoint resumes from it, on any mesh and any number of processes:
  the state is restored into this run's shardings and the data iterator is re-created at
  the saved position (global batches consumed), so the remaining steps see exactly the
  data and random keys an uninterrupted run would.
* SIGTERM (preemption) makes every process stop at the same step, save and return.
* A step with a non-finite loss or gradient never changes params, EMA or optimiser state
  (the step withholds its update). It is reported with the quantity (and the parameters
  with non-finite gradients); `on_nonfinite='stop'` then ends training without saving,
  'skip' goes on.
* With eval_every > 0, every eval_every steps and at the last one, the EMA parameters'
  validation figures (`Trainer.eval_step` on fixed held-out batches and noise, so that
  they compare across steps) join that step's metrics record, with a console line.
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
from sabr_jax.dry_run import jaxpr_flops
from sabr_jax.metrics_log import MetricsLog
from sabr_jax.trainer import Trainer

# With several processes, agreeing on a SIGTERM costs a cross-host collective (and a
# pipeline bubble), so processes compare flags every this many steps (and at each log and
# checkpoint step); one process alone checks every step.
PREEMPTION_CHECK_EVERY = 10

# Seed of the fixed validation batches (their windows) and of their noise: the same for
# every run on the same data, so figures compare across runs too.
VALIDATION_SEED = 0


class Preemption:
    """Turns SIGTERM into a flag that every process agrees on at the same step."""

    def __init__(self):
        self.flag = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.flag = True

    def requested(self, step: int, force: bool = False) -> bool:
        if jax.process_count() == 1:
            return self.flag
        if not force and step % PREEMPTION_CHECK_EVERY:
            return False
        return bool(multihost_utils.process_allgather(np.int32(self.flag)).max())

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def nonfinite_report(step: int, metrics: dict, names: list[str]) -> str | None:
    """A message naming the non-finite quantity of a step, or None when it was finite."""
    if metrics["finite"]:
        return None
    if not metrics["loss_finite"]:
        return f"step {step}: non-finite loss ({float(metrics['loss'])})"
    bad = [n for n, ok in zip(names, np.asarray(metrics["grad_leaf_finite"])) if not ok]
    shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    return f"step {step}: non-finite gradients (loss {float(metrics['loss']):.4g}) in {len(bad)} parameters: {shown}"


def validation_line(step: int, figures: dict, num_steps: int) -> str:
    """The console line of a step's validation figures (num_steps: the diffusion's T)."""
    return (f"step {step}: val x0 mse {figures['val_x0_mse']:.4g} (t={num_steps - 1}: "
            f"{figures['val_x0_mse_t999']:.4g}), shuffled video {figures['val_x0_mse_shuffled']:.4g}")


def summarize(pending: list[dict], elapsed: float, flops_per_step: float, cfg) -> dict[str, float]:
    """Mean metrics over the finite steps since the last log, plus throughput and MFU."""
    host = [{k: np.asarray(v) for k, v in m.items() if k != "grad_leaf_finite"} for m in jax.device_get(pending)]
    finite = [m for m in host if m["finite"]]
    record = {k: float(np.mean([m[k] for m in finite])) if finite else float("nan") for k in ("loss", "mse", "vlb", "grad_norm")}
    record["skipped"] = float(len(host) - len(finite))
    record["steps_per_s"] = len(host) / elapsed
    record["examples_per_s"] = record["steps_per_s"] * cfg.batch_size
    if cfg.peak_flops_per_device > 0 and flops_per_step > 0:
        record["mfu"] = flops_per_step * record["steps_per_s"] / (cfg.peak_flops_per_device * jax.device_count())
    return record


def global_batch(local: dict, trainer: Trainer) -> dict:
    """This process's rows of a batch (numpy) -> the global, sharded batch."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(trainer.batch_sharding, x), local)


def validation(cfg, trainer: Trainer, stats, state: dict, say):
    """A function params -> validation figures (`Trainer.eval_step`, averaged over the
    fixed batches), or None when cfg.eval_every is 0 or the validation split is empty.

    The batches are this process's rows of the first cfg.eval_batches global batches of
    the validation split, windowed like training batches from VALIDATION_SEED; they stay
    on the host until used. Batch i always gets the noise of fold_in(VALIDATION_SEED, i).
    """
    if cfg.eval_every <= 0:
        return None
    source, _ = open_source(cfg, "validation")
    if len(source) == 0:
        say("the validation split has no clips: no validation figures (eval_every is ignored)")
        return None
    start_row, stop_row = sharding.process_rows(cfg.batch_size, trainer.mesh)
    rows = stop_row - start_row
    val_iter = iter(pipeline.dataset(
        source, stats=stats, max_frames=cfg.data.max_frames, context_frames=cfg.data.context_frames,
        batch_size=rows, seed=VALIDATION_SEED, shard_index=start_row // rows, shard_count=cfg.batch_size // rows,
    ))
    batches = [next(val_iter) for _ in range(cfg.eval_batches)]
    keys = [np.asarray(jax.random.fold_in(jax.random.PRNGKey(VALIDATION_SEED), i)) for i in range(len(batches))]
    with jax.set_mesh(trainer.mesh):
        eval_fn = trainer.jit_eval_step.lower(state["ema"], global_batch(batches[0], trainer), keys[0]).compile()

    def evaluate(params) -> dict[str, float]:
        figures = jax.device_get([eval_fn(params, global_batch(b, trainer), k) for b, k in zip(batches, keys)])
        return {name: float(np.mean([f[name] for f in figures])) for name in figures[0]}

    return evaluate


def train(cfg, workdir: str) -> dict:
    """Train until cfg.total_steps (or preemption, or a non-finite step with on_nonfinite='stop').

    Returns {"state": final state, "meta": checkpoint meta, "status": "done" | "preempted"
    | "nonfinite", "step": int}.
    """
    if cfg.on_nonfinite not in ("stop", "skip"):
        raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {cfg.on_nonfinite!r}")
    mesh = sharding.make_mesh(cfg.mesh)
    trainer = Trainer(cfg, mesh)
    start_row, stop_row = sharding.process_rows(cfg.batch_size, mesh)
    local_batch = stop_row - start_row
    source, stats = open_source(cfg, "train")

    mngr = checkpoint.manager(workdir, cfg.keep_checkpoints)
    restored = checkpoint.restore(mngr, trainer.abstract_state())
    if restored is None:
        state, next_batch = trainer.init_state(cfg.seed), 0
    else:
        state, saved_meta, data_position = restored
        _, stats = checkpoint.read_meta(saved_meta)  # normalisation must stay what the run started with
        next_batch = checkpoint.data_start_batch(data_position, cfg)
    meta = checkpoint.meta(cfg, stats)
    step = int(state["step"])
    say = tqdm.write if jax.process_index() == 0 else (lambda *_: None)
    data_iter = iter(pipeline.dataset(
        source, stats=stats, max_frames=cfg.data.max_frames, context_frames=cfg.data.context_frames,
        batch_size=local_batch, seed=cfg.seed, shard_index=start_row // local_batch,
        shard_count=cfg.batch_size // local_batch, num_workers=cfg.data.num_workers, start_batch=next_batch,
    ))
    say(f"{'resuming from step ' + str(step) if restored else 'starting'} in {os.path.abspath(workdir)} "
        f"on {jax.process_count()} process(es), {jax.device_count()} devices, mesh {dict(mesh.shape)}")

    consumed = next_batch

    def next_batch_global():
        nonlocal consumed
        consumed += 1
        return global_batch(next(data_iter), trainer)

    batch, step_fn, flops, evaluate = None, None, 0.0, None
    if step < cfg.total_steps:
        batch = next_batch_global()
        with jax.set_mesh(mesh):  # attention picks its kernel (and splash its partitioning) from the mesh
            traced = trainer.jit_train_step.trace(state, batch)
            step_fn = traced.lower().compile()
        flops = jaxpr_flops(traced.jaxpr)  # whole step, all devices
        say(f"train step: {flops:.4g} FLOPs (matmuls, forward + backward + remat) per global batch of {cfg.batch_size}"
            + ("" if cfg.peak_flops_per_device > 0 else "; set peak_flops_per_device for MFU"))
        evaluate = validation(cfg, trainer, stats, state, say)

    def save():
        checkpoint.save(mngr, step, state, checkpoint.data_position(consumed, cfg), meta)

    log = MetricsLog(workdir, step)
    preemption = Preemption()
    progress = tqdm(total=cfg.total_steps, initial=step, disable=jax.process_index() != 0, desc="train", unit="step")
    pending, unchecked, last_saved, status = [], [], step, "done"
    t_log = time.perf_counter()

    def check(upto_now: bool) -> bool:
        """Report non-finite steps among the unchecked ones; False when training must stop."""
        nonlocal unchecked
        ready, unchecked = (unchecked, []) if upto_now else (unchecked[:-1], unchecked[-1:])
        for s, m in ready:
            message = nonfinite_report(s, jax.device_get(m), trainer.param_names)
            if message:
                say(f"{message}; its update was not applied (on_nonfinite={cfg.on_nonfinite!r})")
                if cfg.on_nonfinite == "stop":
                    return False
        return True

    try:
        while step < cfg.total_steps:
            batch = batch if batch is not None else next_batch_global()
            state, metrics = step_fn(state, batch)
            batch, step = None, step + 1
            pending.append(metrics)
            unchecked.append((step, metrics))
            progress.update(1)
            eval_now = evaluate is not None and (step % cfg.eval_every == 0 or step == cfg.total_steps)
            log_now = step % cfg.log_every == 0 or step == cfg.total_steps or eval_now
            save_now = step % cfg.checkpoint_every == 0 and step < cfg.total_steps
            # Check the flags of all but the newest step (already queued work keeps the
            # device busy); before a save or log, all of them.
            if not check(upto_now=save_now or log_now):
                status = "nonfinite"
                break
            if log_now:
                record = summarize(pending, time.perf_counter() - t_log, flops, cfg)
                progress.set_postfix(loss=f"{record['loss']:.4f}")
                say(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in record.items()))
                if eval_now:
                    record.update(evaluate(state["ema"]))
                    say(validation_line(step, record, cfg.diffusion.num_steps))
                log.write(step, record)
                t_log, pending = time.perf_counter(), []  # (evaluation time is not training throughput)
            if save_now:
                save()
                last_saved = step
            if preemption.requested(step, force=log_now or save_now):
                status = "preempted"
                break
        if status != "nonfinite" and not check(upto_now=True):
            status = "nonfinite"
        progress.close()
        if status != "nonfinite" and last_saved != step:
            save()
        mngr.wait_until_finished()
    finally:
        preemption.restore()
        mngr.close()
        log.close()
    if status == "nonfinite":
        say(f"stopped at step {step}: non-finite loss or gradients (on_nonfinite='stop'); "
            f"the checkpoints in {mngr.directory} hold the last good states")
    else:
        say(f"{status} at step {step}; checkpoints in {mngr.directory}")
    return {"state": state, "meta": meta, "status": status, "step": step}
