"""The training loop end to end: metrics, validation figures, resume after SIGTERM, SIGKILL
during an async save, non-finite steps, EMA export.

Killed runs are `sabr-train` subprocesses started through this file
(`python tests/test_train_loop.py MODE -- FLAGS`), which can slow the steps down (so a
SIGTERM lands mid-run) or kill itself right after an asynchronous save has started.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = [
    "--config.batch_size=8",
    "--config.model.width=32",
    "--config.model.heads=4",
    "--config.model.depth=2",
    "--config.model.video_dim=16",
    "--config.data.max_frames=16",
    "--config.data.num_patches=8",
    "--config.data.num_clips=16",
    "--config.data.min_clip_frames=8",
    "--config.data.max_clip_frames=24",
    "--config.optim.warmup_steps=2",
    "--config.log_every=1",
]


def flags(workdir, total_steps, checkpoint_every, *extra):
    return [
        "--config",
        os.path.join(REPO, "configs/demo.py"),
        "--workdir",
        str(workdir),
        f"--config.total_steps={total_steps}",
        f"--config.checkpoint_every={checkpoint_every}",
        *TINY,
        *extra,
    ]


def tiny_cfg(total_steps, checkpoint_every, **overrides):
    """The config the flags above give, for in-process runs."""
    from sabr_jax.config import demo_config

    cfg = demo_config()
    for flag in flags("x", total_steps, checkpoint_every)[4:]:
        key, value = flag[len("--config.") :].split("=")
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = type(node[leaf])(value)
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def records(workdir):
    """{step: the step's record} of WORKDIR/metrics.jsonl."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def losses(workdir):
    return {step: r["loss"] for step, r in records(workdir).items()}


def child_env(**extra):
    return dict(os.environ, JAX_PLATFORMS="cpu", **extra)


def start(mode, args, **env):
    return subprocess.Popen(
        [sys.executable, __file__, mode, "--", *args],
        cwd=REPO,
        env=child_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 8-step run, in this process, with validation figures at steps 3, 6, 8."""
    from sabr_jax.training.loop import train

    workdir = tmp_path_factory.mktemp("reference")
    result = train(tiny_cfg(8, 4, eval_every=3), str(workdir))
    assert result["status"] == "done"
    return workdir, losses(workdir)


VALIDATION = {"val_x0_mse", "val_x0_mse_t999", "val_x0_mse_shuffled"}


def test_uninterrupted_run_writes_metrics_tensorboard_checkpoints(reference):
    workdir, ref = reference
    assert sorted(ref) == list(range(1, 9)) and all(np.isfinite(list(ref.values())))
    logged = records(workdir)
    assert {"step", "loss", "mse", "vlb", "grad_norm", "steps_per_s", "examples_per_s"} <= set(logged[1])
    assert [s for s, r in logged.items() if VALIDATION <= set(r)] == [3, 6, 8]  # every eval_every steps and the last
    assert all(0 < logged[s][k] < 10 for s in (3, 6, 8) for k in VALIDATION), logged[8]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(workdir, "tensorboard")))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]
    with open(os.path.join(workdir, "checkpoints", "8", "data_iter", "metadata")) as f:
        assert json.load(f)["next_batch"] == 8


def test_validation_figures_are_deterministic_and_see_the_video(reference):
    """Re-evaluating the reference run's final EMA (a fresh compile, the batches drawn anew)
    gives the logged figures; with its trained params, another example's video changes them."""
    from sabr_jax.data.sources import open_source
    from sabr_jax.parallel import sharding
    from sabr_jax.training import checkpoint
    from sabr_jax.training.loop import validation, validation_line
    from sabr_jax.training.trainer import Trainer

    workdir, _ = reference
    cfg = tiny_cfg(8, 4, eval_every=3)
    trainer = Trainer(cfg, sharding.make_mesh(cfg.mesh))
    mngr = checkpoint.manager(str(workdir), 3)
    state, _, _ = checkpoint.restore(mngr, trainer.abstract_state())
    mngr.close()
    evaluate = validation(cfg, trainer, open_source(cfg)[1], state, print)
    ema = evaluate(state["ema"])
    assert ema == evaluate(state["ema"]) == {k: records(workdir)[8][k] for k in VALIDATION}
    trained = evaluate(state["params"])  # 8 steps: the video moves the figure by ~1e-4 (float32 round-off: ~1e-7)
    assert abs(trained["val_x0_mse_shuffled"] - trained["val_x0_mse"]) > 1e-5, trained
    assert validation_line(8, trained, 1000).startswith(f"step 8: val x0 mse {trained['val_x0_mse']:.4g} (t=999: ")


def test_rolled_video_is_another_examples():
    from sabr_jax.training.trainer import roll_video

    batch = {"video": np.arange(3)[:, None] * np.ones((3, 4)), "frame_mask": np.eye(3, 4, dtype=bool)}
    rolled = roll_video(batch)
    np.testing.assert_array_equal(rolled["video"][:, 0], [2, 0, 1])
    assert rolled["frame_mask"] is batch["frame_mask"]


def test_empty_validation_split_skips_evaluation(monkeypatch):
    from sabr_jax.training import loop

    messages = []
    monkeypatch.setattr(loop, "open_source", lambda cfg, split: ([], None))
    assert loop.validation(tiny_cfg(2, 100, eval_every=1), None, None, None, messages.append) is None
    assert "no clips" in messages[0]


def test_sigterm_saves_and_the_same_command_resumes_exactly(tmp_path, reference):
    _, ref = reference
    args = flags(tmp_path, 8, 100)
    proc = start("slow", args)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(tmp_path / "metrics.jsonl") and len(losses(tmp_path)) >= 2:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "preempted at step" in out, out[-3000:]
    saved = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
    assert len(saved) == 1 and 2 <= saved[0] < 8, saved  # checkpoint_every=100: only the preemption save
    # Rerun the same command: it resumes and finishes; the losses equal the uninterrupted run's.
    second = subprocess.run(
        [sys.executable, "-m", "sabr_jax.cli.train", *args],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming from step {saved[0]}" in second.stderr + second.stdout
    got = losses(tmp_path)
    assert sorted(got) == list(range(1, 9))
    np.testing.assert_allclose([got[s] for s in range(1, 9)], [ref[s] for s in range(1, 9)], rtol=1e-6)


def test_sigkill_during_async_save_keeps_the_previous_checkpoint(tmp_path, reference):
    _, ref = reference
    args = flags(tmp_path, 8, 2)
    proc = start("kill_at_save_4", args)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, out[-3000:]
    entries = os.listdir(tmp_path / "checkpoints")
    assert "2" in entries and "4" not in entries, entries  # step 4's save never committed
    from sabr_jax.training.loop import train

    result = train(tiny_cfg(8, 2), str(tmp_path))  # resumes from step 2
    assert result["status"] == "done"
    got = losses(tmp_path)
    assert sorted(got) == list(range(1, 9))
    np.testing.assert_allclose([got[s] for s in range(1, 9)], [ref[s] for s in range(1, 9)], rtol=1e-6)
    assert not any("tmp" in e for e in os.listdir(tmp_path / "checkpoints"))  # the unfinished save was cleaned up


def _poison_batch(monkeypatch, bad_batch):
    """Make global batch `bad_batch` carry a NaN in its motion."""
    from sabr_jax.data import pipeline
    from sabr_jax.training import loop

    real = pipeline.dataset

    def dataset(*args, start_batch=0, **kwargs):
        def gen():
            for index, batch in enumerate(real(*args, start_batch=start_batch, **kwargs), start_batch):
                if index == bad_batch:
                    batch = dict(batch, motion=batch["motion"].copy())
                    batch["motion"][0, 6, 0] = np.nan
                yield batch

        return gen()

    monkeypatch.setattr(loop.pipeline, "dataset", dataset)


# "skip" ~37 s: in CI, test_train_robust's consecutive skips and test_train_sharded's skipped step cover it
@pytest.mark.parametrize("mode", ["stop", pytest.param("skip", marks=pytest.mark.slow)])
def test_nonfinite_loss_stops_or_skips(tmp_path, monkeypatch, capsys, mode):
    from sabr_jax.parallel import sharding
    from sabr_jax.training import checkpoint
    from sabr_jax.training.loop import train
    from sabr_jax.training.trainer import Trainer

    _poison_batch(monkeypatch, bad_batch=2)  # the third step
    cfg = tiny_cfg(5, 2, on_nonfinite=mode)
    result = train(cfg, str(tmp_path))
    out = capsys.readouterr()
    text = out.out + out.err
    assert "step 3: non-finite loss" in text, text[-2000:]
    mngr = checkpoint.manager(str(tmp_path), 3)
    trainer = Trainer(cfg, sharding.make_mesh(cfg.mesh))
    if mode == "stop":
        assert result["status"] == "nonfinite"
        assert mngr.all_steps() == [2]  # nothing after the bad step was saved
    else:
        assert result["status"] == "done" and result["step"] == 5
        assert mngr.all_steps() == [2, 4, 5]
        logged = records(tmp_path)
        assert logged[3]["skipped"] == 1 and logged[4]["skipped"] == 0
    state, _, _ = checkpoint.restore(mngr, trainer.abstract_state())
    mngr.close()
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))


def test_export_after_training(tmp_path, reference):
    from sabr_jax.training import checkpoint

    workdir, _ = reference
    export = tmp_path / "export"
    # The run is complete: the same command with --export restores it and only exports.
    proc = subprocess.run(
        [sys.executable, "-m", "sabr_jax.cli.train", *flags(workdir, 8, 4), "--export", str(export)],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    params, meta = checkpoint.load_export(str(export))
    assert meta["config"]["total_steps"] == 8 and "norm_stats" in meta
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_best_ema_is_kept_and_early_stopping(tmp_path, monkeypatch):
    """WORKDIR/best holds the EMA of the evaluation with the lowest val_x0_mse (an export, beside the
    newest checkpoints), and early_stop_evals=2 ends training two evaluations after it; with
    export_from='best' that is what is exported, also from the finished run."""
    from sabr_jax.training import checkpoint, loop

    figures = iter([0.5, 0.4, 0.45, 0.46, 0.3, 0.2])
    seen = {}

    def fake_validation(cfg, trainer, stats, state, say):
        def evaluate(params):
            value = next(figures)
            seen[value] = jax.device_get(params)
            return {"val_x0_mse": value, "val_x0_mse_t999": value, "val_x0_mse_shuffled": value}

        return evaluate

    monkeypatch.setattr(loop, "validation", fake_validation)
    cfg = tiny_cfg(8, 4, eval_every=1, early_stop_evals=2, keep_checkpoints=1, export_from="best")
    result = loop.train(cfg, str(tmp_path / "w"))
    assert result["status"] == "done" and result["step"] == 4  # evaluations 0.5, 0.4 (best), 0.45, 0.46: stop
    assert result["best"] == {"step": 2, "val_x0_mse": 0.4} and "stopped early" in result["message"]
    assert sorted(os.listdir(tmp_path / "w" / "checkpoints")) == ["4"]
    params, meta = checkpoint.load_export(str(tmp_path / "w" / "best"))
    assert meta["best"] == {"step": 2, "val_x0_mse": 0.4}
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), seen[0.4])
    line = checkpoint.export_trained(str(tmp_path / "export"), str(tmp_path / "w"), result, "best")
    assert line.startswith("the best EMA parameters (step 2, validation x0 MSE 0.4) exported to")
    jax.tree.map(
        np.testing.assert_array_equal, jax.device_get(checkpoint.load_export(str(tmp_path / "export"))[0]), seen[0.4]
    )
    again = loop.train(cfg, str(tmp_path / "w"))  # rerun: it had stopped early, so it stops again at once
    assert again["step"] == 4 and again["best"] == {"step": 2, "val_x0_mse": 0.4}


def _child(mode, argv):
    """Run sabr-train in this process, slowed down or killed as the mode says."""
    from sabr_jax.cli.train import run
    from sabr_jax.training import checkpoint, metrics_log

    if mode == "slow":
        write = metrics_log.MetricsLog.write

        def slow_write(self, step, record):
            write(self, step, record)
            time.sleep(0.5)

        metrics_log.MetricsLog.write = slow_write
    elif mode.startswith("kill_at_save_"):
        at = int(mode.rsplit("_", 1)[1])
        save = checkpoint.save

        def save_then_die(mngr, step, *args, **kwargs):
            save(mngr, step, *args, **kwargs)
            if step == at:  # the asynchronous save has started, not finished
                os.kill(os.getpid(), signal.SIGKILL)

        checkpoint.save = save_then_die
    sys.argv = ["sabr-train", *argv]
    run()


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[3:])
