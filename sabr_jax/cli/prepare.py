"""sabr-prepare: a folder of user clips -> a TFDS dataset of motion vectors and DINOv2 tokens.

    sabr-prepare CLIPS --data_dir DIR --encoder /path/to/dinov2-with-registers-large

CLIPS/<clip_id>/ holds video.mp4, context/*.png (optional), tracks.pkl (PHALP /
4D-Humans) and holds.json (optional). DIR gets the prepared clips, the dataset,
norm_stats.json and report.json (also printed): what was built, resumed and skipped, and
why. The exit status is 1 when no dataset could be built. A rerun skips finished clips.
The stages are described in sabr_jax.data.prepare.build; each flag below but --data_dir and
the multi-host ones (sabr_jax.cli.multihost, as for sabr-train: on several hosts the clips are
split between them) sets the field of sabr_jax.data.prepare.settings.Settings of its name.
"""

from __future__ import annotations

import dataclasses

import jax
from absl import flags

from sabr_jax.cli import console, multihost
from sabr_jax.data.prepare.build import prepare
from sabr_jax.data.prepare.settings import Settings
from sabr_jax.data.store import prepared as prep
from sabr_jax.encoders.dinov2 import RANDOM_ENCODERS
from sabr_jax.errors import UserError

NO_ENCODER = (
    "--encoder is required: the path of DINOv2-with-registers weights (a HuggingFace folder such as a download of "
    "facebook/dinov2-with-registers-large, a .safetensors file or a torch-hub dinov2_vitl14_reg4_pretrain.pth). For a "
    "test or demo without weights, pass --encoder random-s (or random-tiny) explicitly: random weights give "
    "meaningless tokens."
)

_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Output folder (prepared clips, TFDS dataset, report.json, norm_stats.json).", required=True
)
_ENCODER = flags.DEFINE_string(
    "encoder",
    None,
    "DINOv2-with-registers weights: a HuggingFace folder, a .safetensors file or a torch-hub .pth (e.g. "
    f"facebook/dinov2-with-registers-large). Required; one of {', '.join(RANDOM_ENCODERS)} uses seeded random "
    "weights instead (tests and demos only: the tokens mean nothing).",
)
flags.DEFINE_enum("precision", Settings.precision, sorted(prep.DTYPES), "Token storage precision.")
flags.DEFINE_integer(
    "pool",
    Settings.pool,
    "2: average-pool patch tokens 2x2 (20x35 -> 10x18 = 180 per frame; the last, odd column is averaged alone). "
    "1: all 700.",
    lower_bound=1,
    upper_bound=2,
)
flags.DEFINE_float("max_seconds", Settings.max_seconds, "Clips longer than this are cut into equal parts.")
flags.DEFINE_integer("min_frames", Settings.min_frames, "Skip clips with fewer frames showing the climber.")
flags.DEFINE_float(
    "max_bad_fraction",
    Settings.max_bad_fraction,
    "A frame whose track values cannot be used (NaN, inf) is masked like a frame where the tracker lost the climber "
    "(its video kept, out of the loss; report.json names it); a clip where more than this fraction of the climber's "
    "detected frames are so is skipped.",
    lower_bound=0,
    upper_bound=1,
)
flags.DEFINE_integer(
    "context_frames",
    Settings.context_frames,
    "Route images kept per clip, in natural name order (2.png before 10.png); the report names those dropped. "
    "Training uses at most --config.data.context_frames of them.",
    lower_bound=0,
)
flags.DEFINE_float(
    "validation_fraction", Settings.validation_fraction, "Fraction of clips (by clip id) for validation."
)
flags.DEFINE_integer("split_seed", Settings.split_seed, "Seed of the train/validation assignment.")
flags.DEFINE_integer(
    "frame_tolerance",
    Settings.frame_tolerance,
    "Accepted difference between the number of frames in tracks.pkl and in the video.",
)
flags.DEFINE_integer("batch_size", Settings.batch_size, "Frames per encoder call on each host.")
flags.DEFINE_enum(
    "encoder_dtype",
    Settings.encoder_dtype,
    ["auto", "float32", "bfloat16"],
    "Encoder compute dtype (auto: bfloat16 on accelerators, float32 on CPU).",
)
flags.DEFINE_integer("fps", Settings.fps, "Output frame rate (24: the paper's).")
console.define_size("frame_size", Settings.frame_size, "Decoded frame HxW, landscape.")
console.define_size("encoder_size", Settings.encoder_size, "Encoder input HxW, multiples of 14.")
flags.DEFINE_integer("seed", Settings.seed, "Seed of a random encoder.")
flags.DEFINE_bool(
    "mirror",
    Settings.mirror,
    "Augment: also prepare every train clip's left-right mirror image (<clip_id>.mirror, train split only): the "
    "video and route images flipped, the motion mirrored (left and right swapped), holds.json mirrored.",
)
_WORKERS = flags.DEFINE_integer(
    "workers",
    1,
    "Processes that encode the clips on this host, each its share with an encoder of its own (CPU hosts: the "
    "core count is a good start; each process takes the host's accelerators too, so keep 1 on GPU/TPU hosts).",
    lower_bound=1,
)
flags.adopt_module_key_flags(multihost)


def main(argv: list[str]) -> int:
    if _ENCODER.value is None:
        raise UserError(NO_ENCODER)
    settings = Settings(**{field.name: flags.FLAGS[field.name].value for field in dataclasses.fields(Settings)})
    multihost.initialize()
    barrier = None
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        barrier = lambda: multihost_utils.sync_global_devices("sabr-prepare: clips encoded")  # noqa: E731
    report = prepare(
        argv[1],
        _DATA_DIR.value,
        settings,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        barrier=barrier,
        workers=_WORKERS.value,
    )
    return 1 if report is not None and report.get("error") else 0


def run() -> None:
    """Console-script entry point."""
    console.run(main, "sabr-prepare", args=("CLIPS",))


if __name__ == "__main__":
    run()
