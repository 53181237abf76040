"""sabr-sample: from an exported model and a wall video to motion files and an overlay video.

    sabr-sample --checkpoint sabr_demo --video wall.mp4 --route_color cyan --out samples
    sabr-sample --checkpoint EXPORT --video wall.mp4 --context route_images/ --out samples --smpl SMPL_NEUTRAL.pkl
    sabr-sample --checkpoint EXPORT --video attempt.mp4 --context route/ --complete tracks.pkl --keep_seconds 10 --out done

--checkpoint is an export (sabr-train --export DIR) or a workdir holding one (sabr-demo's).
The video is decoded upright (phone videos' rotation applied), resampled to 24 FPS and
encoded as sabr-prepare did for the model's training data, with the encoder and settings
the export records (older exports: the report of the dataset they trained on; or
--encoder). Every frame from the first is a motion frame; a video longer than the model
takes (data.max_frames positions less the route images: 45 s at 24 FPS for the paper's
models) is cut to its first part, with a warning; one shorter than the shortest clip the
training data could hold (sabr-prepare's --min_frames, which the export records: 12 frames,
0.5 s, by default; 8 for sabr-demo's) is refused. Route images come from --context (PNGs,
natural name order) or --route_color (the video's pixels of that colour on grey, from
frames spread over the clip; a WARNING line when those holds do not look like a route:
too few, or spread across the wall more than up it); neither gives none (a model that
reads them then refuses).
--complete keeps the tracked motion of the first --keep_seconds seconds (round(S * fps)
frames; the tracker's values exactly, where it saw the climber) and samples the rest.

--dry_run prints the sampler's memory plan (sabr_jax.diffusion.kv_cache) for the model of
--checkpoint or --config, --frames time positions (default: its data.max_frames) and a
--device, without sampling:

    sabr-sample --dry_run --config configs/sabr_l.py --frames 1116 --device h100-80gb   # 1100 + 16 route images

The output folder (also written to OUT/README.md):

"""

from __future__ import annotations

import os

from absl import flags
from ml_collections import config_flags

from sabr_jax.cli import console
from sabr_jax.encoders.dinov2 import RANDOM_ENCODERS
from sabr_jax.errors import UserError
from sabr_jax.sample.outputs import LAYOUT

__doc__ += LAYOUT  # (--help shows the module docstring)

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "An exported model (sabr-train --export DIR) or a workdir holding one in export/ (sabr-demo's)."
)
_VIDEO = flags.DEFINE_string("video", None, "The wall video (mp4, mov, ...; phone rotation is applied).")
_OUT = flags.DEFINE_string(
    "out", None, "Output folder: README.md and sample_<k>/{motion.npz, motion.bvh, overlay.mp4}."
)
_CONTEXT = flags.DEFINE_string("context", None, "A folder of route images (*.png, natural name order).")
_ROUTE_COLOR = flags.DEFINE_string(
    "route_color", None, "Route images from the video: the holds of this colour (red, blue, ..., or #rrggbb)."
)
_SAMPLES = flags.DEFINE_integer("samples", 1, "Motions to sample, each from its own noise.", lower_bound=1)
_STEPS, _METHOD, _GUIDANCE = console.sampler_flags()
_COMPLETE = flags.DEFINE_string("complete", None, "A tracker's .pkl (PHALP / 4D-Humans) of this video: complete it.")
_KEEP_SECONDS = flags.DEFINE_float(
    "keep_seconds", None, "With --complete: seconds of tracked motion kept.", lower_bound=0
)
_SMPL = flags.DEFINE_string("smpl", None, "An SMPL model file (.pkl or .npz) for the mesh overlay and BVH rest pose.")
_ENCODER = flags.DEFINE_string(
    "encoder",
    None,
    "DINOv2 weights (or one of " + ", ".join(RANDOM_ENCODERS) + ") replacing the encoder the export records.",
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the sampling noise.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the sampler's memory plan for --device and stop.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "With --dry_run, instead of --checkpoint: a config file (e.g. configs/sabr_l.py)."
)
_FRAMES = flags.DEFINE_integer(
    "frames", None, "With --dry_run: time positions, route images included (default: data.max_frames).", lower_bound=1
)
_DEVICE = flags.DEFINE_string(
    "device", None, "With --dry_run: a device name (h100-80gb, a100-40gb, t4-16gb, colab, cpu, ...) or its bytes."
)


def dry_run() -> str:
    """--dry_run: the memory plan of the model of --config or --checkpoint."""
    from sabr_jax.diffusion import sampling
    from sabr_jax.diffusion.kv_cache import DEVICES
    from sabr_jax.sample import export

    if _DEVICE.value is None:
        raise UserError(f"--dry_run needs --device: one of {', '.join(DEVICES)} or the device's bytes")
    if _CONFIG.value is not None:
        cfg = _CONFIG.value
    elif _CHECKPOINT.value is not None:
        cfg = export.load(export.find_export(_CHECKPOINT.value)).cfg
    else:
        raise UserError("--dry_run needs the model: --config FILE or --checkpoint EXPORT")
    with cfg.unlocked():
        cfg.sample.steps = _STEPS.value or cfg.sample.steps
        cfg.sample.method = _METHOD.value or cfg.sample.method
        cfg.sample.guidance_scale = _GUIDANCE.value or cfg.sample.guidance_scale
    return sampling.dry_run(cfg, _FRAMES.value or cfg.data.max_frames, _DEVICE.value, _SAMPLES.value)


def check_flags() -> None:
    """UserError naming the flag when the command line is incomplete or contradictory."""
    for holder in (_CHECKPOINT, _VIDEO, _OUT):
        if holder.value is None:
            raise UserError(f"--{holder.name} is required: {flags.FLAGS[holder.name].help}")
    if _CONTEXT.value is not None and _ROUTE_COLOR.value is not None:
        raise UserError("--context and --route_color both give route images: give one of them")
    if (_COMPLETE.value is None) != (_KEEP_SECONDS.value is None):
        raise UserError("--complete TRACKS.pkl and --keep_seconds S go together: give both or neither")
    for holder in (_VIDEO, _COMPLETE, _SMPL):
        if holder.value is not None and not os.path.isfile(holder.value):
            raise UserError(f"--{holder.name}={holder.value}: no such file")
    if _CONTEXT.value is not None:
        console.existing_dir(_CONTEXT)


def main(argv: list[str]) -> None:
    if _DRY_RUN.value:
        print(dry_run())
        return
    check_flags()
    from sabr_jax.sample.run import sample_video

    sample_video(
        checkpoint=_CHECKPOINT.value,
        video=_VIDEO.value,
        out=_OUT.value,
        context=_CONTEXT.value,
        route_color=_ROUTE_COLOR.value,
        samples=_SAMPLES.value,
        steps=_STEPS.value,
        method=_METHOD.value,
        guidance=_GUIDANCE.value,
        complete=_COMPLETE.value,
        keep_seconds=_KEEP_SECONDS.value,
        smpl_path=_SMPL.value,
        encoder=_ENCODER.value,
        seed=_SEED.value,
        log=print,
    )


def run() -> None:
    """Console-script entry point."""
    console.run(main, "sabr-sample")


if __name__ == "__main__":
    run()
