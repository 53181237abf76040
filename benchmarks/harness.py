"""What every bench_*.py script shares: the machine's measured matrix-multiply peak, the report
header (device, JAX version, config), config defaults that command-line overrides win over,
one Markdown table per report, and the report as JSON (`--json PATH`).

Every figure of a report is also a fraction of the peak measured in the same run (the same
process, the same load on the machine): `matmul_peak` times a jitted square matrix multiply.
"""

from __future__ import annotations

import ast
import json
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from absl import flags
from ml_collections import config_flags

from sabr_jax.errors import UserError
from sabr_jax.parallel.flops import GIB, Matmul  # noqa: F401 - GIB: the scripts read harness.GIB

JSON = flags.DEFINE_string("json", None, "Also write the whole report (header and rows) as JSON to this file.")
PEAK_N = flags.DEFINE_integer(
    "peak_n", 0, "Side of the square matrices that measure the matmul peak (0: 2048 on a CPU, 8192 on accelerators)."
)
MAX_GIB = flags.DEFINE_float(
    "max_gib", 0.0, "Memory per device a measured program may use, GiB (0: 80% of the device's, else the host's RAM)."
)


def matmul_peak(dtype: str, n: int = 0, calls: int = 10) -> float:
    """FLOP/s of one jitted [n, n] @ [n, n] matrix multiply in `dtype` on the first device:
    2 n^3 FLOPs over the fastest of `calls` timed calls after a compile and a warm-up call. The
    fastest, not the median: a peak is the best the machine does, and on a shared machine the
    median of a few calls can fall far below it (122 against 200 GFLOP/s on 2 cores), which
    would inflate every fraction of peak in the report.

    n = 0 picks 2048 on a CPU (about 0.1-0.5 s a call on 2 cores) and 8192 on a GPU or TPU.
    """
    n = n or (2048 if jax.default_backend() == "cpu" else 8192)
    a_key, b_key = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(a_key, (n, n), dtype)
    b = jax.random.normal(b_key, (n, n), dtype)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()  # the compile
    _, seconds = median_seconds(lambda: matmul(a, b).block_until_ready(), calls, warmup=1)
    return 2.0 * n**3 / min(seconds)


def matmul_seconds(counts: Mapping[Matmul, int], calls: int = 3) -> float:
    """Seconds a program's matrix multiplies (`flops.matmuls`: how often each runs) take when each
    runs alone on the first device: per distinct dot_general, the fastest of `calls` jitted calls
    after a compile, times its count. Convolutions are left out.

    Over the program's dot FLOPs this is the fastest the program could run if nothing else took
    time: its ceiling, which shows how much of the gap to the peak is the shapes of its matmuls
    (small, batched, thin) and how much everything else (softmax, copies, transposes).
    """
    return sum(count * _dot_seconds(m, calls) for m, count in counts.items() if m.dimension_numbers is not None)


def _dot_seconds(m: Matmul, calls: int) -> float:
    """The fastest of `calls` jitted calls of one dot_general (operands of ones), after its compile."""
    lhs, rhs = jnp.ones(m.lhs, m.dtype), jnp.ones(m.rhs, m.dtype)
    dot = jax.jit(lambda a, b: jax.lax.dot_general(a, b, m.dimension_numbers, preferred_element_type=m.out_dtype))
    dot(lhs, rhs).block_until_ready()  # the compile
    return min(median_seconds(lambda: dot(lhs, rhs).block_until_ready(), calls, warmup=0)[1])


def measure_peaks(dtypes: Sequence[str]) -> dict[str, float]:
    """{dtype: FLOP/s} (`matmul_peak`, `--peak_n`) of float32 and of every other dtype in `dtypes`
    (the compute dtypes of the configs a report measures)."""
    return {d: matmul_peak(d, PEAK_N.value) for d in dict.fromkeys(("float32", *dtypes))}


def config_summary(cfg: ml_collections.ConfigDict, batch: bool = True, per_row: bool = False) -> str:
    """One line of the config figures that set a step's cost (batch=False: without the batch size;
    per_row: without the layout, frames and patches, which the rows give)."""
    m, d = cfg.model, cfg.data
    shape = f"frames={d.max_frames} (context {d.context_frames}) patches={d.num_patches} "
    return (
        ("" if per_row else f"layout={m.layout} ")
        + f"width={m.width} depth={m.depth} heads={m.heads} dtype={m.dtype} remat={m.remat} "
        + (f"batch={cfg.batch_size} " if batch else "")
        + ("context frames " + str(d.context_frames) + " " if per_row else shape)
        + f"video_dim={m.video_dim}"
    )


def header(
    cfg: ml_collections.ConfigDict, peaks: dict[str, float], batch: bool = True, per_row: bool = False, **extra
) -> dict:
    """The report's header: device kind and count, backend, CPU cores, JAX version, XLA_FLAGS, the config
    (`config_summary`), the measured peaks in FLOP/s, and `extra` items."""
    return {
        "device": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
        "backend": jax.default_backend(),
        "cpu_cores": os.cpu_count(),
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "config": config_summary(cfg, batch, per_row),
        "peak_flops": peaks,
        **extra,
    }


def print_header(head: dict) -> None:
    peaks = ", ".join(f"{d} {f / 1e9:.1f} GFLOP/s" for d, f in head["peak_flops"].items())
    print(
        f"device: {head['device_count']} x {head['device']} ({head['backend']}), {head['cpu_cores']} CPU cores; "
        f"JAX {head['jax']}" + (f"; XLA_FLAGS={head['xla_flags']}" if head["xla_flags"] else "")
    )
    print(f"config: {head['config']}")
    print(f"matmul peak per device, measured in this run: {peaks}")
    for key, value in head.items():
        if key not in ("device", "device_count", "backend", "cpu_cores", "jax", "xla_flags", "config", "peak_flops"):
            print(f"{key}: {value}")


Column = tuple[str, str, str]  # (row key, title, format spec such as ".3f"; "" for str())


def markdown_table(rows: Sequence[dict], columns: Sequence[Column]) -> str:
    """A Markdown table of `rows` (dicts), one column per (key, title, format); a missing or
    None value prints as an empty cell."""

    def cell(row, key, spec):
        value = row.get(key)
        return "" if value is None else format(value, spec)

    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r, k, s) for k, _, s in columns) + " |" for r in rows]
    return "\n".join(lines)


def report(head: dict, rows: Sequence[dict], columns: Sequence[Column], notes: Sequence[str] = ()) -> None:
    """Print the header, the table and the notes; with `--json PATH`, also write
    {"header": head, "rows": rows, "notes": notes} there."""
    print_header(head)
    print()
    print(markdown_table(rows, columns))
    for note in notes:
        print(note)
    if JSON.value:
        with open(JSON.value, "w") as f:
            json.dump({"header": head, "rows": list(rows), "notes": list(notes)}, f, indent=1)
        print(f"wrote {JSON.value}")


def set_defaults(cfg: ml_collections.ConfigDict, defaults: dict, config_flag: flags.FlagHolder) -> None:
    """Set cfg's dotted keys to `defaults`, in place, except those the command line sets
    (`--config.KEY=VALUE` of `config_flag`)."""
    keep = set(config_flags.get_override_values(flags.FLAGS[config_flag.name]))
    apply_overrides(cfg, {k: v for k, v in defaults.items() if k not in keep}, "the benchmark's defaults")


def parse_overrides(text: str, what: str) -> dict:
    """'key=value,key=value' (dotted config keys; values Python literals, else strings) -> dict.
    `what` names the flag in the UserError a malformed item raises."""
    out = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{what}: expected key=value items separated by commas, got {item!r}")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: dict, what: str) -> None:
    """Set the dotted keys of cfg (locked: no new keys) to `overrides`, in place; UserError naming
    `what` for a key cfg lacks or a value of the wrong type."""
    for key, value in overrides.items():
        try:
            cfg.update_from_flattened_dict({key: value})
        except (KeyError, AttributeError) as error:
            raise UserError(f"{what}: the config has no key {key!r} (sabr_jax/config.py lists them)") from error
        except TypeError as error:
            raise UserError(f"{what}: {key}={value!r} has the wrong type ({error})") from error


def int_list(holder: flags.FlagHolder) -> list[int]:
    """The positive integers of a comma-separated list flag; UserError naming the flag otherwise."""
    try:
        values = [int(v) for v in holder.value]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise UserError(f"--{holder.name}={','.join(holder.value)}: expected positive integers separated by commas")
    return values


def memory_budget(max_gib: float) -> int:
    """Bytes a measured program may use per device: `max_gib` GiB if > 0, else 80% of the first
    device's memory limit where it reports one (GPU, TPU), else 80% of the host's RAM (CPU)."""
    if max_gib > 0:
        return int(max_gib * GIB)
    limit = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
    if limit is None:
        limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(0.8 * limit)


def median_seconds(call: Callable[[], object], timed: int, warmup: int) -> tuple[float, list[float]]:
    """Run `call` (which blocks until its result is ready) warmup + timed times; -> (median of
    the timed calls' seconds, their seconds)."""
    times = []
    for _ in range(warmup + timed):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:]), times[warmup:]
