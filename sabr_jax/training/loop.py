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
  'skip' goes on, up to `max_consecutive_skips` such steps in a row.
* The workdir is locked for the run (sabr_jax.training.workdir_lock); a checkpoint of another
  model stops the run before restoring, an unreadable newest checkpoint is set aside and
  the one before it restored, and a save that fails (a full disk) stops training at the
  next step, naming the last good checkpoint (sabr_jax.training.checkpoint).
* `train(..., profile_steps=(start, stop))` writes a `jax.profiler` trace of those steps
  to WORKDIR/profile for TensorBoard's profile tab (`ProfileWindow`; process 0 only).
* With eval_every > 0, every eval_every steps and at the last one, the EMA parameters'
  validation figures (`Trainer.eval_step` on fixed held-out batches and noise, so that
  they compare across steps) join that step's metrics record, with a console line. The
  EMA parameters of the best of them (lowest val_x0_mse) are kept in WORKDIR/best, an export
  (`checkpoint.BestEma`); with early_stop_evals > 0 training ends once that many evaluations
  in a row found nothing better.
"""

from __future__ import annotations

import os
import signal
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from sabr_jax.data import pipeline
from sabr_jax.data.sources import open_source
from sabr_jax.parallel import sharding
from sabr_jax.parallel.flops import compile_abstract, jaxpr_flops
from sabr_jax.training import checkpoint
from sabr_jax.training.metrics_log import MetricsLog
from sabr_jax.training.trainer import Trainer
from sabr_jax.training.workdir_lock import WorkdirLock

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
    return (
        f"step {step}: val x0 mse {figures['val_x0_mse']:.4g} (t={num_steps - 1}: "
        f"{figures['val_x0_mse_t999']:.4g}), shuffled video {figures['val_x0_mse_shuffled']:.4g}"
    )


def summarize(pending: list[dict], elapsed: float, flops_per_step: float, cfg) -> dict[str, float]:
    """Mean metrics over the finite steps since the last log, plus throughput and MFU."""
    host = [{k: np.asarray(v) for k, v in m.items() if k != "grad_leaf_finite"} for m in jax.device_get(pending)]
    finite = [m for m in host if m["finite"]]
    record = {
        k: float(np.mean([m[k] for m in finite])) if finite else float("nan")
        for k in ("loss", "mse", "vlb", "grad_norm")
    }
    record["skipped"] = float(len(host) - len(finite))
    record["steps_per_s"] = len(host) / elapsed
    record["examples_per_s"] = record["steps_per_s"] * cfg.batch_size
    if cfg.peak_flops_per_device > 0 and flops_per_step > 0:
        record["mfu"] = flops_per_step * record["steps_per_s"] / (cfg.peak_flops_per_device * jax.device_count())
    return record


def global_batch(local: dict, trainer: Trainer) -> dict:
    """This process's rows of a batch (numpy) -> the global, sharded batch."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(trainer.batch_sharding, x), local)


def process_batches(cfg, source, stats, mesh, seed: int, start_batch: int = 0, num_workers: int = 0):
    """An iterator over this process's rows of the global batches from `start_batch` on
    (windows and order from `seed`): what `global_batch` assembles into sharded batches."""
    start_row, stop_row = sharding.process_rows(cfg.batch_size, mesh)
    rows = stop_row - start_row
    return iter(
        pipeline.dataset(
            source,
            stats=stats,
            max_frames=cfg.data.max_frames,
            context_frames=cfg.data.context_frames,
            batch_size=rows,
            seed=seed,
            shard_index=start_row // rows,
            shard_count=cfg.batch_size // rows,
            num_workers=num_workers,
            start_batch=start_batch,
        )
    )


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
    val_iter = process_batches(cfg, source, stats, trainer.mesh, VALIDATION_SEED)
    batches = [next(val_iter) for _ in range(cfg.eval_batches)]
    keys = [np.asarray(jax.random.fold_in(jax.random.PRNGKey(VALIDATION_SEED), i)) for i in range(len(batches))]
    *_, eval_fn = compile_abstract(
        trainer.jit_eval_step, state["ema"], global_batch(batches[0], trainer), keys[0], mesh=trainer.mesh
    )

    def evaluate(params) -> dict[str, float]:
        figures = jax.device_get([eval_fn(params, global_batch(b, trainer), k) for b, k in zip(batches, keys)])
        return {name: float(np.mean([f[name] for f in figures])) for name in figures[0]}

    return evaluate


def train(cfg, workdir: str, profile_steps: tuple[int, int] | None = None) -> dict:
    """Train until cfg.total_steps (or preemption, or non-finite steps: one with
    on_nonfinite='stop', cfg.max_consecutive_skips in a row with 'skip').

    profile_steps (start, stop): trace steps start .. stop - 1 (1-based) into WORKDIR/profile
    (`ProfileWindow`).

    Returns {"state": final state, "meta": checkpoint meta, "status": "done" | "preempted"
    | "nonfinite", "step": int, "message": the closing line, "best": {"step", "val_x0_mse"} of
    WORKDIR/best (`checkpoint.BestEma`), or None without validation}. With cfg.early_stop_evals
    > 0, training is "done" early once that many evaluations in a row found nothing better. Raises UserError subclasses
    (one line each) for a workdir in use by another run, a checkpoint of another model, no
    readable checkpoint, or a failed save.
    """
    if cfg.on_nonfinite not in ("stop", "skip"):
        raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {cfg.on_nonfinite!r}")
    say = tqdm.write if jax.process_index() == 0 else (lambda *_: None)
    with WorkdirLock(workdir, say):
        return _train_locked(cfg, workdir, say, profile_steps)


def itstime(step: int, every: int, total: int) -> bool:
    """Whether `step` (1-based, just taken) is an every-th step or the last one; every <= 0: never."""
    return every > 0 and (step % every == 0 or step == total)


class NonfiniteGuard:
    """Reports non-finite steps and says when training must stop: at the first one with
    on_nonfinite='stop', at max_consecutive_skips in a row with 'skip'.

    Steps are checked one step late (`check(everything=False)` leaves the newest), so that
    reading a step's flags never waits for the device while already queued work runs.
    """

    def __init__(self, cfg, param_names: list[str], say):
        self.cfg, self.param_names, self.say = cfg, param_names, say
        self.unchecked, self.in_a_row = [], 0

    def add(self, step: int, metrics: dict) -> None:
        self.unchecked.append((step, metrics))

    def check(self, everything: bool) -> bool:
        """Report the unchecked steps' non-finite ones; False when training must stop."""
        ready = self.unchecked if everything else self.unchecked[:-1]
        self.unchecked = self.unchecked[len(ready) :]
        for step, metrics in ready:
            message = nonfinite_report(step, jax.device_get(metrics), self.param_names)
            if not message:
                self.in_a_row = 0
                continue
            self.say(f"{message}; its update was not applied (on_nonfinite={self.cfg.on_nonfinite!r})")
            self.in_a_row += 1
            if self.cfg.on_nonfinite == "stop" or self.in_a_row >= self.cfg.max_consecutive_skips:
                return False
        return True

    def reason(self) -> str:
        if self.cfg.on_nonfinite == "stop":
            return "a non-finite loss or gradient (on_nonfinite='stop')"
        return (
            f"{self.in_a_row} non-finite steps in a row (on_nonfinite='skip', "
            f"max_consecutive_skips={self.cfg.max_consecutive_skips})"
        )


def save_checkpoint(saver: checkpoint.Saver, cfg, meta: dict, state: dict, step: int, next_batch: int) -> None:
    """Save `state` after `step` steps; next_batch: the global batches read so far (each step reads one)."""
    saver.save(step, state, checkpoint.data_position(next_batch, cfg), meta)


class ProfileWindow:
    """A `jax.profiler` trace (TensorBoard / XProf: WORKDIR/profile/plugins/profile/<run>/*.xplane.pb)
    of the steps numbered start .. stop - 1 (1-based, as the log numbers them), on process 0 only.

    `before(step)` ahead of each step (step: steps taken so far) starts it, `after(step, metrics)`
    stops it once step stop - 1 has run on the device, `stop()` (in a `finally`) ends one that
    training left early. A resumed run traces the part of the window it still reaches.
    """

    def __init__(self, steps: tuple[int, int] | None, logdir: str):
        self.start, self.stop_at = steps or (0, 0)
        self.logdir, self.active = logdir, False
        self.enabled = steps is not None and jax.process_index() == 0

    def before(self, step: int) -> None:
        if self.enabled and not self.active and self.start <= step + 1 < self.stop_at:
            jax.profiler.start_trace(self.logdir)
            self.active = True

    def after(self, step: int, metrics: dict) -> None:
        if self.active and step + 1 >= self.stop_at:
            jax.block_until_ready(metrics)  # the trace holds the last step's device work too
            self.stop()

    def stop(self) -> None:
        if self.active:
            self.active = self.enabled = False
            jax.profiler.stop_trace()


def _train_locked(cfg, workdir: str, say, profile_steps: tuple[int, int] | None) -> dict:
    mesh = sharding.make_mesh(cfg.mesh)
    trainer = Trainer(cfg, mesh)
    source, stats = open_source(cfg, "train")

    mngr = checkpoint.manager(workdir, cfg.keep_checkpoints)
    try:
        restored = checkpoint.resume(mngr, trainer.abstract_state(), cfg, say)
    except BaseException:
        mngr.close()
        raise
    if restored is None:
        state, first_batch = trainer.init_state(cfg.seed), 0
    else:
        state, saved_meta, data_position = restored
        _, stats = checkpoint.read_meta(saved_meta)  # normalisation must stay what the run started with
        first_batch = checkpoint.data_start_batch(data_position, cfg)
    meta = checkpoint.meta(cfg, stats)
    first_step = step = int(state["step"])
    data_iter = process_batches(cfg, source, stats, mesh, cfg.seed, first_batch, cfg.data.num_workers)
    say(
        f"{'resuming from step ' + str(step) if restored else 'starting'} in {os.path.abspath(workdir)} "
        f"on {jax.process_count()} process(es), {jax.device_count()} devices, mesh {dict(mesh.shape)}"
    )

    batch, step_fn, flops, evaluate = None, None, 0.0, None
    if step < cfg.total_steps:
        batch = global_batch(next(data_iter), trainer)
        # under the mesh: attention picks its kernel (and splash its partitioning) from it
        traced, _, step_fn = compile_abstract(trainer.jit_train_step, state, batch, mesh=mesh)
        flops = jaxpr_flops(traced.jaxpr)  # whole step, all devices
        say(
            f"train step: {flops:.4g} FLOPs (matmuls, forward + backward + remat) per global batch of {cfg.batch_size}"
            + ("" if cfg.peak_flops_per_device > 0 else "; set peak_flops_per_device for MFU")
        )
        evaluate = validation(cfg, trainer, stats, state, say)

    saver = checkpoint.Saver(mngr, step if restored else None)
    best = checkpoint.BestEma(workdir) if cfg.eval_every > 0 else None  # (a finished run's too)
    guard = NonfiniteGuard(cfg, trainer.param_names, say)
    log = MetricsLog(workdir, step)
    preemption = Preemption()
    profile = ProfileWindow(profile_steps, os.path.join(workdir, "profile"))
    progress = tqdm(total=cfg.total_steps, initial=step, disable=jax.process_index() != 0, desc="train", unit="step")
    early = None if best is None else early_stop(cfg, step, best)  # (a resumed run that had stopped early)
    pending, last_saved, status, failed = [], step, "done", True
    t_log = time.perf_counter()
    try:
        while step < cfg.total_steps and early is None:
            profile.before(step)  # (the trace holds reading the step's batch too)
            batch = batch if batch is not None else global_batch(next(data_iter), trainer)
            state, metrics = step_fn(state, batch)
            batch, step = None, step + 1
            pending.append(metrics)
            guard.add(step, metrics)
            progress.update(1)
            saver.poll()
            eval_now = evaluate is not None and itstime(step, cfg.eval_every, cfg.total_steps)
            log_now = itstime(step, cfg.log_every, cfg.total_steps) or eval_now
            save_now = step % cfg.checkpoint_every == 0 and step < cfg.total_steps
            if not guard.check(everything=save_now or log_now):  # before a save or log, every step's flags
                status = "nonfinite"
                break
            if log_now:
                saver.wait()  # a failed save is found by the next log point at the latest
                record = summarize(pending, time.perf_counter() - t_log, flops, cfg)
                progress.set_postfix(loss=f"{record['loss']:.4f}")
                say(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in record.items()))
                if eval_now:
                    record.update(evaluate(state["ema"]))
                    say(validation_line(step, record, cfg.diffusion.num_steps))
                    if best.offer(step, record["val_x0_mse"], state["ema"], meta):
                        say(f"step {step}: the best validation x0 MSE so far; its EMA parameters are in {best.path}")
                    early = early_stop(cfg, step, best)
                log.write(step, record)
                t_log, pending = time.perf_counter(), []  # (evaluation time is not training throughput)
            profile.after(step, metrics)
            if save_now:
                save_checkpoint(saver, cfg, meta, state, step, first_batch + step - first_step)
                last_saved = step
            if early is not None:
                break
            if preemption.requested(step, force=log_now or save_now):
                status = "preempted"
                break
        if status != "nonfinite" and not guard.check(everything=True):
            status = "nonfinite"
        if status != "nonfinite" and last_saved != step:
            save_checkpoint(saver, cfg, meta, state, step, first_batch + step - first_step)
        saver.wait()
        failed = False
    finally:
        profile.stop()
        progress.close()
        preemption.restore()
        log.close()
        if best is not None:
            best.close()
        try:
            mngr.close()
        except Exception:  # noqa: BLE001 - after a failed save, close raises its error again
            if not failed:
                raise
    if status == "nonfinite":
        message = f"stopped after step {step}: {guard.reason()}; {saver.where()}"
    else:
        message = f"{status} at step {step}{'' if early is None else ' (' + early + ')'}; {saver.where()}"
    say(message)
    found = None if best is None or best.step is None else {"step": best.step, "val_x0_mse": best.value}
    return {"state": state, "meta": meta, "status": status, "step": step, "message": message, "best": found}


def early_stop(cfg, step: int, best: checkpoint.BestEma) -> str | None:
    """Why training stops early after `step`'s evaluation (cfg.early_stop_evals evaluations in a row
    without a better validation x0 MSE than the best's), or None to go on."""
    if cfg.early_stop_evals <= 0 or best.step is None or step - best.step < cfg.early_stop_evals * cfg.eval_every:
        return None
    return (
        f"stopped early: no better validation x0 MSE in {cfg.early_stop_evals} evaluations; the best, step "
        f"{best.step} ({best.value:.4g}), is in {best.path}"
    )
