"""Checkpoints: Orbax CheckpointManager with named items.

Each checkpoint `WORKDIR/checkpoints/<step>/` holds
    state      the train state (params, ema, opt_state, step, key), sharded arrays
    data_iter  the Grain iterator state of every host (so a resume neither repeats nor skips)
    meta       JSON: the config and the normalisation statistics

Saves are asynchronous; Orbax writes into a temporary directory and renames it when
complete, so a process killed mid-save leaves the previous checkpoint intact. Restoring
takes the target shardings from the caller: a checkpoint restores onto any mesh.

`export_ema` writes the EMA parameters alone with the meta: what sampling loads.
"""

from __future__ import annotations

import json
import os
import shutil

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from sabr_jax.motion import NormStats


def meta(cfg: ml_collections.ConfigDict, stats: NormStats) -> dict:
    return {"config": json.loads(cfg.to_json()), "norm_stats": stats.to_dict()}


def read_meta(meta_dict: dict) -> tuple[ml_collections.ConfigDict, NormStats]:
    return ml_collections.ConfigDict(meta_dict["config"]), NormStats.from_dict(meta_dict["norm_stats"])


def manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"), options=options, item_names=("state", "data_iter", "meta")
    )


def save(mngr: ocp.CheckpointManager, step: int, state, data_iter, meta_dict: dict) -> None:
    """Start an asynchronous save (returns once the arrays are copied off the devices)."""
    mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_iter=grain.checkpoint.CheckpointSave(data_iter),
            meta=ocp.args.JsonSave(meta_dict),
        ),
        force=True,
    )


def restore(mngr: ocp.CheckpointManager, abstract_state, data_iter, step: int | None = None):
    """Restore the newest (or given) step into `abstract_state`'s shardings and `data_iter`.

    Returns (state, meta dict), or None when the directory holds no checkpoint.
    """
    step = mngr.latest_step() if step is None else step
    if step is None:
        return None
    restored = mngr.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data_iter=grain.checkpoint.CheckpointRestore(data_iter),
            meta=ocp.args.JsonRestore(),
        ),
    )
    return restored["state"], restored["meta"]


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

