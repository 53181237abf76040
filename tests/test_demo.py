"""sabr-demo end to end on a few SynthClimb walls and a few steps: clips -> DINOv2 tokens ->
TFDS -> training -> export -> sabr-eval, and a rerun resumes instead of starting over."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = [
    "--config.synth.clips=5",
    "--config.synth.holds=3",
    "--config.total_steps=4",
    "--config.log_every=2",
    "--config.eval_every=2",
    "--config.checkpoint_every=2",
    "--config.batch_size=2",
    "--config.sample.steps=3",
    "--config.data.max_frames=32",
]


def run_demo(workdir, *extra):
    cmd = [sys.executable, "-m", "sabr_jax.cli.demo", "--workdir", str(workdir), *SHORT, *extra]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}
    )


@pytest.mark.slow  # ~80 s; CI runs the full sabr-demo itself (its first command)
def test_short_demo_runs_end_to_end_and_resumes(tmp_path):
    done = run_demo(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "SEEDED RANDOM WEIGHTS" in out
    for row in ("model", "mean_motion", "random_clip", "shuffled_video", "ground_truth"):
        assert row in out, out
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for row in ("model", "mean_motion", "random_clip", "shuffled_video", "ground_truth"):
        assert {"movement_mse", "route_adherence"} <= set(metrics["rows"][row])
    truth = metrics["rows"]["ground_truth"]
    assert truth["movement_mse"] == 0.0 and truth["route_adherence"] == 1.0
    for name in ("loss.png", "eval/adherence.png", "eval/metrics.csv", "export", "train/metrics.jsonl"):
        assert (tmp_path / name).exists(), name
    records = [json.loads(line) for line in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_x0_mse_shuffled" in r for r in records)
    assert str(tmp_path / "eval" / "metrics.json") in out.replace(os.sep + os.sep, os.sep)

    again = run_demo(tmp_path)  # everything is there: nothing is regenerated, training is already done
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from step 4" in again.stdout + again.stderr
