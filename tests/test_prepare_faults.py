"""sabr-prepare against faults: unusable values in some frames of a track, a full disk, a damaged
dataset file, a kill mid-run. Each ends in a correct recovery or one line naming the file and the fix."""

import copy
import errno
import json
import os
import shutil
import signal
import subprocess
import sys

import joblib
import numpy as np
import pytest
from console import script

from sabr_jax.data.prepare import build as P
from sabr_jax.data.prepare.settings import Settings
from sabr_jax.data.store import tfds_source
from sabr_jax.data.store.prepared import PreparedClip
from sabr_jax.data.synthclimb import synth

SETTINGS = dict(encoder="random-tiny", frame_size=(64, 112), encoder_size=(28, 56), context_frames=2)
SIZE_ARGS = ["--frame_size", "64x112", "--encoder_size", "28x56", "--encoder", "random-tiny", "--context_frames", "2"]
GOOD = ["good0", "good1"]


def _spoil(folder, frames):
    """NaN in the climber's body pose in the given frames (indices into the sorted frame names) of
    the clip's tracks.pkl; returns those frames' names."""
    tracks = joblib.load(folder / "tracks.pkl")
    names = sorted(tracks)
    for i in frames:
        frame = tracks[names[i]]
        pos = frame["tid"].index(synth.CLIMBER)
        frame["smpl"][pos] = copy.deepcopy(frame["smpl"][pos])
        frame["smpl"][pos]["body_pose"] = np.full((23, 3, 3), np.nan, np.float32)
    joblib.dump(tracks, folder / "tracks.pkl", compress=3)
    return [names[i] for i in frames]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Two good 1-s clips (24 FPS: output frame i is source frame i), one with NaN in one frame of
    the climber's track and one with NaN in 13 of its 24 frames; sabr-prepare, in-process."""
    root = tmp_path_factory.mktemp("faults")
    clips, data = root / "clips", root / "data"
    for i, name in enumerate([*GOOD, "nan_one", "nan_most"]):
        synth.make_clip(clips / name, seed=60 + i, holds=3, height=64, width=112, context=2)
    spoiled = _spoil(clips / "nan_one", [9])
    _spoil(clips / "nan_most", range(2, 15))
    lines = []
    report = P.prepare(clips, data, Settings(**SETTINGS, validation_fraction=0.0), log=lines.append)
    return {"root": root, "clips": clips, "data": data, "report": report, "log": lines, "spoiled": spoiled}


def test_nan_in_one_frame_is_masked_not_skipped(prepared):
    report, data = prepared["report"], prepared["data"]
    assert "error" not in report and report["built"] == [*GOOD, "nan_one"]
    (name,) = prepared["spoiled"]
    reason = f"frame '{name}', track 7: field 'smpl.body_pose' has non-finite values (NaN or inf)"
    assert list(report["bad_frames"]) == ["nan_one"]
    ((frame, why),) = report["bad_frames"]["nan_one"].items()
    assert frame == name and why.endswith(reason) and "nan_one/tracks.pkl" in why
    clip = PreparedClip(data / P.PREPARED / "nan_one")
    mask = clip.motion_mask()
    assert clip.meta["source_frame_of"] == list(range(24)) and mask.tolist() == [i != 9 for i in range(24)]
    assert not clip.motion()[9].any() and np.isfinite(clip.motion()).all() and report["masked_frames"]["nan_one"] == 1
    assert f"frames with unusable tracker values, masked like tracker-lost ones: nan_one {name}" in prepared["log"]
    source, stats = tfds_source.open_tfds(data, "train")
    assert np.isfinite(stats.mean).all() and np.isfinite(stats.std).all()
    i = [source.clip_id(k) for k in range(len(source))].index("nan_one")
    read = source.read(i, 0, source.num_frames(i))
    np.testing.assert_array_equal(read["motion_mask"], mask)  # out of the loss, its video tokens kept


def test_too_many_bad_frames_skip_the_clip(prepared):
    (skipped,) = prepared["report"]["skipped"]
    assert skipped["clip_id"] == "nan_most"
    assert skipped["reason"].startswith(
        f"{prepared['clips'] / 'nan_most' / 'tracks.pkl'}: 13 of the 24 frames where the climber (track 7) is "
        "detected have unusable values (more than --max_bad_fraction=0.5 of them); the first: frame '000003.jpg'"
    ), skipped["reason"]


def test_tfds_prints_nothing_to_stdout(prepared, tmp_path, capfd):
    shutil.copytree(prepared["data"] / P.PREPARED, tmp_path / P.PREPARED)
    P.build_dataset(tmp_path, Settings(**SETTINGS, validation_fraction=0.0), GOOD, log=lambda line: None)
    out, err = capfd.readouterr()
    assert "Downloading and preparing" not in out + err and "downloaded and prepared" not in out + err, out + err


# ---------------------------------------------------------------- a damaged dataset file
def _copy(prepared, tmp_path):
    shutil.copytree(prepared["data"], tmp_path / "data")
    return tmp_path / "data"


def test_damaged_arrayrecord_is_named_and_a_rerun_rebuilds_it(prepared, tmp_path):
    data = _copy(prepared, tmp_path)
    source, _ = tfds_source.open_tfds(data, "train")
    before = source.read(0, 0, source.num_frames(0))
    (shard,) = sorted(P.dataset_dir(data).glob("sabr_clips-train.array_record-*"))
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 3)
    expected = (
        f"{shard}: damaged ({size // 3} bytes, {size} were written); rerun sabr-prepare on the same clips with the "
        "same --data_dir: it rebuilds the dataset from its prepared clips"
    )
    with pytest.raises(tfds_source.DatasetMismatchError) as raised:
        tfds_source.open_tfds(data, "train")
    assert str(raised.value) == expected
    proc = script(
        "sabr-train", "--config", "configs/demo.py", "--config.data.source=tfds", f"--config.data.dir={data}",
        "--workdir", tmp_path / "run",
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == f"sabr-train: error: {expected}"

    lines = []
    report = P.prepare(prepared["clips"], data, Settings(**SETTINGS, validation_fraction=0.0), log=lines.append)
    assert report["dataset"]["rebuilt"] is True and report["resumed"] == [*GOOD, "nan_one"]
    assert (
        f"dataset {P.dataset_dir(data).absolute()} is damaged ({shard.name}: {size // 3} bytes, {size} were written): rebuilding"
        in lines
    )
    source, _ = tfds_source.open_tfds(data, "train")
    after = source.read(0, 0, source.num_frames(0))
    for key in before:
        np.testing.assert_array_equal(after[key], before[key])
    again = []
    P.prepare(prepared["clips"], data, Settings(**SETTINGS, validation_fraction=0.0), log=again.append)
    assert f"dataset {P.dataset_dir(data).absolute()} is up to date" in again


def test_unreadable_arrayrecord_of_the_same_size_is_named(prepared, tmp_path):
    data = _copy(prepared, tmp_path)
    (shard,) = sorted(P.dataset_dir(data).glob("sabr_clips-train.array_record-*"))
    size = shard.stat().st_size
    shard.write_bytes(b"\0" * size)  # the size it was written with, but no ArrayRecord file
    with pytest.raises(tfds_source.DatasetMismatchError, match=f"{shard}: damaged \\(not a readable ArrayRecord file"):
        tfds_source.open_tfds(data, "train")


# ---------------------------------------------------------------- a full disk
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_while_preparing_a_clip_is_one_error(prepared, tmp_path, monkeypatch):
    from sabr_jax.data.store import prepared as prep

    def full(self, name, tokens):
        raise ENOSPC

    monkeypatch.setattr(prep.ClipWriter, "append", full)
    with pytest.raises(P.DiskFull) as raised:
        P.prepare(prepared["clips"], tmp_path / "data", Settings(**SETTINGS), log=lambda line: None)
    assert str(raised.value) == (
        f"no space left on device writing the prepared clip {tmp_path / 'data' / P.PREPARED / 'good0'}: free space "
        "there (or give another --data_dir) and rerun sabr-prepare: it resumes, keeping the clips already prepared"
    )
    assert not any((tmp_path / "data" / P.PREPARED).glob("*good0*"))  # its temporary folder is removed
    assert not any((tmp_path / "data" / P.PREPARED / "_failed").iterdir())  # no clip is marked as failed


def test_full_disk_while_writing_the_dataset_is_one_error(prepared, tmp_path, monkeypatch):
    from sabr_jax.data.store import tfds_builder

    class FullWriter:
        def __init__(self, path, options):
            self.path = path

        def write(self, record):
            raise RuntimeError(f"write() failed: No space left on device; writing {self.path}; at byte 16384")

        def close(self):
            raise RuntimeError("Failed to close chunk_writer")

    data = _copy(prepared, tmp_path)
    shutil.rmtree(P.dataset_dir(data))
    monkeypatch.setattr(tfds_builder.array_record_module, "ArrayRecordWriter", FullWriter)
    with pytest.raises(P.DiskFull) as raised:
        P.prepare(prepared["clips"], data, Settings(**SETTINGS, validation_fraction=0.0), log=lambda line: None)
    assert str(raised.value) == (
        f"no space left on device writing sabr_clips-train.array_record-00000-of-00001 of the dataset "
        f"{P.dataset_dir(data).absolute()}: free space there (or give another --data_dir) and rerun sabr-prepare: "
        "it resumes, keeping the clips already prepared"
    )
    assert not any((data / "sabr_clips").iterdir())  # TFDS removed its incomplete folder


def _tmpfs_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _tmpfs_available(), reason="needs unshare and mount (root, a private mount namespace)")
@pytest.mark.parametrize("size, stage", [("256k", "the prepared clip"), ("1m", "of the dataset")])
def test_full_disk_on_the_command_line(prepared, tmp_path, size, stage):
    """--data_dir on a small tmpfs: it fills while the clips are prepared (256 KB) or while the dataset is
    written (1 MB, which holds the prepared clips); one line, status 1, no traceback."""
    from console import REPO, SCRIPTS

    (tmp_path / "data").mkdir()
    module, function = SCRIPTS["sabr-prepare"].split(":")
    code = f"import sys; from {module} import {function}; sys.argv[0] = 'sabr-prepare'; sys.exit({function}())"
    args = [prepared["clips"], "--data_dir", tmp_path / "data", *SIZE_ARGS[:4], "--encoder", "random-s"]
    child = " ".join([sys.executable, "-c", f'"{code}"', *map(str, args), "--precision", "float32"])
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size={size} tmpfs {tmp_path / 'data'} && exec {child}"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("sabr-prepare: error: no space left on device writing ") and stage in last, last
    assert last.endswith("rerun sabr-prepare: it resumes, keeping the clips already prepared"), last
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# ---------------------------------------------------------------- kill -9, then rerun
def test_kill_9_during_prepare_then_rerun_builds_every_clip(prepared, tmp_path):
    from console import REPO

    data = tmp_path / "data"
    child = """
import os, signal, sys
from sabr_jax.data.store import prepared as prep
commit = prep.ClipWriter.commit
def commit_then_die(self, *args, **kwargs):
    out = commit(self, *args, **kwargs)
    if self.final.name == "good1":
        os.kill(os.getpid(), signal.SIGKILL)
    return out
prep.ClipWriter.commit = commit_then_die
from sabr_jax.cli.prepare import run
sys.argv = ["sabr-prepare", *sys.argv[1:]]
run()
"""
    args = [prepared["clips"], "--data_dir", data, *SIZE_ARGS, "--validation_fraction", "0"]
    proc = subprocess.run(
        [sys.executable, "-c", child, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert sorted(p.name for p in (data / P.PREPARED).iterdir()) == ["_failed", *GOOD]  # no half-written clip
    assert not (data / P.REPORT).exists()
    done = script("sabr-prepare", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((data / P.REPORT).read_text())
    assert report["resumed"] == GOOD and report["prepared_now"] == ["nan_one"]
    assert report["built"] == [*GOOD, "nan_one"] and report["dataset"]["splits"]["train"]["clips"] == 3
