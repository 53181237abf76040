"""Run a console script in a subprocess the way its installed wrapper runs it: the entry point
pyproject.toml's [project.scripts] names, argv[0] the script's name, from the repository root."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def script(name: str, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run console script `name` with `args` (JAX on the CPU); stdout and stderr are captured as text."""
    module, function = SCRIPTS[name].split(":")
    code = f"import sys; from {module} import {function}; sys.argv[0] = {name!r}; sys.exit({function}())"
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
