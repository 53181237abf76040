"""The console scripts' command line (sabr_jax.cli.console): errors in the input are one line on
stderr with exit status 1, `--verbose` shows the traceback, `--help` lists the flags.

Each script runs in a subprocess the way its installed wrapper runs it (tests/console.py).
All of them stop before any JAX compile.
"""

import subprocess

import pytest
from console import script


def one_line_error(proc: subprocess.CompletedProcess, prog: str) -> str:
    """The `<prog>: error: ...` line that ends stderr, after checking status 1 and no traceback."""
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{prog}: error: "), proc.stderr[-3000:]
    return last


def test_missing_config_file():
    last = one_line_error(script("sabr-train", "--config", "configs/nope.py"), "sabr-train")
    assert (
        last == "sabr-train: error: cannot load the config file: [Errno 2] No such file or directory: 'configs/nope.py'"
    )


def test_bad_config_value(tmp_path):
    proc = script("sabr-train", "--config", "configs/demo.py", "--config.model.layout=foo", "--workdir", tmp_path)
    assert (
        one_line_error(proc, "sabr-train")
        == "sabr-train: error: config.model.layout='foo': expected one of 'slots', 'frame'"
    )
    assert not any(tmp_path.iterdir())


def test_override_of_a_missing_key(tmp_path):
    proc = script("sabr-train", "--config", "configs/demo.py", "--config.model.widht=96", "--workdir", tmp_path)
    assert one_line_error(proc, "sabr-train") == (
        'sabr-train: error: --config.model.widht: the config has no such key; Did you mean "width" instead of "widht"? '
        "(sabr_jax/config.py documents every key)"
    )


def test_tfds_source_needs_a_data_dir(tmp_path):
    proc = script("sabr-train", "--config", "configs/demo.py", "--config.data.source=tfds", "--workdir", tmp_path)
    last = one_line_error(proc, "sabr-train")
    assert last.startswith("sabr-train: error: config.data.dir='': expected the --data_dir of sabr-prepare"), last


def test_prepare_missing_clips_folder(tmp_path):
    proc = script("sabr-prepare", tmp_path / "missing", "--data_dir", tmp_path / "data", "--encoder", "random-tiny")
    last = one_line_error(proc, "sabr-prepare")
    assert last.startswith(
        f"sabr-prepare: error: {tmp_path / 'missing'}: no such folder; expected a folder of clips"
    ), last
    assert not (tmp_path / "data").exists()


def test_prepare_needs_an_encoder(tmp_path):
    last = one_line_error(script("sabr-prepare", tmp_path, "--data_dir", tmp_path / "data"), "sabr-prepare")
    assert "--encoder is required" in last and "random-s" in last


def test_eval_missing_export(tmp_path):
    proc = script("sabr-eval", "--checkpoint", tmp_path / "missing", "--data_dir", tmp_path, "--out", tmp_path / "out")
    last = one_line_error(proc, "sabr-eval")
    assert last.startswith(
        f"sabr-eval: error: --checkpoint={tmp_path / 'missing'}: no such folder; expected an exported model"
    ), last


def test_verbose_shows_the_traceback():
    proc = script("sabr-train", "--config", "configs/nope.py", "--verbose")
    assert proc.returncode == 1
    assert (
        "Traceback (most recent call last)" in proc.stderr
        and "No such file or directory: 'configs/nope.py'" in proc.stderr
    )
    assert "sabr-train: error:" not in proc.stderr


@pytest.mark.parametrize(
    "name,flag",
    [
        ("sabr-train", "--workdir"),
        ("sabr-demo", "--encoder"),
        ("sabr-prepare", "--data_dir"),
        ("sabr-synth", "--out"),
        ("sabr-eval", "--checkpoint"),
        ("sabr-sample", "--route_color"),
    ],
)
def test_help_lists_the_flags_and_exits_0(name, flag):
    proc = script(name, "--help")  # (absl's own --help exits with status 1)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"  {flag}" in proc.stdout and "  --[no]verbose" in proc.stdout, proc.stdout
    assert proc.stdout.startswith(f"{name}: "), proc.stdout[:200]  # the script's docstring


@pytest.mark.parametrize("flag", ["--helpfull", "--helpshort", "-?"])
def test_every_help_flag_exits_0(flag):
    proc = script("sabr-synth", flag)
    assert proc.returncode == 0 and "  --out" in proc.stdout, proc.stderr[-2000:]


def test_sizes_show_their_defaults_as_they_are_typed():
    assert "(default: '368x640')" in script("sabr-synth", "--help").stdout
    text = script("sabr-prepare", "--help").stdout
    assert "(default: '368x640')" in text and "(default: '280x490')" in text, text
