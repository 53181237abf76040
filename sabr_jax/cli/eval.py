"""sabr-eval: the paper's metrics for an exported model on a split of a prepared dataset.

    sabr-eval --checkpoint EXPORT_DIR --data_dir DATA --out OUT [--split validation]
              [--steps K] [--method ddpm|ddim] [--guidance G] [--seed S] [--max_clips N] [--batch_size B]

The table is printed and written to OUT with the sampled motions and a figure; the rows,
the metrics and the files are described in sabr_jax.eval.evaluate.
"""

from __future__ import annotations

from absl import flags

from sabr_jax.cli import console
from sabr_jax.eval import metrics as M
from sabr_jax.eval.evaluate import evaluate

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "An exported model folder (sabr-train --export DIR, or sabr_demo/export).", required=True
)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "A prepared dataset (the --data_dir of sabr-prepare).", required=True)
_OUT = flags.DEFINE_string(
    "out", None, "Output folder for metrics.json, metrics.csv, adherence.png, samples.npz.", required=True
)
_SPLIT = flags.DEFINE_string("split", "validation", "The split to evaluate.")
_STEPS, _METHOD, _GUIDANCE = console.sampler_flags()
_SEED = flags.DEFINE_integer("seed", 0, "Sampling noise, random_clip choice and the paired bootstrap.")
_MAX_CLIPS = flags.DEFINE_integer("max_clips", None, "Evaluate only the first N clips of the split.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 4, "Clips sampled at once.")
_RADIUS_SCALE = flags.DEFINE_float("radius_scale", M.RADIUS_SCALE, "Touch radius in hold radii.")
_MIN_FRAMES = flags.DEFINE_integer("min_frames", M.MIN_FRAMES, "Frames near a hold that make a touch.")


def main(argv: list[str]) -> None:
    evaluate(
        console.existing_dir(_CHECKPOINT),
        console.existing_dir(_DATA_DIR),
        _OUT.value,
        split=_SPLIT.value,
        steps=_STEPS.value,
        method=_METHOD.value,
        guidance=_GUIDANCE.value,
        seed=_SEED.value,
        max_clips=_MAX_CLIPS.value,
        batch_size=_BATCH_SIZE.value,
        radius_scale=_RADIUS_SCALE.value,
        min_frames=_MIN_FRAMES.value,
    )


def run() -> None:
    """Console-script entry point."""
    console.run(main, "sabr-eval")


if __name__ == "__main__":
    run()
