"""The benchmark scripts (benchmarks/): their shared harness, and each script run on tiny configs
(configs/demo.py shapes, 8-16 frames, 1 timed step) through its command line, checked on its JSON."""

import json
import os
import subprocess
import sys

import pytest

from sabr_jax.errors import UserError

BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks")
DEMO = os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py")
sys.path.insert(0, BENCH)

import harness  # noqa: E402  (its absl flags --json, --peak_n, --max_gib: no other module defines them)

HEADER = {"device", "device_count", "backend", "cpu_cores", "jax", "xla_flags", "config", "peak_flops"}


def bench(tmp_path, script: str, *args) -> dict:
    """Run benchmarks/<script> with args and --json; its report."""
    out = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, os.path.join(BENCH, script), *map(str, args), "--peak_n=256", f"--json={out}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "|---|" in done.stdout  # the Markdown table is printed too
    report = json.loads(out.read_text())
    assert HEADER <= set(report["header"]) and report["header"]["peak_flops"]["float32"] > 0
    return report


def test_markdown_table_formats_and_leaves_missing_cells_empty():
    columns = (("name", "case", ""), ("s", "step (s)", ".2f"))
    table = harness.markdown_table([{"name": "a", "s": 1.234}, {"name": "b", "s": None}, {"name": "c"}], columns)
    assert table.splitlines() == ["| case | step (s) |", "|---|---|", "| a | 1.23 |", "| b |  |", "| c |  |"]


def test_overrides_parse_literals_and_reject_unknown_keys():
    assert harness.parse_overrides("model.kv_share=True,model.layout=frame,model.width=96", "--v") == {
        "model.kv_share": True,
        "model.layout": "frame",
        "model.width": 96,
    }
    with pytest.raises(UserError, match="--v: expected key=value"):
        harness.parse_overrides("model.width", "--v")
    from sabr_jax.config import demo_config

    cfg = demo_config()
    cfg.lock()
    harness.apply_overrides(cfg, {"model.width": 96}, "--v")
    assert cfg.model.width == 96
    with pytest.raises(UserError, match="--v: the config has no key 'model.nope'"):
        harness.apply_overrides(cfg, {"model.nope": 1}, "--v")
    with pytest.raises(UserError, match="--v: model.width='wide' has the wrong type"):
        harness.apply_overrides(cfg, {"model.width": "wide"}, "--v")


def test_matmul_peak_and_memory_budget():
    assert harness.matmul_peak("float32", n=128, calls=2) > 1e6  # FLOP/s: any machine does 1 MFLOP/s
    assert harness.memory_budget(2.0) == 2 * harness.GIB
    assert 0 < harness.memory_budget(0) < os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_matmul_seconds_times_each_matmul_alone():
    from sabr_jax.parallel.flops import Matmul

    dot = Matmul((64, 128), (128, 96), (((1,), (0,)), ((), ())), "float32", "float32", 2.0 * 64 * 128 * 96)
    batched = Matmul((4, 8, 16), (4, 16, 8), (((2,), (1,)), ((0,), (0,))), "float32", "float32", 2.0 * 4 * 8 * 16 * 8)
    conv = Matmul((1, 3, 8, 8), (4, 3, 3, 3), None, "float32", "float32", 1e6)
    assert harness.matmul_seconds({dot: 2, batched: 1}) > 0
    assert harness.matmul_seconds({conv: 5}) == 0  # convolutions are left out


def test_bench_train_times_a_case_as_a_fraction_of_the_peak(tmp_path):
    report = bench(
        tmp_path,
        "bench_train.py",
        "--config",
        DEMO,
        "--layouts",
        "frame",
        "--frames",
        8,
        "--steps",
        1,
        "--warmup",
        0,
        "--ceiling",
    )
    (row,) = report["rows"]
    assert (row["layout"], row["variant"], row["frames"], row["patches"], row["batch"]) == ("frame", "base", 8, 8, 1)
    assert row["gflop_per_step"] > 0 and row["memory_gib"] > 0 and row["compile_s"] > 0
    assert row["step_s"] > 0 and row["examples_per_s"] == pytest.approx(1 / row["step_s"])
    assert row["gflop_per_s"] == pytest.approx(row["gflop_per_step"] / row["step_s"])
    assert 0 < row["peak_fraction"] < 10
    assert row["matmul_s"] > 0 and row["ceiling"] == pytest.approx(
        row["gflop_per_step"] * 1e9 / row["matmul_s"] / report["header"]["peak_flops"]["float32"]
    )
    assert "batch=1" in report["header"]["config"] and "dtype=float32" in report["header"]["config"]


def test_bench_train_errors_name_the_flag():
    done = subprocess.run(
        [sys.executable, os.path.join(BENCH, "bench_train.py"), "--config", DEMO, "--variant", "w:model.nope=1"],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        timeout=300,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "bench_train: error: --variant w, layout frame, 64 frames: the config has no key 'model.nope' "
        "(sabr_jax/config.py lists them)"
    ]


def test_bench_sample_reports_seconds_per_clip_and_flops_per_step(tmp_path):
    report = bench(tmp_path, "bench_sample.py", "--frames", 8, "--batches", 2, "--repeats", 1, "--timed_steps", 2)
    rows = {r["method"]: r for r in report["rows"]}
    assert {m: (r["steps"], r["timed_steps"], r["batch"]) for m, r in rows.items()} == {
        "ddpm": (250, 2, 2),
        "ddim": (50, 2, 2),
    }
    for r in rows.values():
        assert r["seconds_per_clip"] == pytest.approx(r["seconds_per_step"] * r["steps"] / 2)
        assert r["gflop_per_step"] > 0 and r["setup_gflop"] > 0 and 0 < r["peak_fraction"] < 10
        # the step without the set-up, from a 1-step run timed beside the 2-step one
        peak = report["header"]["peak_flops"]["float32"]
        assert r["step_peak_fraction"] == pytest.approx(r["gflop_per_step"] * 1e9 / r["denoise_step_s"] / peak)
        assert {"setup_s", "denoise_step_s"} <= set(r)
    assert rows["ddpm"]["gflop_per_step"] == rows["ddim"]["gflop_per_step"]  # the same model forward


@pytest.mark.slow
def test_bench_train_variants_and_flops_only(tmp_path):
    report = bench(
        tmp_path,
        "bench_train.py",
        *("--config", DEMO, "--layouts", "slots", "--frames", "16,8", "--flops_only"),
        *("--variant", "base:", "--variant", "wide:model.width=128"),
    )
    rows = {(r["variant"], r["frames"]): r for r in report["rows"]}
    assert list(rows) == [("base", 8), ("base", 16), ("wide", 8), ("wide", 16)]  # frames ascending
    assert all(r["note"] == "not timed: --flops_only" and "step_s" not in r for r in rows.values())
    assert rows["wide", 8]["gflop_per_step"] > 2 * rows["base", 8]["gflop_per_step"]
    assert rows["base", 16]["gflop_per_step"] > rows["base", 8]["gflop_per_step"]


@pytest.mark.slow
def test_bench_scaling_plots_and_skips_what_exceeds_the_budget(tmp_path):
    report = bench(
        tmp_path,
        "bench_scaling.py",
        *("--config", DEMO, "--config.model.patch_grid=()", "--layouts", "slots", "--frames", "8,16"),
        *("--patches", 8, "--max_gib", 1e-6, "--plot", tmp_path / "scaling.png"),
    )
    first, second = report["rows"]
    assert all(r["note"].startswith("not timed: needs") and r["memory_gib"] > 1e-6 for r in (first, second))
    assert "flop_slope" not in first and 0.8 < second["flop_slope"] < 1.3  # slots: about linear in frames
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
