"""Multi-host set-up (sabr_jax.parallel.distributed), shared by sabr-train and sabr-prepare.

Training: 2 CPU processes x 4 devices (jax.distributed, gloo) train and
checkpoint; 1 process x 8 devices on another mesh resumes; the result equals an
uninterrupted single-device run of the same length (same data order, same keys).

Preparing: 2 CPU processes of sabr-prepare split the clips between them and process 0 builds
the dataset of both.

The data order holds across process counts because every host reads its rows of one
global, seeded stream of batches (sabr_jax.data.pipeline), and the data_iter checkpoint
is that stream's position (sabr_jax.training.checkpoint), which any number of processes restores.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from console import SCRIPTS
from test_train_loop import REPO, flags, losses, tiny_cfg

TOTAL, FIRST = 6, 3
# Adam divides by sqrt(v) + eps: with the default eps a gradient of float-noise size (the
# zero-initialised gates make many exactly ~0 at the start) still moves its parameter by
# ~lr, so summation-order noise between device layouts (and in gloo's all-reduce) would be
# amplified to visible loss differences. A larger eps keeps noise-sized gradients noise-sized.
EPS = "--config.optim.eps=1e-4"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def env(devices):
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def run_processes(module: str, args: list, count: int, devices: int) -> list[str]:
    """Run `python -m module args` as `count` processes of one job (gloo on localhost, `devices` CPU
    devices each); -> their outputs, after checking that each exited with status 0."""
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", module, *map(str, args)]
            + ["--coordinator_address", f"localhost:{port}", "--num_processes", str(count), "--process_id", str(i)],
            cwd=REPO,
            env=env(devices),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(count)
    ]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return outs


def final_state(workdir, cfg):
    from sabr_jax.parallel import sharding
    from sabr_jax.training import checkpoint
    from sabr_jax.training.trainer import Trainer

    mngr = checkpoint.manager(str(workdir), 3)
    state, _, position = checkpoint.restore(
        mngr, Trainer(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1])).abstract_state()
    )
    mngr.close()
    return jax.tree.map(np.asarray, jax.device_get(state)), position


def test_two_hosts_checkpoint_one_host_resumes_like_an_uninterrupted_run(tmp_path):
    from sabr_jax.training.loop import train

    work, ref_dir = tmp_path / "run", tmp_path / "reference"
    # 2 processes x 4 devices, mesh data=2 fsdp=2 tensor=2 across both hosts; stop at step 3.
    first = flags(work, FIRST, 100, EPS, "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2")
    outs = run_processes("sabr_jax.cli.train", first, 2, 4)
    assert "2 process(es), 8 devices" in outs[0]
    assert sorted(os.listdir(work / "checkpoints")) == [str(FIRST)]
    # 1 process x 8 devices, another mesh (fsdp=8), the same workdir: resumes at step 3.
    second = flags(work, TOTAL, 100, EPS, "--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.mesh.tensor=1")
    proc = subprocess.run(
        [sys.executable, "-m", "sabr_jax.cli.train", *second],
        cwd=REPO,
        env=env(8),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"resuming from step {FIRST}" in proc.stderr + proc.stdout
    # The uninterrupted reference: 1 process, 1 device.
    cfg = tiny_cfg(TOTAL, 100)
    cfg.optim.eps = 1e-4
    assert train(cfg, str(ref_dir))["status"] == "done"

    got, ref = losses(work), losses(ref_dir)
    assert sorted(got) == sorted(ref) == list(range(1, TOTAL + 1))
    np.testing.assert_allclose([got[s] for s in ref], [ref[s] for s in ref], rtol=5e-5)
    state, position = final_state(work, cfg)
    ref_state, ref_position = final_state(ref_dir, cfg)
    assert position == ref_position and position["next_batch"] == TOTAL
    np.testing.assert_array_equal(state["key"], ref_state["key"])
    assert int(state["step"]) == int(ref_state["step"]) == TOTAL
    tol = 5e-3 * cfg.optim.lr * TOTAL  # Adam amplifies float noise in tiny gradients up to ~lr per step
    for name in ("params", "ema"):
        for a, b in zip(jax.tree.leaves(state[name]), jax.tree.leaves(ref_state[name])):
            np.testing.assert_allclose(a, b, atol=tol)


@pytest.mark.slow  # ~75 s on 2 cores
def test_two_hosts_prepare_one_dataset(tmp_path):
    """sabr-prepare joins the job through the same flags and function as sabr-train
    (sabr_jax.parallel.distributed): each process encodes its half of the clips, process 0 builds them all."""
    from sabr_jax.data.synthclimb import synth

    clips = tmp_path / "clips"
    for i in range(2):
        synth.make_clip(clips / f"clip{i}", seed=i, holds=3, fps=24, height=64, width=112, context=1)
    module = SCRIPTS["sabr-prepare"].split(":")[0]
    size = ["--frame_size", "64x112", "--encoder_size", "28x56", "--encoder", "random-tiny", "--context_frames", "1"]
    outs = run_processes(module, [clips, "--data_dir", tmp_path / "data", *size], 2, 1)
    for i, out in enumerate(outs):  # clips[process_index::process_count]
        assert f"[1/1] clip{i}:" in out and f"clip{1 - i}:" not in out, out[-4000:]
    report = json.loads((tmp_path / "data" / "report.json").read_text())
    assert sorted(report["built"]) == ["clip0", "clip1"], report
