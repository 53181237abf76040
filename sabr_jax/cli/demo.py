"""sabr-demo: the whole path on SynthClimb, on any machine, with no downloads.

    sabr-demo                                          # ./sabr_demo, the embedded default
    sabr-demo --encoder /path/to/dinov2-with-registers-small   # real DINOv2 features
    sabr-demo --config configs/synthclimb.py --workdir runs/synthclimb   # the longer run
    sabr-demo --config.total_steps=300 --workdir out   # any config key

Stages, each of which resumes where an interrupted run stopped (rerun the same command):

1. WORKDIR/clips: SynthClimb clips (`sabr-synth`), one wall each: the empty-wall video,
   route images, PHALP tracks of the climber, holds.json.
2. WORKDIR/data: `sabr-prepare`: DINOv2 tokens of every frame and route image, motion
   vectors, a TFDS dataset split train/validation by clip, so no wall is in both.
3. WORKDIR/train: `sabr-train` on it, with a validation x0 error every `eval_every` steps.
4. WORKDIR/export (the EMA model) and WORKDIR/eval: `sabr-eval` on the held-out walls: the
   model against the mean motion, a random training clip, the model given another wall's
   video (is the video used?) and the ground truth.
5. WORKDIR/loss.png: the loss curves.

It ends with the model's window (data.max_frames less the route images, in seconds at 24
FPS: a longer video is cut) and a ready `sabr-sample` command for a held-out wall, with the
route colour its holds.json records.

The config is checked first (sabr_jax.config.validate; not data.source and data.dir: they
become stage 2's dataset). Errors in the input are one line, `sabr-demo: error: ...`.
"""

from __future__ import annotations

import json
import os
import time

from absl import flags
from ml_collections import config_flags

from sabr_jax import config as config_lib
from sabr_jax.cli import console
from sabr_jax.data.synthclimb.benchmark import match_dataset, sampling_hint, write_benchmark
from sabr_jax.encoders.dinov2 import RANDOM_ENCODERS
from sabr_jax.training import checkpoint

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    f"{config_lib.__file__}:synthclimb_demo",
    "Config file (default: the embedded SynthClimb demo; configs/synthclimb.py is the longer run). "
    "Override keys with --config.KEY=VALUE.",
)
_WORKDIR = flags.DEFINE_string(
    "workdir", "sabr_demo", "Where the clips, dataset, checkpoints, export and evaluation go."
)
_ENCODER = flags.DEFINE_string(
    "encoder",
    None,
    "DINOv2-with-registers weights (a HuggingFace folder, .safetensors or torch-hub .pth). Default: the config's "
    "synth.encoder, seeded random weights.",
)


def main(argv) -> None:
    from sabr_jax.eval.evaluate import evaluate
    from sabr_jax.eval.plots import plot_losses
    from sabr_jax.training.loop import train

    cfg, workdir = config_lib.validate(_CONFIG.value, data_dir=False), os.path.abspath(_WORKDIR.value)
    encoder = _ENCODER.value or cfg.synth.encoder
    if encoder in RANDOM_ENCODERS:
        print(
            f"*** video encoder: {encoder}, SEEDED RANDOM WEIGHTS (no DINOv2 checkpoint given; pass --encoder PATH "
            "for real DINOv2 features). The tokens are a fixed random function of the pixels. ***"
        )
    else:
        print(f"video encoder: {encoder}")
    start = time.time()
    data_dir = write_benchmark(cfg, workdir, encoder)
    match_dataset(cfg, data_dir)

    train_dir = os.path.join(workdir, "train")
    result = train(cfg, train_dir)
    if result["status"] != "done":  # preempted (rerun to go on) or non-finite: nothing to evaluate yet
        raise SystemExit(0 if result["status"] == "preempted" else 1)
    export_dir = os.path.join(workdir, "export")
    print(checkpoint.export_trained(export_dir, train_dir, result, cfg.export_from))
    plot_losses(os.path.join(train_dir, "metrics.jsonl"), os.path.join(workdir, "loss.png"))

    eval_dir = os.path.join(workdir, "eval")
    print("\nsabr-eval on the held-out walls:")
    metrics = evaluate(export_dir, data_dir, eval_dir, seed=cfg.seed)
    print(f"\ndone in {(time.time() - start) / 60:.1f} min. Outputs:")
    for path, what in [
        ("clips", "SynthClimb clips (video.mp4, context/*.png, tracks.pkl, holds.json)"),
        ("data", "prepared dataset (TFDS ArrayRecord) and report.json"),
        ("train", "checkpoints (resumable), metrics.jsonl, TensorBoard events"),
        ("loss.png", "loss curves"),
        ("export", "the EMA model, config and normalisation statistics, for sampling"),
        ("eval/metrics.json", "the table above, per video too (also metrics.csv)"),
        ("eval/adherence.png", "route adherence per held-out video, per row"),
        ("eval/samples.npz", "the sampled motions"),
    ]:
        print(f"  {os.path.join(workdir, path):<48} {what}")
    print(f"\n{sampling_hint(cfg, workdir, data_dir)}")
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(
            {
                "minutes": (time.time() - start) / 60,
                "steps": result["step"],
                "encoder": encoder,
                "rows": {k: {m: v[m] for m in ("movement_mse", "route_adherence")} for k, v in metrics["rows"].items()},
            },
            f,
            indent=1,
        )


def run() -> None:
    """Console-script entry point."""
    console.run(main, "sabr-demo")


if __name__ == "__main__":
    run()
