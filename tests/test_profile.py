"""`sabr-train --profile_steps START:STOP`: a jax.profiler trace of those steps in WORKDIR/profile
(`loop.ProfileWindow`), stopped even when training ends inside the window."""

import pytest
from console import script
from test_train_loop import flags, tiny_cfg


def traces(workdir):
    """The XProf trace files (*.xplane.pb) under WORKDIR/profile."""
    return sorted((workdir / "profile").rglob("*.xplane.pb"))


@pytest.mark.slow  # a 4-step training run: 91 s on the 2 shared cores
def test_profile_steps_write_a_trace(tmp_path):
    """The window reaches past the run's last step: the trace is stopped when training ends."""
    from sabr_jax.training.loop import train

    assert train(tiny_cfg(4, 100), str(tmp_path), profile_steps=(3, 10))["status"] == "done"
    (trace,) = traces(tmp_path)
    assert trace.stat().st_size > 0


def test_window_stops_after_its_last_step(tmp_path):
    import jax.numpy as jnp

    from sabr_jax.training.loop import ProfileWindow

    window = ProfileWindow((2, 4), str(tmp_path / "profile"))
    for step in range(5):  # steps taken so far; the loop's calls around step step + 1
        window.before(step)
        assert window.active == (step + 1 in (2, 3))
        window.after(step + 1, {"loss": jnp.float32(step)})
        assert window.active == (step + 1 == 2)
    window.stop()  # (the loop's `finally`) a no-op once stopped
    assert len(traces(tmp_path)) == 1


def test_bad_profile_steps_is_one_line(tmp_path):
    proc = script("sabr-train", *flags(tmp_path, 4, 100, "--profile_steps", "4:2"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("sabr-train: error: flag --profile_steps=4:2: expected START:STOP with 1 <= START < STOP")
    ), proc.stderr[-2000:]
    assert not traces(tmp_path)
