"""Checkpoints: Orbax CheckpointManager with named items.

Each checkpoint `WORKDIR/checkpoints/<step>/` holds
    state      the train state (params, ema, opt_state, step, key), sharded arrays
    data_iter  JSON: the input position, {"next_batch", "global_batch_size", "seed"}
    meta       JSON: the config and the normalisation statistics

Saves are asynchronous; Orbax writes into a temporary directory and renames it when
complete, so a process killed mid-save leaves the previous checkpoint intact (the
unfinished one is ignored and cleaned up by the next run). Restoring takes the target
shardings from the caller: a checkpoint restores onto any mesh and device count.

Why the data iterator is a position, not Grain's per-process iterator state: Grain saves
one state per process (`process_<i>-of-<n>.json`), which cannot be restored by a
different number of processes. The input pipeline (sabr_jax.data.pipeline) is a pure
function of (seed, global batch index): global batch g has the same examples, windows and
row order on any number of hosts, and each host reads its rows of it. So the number of
global batches consumed is the complete iterator state; a resumed run, on any number of
hosts and with any number of Grain workers, re-creates its iterator at that batch.

A rerun must be the same model: `resume` compares the checkpoint's config with the run's
(`STATE_KEYS`) before restoring, and stops with one line naming what changed. A newest
checkpoint that cannot be read (a truncated array file, a lost metadata file) is reported
in one line and moved to `WORKDIR/checkpoints.damaged/<step>` (kept, not deleted); the run
resumes from the newest one that reads. A save that fails in the background (a full disk)
is found by `Saver` at the next step where it has ended, the next log point at the latest.

`export_ema` writes the EMA parameters alone with the meta: what sampling loads, on any
devices (one by default) whatever mesh wrote it.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from sabr_jax import config as config_lib
from sabr_jax.errors import UserError
from sabr_jax.motion import NormStats

# Config keys that fix the train state's shapes or the meaning of its parameters: a run
# whose values differ cannot resume a checkpoint. `model.*` are all of them but these:
FREE_MODEL_KEYS = ("dtype", "remat", "attention")  # compute choices; the parameters are the same
STATE_KEYS = ("data.context_frames", "diffusion.num_steps", "diffusion.beta_start", "diffusion.beta_end")
DAMAGED = "checkpoints.damaged"  # WORKDIR/<this>/<step>: unreadable checkpoints, moved aside
BEST = "best"  # WORKDIR/<this>: the EMA parameters of the best validation figure, an export (`BestEma`)


class ConfigMismatch(UserError):
    """The checkpoint in the workdir was written by another model."""


class SaveFailed(UserError):
    """A checkpoint could not be written (a full disk, a lost directory)."""


def short_reason(error: BaseException, limit: int = 200) -> str:
    """An exception's first line as `Type: message`; over `limit` characters, its start and
    its end (where an OS error's reason is) joined by ' ... '."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else f"{text[: limit // 2 - 3]} ... {text[-(limit // 2) + 2 :]}"


def state_signature(config: dict) -> dict:
    """{key: value} of everything in a (JSON) config that the train state depends on."""
    signature = {f"model.{k}": v for k, v in sorted(config["model"].items()) if k not in FREE_MODEL_KEYS}
    for key in STATE_KEYS:
        block, name = key.split(".")
        signature[key] = config[block][name]
    signature["optim.clip_norm > 0"] = config["optim"]["clip_norm"] > 0  # adds a state to the optimiser
    return signature


def check_same_model(saved: dict, cfg: ml_collections.ConfigDict, where: str) -> None:
    """Raise ConfigMismatch naming each state key whose value differs between a checkpoint's
    config (`saved`, JSON) and this run's."""
    ours, theirs = state_signature(json.loads(cfg.to_json())), state_signature(config_lib.upgrade(saved))
    changed = [
        f"{k} {json.dumps(theirs.get(k))} (checkpoint) vs {json.dumps(v)} (this run)"
        for k, v in ours.items()
        if json.dumps(theirs.get(k)) != json.dumps(v)
    ]
    if changed:
        raise ConfigMismatch(
            f"{where} was written by another model: {'; '.join(changed)}. Rerun with the checkpoint's config "
            "to resume it, or give a new --workdir to start afresh"
        )


def meta(cfg: ml_collections.ConfigDict, stats: NormStats) -> dict:
    """What every checkpoint and export carries besides arrays: the config, the normalisation
    statistics and, when the run trains on a prepared dataset, the sabr-prepare settings that
    made its tokens (key "encoder", see `dataset_settings`): how sabr-sample encodes a new video."""
    out = {"config": json.loads(cfg.to_json()), "norm_stats": stats.to_dict()}
    settings = dataset_settings(cfg)
    if settings is not None:
        out["encoder"] = settings
    return out


def dataset_settings(cfg: ml_collections.ConfigDict) -> dict | None:
    """The sabr-prepare settings (report.json's "settings": encoder, seed, precision, pool, fps,
    frame_size, encoder_size, context_frames, ...) of the dataset cfg.data.dir names, or None
    when the data is not a prepared dataset or its report cannot be read. data.dir may name the
    --data_dir of sabr-prepare or a folder below it (sabr_clips, sabr_clips/1.0.0)."""
    if cfg.data.get("source") != "tfds" or not cfg.data.get("dir"):
        return None
    folder = os.path.abspath(cfg.data.dir)
    for candidate in (folder, os.path.dirname(folder), os.path.dirname(os.path.dirname(folder))):
        try:
            with open(os.path.join(candidate, "report.json")) as f:
                settings = json.load(f).get("settings")
        except (OSError, ValueError):
            continue
        if isinstance(settings, dict):
            return settings
    return None


def read_meta(meta_dict: dict) -> tuple[ml_collections.ConfigDict, NormStats]:
    """A checkpoint's or export's (config, NormStats); keys the config gained since it was written
    read as their old values (sabr_jax.config.ADDED_KEYS)."""
    config = ml_collections.ConfigDict(config_lib.upgrade(meta_dict["config"]))
    return config, NormStats.from_dict(meta_dict["norm_stats"])


def data_position(next_batch: int, cfg: ml_collections.ConfigDict) -> dict:
    """The data_iter item: global batches consumed so far (= the next one to read)."""
    return {"next_batch": int(next_batch), "global_batch_size": int(cfg.batch_size), "seed": int(cfg.seed)}


def data_start_batch(position: dict, cfg: ml_collections.ConfigDict) -> int:
    """The global batch a resumed run starts reading at (same examples if the batch size changed)."""
    examples = position["next_batch"] * position["global_batch_size"]
    if position["global_batch_size"] != cfg.batch_size or position["seed"] != cfg.seed:
        logging.warning(
            "resuming with batch size %d / seed %d, the checkpoint used %d / %d: the data order differs from an "
            "uninterrupted run",
            cfg.batch_size,
            cfg.seed,
            position["global_batch_size"],
            position["seed"],
        )
    return -(-examples // cfg.batch_size)


def manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=True, create=True, cleanup_tmp_directories=True
    )
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        options=options,
        item_names=("state", "data_iter", "meta"),
    )


def save(mngr: ocp.CheckpointManager, step: int, state, position: dict, meta_dict: dict) -> None:
    """Start an asynchronous save (returns once the arrays are copied off the devices).

    position: `data_position(...)`.
    """
    mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data_iter=ocp.args.JsonSave(position), meta=ocp.args.JsonSave(meta_dict)
        ),
        force=True,
    )


def read_saved_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
    """The meta item (config, normalisation statistics) of a checkpoint, without its arrays."""
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def resume(mngr: ocp.CheckpointManager, abstract_state, cfg: ml_collections.ConfigDict, say=print):
    """Restore the newest readable checkpoint written by the same model as `cfg`.

    Returns `restore(...)`'s (state, meta, position), or None when there is no checkpoint.
    Raises ConfigMismatch when the checkpoint's model differs from cfg's (before reading
    any array), UserError when no checkpoint can be read. Unreadable checkpoints newer
    than the restored one are reported with `say` and moved to WORKDIR/checkpoints.damaged.
    """
    steps = sorted(mngr.all_steps(), reverse=True)
    if not steps:
        return None
    failures = []
    for step in steps:
        where = os.path.join(str(mngr.directory), str(step))
        try:
            saved_meta = read_saved_meta(mngr, step)
        except Exception as error:  # noqa: BLE001 - any failure to read is reported, then the next one tried
            failures.append((step, error))
            continue
        check_same_model(saved_meta["config"], cfg, where)
        try:
            restored = restore(mngr, abstract_state, step)
        except Exception as error:  # noqa: BLE001
            failures.append((step, error))
            continue
        for bad_step, error in failures:
            say(
                f"checkpoint {os.path.join(str(mngr.directory), str(bad_step))} is unreadable "
                f"({short_reason(error)}); moved to {_move_damaged(mngr, bad_step)}; resuming from step {step}"
            )
        if failures:
            mngr.reload()
        return restored
    newest, error = failures[0]
    raise UserError(
        f"no checkpoint in {mngr.directory} can be read (newest, step {newest}: {short_reason(error)}); "
        "give a new --workdir, or move the checkpoints directory away to start afresh"
    )


def _move_damaged(mngr: ocp.CheckpointManager, step: int) -> str:
    """Move a checkpoint out of the manager's directory (the next save may reuse its step)."""
    workdir = os.path.dirname(str(mngr.directory))
    target = os.path.join(workdir, DAMAGED, str(step))
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.exists(target):
            shutil.rmtree(target)  # an older copy of the same step, damaged before
        os.rename(os.path.join(str(mngr.directory), str(step)), target)
    multihost_utils.sync_global_devices(f"sabr_move_damaged_{step}")
    return target


def save_failure(mngr: ocp.CheckpointManager, step: int, last_good: int | None, error: BaseException) -> SaveFailed:
    """The one-line error of a save of `step` that failed; last_good: the newest complete checkpoint."""
    good = f"the last good checkpoint is step {last_good}" if last_good is not None else "no checkpoint was written"
    return SaveFailed(
        f"the checkpoint of step {step} could not be written to {mngr.directory} ({short_reason(error)}); "
        f"{good}. Training stopped; free space (or fix the directory) and rerun the same command to resume"
    )


class Saver:
    """A run's asynchronous saves, at most one in flight; a failed one raises SaveFailed
    (which step, why, the last good checkpoint) from the next `poll`, `wait` or `save`.

    newest: the newest checkpoint known to be complete (the restored one), or None.
    """

    def __init__(self, mngr: ocp.CheckpointManager, newest: int | None):
        self.mngr, self.newest, self.in_flight = mngr, newest, None

    def save(self, step: int, state, position: dict, meta_dict: dict) -> None:
        """Start saving `step` (`save`), once the save before it has succeeded."""
        self.wait()
        try:
            save(self.mngr, step, state, position, meta_dict)
        except OSError as error:  # its synchronous part: directories, the copy off the devices
            raise save_failure(self.mngr, step, self.newest, error) from error
        self.in_flight = step

    def poll(self) -> None:
        """Cheap, every step: once the save in flight has ended, its outcome (`wait`)."""
        if self.in_flight is not None and not self.mngr.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        """Block until the save in flight has ended; raise SaveFailed if it failed."""
        if self.in_flight is None:
            return
        try:
            self.mngr.wait_until_finished()
        except Exception as error:  # noqa: BLE001 - Orbax re-raises the background thread's error as it was
            raise save_failure(self.mngr, self.in_flight, self.newest, error) from error
        self.newest, self.in_flight = self.in_flight, None

    def where(self) -> str:
        """'the newest checkpoint is step N in DIR', or that there is none."""
        if self.newest is None:
            return "no checkpoint was written"
        return f"the newest checkpoint is step {self.newest} in {self.mngr.directory}"


def restore(mngr: ocp.CheckpointManager, abstract_state, step: int | None = None):
    """Restore the newest (or given) step into `abstract_state`'s shardings.

    Returns (state, meta dict, data position dict), or None when there is no checkpoint.
    """
    step = mngr.latest_step() if step is None else step
    if step is None:
        return None
    restored = mngr.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data_iter=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
        ),
    )
    return restored["state"], restored["meta"], restored["data_iter"]


class BestEma:
    """WORKDIR/best: the EMA parameters of the evaluation with the lowest validation x0 MSE so far,
    as an export (meta + "best": {"step", "val_x0_mse"}; sabr-eval and sabr-sample read it as any
    export). Written only when an evaluation improves on it; Orbax replaces the one before once
    the new one is complete (max_to_keep 1), and keep_checkpoints never deletes it. A resumed run
    reads the best so far from it."""

    def __init__(self, workdir: str):
        options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True, enable_async_checkpointing=False)
        self.path = os.path.join(os.path.abspath(workdir), BEST)
        self.mngr = ocp.CheckpointManager(self.path, options=options, item_names=("params", "meta"))
        self.step, self.value = None, float("inf")
        if self.mngr.latest_step() is not None:
            step = self.mngr.latest_step()
            best = self.mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]["best"]
            self.step, self.value = best["step"], best["val_x0_mse"]

    def offer(self, step: int, value: float, ema_params, meta_dict: dict) -> bool:
        """Save ema_params as the best if `value` (the step's val_x0_mse) is lower than the best's."""
        if not value < self.value:
            return False
        best = {"step": step, "val_x0_mse": value}
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(ema_params), meta=ocp.args.JsonSave(meta_dict | {"best": best})
        )
        self.mngr.save(step, args=args, force=True)
        self.mngr.wait_until_finished()
        self.step, self.value = step, value
        return True

    def close(self) -> None:
        self.mngr.close()


def export_ema(path: str, ema_params, meta_dict: dict) -> None:
    """Write the EMA parameters and meta to `path` for sampling, replacing an earlier export."""
    path = os.path.abspath(path)
    if jax.process_index() == 0 and os.path.exists(path):
        shutil.rmtree(path)
    multihost_utils.sync_global_devices("sabr_export_ema")
    with ocp.CheckpointManager(
        path, options=ocp.CheckpointManagerOptions(create=True), item_names=("params", "meta")
    ) as m:
        m.save(
            0,
            args=ocp.args.Composite(params=ocp.args.StandardSave(ema_params), meta=ocp.args.JsonSave(meta_dict)),
            force=True,
        )
        m.wait_until_finished()


def export_trained(path: str, workdir: str, result: dict, export_from: str) -> str:
    """Write the export of a finished run (`loop.train`'s result in `workdir`) to `path`:
    export_from 'newest' (the final EMA parameters) or 'best' (WORKDIR/best, placed like the final
    ones). Returns a line saying what was exported."""
    ema, meta_dict = result["state"]["ema"], result["meta"]
    what = f"the EMA parameters of step {result['step']}"
    if export_from == "best":
        if result["best"] is None:
            raise UserError("config.export_from='best' needs validation figures: eval_every > 0 and a validation split")
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), ema)
        ema, meta_dict = load_export(os.path.join(os.path.abspath(workdir), BEST), abstract)
        best = meta_dict["best"]
        what = f"the best EMA parameters (step {best['step']}, validation x0 MSE {best['val_x0_mse']:.4g})"
    export_ema(path, ema, meta_dict)
    return f"{what} exported to {os.path.abspath(path)}"


def load_export(path: str, abstract_params=None):
    """-> (params, meta dict) from an `export_ema` directory, written on any mesh.

    abstract_params (ShapeDtypeStructs with shardings) places the arrays; without it they
    all go to this process's first device, whatever mesh and device count wrote them.
    """
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise UserError(
            f"no exported model at {path}: expected a directory written by sabr-train --export or sabr-demo"
        )
    handlers = {
        "params": ocp.StandardCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
    }  # (lets item_metadata read)
    with ocp.CheckpointManager(path, item_handlers=handlers, options=ocp.CheckpointManagerOptions(read_only=True)) as m:
        step = m.latest_step()
        if step is None:
            raise UserError(
                f"{path} holds no exported parameters (expected a directory written by sabr-train --export)"
            )
        if abstract_params is None:
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            abstract_params = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), m.item_metadata(step)["params"]
            )
        args = ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params), meta=ocp.args.JsonRestore())
        restored = m.restore(step, args=args)
    return restored["params"], restored["meta"]
