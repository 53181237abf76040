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


def _install_cell():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    (cell,) = [c for c in notebook.cells if "network" in c.metadata.get("tags", [])]
    return cell.source


def _run_install(monkeypatch, cwd, source):
    """Run the install cell in `cwd` as if sabr_jax were not installed; -> the pip commands it ran."""
    import importlib.util
    import subprocess

    ran = []
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    monkeypatch.setattr(subprocess, "run", lambda args, **kwargs: ran.append(args))
    exec(compile(source, "install cell", "exec"), {})
    return ran


def test_install_cell_installs_the_checkout_it_sits_in(monkeypatch):
    source = _install_cell()
    assert "github.com/sabr-jax" not in source  # no invented address
    (pip,) = _run_install(monkeypatch, NOTEBOOK.parent, source)  # Jupyter runs a notebook in its folder
    assert pip[1:5] == ["-m", "pip", "install", "-q"] and pip[-1] == str(ROOT)


def test_install_cell_outside_a_checkout_needs_the_marked_repo_url(monkeypatch, tmp_path):
    source = _install_cell()
    assert 'REPO_URL = ""  # <-- SET THIS' in source
    with pytest.raises(RuntimeError, match="not in a checkout of sabr_jax: set REPO_URL"):
        _run_install(monkeypatch, tmp_path, source)
    set_url = source.replace('REPO_URL = ""', 'REPO_URL = "git+https://example.org/me/sabr_jax"')
    (pip,) = _run_install(monkeypatch, tmp_path, set_url)
    assert pip[-1] == "git+https://example.org/me/sabr_jax"
