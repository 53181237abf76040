"""Train-step speed on this machine, for a grid of cases: layouts x frames x config variants.

    python benchmarks/bench_train.py                          # sabr_s, frame and slots, 64 and 128 frames
    python benchmarks/bench_train.py --variant base: --variant share:model.kv_share=True --json train.json
    python benchmarks/bench_train.py --config configs/sabr_l.py --frames 1100 --flops_only
    python benchmarks/bench_train.py --frames 64 --ceiling    # + each matmul of the step timed alone

Per case (row): the median step after warm-up, examples/s, matrix-multiply GFLOP per step
(sabr_jax.parallel.flops.jaxpr_flops on the traced step: forward, backward, recompute), the achieved
GFLOP/s and its fraction of the matmul peak measured in the same run for the compute dtype
(all devices), the compiled memory per device and the compile time. With `--ceiling`, also the
step's ceiling: its matmul FLOPs over the seconds its matrix multiplies take when each runs alone
(`harness.matmul_seconds`), as a fraction of the peak. A step at its ceiling loses nothing to the
rest (softmax, copies, transposes); below it, the gap is the rest; the ceiling's own gap to 1 is
the shapes of the matmuls (thin, small or batched ones run below the square matmul's peak).

Default set-up (the issue's measurement; every item is a `--config.KEY=VALUE` away): configs/sabr_s.py
(width 384, 12 blocks, 6 heads; 700 patches of width 384) on the in-memory synthetic source with
2 clips, batch 1, float32, remat 'none'. A case sets data.max_frames to its frames and the clips'
lengths to fill them (max_frames - context_frames motion frames), then applies its variant
(`--variant NAME:key=value,...`). Every case is compiled ahead of time first; it is timed unless
`--flops_only`, or its compiled memory exceeds `--max_gib`. The batches are prepared before timing
(the input pipeline has its own benchmark): this measures the jitted, donated, sharded step alone,
on all local devices.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import harness  # noqa: E402
import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from sabr_jax import config as config_lib  # noqa: E402
from sabr_jax.cli.console import run  # noqa: E402
from sabr_jax.data.pipeline import abstract_batch  # noqa: E402
from sabr_jax.data.sources import open_source  # noqa: E402
from sabr_jax.errors import UserError  # noqa: E402
from sabr_jax.parallel import sharding  # noqa: E402
from sabr_jax.parallel.flops import compile_abstract, compiled_bytes, matmuls, total_flops  # noqa: E402
from sabr_jax.training.loop import process_batches  # noqa: E402
from sabr_jax.training.trainer import Trainer  # noqa: E402

flags.adopt_module_key_flags(harness)  # --help lists --json, --max_gib, --peak_n
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "..", "configs", "sabr_s.py"), "Config file."
)
_LAYOUTS = flags.DEFINE_list("layouts", ["frame", "slots"], "model.layout of the cases.")
_FRAMES = flags.DEFINE_list("frames", ["64", "128"], "data.max_frames of the cases (context frames included).")
_VARIANTS = flags.DEFINE_multi_string(
    "variant", [], "NAME:key=value,key=value: a config variant measured in every case (repeatable; none: 'base')."
)
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps per case (after the warm-up steps).")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed steps per case after its compile.")
_FLOPS_ONLY = flags.DEFINE_bool("flops_only", False, "Compile and count FLOPs and memory; time nothing.")
_CEILING = flags.DEFINE_bool(
    "ceiling",
    False,
    "Also time each of the step's matrix multiplies alone (harness.matmul_seconds): the step's ceiling, "
    "its matmul FLOPs over their seconds alone, as a fraction of the peak.",
)

# The measurement set-up, applied unless the command line sets the key.
DEFAULTS = {
    "data.source": "synthetic",
    "data.num_clips": 2,  # the synthetic source keeps its clips in memory (1.2 GB each at 1100 frames)
    "batch_size": 1,
    "model.dtype": "float32",
    "model.remat": "none",
}

COLUMNS = (
    ("layout", "layout", ""),
    ("variant", "variant", ""),
    ("frames", "frames", "d"),
    ("patches", "patches", "d"),
    ("step_s", "median step (s)", ".3f"),
    ("examples_per_s", "examples/s", ".3g"),
    ("gflop_per_step", "GFLOP/step", ".4g"),
    ("gflop_per_s", "GFLOP/s", ".4g"),
    ("peak_fraction", "of peak", ".2f"),
    ("ceiling", "ceiling, of peak", ".2f"),
    ("memory_gib", "GiB/device", ".2f"),
    ("compile_s", "compile (s)", ".1f"),
    ("note", "note", ""),
)


def parse_variants(texts: list[str]) -> list[tuple[str, dict]]:
    """`--variant` values 'NAME:key=value,...' -> [(name, overrides)]; [('base', {})] for none."""
    variants = []
    for text in texts:
        name, sep, rest = text.partition(":")
        if not sep or not name.strip():
            raise UserError(f"--variant={text}: expected NAME:key=value,key=value (e.g. share:model.kv_share=True)")
        variants.append((name.strip(), harness.parse_overrides(rest, f"--variant={text}")))
    names = [n for n, _ in variants]
    if len(set(names)) < len(names):
        raise UserError(f"--variant: the names {names} repeat; give each variant its own name")
    return variants or [("base", {})]


def case_config(base, layout: str, frames: int, overrides: dict, what: str):
    """A copy of `base` with model.layout, data.max_frames = frames, then `overrides`, and clips
    that fill the frames (min and max clip frames = frames - context frames); validated.
    `what` names the case in a UserError."""
    cfg = copy.deepcopy(base)
    harness.apply_overrides(cfg, {"model.layout": layout, "data.max_frames": frames, **overrides}, what)
    fill = cfg.data.max_frames - cfg.data.context_frames
    harness.apply_overrides(cfg, {"data.min_clip_frames": fill, "data.max_clip_frames": fill}, what)
    return config_lib.validate(cfg, data_dir=False)


def device_batches(cfg, trainer: Trainer, mesh, spec: dict, count: int) -> list[dict]:
    """`count` global batches from cfg's source, on the devices, in `spec`'s dtypes and shardings."""
    source, stats = open_source(cfg)
    it = process_batches(cfg, source, stats, mesh, cfg.seed)

    def put(x, s):
        return jax.device_put(np.asarray(x, s.dtype), s.sharding)

    return [jax.tree.map(put, next(it), spec) for _ in range(count)]


def compile_step(cfg):
    """-> (trainer, mesh, abstract batch, compiled train step or None, its matrix multiplies
    (`flops.matmuls`), compile s). The step is None where XLA refuses it for the device's memory
    (its matmuls are still counted)."""
    mesh = sharding.make_mesh(cfg.mesh)
    trainer = Trainer(cfg, mesh)
    spec = abstract_batch(cfg, trainer.batch_sharding)
    start = time.perf_counter()
    try:
        traced, _, step = compile_abstract(trainer.jit_train_step, trainer.abstract_state(), spec, mesh=mesh)
    except Exception as error:  # an accelerator's compiler refuses buffers larger than its memory
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        with jax.set_mesh(mesh):
            traced, step = trainer.jit_train_step.trace(trainer.abstract_state(), spec), None
    return trainer, mesh, spec, step, matmuls(traced.jaxpr), time.perf_counter() - start


def measure_case(
    cfg,
    peaks: dict[str, float],
    *,
    steps: int,
    warmup: int,
    budget: int,
    flops_only: bool = False,
    max_step_s: float = math.inf,
    seconds_per_flop: float | None = None,
    ceiling: bool = False,
) -> dict:
    """One row: compile cfg's train step ahead of time, count its FLOPs and memory, and time it
    (median of `steps` after `warmup`) unless flops_only, its memory per device exceeds `budget`
    bytes, or flops x seconds_per_flop (a prediction, when given) exceeds max_step_s; a row that
    is not timed says why in 'note'. Times in s, FLOPs in GFLOP, memory in GiB per device;
    peak_fraction is the achieved FLOP/s over peaks[compute dtype] x the device count; with
    `ceiling`, a timed row also gets the step's matmuls timed alone (`harness.matmul_seconds`, on
    one device: 'matmul_s' for the whole step's, 'ceiling' their FLOP/s as a fraction of the peak)."""
    trainer, mesh, spec, step, counts, compile_s = compile_step(cfg)
    flops = total_flops(counts)
    nbytes = None if step is None else compiled_bytes(step)
    row = {
        "layout": cfg.model.layout,
        "frames": cfg.data.max_frames,
        "patches": cfg.data.num_patches,
        "batch": cfg.batch_size,
        "dtype": cfg.model.dtype,
        "compile_s": compile_s,
        "gflop_per_step": flops / 1e9,
        "memory_gib": None if nbytes is None else nbytes / harness.GIB,
    }
    predicted = None if seconds_per_flop is None else flops * seconds_per_flop
    if step is None:
        row["note"] = "not timed: the compiler says it does not fit the device's memory"
    elif flops_only:
        row["note"] = "not timed: --flops_only"
    elif nbytes > budget:
        row["note"] = f"not timed: needs {nbytes / harness.GIB:.1f} GiB > budget {budget / harness.GIB:.1f} GiB"
    elif predicted is not None and predicted > max_step_s:
        row["note"] = f"not timed: about {predicted:.3g} s per step predicted > --max_step_s {max_step_s:g}"
    if "note" in row:
        return row
    state = trainer.init_state(cfg.seed)
    batches = device_batches(cfg, trainer, mesh, spec, 2)
    feed = itertools.cycle(batches)

    def one_step():
        nonlocal state
        state, metrics = step(state, next(feed))
        jax.block_until_ready(metrics["loss"])

    seconds, runs = harness.median_seconds(one_step, steps, warmup)
    rate = flops / seconds
    row.update(
        step_s=seconds,
        runs_s=runs,
        examples_per_s=cfg.batch_size / seconds,
        gflop_per_s=rate / 1e9,
        peak_fraction=rate / (peaks[cfg.model.dtype] * jax.device_count()),
    )
    if ceiling:
        row["matmul_s"] = harness.matmul_seconds(counts) / jax.device_count()
        row["ceiling"] = flops / row["matmul_s"] / (peaks[cfg.model.dtype] * jax.device_count())
    return row


def progress(row: dict) -> None:
    """One line on stderr as a case finishes (a full grid takes minutes)."""
    timing = f"{row['step_s']:.3f} s/step" if "step_s" in row else row["note"]
    case = f"{row['layout']} {row.get('variant', '')} {row['frames']} frames x {row['patches']} patches"
    print(f"{case}: {row['gflop_per_step']:.4g} GFLOP, {timing}", file=sys.stderr, flush=True)


def grid(
    patches: list[int] | None = None,
) -> tuple[ml_collections.ConfigDict, list[tuple[str, ml_collections.ConfigDict]]]:
    """The flags' cases -> (the base config: --config, its overrides and DEFAULTS; [(variant name,
    case config)]) over variants x layouts x patches (data.num_patches; None: the config's) x frames."""
    base = _CONFIG.value
    harness.set_defaults(base, DEFAULTS, _CONFIG)
    cases = []
    for name, overrides in parse_variants(_VARIANTS.value):
        for layout in _LAYOUTS.value:
            for p in patches or [None]:
                for frames in sorted(harness.int_list(_FRAMES)):
                    what = f"--variant {name}, layout {layout}, {frames} frames" + (f", {p} patches" if p else "")
                    more = {"data.num_patches": p} if p else {}
                    cases.append((name, case_config(base, layout, frames, {**more, **overrides}, what)))
    return base, cases


def main(argv) -> None:
    del argv
    base, cases = grid()
    peaks = harness.measure_peaks([cfg.model.dtype for _, cfg in cases])
    budget = harness.memory_budget(harness.MAX_GIB.value)
    rows = []
    for name, cfg in cases:
        row = measure_case(
            cfg,
            peaks,
            steps=_STEPS.value,
            warmup=_WARMUP.value,
            budget=budget,
            flops_only=_FLOPS_ONLY.value,
            ceiling=_CEILING.value,
        )
        rows.append({"variant": name, **row})
        progress(rows[-1])
    head = harness.header(base, peaks, per_row=True, memory_budget_gib=round(budget / harness.GIB, 1))
    notes = [f"medians of {_STEPS.value} steps after {_WARMUP.value} warm-up; of peak: of the measured matmul peak"]
    harness.report(head, rows, COLUMNS, notes)


if __name__ == "__main__":
    run(main, "bench_train")
