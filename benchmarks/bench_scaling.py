"""Train-step cost against frames and patches per frame, both layouts, with a PNG plot.

    python benchmarks/bench_scaling.py                     # sabr_s: 64..1100 frames x 700, 180 patches
    python benchmarks/bench_scaling.py --max_step_s 30 --plot scaling.png --json scaling.json

Every point is bench_train's case (`bench_train.measure_case`; its flags and defaults: configs/sabr_s.py,
batch 1, float32, remat 'none', synthetic data; `--variant` too), with data.num_patches from
`--patches`: FLOPs and memory per device from the ahead-of-time compile for every point; the step
is timed only where its memory fits `--max_gib` and its predicted time `--max_step_s`. The
prediction for a line (one layout x patches x variant, frames ascending) is the point's FLOPs at
the seconds per FLOP of the line's last timed point, or at the measured peak before any.

'FLOP slope' is d log(FLOPs) / d log(frames) from the line's previous point: 1 is linear in
frames, 2 quadratic (attention over time). The plot has three log-log panels against frames:
GFLOP/step, memory per device (GiB) and the timed step (s); one line per layout x patches
(x variant).
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import bench_train  # noqa: E402
import harness  # noqa: E402
import matplotlib  # noqa: E402
from absl import flags  # noqa: E402

from sabr_jax.cli.console import run  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

flags.adopt_module_key_flags(bench_train)
flags.FLAGS.set_default("frames", ["64", "128", "256", "512", "1100"])  # bench_train's flag, this script's range
_PATCHES = flags.DEFINE_list("patches", ["700", "180"], "data.num_patches of the lines (180: sabr-prepare --pool 2).")
_MAX_STEP_S = flags.DEFINE_float("max_step_s", 60.0, "Time only points whose predicted step takes at most this (s).")
_PLOT = flags.DEFINE_string("plot", "bench_scaling.png", "Where to write the PNG plot.")

COLUMNS = (
    ("layout", "layout", ""),
    ("patches", "patches", "d"),
    ("variant", "variant", ""),
    ("frames", "frames", "d"),
    ("gflop_per_step", "GFLOP/step", ".4g"),
    ("flop_slope", "FLOP slope", ".2f"),
    ("memory_gib", "GiB/device", ".3g"),
    ("step_s", "median step (s)", ".3f"),
    ("peak_fraction", "of peak", ".2f"),
    ("compile_s", "compile (s)", ".1f"),
    ("note", "note", ""),
)

PANELS = (("gflop_per_step", "GFLOP per step"), ("memory_gib", "GiB per device"), ("step_s", "step (s)"))


def line_key(row: dict) -> tuple:
    return row["layout"], row["patches"], row["variant"]


def measure_lines(cases, peaks: dict[str, float], budget: int) -> list[dict]:
    """Rows of every case (bench_train.grid's, frames ascending within a line), each with its
    'flop_slope' from the line's previous point; timing as the module docstring says."""
    rows, last = [], {}  # last: line -> (its latest row, seconds per FLOP of its latest timed point)
    for name, cfg in cases:
        key = (cfg.model.layout, cfg.data.num_patches, name)
        previous, seconds_per_flop = last.get(key, (None, 1.0 / peaks[cfg.model.dtype]))
        row = bench_train.measure_case(
            cfg,
            peaks,
            steps=flags.FLAGS.steps,
            warmup=flags.FLAGS.warmup,
            budget=budget,
            flops_only=flags.FLAGS.flops_only,
            max_step_s=_MAX_STEP_S.value,
            seconds_per_flop=seconds_per_flop,
        )
        row["variant"] = name
        if previous is not None:
            ratio = math.log(row["frames"] / previous["frames"])
            row["flop_slope"] = math.log(row["gflop_per_step"] / previous["gflop_per_step"]) / ratio
        if "step_s" in row:
            seconds_per_flop = row["step_s"] / (row["gflop_per_step"] * 1e9)
        last[key] = row, seconds_per_flop
        bench_train.progress(row)
        rows.append(row)
    return rows


def plot(rows: list[dict], title: str, path: str) -> None:
    """Log-log panels (PANELS) of rows against frames, one line per layout x patches (x variant)."""
    variants = {r["variant"] for r in rows}
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4.2))
    for ax, (field, label) in zip(axes, PANELS):
        for key in dict.fromkeys(line_key(r) for r in rows):
            points = [(r["frames"], r[field]) for r in rows if line_key(r) == key and r.get(field) is not None]
            if points:
                name = f"{key[0]}, {key[1]} patches" + (f", {key[2]}" if len(variants) > 1 else "")
                ax.plot(*zip(*points), marker="o", label=name)
        ax.set(xscale="log", yscale="log", xlabel="frames", ylabel=label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv) -> None:
    del argv
    base, cases = bench_train.grid(harness.int_list(_PATCHES))
    peaks = harness.measure_peaks([cfg.model.dtype for _, cfg in cases])
    budget = harness.memory_budget(harness.MAX_GIB.value)
    rows = measure_lines(cases, peaks, budget)
    head = harness.header(base, peaks, per_row=True, memory_budget_gib=round(budget / harness.GIB, 1), plot=_PLOT.value)
    plot(rows, f"{head['config']}\n{head['device_count']} x {head['device']}, JAX {head['jax']}", _PLOT.value)
    notes = [f"timed: medians of {flags.FLAGS.steps} steps after {flags.FLAGS.warmup} warm-up; plot: {_PLOT.value}"]
    harness.report(head, rows, COLUMNS, notes)


if __name__ == "__main__":
    run(main, "bench_scaling")
