"""colab/sample.ipynb runs top to bottom (its network cells left out) and shows the overlay.

Against the demo's model when `sabr-demo` has run in the repository root (CI runs it before the
tests), else against the tiny export of the sampling tests."""

import os
import sys
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "colab" / "sample.ipynb"


def test_sample_notebook_runs_top_to_bottom(wall, tmp_path, monkeypatch):
    demo = ROOT / "sabr_demo" / "export"
    checkpoint = str(demo) if demo.is_dir() else wall["workdir"]
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    network = [c for c in notebook.cells if "network" in c.metadata.get("tags", [])]
    assert network, "the install cell is tagged 'network'"
    notebook.cells = [c for c in notebook.cells if c not in network]
    monkeypatch.setenv("SABR_CHECKPOINT", checkpoint)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    nbclient.NotebookClient(notebook, timeout=600, resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert any("<video" in o.get("data", {}).get("text/html", "") for o in outputs), "the overlay is shown"
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "motion " in printed and "axis_angle" in printed and "sample_<k>/" in printed
    assert (tmp_path / "samples" / "sample_0" / "motion.bvh").is_file()
