"""sabr-synth: write SynthClimb clips in the layout sabr-prepare reads.

    sabr-synth --out CLIPS --clips 4 [--size 368x640] [--holds 8] [--context 2] [--pan]

Each clip folder CLIPS/<prefix>NNN/ gets video.mp4 (the empty wall), context/*.png (route
images), tracks.pkl (PHALP tracks of the climber) and holds.json; sabr_jax.data.synthclimb.synth
describes them. The climb is a deterministic function of the route; each clip's wall comes
from (--seed, clip number), so runs with different seeds share no wall. A rerun keeps the
clips already written.
"""

from __future__ import annotations

import os
import time

from absl import flags

from sabr_jax.cli import console
from sabr_jax.data.synthclimb import synth
from sabr_jax.data.synthclimb.climber import MAX_HOLDS

_OUT = flags.DEFINE_string("out", None, "Folder to write CLIPS/<prefix>NNN/ into.", required=True)
_CLIPS = flags.DEFINE_integer("clips", 4, "Number of clips.", lower_bound=1)
_SIZE = console.define_size("size", (368, 640), "Video HxW, both even.")
_HOLDS = flags.DEFINE_integer(
    "holds",
    None,
    f"Route holds per clip, 3 to {MAX_HOLDS} (default {synth.DEFAULT_HOLDS}); the clip length follows from it.",
)
_SECONDS = flags.DEFINE_float(
    "seconds", None, "Instead of --holds: the shortest route whose climb lasts at least this long."
)
_FPS = flags.DEFINE_integer("fps", 24, "Frame rate of the videos.", lower_bound=1)
_CONTEXT = flags.DEFINE_integer("context", 2, "Route images per clip.", lower_bound=0)
_PAN = flags.DEFINE_bool("pan", False, "Slow camera pan and zoom (holds.json gets per-frame views).")
_SEED = flags.DEFINE_integer("seed", 0, "Run seed.")
_PREFIX = flags.DEFINE_string("prefix", "clip", "Clip folder prefix.")
_WORKERS = flags.DEFINE_integer(
    "workers", os.cpu_count() or 1, "Clips written at once, one process each (default: the CPU count).", lower_bound=1
)


def main(argv: list[str]) -> None:
    height, width = _SIZE.value
    start = time.perf_counter()
    paths = synth.write_clips(
        _OUT.value, _CLIPS.value, seed=_SEED.value, prefix=_PREFIX.value, log=lambda line: print(line, flush=True),
        holds=_HOLDS.value, seconds=_SECONDS.value, fps=_FPS.value, height=height, width=width, context=_CONTEXT.value,
        pan=_PAN.value, workers=_WORKERS.value,
    )  # fmt: skip
    print(f"wrote {len(paths)} clips to {_OUT.value} in {time.perf_counter() - start:.1f} s")


def run() -> None:
    """Console-script entry point."""
    console.run(main, "sabr-synth")


if __name__ == "__main__":
    run()
