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

`export_ema` writes the EMA parameters alone with the meta: what sampling loads.
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

from sabr_jax.motion import NormStats


def meta(cfg: ml_collections.ConfigDict, stats: NormStats) -> dict:
    return {"config": json.loads(cfg.to_json()), "norm_stats": stats.to_dict()}


def read_meta(meta_dict: dict) -> tuple[ml_collections.ConfigDict, NormStats]:
    return ml_collections.ConfigDict(meta_dict["config"]), NormStats.from_dict(meta_dict["norm_stats"])


def data_position(next_batch: int, cfg: ml_collections.ConfigDict) -> dict:
    """The data_iter item: global batches consumed so far (= the next one to read)."""
    return {"next_batch": int(next_batch), "global_batch_size": int(cfg.batch_size), "seed": int(cfg.seed)}


def data_start_batch(position: dict, cfg: ml_collections.ConfigDict) -> int:
    """The global batch a resumed run starts reading at (same examples if the batch size changed)."""
    examples = position["next_batch"] * position["global_batch_size"]
    if position["global_batch_size"] != cfg.batch_size or position["seed"] != cfg.seed:
        logging.warning(
            "resuming with batch size %d / seed %d, the checkpoint used %d / %d: the data order differs from an "
            "uninterrupted run", cfg.batch_size, cfg.seed, position["global_batch_size"], position["seed"],
        )
    return -(-examples // cfg.batch_size)


def manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=True, create=True, cleanup_tmp_directories=True
    )
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"), options=options, item_names=("state", "data_iter", "meta")
    )


def save(mngr: ocp.CheckpointManager, step: int, state, position: dict, meta_dict: dict) -> None:
    """Start an asynchronous save (returns once the arrays are copied off the devices).

    position: `data_position(...)`.
    """
    mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_iter=ocp.args.JsonSave(position),
            meta=ocp.args.JsonSave(meta_dict),
        ),
        force=True,
    )


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


def export_ema(path: str, ema_params, meta_dict: dict) -> None:
    """Write the EMA parameters and meta to `path` for sampling, replacing an earlier export."""
    path = os.path.abspath(path)
    if jax.process_index() == 0 and os.path.exists(path):
        shutil.rmtree(path)
    multihost_utils.sync_global_devices("sabr_export_ema")
    with ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(create=True), item_names=("params", "meta")) as m:
        m.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(ema_params), meta=ocp.args.JsonSave(meta_dict)), force=True)
        m.wait_until_finished()


def load_export(path: str, abstract_params=None):
    """-> (params, meta dict) from an `export_ema` directory.

    abstract_params (ShapeDtypeStructs with shardings) places the arrays; without it they
    are restored as saved, on the default device.
    """
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no exported model at {path}: expected a directory written by sabr-train --export")
    with ocp.CheckpointManager(path, item_names=("params", "meta"), options=ocp.CheckpointManagerOptions(read_only=True)) as m:
        if m.latest_step() is None:
            raise FileNotFoundError(f"{path} holds no exported parameters")
        params_args = ocp.args.StandardRestore(abstract_params) if abstract_params is not None else ocp.args.StandardRestore()
        restored = m.restore(m.latest_step(), args=ocp.args.Composite(params=params_args, meta=ocp.args.JsonRestore()))
    return restored["params"], restored["meta"]

