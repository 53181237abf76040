"""Training never loses work silently: a changed config, a damaged checkpoint, a second run
on the same workdir, a failed save, all-non-finite steps, and an export read on another mesh.

Each case ends in one line that says what happened and what to do (the exceptions are
`sabr_jax.errors.UserError`s, which the console scripts print as one line)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from test_train_loop import REPO, child_env, flags, records, start, tiny_cfg


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4."""
    from sabr_jax.training.loop import train

    workdir = tmp_path_factory.mktemp("finished")
    assert train(tiny_cfg(4, 2), str(workdir))["status"] == "done"
    return workdir


def copy_of(workdir, tmp_path):
    target = tmp_path / "workdir"
    shutil.copytree(workdir, target)
    return target


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("width", 48, "model.width 32 (checkpoint) vs 48 (this run)"),
        ("depth", 4, "model.depth 2 (checkpoint) vs 4 (this run)"),
    ],
)
def test_changed_model_stops_before_restoring(finished, tmp_path, key, value, expected):
    from sabr_jax.training.checkpoint import ConfigMismatch
    from sabr_jax.training.loop import train

    workdir = copy_of(finished, tmp_path)
    cfg = tiny_cfg(6, 2)
    cfg.model[key] = value
    with pytest.raises(ConfigMismatch) as raised:
        train(cfg, str(workdir))
    message = str(raised.value)
    assert "\n" not in message and expected in message and "--workdir" in message, message
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]  # untouched


def _damage(workdir, how):
    state = workdir / "checkpoints" / "4" / "state"
    if how == "truncated":
        files = [os.path.join(d, f) for d, _, fs in os.walk(state) for f in fs if "/d/" in os.path.join(d, f)]
        biggest = max(files, key=os.path.getsize)  # an array data file of the OCDBT store
        with open(biggest, "r+b") as f:
            f.truncate(os.path.getsize(biggest) // 2)
    else:
        os.remove(state / "_METADATA")


@pytest.mark.parametrize("how", ["truncated", "metadata_removed"])
def test_damaged_newest_checkpoint_resumes_from_the_previous(finished, tmp_path, capsys, how):
    from sabr_jax.training.loop import train

    workdir = copy_of(finished, tmp_path)
    _damage(workdir, how)
    result = train(tiny_cfg(6, 2), str(workdir))
    text = capsys.readouterr()
    text = text.out + text.err
    assert result["status"] == "done" and result["step"] == 6
    lines = [line for line in text.splitlines() if "is unreadable" in line]
    assert len(lines) == 1 and "checkpoints/4 is unreadable" in lines[0] and "resuming from step 2" in lines[0], text[
        -2000:
    ]
    assert "resuming from step 2" in text
    assert os.path.isdir(workdir / "checkpoints.damaged" / "4" / "state")  # kept, not deleted
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4", "6"]
    assert sorted(records(workdir)) == list(range(1, 7))


def test_no_readable_checkpoint_names_the_directory(finished, tmp_path):
    from sabr_jax.errors import UserError
    from sabr_jax.training.loop import train

    workdir = copy_of(finished, tmp_path)
    for step in ("2", "4"):
        os.remove(workdir / "checkpoints" / step / "state" / "_METADATA")
    with pytest.raises(UserError, match=r"no checkpoint in .*checkpoints can be read \(newest, step 4"):
        train(tiny_cfg(6, 2), str(workdir))


def test_second_run_on_a_workdir_fails_at_once(tmp_path):
    first = start("slow", flags(tmp_path, 1000, 1000))  # 0.5 s a step: alive until SIGTERM
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None and not (tmp_path / "metrics.jsonl").exists():
        time.sleep(0.1)
    assert first.poll() is None, first.communicate()[0][-3000:]
    second = subprocess.run(
        [sys.executable, "-m", "sabr_jax.cli.train", *flags(tmp_path, 1000, 1000), "--config.optim.lr=0.01"],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert first.poll() is None, "the first run ended before the second was refused"
    first.send_signal(signal.SIGTERM)
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0 and "preempted at step" in out, out[-3000:]
    assert second.returncode == 1, second.stderr[-3000:]
    last = second.stderr.strip().splitlines()[-1]
    assert f"is in use by another run: pid {first.pid} on host {socket.gethostname()}" in last, second.stderr[-3000:]
    assert "Traceback" not in second.stderr
    with open(tmp_path / "metrics.jsonl") as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == list(range(1, len(steps) + 1)), steps  # the first run's log, whole and once
    (saved,) = os.listdir(tmp_path / "checkpoints")
    with open(tmp_path / "checkpoints" / saved / "meta" / "metadata") as f:
        assert json.load(f)["config"]["optim"]["lr"] == tiny_cfg(6, 100).optim.lr  # not the second run's


def test_stale_lock_is_taken_over(tmp_path, capsys):
    from sabr_jax.training.loop import train

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "lock").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "since": "then"}))
    assert train(tiny_cfg(1, 100), str(tmp_path))["status"] == "done"
    text = capsys.readouterr()
    assert f"took over the lock of a run that is no longer running (pid {int(dead.stdout)}" in text.out + text.err
    assert (tmp_path / "lock").read_text() == ""  # released


def test_failed_save_stops_at_once_naming_the_last_good_checkpoint(tmp_path, monkeypatch):
    """The checkpoints directory is replaced by a file before step 4's save: a real OS error."""
    from sabr_jax.training import checkpoint
    from sabr_jax.training.loop import train

    save = checkpoint.save

    def break_then_save(mngr, step, *args, **kwargs):
        if step == 4:
            shutil.rmtree(tmp_path / "checkpoints")
            (tmp_path / "checkpoints").write_text("not a directory")
        save(mngr, step, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", break_then_save)
    with pytest.raises(checkpoint.SaveFailed) as raised:
        train(tiny_cfg(8, 2), str(tmp_path))
    message = str(raised.value)
    assert "\n" not in message, message
    assert (
        "the checkpoint of step 4 could not be written" in message and "the last good checkpoint is step 2" in message
    )
    assert max(records(tmp_path)) <= 5, records(tmp_path).keys()  # noticed at the next step at the latest


def _tmpfs_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _tmpfs_available(), reason="needs unshare and mount (root, a private mount namespace)")
def test_full_disk_stops_training_with_one_line(tmp_path):
    """Checkpoints on a tmpfs that holds one of them: the second save runs out of space."""
    (tmp_path / "checkpoints").mkdir()
    child = " ".join([sys.executable, "-m", "sabr_jax.cli.train", *flags(tmp_path, 8, 2)])
    script = f"mount -t tmpfs -o size=1200k tmpfs {tmp_path / 'checkpoints'} && exec {child}"
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", script], cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "could not be written" in last and "No space left on device" in last, proc.stderr[-3000:]
    assert "the last good checkpoint is step 2" in last, last
    assert "Traceback" not in proc.stderr


def test_all_nonfinite_steps_stop_after_max_consecutive_skips(tmp_path, monkeypatch, capsys):
    from sabr_jax.training import loop
    from sabr_jax.training.loop import train

    real = loop.pipeline.dataset

    def poisoned(*args, **kwargs):
        for batch in real(*args, **kwargs):
            yield dict(batch, motion=np.full_like(batch["motion"], np.nan))

    monkeypatch.setattr(loop.pipeline, "dataset", poisoned)
    result = train(tiny_cfg(20, 5, on_nonfinite="skip", max_consecutive_skips=3), str(tmp_path))
    assert result["status"] == "nonfinite" and result["step"] <= 4, result["step"]
    assert result["message"].startswith(f"stopped after step {result['step']}: 3 non-finite steps in a row")
    assert result["message"].endswith("no checkpoint was written"), result["message"]
    assert not os.path.exists(tmp_path / "checkpoints") or not os.listdir(tmp_path / "checkpoints")

    def strict(constant):
        raise ValueError(f"metrics.jsonl holds {constant}, which is not JSON")

    with open(tmp_path / "metrics.jsonl") as f:
        logged = [json.loads(line, parse_constant=strict) for line in f]
    assert logged and all(r["loss"] is None for r in logged), logged


def test_export_from_8_devices_loads_and_samples_on_1(tmp_path):
    from sabr_jax.sample.export import load

    export = tmp_path / "export"
    env = child_env(XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sabr_jax.cli.train",
            *flags(tmp_path / "w", 2, 100),
            "--config.mesh.data=1",
            "--config.mesh.fsdp=8",
            "--export",
            str(export),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mesh {'data': 1, 'fsdp': 8, 'tensor': 1}" in proc.stderr + proc.stdout
    assert jax.device_count() == 1
    params, cfg, _, sampler, _ = load(str(export), steps=4)
    assert all(x.sharding.device_set == {jax.devices()[0]} for x in jax.tree.leaves(params))
    length, patches = cfg.data.max_frames, cfg.data.num_patches
    batch = {
        "video": np.random.default_rng(0).normal(size=(1, length, patches, cfg.model.video_dim)).astype(np.float32),
        "frame_mask": np.ones((1, length), bool),
        "context_mask": np.arange(length)[None] < 2,
    }
    (motion,) = sampler(params, batch, jax.random.PRNGKey(0))  # the motion frames only
    assert motion.shape == (length - 2, 161) and np.isfinite(motion).all()


OLD_KEYS = ("kv_share", "cross_norm_affine")  # model.* keys added after exports and checkpoints were written


def test_export_written_before_newer_model_keys_loads_and_samples(tmp_path):
    """An export whose config lacks keys added since (sabr_jax.config.ADDED_KEYS) reads each as the
    value that reproduces the old model, and samples."""
    from flax import nnx

    from sabr_jax.config import ADDED_KEYS
    from sabr_jax.model.factory import build_model
    from sabr_jax.motion import NormStats
    from sabr_jax.sample.export import load
    from sabr_jax.training import checkpoint

    cfg = tiny_cfg(2, 100)
    params = nnx.to_pure_dict(nnx.state(build_model(cfg, 0)))
    meta = checkpoint.meta(cfg, NormStats.from_data(np.random.default_rng(0).normal(size=(20, 161))))
    for key in OLD_KEYS:
        del meta["config"]["model"][key]
    checkpoint.export_ema(str(tmp_path / "old"), params, meta)
    model = load(str(tmp_path / "old"), steps=2)
    for key in OLD_KEYS:
        assert model.cfg.model[key] == ADDED_KEYS[f"model.{key}"]
    length, patches = 16, model.cfg.data.num_patches
    batch = {
        "video": np.zeros((1, length, patches, model.cfg.model.video_dim), np.float32),
        "frame_mask": np.ones((1, length), bool),
        "context_mask": np.arange(length)[None] < 2,
    }
    (motion,) = model.sampler(model.params, batch, jax.random.PRNGKey(0))
    assert motion.shape == (length - 2, 161) and np.isfinite(motion).all()


def test_checkpoint_written_before_newer_model_keys_resumes(finished, tmp_path, capsys):
    from sabr_jax.training.loop import train

    workdir = copy_of(finished, tmp_path)
    for step in ("2", "4"):
        path = workdir / "checkpoints" / step / "meta" / "metadata"
        saved = json.loads(path.read_text())
        for key in OLD_KEYS:
            del saved["config"]["model"][key]
        path.write_text(json.dumps(saved))
    result = train(tiny_cfg(6, 2), str(workdir))
    text = capsys.readouterr()
    assert result["status"] == "done" and result["step"] == 6
    assert "resuming from step 4" in text.out + text.err
