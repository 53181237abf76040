"""An exported model, ready to sample, and the encoder settings that made its training tokens.

model = load(find_export(PATH))                     # params, cfg, stats, sampler, meta
settings = encoder_settings(model.meta, model.cfg)  # sabr-prepare's Settings, to encode a new video alike
"""

from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple

import ml_collections
from flax import nnx

from sabr_jax.data.prepare.settings import Settings
from sabr_jax.diffusion.sampling import Sampler, make_sampler
from sabr_jax.errors import UserError
from sabr_jax.model.factory import abstract_model
from sabr_jax.motion import NormStats
from sabr_jax.training import checkpoint


class Model(NamedTuple):
    """An export, ready to sample: params (on this process's first device), the run's config
    (cfg.sample possibly overridden), its NormStats, the jitted Sampler and the export's meta."""

    params: object
    cfg: ml_collections.ConfigDict
    stats: NormStats
    sampler: Sampler
    meta: dict


def find_export(path: str) -> str:
    """An export folder: `path` itself, or path/export when path is a workdir (sabr-demo's, or
    one holding the export of sabr-train --export there); UserError saying what is missing."""
    if not os.path.isdir(path):
        raise UserError(f"--checkpoint={path}: no such folder; expected an exported model or a sabr-demo workdir")
    if os.path.isdir(os.path.join(path, "checkpoints")) or os.path.isdir(os.path.join(path, "export")):
        export = os.path.join(path, "export")
        if not os.path.isdir(export):
            raise UserError(
                f"--checkpoint={path} is a training workdir without an export ({export} is missing): write one with "
                "sabr-train --export DIR (or give the folder sabr-demo made)"
            )
        return export
    return path


def load(export_dir: str, steps: int | None = None, method: str | None = None, guidance: float | None = None) -> Model:
    """An export (sabr_jax.training.checkpoint.load_export: written on any mesh, read onto this
    process's first device) with its sampler; steps / method / guidance (the classifier-free
    guidance scale) override cfg.sample. UserError for guidance != 1 with a model trained
    without condition dropout (its unconditional branch was never trained)."""
    params, meta = checkpoint.load_export(export_dir)
    if "config" not in meta or "norm_stats" not in meta:
        raise UserError(
            f"{export_dir}: the export's meta lacks 'config' or 'norm_stats' (not written by sabr-train --export?)"
        )
    cfg, stats = checkpoint.read_meta(meta)
    if steps is not None:
        cfg.sample.steps = steps
    if method is not None:
        cfg.sample.method = method
    if guidance is not None:
        if guidance != 1.0 and cfg.cond_drop_prob <= 0:
            raise UserError(
                f"guidance scale {guidance}: this model was trained with cond_drop_prob={cfg.cond_drop_prob}, so "
                "it has no unconditional branch to guide with; train with --config.cond_drop_prob=0.1, or use 1"
            )
        cfg.sample.guidance_scale = guidance
    graphdef = nnx.graphdef(abstract_model(cfg))
    return Model(params, cfg, stats, make_sampler(graphdef, cfg), meta)


def encoder_settings(meta: dict, cfg: ml_collections.ConfigDict, encoder: str | None = None) -> Settings:
    """The sabr-prepare Settings that made the training tokens: the export's meta "encoder",
    else the report of the dataset cfg.data.dir names (exports written before meta had it),
    with `encoder` (a path or random encoder name) replacing the recorded one if given.
    UserError when neither is there and no encoder is given, or the recorded encoder is not
    on this machine."""
    recorded = meta.get("encoder") or checkpoint.dataset_settings(cfg)
    if recorded is None and encoder is None:
        raise UserError(
            "the export does not say which encoder made its training tokens (no 'encoder' in its meta, no "
            f"report.json in its data.dir {cfg.data.get('dir') or '(none)'}): pass --encoder with the weights sabr-prepare used"
        )
    names = {f.name for f in dataclasses.fields(Settings)}
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in (recorded or {}).items() if k in names}
    if encoder is not None:
        fields["encoder"] = encoder
    try:
        return Settings(**fields)
    except UserError as error:
        if encoder is not None:
            raise UserError(f"--encoder={encoder}: {error}") from None
        raise UserError(f"the export's encoder settings: {error}; pass --encoder PATH to use another copy") from None
