"""`sabr-train --dry_run --topology v5p:2x2x1`: the real train step compiled ahead of time for
a TPU slice on this CPU machine (needs libtpu), with the splash attention kernel."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (the `tpu` extra)")
def test_dry_run_compiles_for_a_v5p_slice():
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    args = [
        sys.executable,
        "-m",
        "sabr_jax.cli.train",
        "--config",
        os.path.join(REPO, "configs/demo.py"),
        "--dry_run",
        "--topology",
        "v5p:2x2x1",
        "--config.mesh.data=1",
        "--config.mesh.fsdp=-1",
        "--config.model.width=64",
        "--config.model.depth=2",
        "--config.model.dtype=bfloat16",
        "--config.model.remat=full",
        "--config.data.max_frames=128",  # temporal attention over 128 frames: long enough for splash
    ]
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert "target: v5p:2x2x1 (TPU v5), mesh {'data': 1, 'fsdp': 4, 'tensor': 1}" in out, out
    flops = float(re.search(r"flops per step: (\S+)", out).group(1))
    memory = float(re.search(r"memory per device: (\S+) GiB", out).group(1))
    splash = int(re.search(r"splash \(Mosaic custom calls\) (\d+)", out).group(1))
    assert flops > 1e9 and 0 < memory < 95
    assert splash > 0, "the temporal attention should use the Pallas splash kernel on TPU"
    assert "fits: yes" in out
