"""synth -> sabr-prepare -> TFDS (ArrayRecord) -> Grain, with bad clips beside good ones.

(A NaN in some frames of a track masks those frames, it does not skip the clip: test_prepare_faults.)"""

import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap

import av
import joblib
import numpy as np
import pytest
from console import script

from sabr_jax.data import pipeline
from sabr_jax.data.prepare import build as P
from sabr_jax.data.prepare.settings import Settings
from sabr_jax.data.store import tfds_source
from sabr_jax.data.store.prepared import PreparedClip
from sabr_jax.data.synthclimb import synth
from sabr_jax.encoders.frames import FrameEncoder, make_encoder

# tiny frames and encoder input (2x4 = 8 patches), random-tiny encoder (Dv = 32): the demo's shapes
SIZE_ARGS = ["--frame_size", "64x112", "--encoder_size", "28x56", "--encoder", "random-tiny", "--context_frames", "2"]
SETTINGS = dict(encoder="random-tiny", frame_size=(64, 112), encoder_size=(28, 56), context_frames=2)
GOOD = ["good0", "good1", "good2", "good3", "good4"]
BAD = {
    "bad_truncated": "cannot open video",
    "bad_missing_field": "missing field 'smpl.betas'",
    "bad_frame_count": "tracks for 10 frames the video lacks",
    "bad_exploit": "unsafe or invalid pickle: refusing to load posix.system",
}


class Exploit:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def make_clips(root):
    """Good clips (one at 24 FPS, the others 30 FPS; the tracker loses the climber for 3 frames in
    each) and one bad clip per failure kind. good0 has 3 route images, 1.png, 2.png (the same
    image) and 10.png (another), of which --context_frames 2 keeps 1.png and 2.png."""
    truth = {}
    for i, name in enumerate(GOOD):
        fps = 24 if i == 0 else 30
        truth[name] = synth.make_clip(
            root / name, seed=i, seconds=2.0, fps=fps, height=64, width=112, context=2, pan=True, tracker_gaps=True
        )
    context = root / "good0" / "context"
    shutil.copy(context / "000.png", context / "2.png")
    (context / "000.png").rename(context / "1.png")
    (context / "001.png").rename(context / "10.png")

    def bad(name, seed=50):
        info = synth.make_clip(root / name, seed=seed, seconds=1.0, fps=24, height=64, width=112)
        return info["tracks"]

    data = (root / "bad_truncated" / "video.mp4", bad("bad_truncated"))[0]
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 3])

    def climber(tracks, index):
        name = sorted(tracks)[index]
        frame = tracks[name]
        if synth.CLIMBER not in frame["tracked_ids"]:
            name = sorted(tracks)[index + 4]
            frame = tracks[name]
        return frame, frame["tid"].index(synth.CLIMBER)

    t = copy.deepcopy(bad("bad_missing_field"))
    frame, pos = climber(t, 5)
    del frame["smpl"][pos]["betas"]
    joblib.dump(t, root / "bad_missing_field" / "tracks.pkl", compress=3)

    t = bad("bad_frame_count")
    last = t[sorted(t)[-1]]
    for _ in range(10):  # tracks for 10 frames after the video's end
        t[f"{len(t) + 1:06d}.jpg"] = copy.deepcopy(last)
    joblib.dump(t, root / "bad_frame_count" / "tracks.pkl", compress=3)

    bad("bad_exploit")
    joblib.dump({"000001.jpg": {"tid": [Exploit(root / "PWNED")]}}, root / "bad_exploit" / "tracks.pkl", compress=3)
    return truth


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    clips, data = root / "clips", root / "data"
    truth = make_clips(clips)
    done = script("sabr-prepare", clips, "--data_dir", data, *SIZE_ARGS, "--validation_fraction", "0.2")
    assert (data / P.REPORT).is_file(), done.stderr[-3000:]
    report = json.loads((data / P.REPORT).read_text())
    return {
        "root": root,
        "clips": clips,
        "data": data,
        "truth": truth,
        "rc": done.returncode,
        "report": report,
        "stdout": done.stdout,
    }


def test_report_lists_good_and_skipped(built):
    report = built["report"]
    assert built["rc"] == 0
    assert report["built"] == GOOD
    assert sorted(report["prepared_now"]) == GOOD
    skipped = {s["clip_id"]: s["reason"] for s in report["skipped"]}
    assert sorted(skipped) == sorted(BAD)
    for clip_id, message in BAD.items():
        assert message in skipped[clip_id], (clip_id, skipped[clip_id])
        assert clip_id in skipped[clip_id]  # the message names the clip's file
    assert "frame '" in skipped["bad_missing_field"] and "track 7" in skipped["bad_missing_field"]
    assert not (built["clips"] / "PWNED").exists()
    assert report["dataset"]["splits"]["train"]["clips"] == 4
    assert report["dataset"]["splits"]["validation"]["clips"] == 1


def test_report_counts_masked_frames(built):
    """Each clip loses the climber for 3 source frames: they are kept, masked, and counted."""
    report = built["report"]
    expected = {c: int((~_expected(built["truth"][c])[2]).sum()) for c in GOOD}
    assert report["masked_frames"] == expected
    assert expected["good0"] == 3 and all(n >= 2 for n in expected.values())  # 24 FPS: all 3; 30 FPS: 2 or 3
    assert (
        f"masked frames (the tracker lost the climber; kept in place, out of the loss): {sum(expected.values())} in 5 clips"
        in built["stdout"]
    )
    assert "good0 3" in built["stdout"]


def test_route_images_in_natural_order_and_drops_named(built):
    meta = PreparedClip(built["data"] / P.PREPARED / "good0").meta
    assert meta["context_files"] == ["1.png", "2.png"] and meta["context_dropped"] == ["10.png"]
    context = PreparedClip(built["data"] / P.PREPARED / "good0").context()
    np.testing.assert_array_equal(context[0], context[1])  # 1.png and 2.png (the same image), not 10.png
    warning = [w for w in built["report"]["warnings"] if w.startswith("good0: ")]
    assert (
        len(warning) == 1
        and "more route images than --context_frames=2; dropped (in natural name order, the first ones are kept): 10.png"
        in warning[0]
    )
    assert f"warning: {warning[0]}" in built["stdout"]
    assert not any(w.startswith("good1: ") for w in built["report"]["warnings"])


def test_read_context_natural_order(tmp_path):
    from PIL import Image

    for name in ["10.png", "2.png", "1.png", "11.png"]:
        Image.fromarray(np.full((4, 6, 3), 10 * int(name.split(".")[0]), np.uint8)).save(tmp_path / name)
    names, frames, dropped = P.vid.read_context(tmp_path, None, limit=3)
    assert names == ["1.png", "2.png", "10.png"] and dropped == ["11.png"]
    assert frames[:, 0, 0, 0].tolist() == [10, 20, 100]
    assert P.vid.read_context(tmp_path, None)[0] == ["1.png", "2.png", "10.png", "11.png"]


def _expected(truth):
    """(source frame of every kept output frame, motion [F, 161], motion_mask [F]) for a clip,
    computed independently of the library: every output frame from the first to the last
    one showing the climber; zero motion where the climber is not tracked."""
    tracks, present, fps = truth["tracks"], truth["present"], truth["fps"]
    n = len(present)
    height, width = truth["size"]
    out = []
    k = 0
    while k * fps <= (n - 1) * 24:  # output k at k/24 s, source j at j/fps s
        exact = k * fps / 24
        j = int(np.floor(exact)) if exact - np.floor(exact) <= 0.5 else int(np.ceil(exact))
        out.append(min(j, n - 1))
        k += 1
    first, last = np.flatnonzero(present)[[0, -1]]
    kept = [j for j in out if first <= j <= last]
    names = sorted(tracks)
    vectors = []
    for j in kept:
        if not present[j]:
            vectors.append(np.zeros(161))
            continue
        frame = tracks[names[j]]
        p = frame["tid"].index(synth.CLIMBER)
        rot = np.concatenate([frame["smpl"][p]["global_orient"], frame["smpl"][p]["body_pose"]])
        vectors.append(
            np.concatenate(
                [
                    frame["bbox"][p] / np.array([width, height, width, height]),
                    frame["camera_bbox"][p],
                    np.concatenate([rot[:, :, 0], rot[:, :, 1]], axis=1).reshape(-1),
                    frame["smpl"][p]["betas"],
                ]
            )
        )
    return kept, np.asarray(vectors, np.float32), present[kept]


def _all_clips(data):
    out = {}
    for split in ("train", "validation"):
        source, _ = tfds_source.open_tfds(data, split)
        for i in range(len(source)):
            out[source.clip_id(i)] = (source, i)
    return out


def test_motion_read_back_equals_tracks_written(built):
    clips = _all_clips(built["data"])
    assert sorted(clips) == GOOD
    for clip_id in GOOD:
        kept, expected, mask = _expected(built["truth"][clip_id])
        meta = PreparedClip(built["data"] / P.PREPARED / clip_id).meta
        assert meta["source_frame_of"] == kept, clip_id
        assert meta["format"] == 2 and meta["masked_frames"] == (~mask).sum() > 0
        source, i = clips[clip_id]
        assert source.num_frames(i) == len(kept) and source.num_context(i) == 2
        clip = source.read(i, 0, source.num_frames(i))
        np.testing.assert_allclose(clip["motion"], expected, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(clip["motion_mask"], mask)
        # video and motion stay aligned in time: one token frame per kept output frame, gaps included
        assert clip["video"].shape == (len(kept), 8, 32) and clip["context"].shape == (2, 8, 32)
        assert str(clip["video"].dtype) == "bfloat16"
        # the 24-FPS clip keeps every source frame, the 3 the tracker lost too (masked); 30 FPS drops ~1 in 5
        if built["truth"][clip_id]["fps"] == 24:
            present = built["truth"][clip_id]["present"]
            assert kept == list(range(len(present))) and not present.all()
        window = source.read(i, 5, 9)
        np.testing.assert_array_equal(window["motion"], clip["motion"][5:9])
        np.testing.assert_array_equal(window["motion_mask"], clip["motion_mask"][5:9])
        np.testing.assert_array_equal(window["video"], clip["video"][5:9])
        prepared = PreparedClip(built["data"] / P.PREPARED / clip_id)
        np.testing.assert_array_equal(clip["video"], prepared.video())
        np.testing.assert_array_equal(clip["context"], prepared.context())
        assert np.isfinite(clip["video"].astype(np.float32)).all()
        assert not np.array_equal(clip["video"][0], clip["video"][-1])  # frames differ


def test_norm_stats_from_train_split(built):
    source, stats = tfds_source.open_tfds(built["data"], "train")
    clips = [source.read(i, 0, source.num_frames(i)) for i in range(len(source))]
    motion = np.concatenate([c["motion"][c["motion_mask"]] for c in clips])  # tracked frames only
    np.testing.assert_allclose(stats.mean, motion.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats.std, np.maximum(motion.std(0), 1e-3), rtol=1e-3, atol=1e-5)  # (floored)
    saved = json.loads((built["data"] / P.NORM_STATS).read_text())
    np.testing.assert_allclose(saved["mean"], stats.mean, rtol=1e-6)
    _, val_stats = tfds_source.open_tfds(built["data"], "validation")
    np.testing.assert_array_equal(val_stats.mean, stats.mean)


def _dataset(source, stats, **kw):
    args = dict(stats=stats, max_frames=48, context_frames=4, batch_size=2, seed=3)
    args.update(kw)
    return pipeline.dataset(source, **args)


def test_grain_batches_shapes_masks_values(built):
    source, stats = tfds_source.open_tfds(built["data"], "train")
    batch = next(iter(_dataset(source, stats)))
    assert batch["motion"].shape == (2, 48, 161) and batch["video"].shape == (2, 48, 8, 32)
    assert batch["context_mask"].sum(1).tolist() == [2, 2]
    used = batch["frame_mask"].sum(1)
    positions = np.arange(48)
    for r in range(2):
        np.testing.assert_array_equal(batch["frame_mask"][r], positions < used[r])  # a prefix, then padding
        assert not batch["motion"][r, used[r] :].any() and not batch["video"][r, used[r] :].astype(np.float32).any()
    assert (used >= 2 + 40).all()  # each clip has >= 40 frames: the window is as long as fits
    np.testing.assert_array_equal(
        batch["motion_mask"], batch["frame_mask"] & ~batch["context_mask"] & batch["motion_mask"]
    )
    # the motion of a batch row is a window of some clip, normalised, with its tracked frames' mask
    clips = [source.read(i, 0, source.num_frames(i)) for i in range(len(source))]
    n = used[0] - 2
    row, tracked = stats.denormalize(batch["motion"][0, 2 : 2 + n]), batch["motion_mask"][0, 2 : 2 + n]
    assert any(
        np.array_equal(tracked, c["motion_mask"][s : s + n])
        and np.allclose(row[tracked], c["motion"][s : s + n][tracked], atol=1e-5)
        for c in clips
        for s in range(len(c["motion"]) - n + 1)
    )
    assert not batch["motion"][0, :2].any()  # context positions carry no motion


def test_same_seed_same_batches_and_state_restore(built):
    source, stats = tfds_source.open_tfds(built["data"], "train")
    a, b = iter(_dataset(source, stats)), iter(_dataset(source, stats))
    for _ in range(3):
        x, y = next(a), next(b)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    state = a.get_state()
    expected = [next(a) for _ in range(4)]  # crosses the epoch boundary (4 clips, batch 2)
    c = iter(_dataset(source, stats))
    c.set_state(state)
    for e in expected:
        got = next(c)
        for k in e:
            np.testing.assert_array_equal(e[k], got[k])


def _which_clip(batch, row, clips, stats):
    """The clip whose motion window fills row `row` of a batch (context first, then motion)."""
    used = int(batch["frame_mask"][row].sum())
    first = int(batch["context_mask"][row].sum())
    window, tracked = stats.denormalize(batch["motion"][row, first:used]), batch["motion_mask"][row, first:used]
    found = [
        i
        for i, m in enumerate(clips)
        if any(
            np.allclose(window[tracked], m[s : s + len(window)][tracked], atol=1e-5)
            for s in range(len(m) - len(window) + 1)
        )
    ]
    assert len(found) == 1, found
    return found[0]


def test_two_hosts_see_disjoint_halves(built):
    source, stats = tfds_source.open_tfds(built["data"], "train")
    clips = [source.read(i, 0, source.num_frames(i))["motion"] for i in range(len(source))]
    seen = []
    for host in range(2):
        it = iter(_dataset(source, stats, batch_size=1, shard_index=host, shard_count=2))
        seen.append({_which_clip(next(it), 0, clips, stats) for _ in range(2)})  # one epoch: 4 clips / 2 hosts
    assert len(seen[0]) == len(seen[1]) == 2
    assert seen[0].isdisjoint(seen[1])
    assert seen[0] | seen[1] == set(range(4))


def test_grain_workers_match_in_process(built):
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # Grain's worker processes read absl flags
    source, stats = tfds_source.open_tfds(built["data"], "train")
    a = iter(_dataset(source, stats))
    b = iter(_dataset(source, stats, num_workers=2))
    for _ in range(2):
        x, y = next(a), next(b)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_check_config(built):
    from configs.demo import get_config

    cfg = get_config()
    source, _ = tfds_source.open_tfds(built["data"], "train", cfg=cfg)  # demo: P 8, Dv 32
    cfg.model.video_dim = 384
    with pytest.raises(
        tfds_source.DatasetMismatchError, match="model.video_dim=384 but the dataset's tokens are 32 wide"
    ):
        tfds_source.check(cfg, source)
    cfg = get_config()
    cfg.data.num_patches = 700
    with pytest.raises(
        tfds_source.DatasetMismatchError, match="data.num_patches=700 but the dataset's tokens are 8 per frame"
    ):
        tfds_source.open_tfds(built["data"], "train", cfg=cfg)


def _tfds_config(data, **data_overrides):
    """The demo config on the prepared dataset, with tiny shapes for a quick run."""
    from sabr_jax.config import demo_config

    cfg = demo_config()
    cfg.model.update(width=32, heads=4, depth=2)
    cfg.data.update(source="tfds", dir=str(data), max_frames=16, context_frames=2, **data_overrides)
    return cfg


def test_unset_shapes_come_from_the_dataset(built):
    from sabr_jax.config import base_config
    from sabr_jax.data.sources import resolve_shapes

    assert base_config().data.num_patches == base_config().model.video_dim == 0  # unset by default
    cfg = _tfds_config(built["data"], num_patches=0)
    cfg.model.video_dim = 0
    assert resolve_shapes(cfg) is cfg and (cfg.data.num_patches, cfg.model.video_dim) == (8, 32)
    cfg = _tfds_config(built["data"], num_patches=0)
    cfg.model.video_dim = 384  # set and wrong: an error, whatever is unset
    with pytest.raises(
        tfds_source.DatasetMismatchError, match="model.video_dim=384 but the dataset's tokens are 32 wide"
    ):
        resolve_shapes(cfg)
    cfg = _tfds_config(built["data"], num_patches=0)
    cfg.model.patch_grid = (4, 7)
    with pytest.raises(
        tfds_source.DatasetMismatchError,
        match=r"model.patch_grid=\(4, 7\) has 28 positions but the dataset's tokens are 8 per frame",
    ):
        resolve_shapes(cfg)
    cfg = base_config()  # no dataset to read (the synthetic source, a dry run): the paper's DINOv2-L shapes
    assert (resolve_shapes(cfg).data.num_patches, cfg.model.video_dim) == (700, 1024)


def test_training_on_the_dataset_with_unset_shapes(built, tmp_path):
    """A short run on the prepared dataset (masked frames in its batches) with data.num_patches and
    model.video_dim left unset: they come from the dataset, into the saved config too."""
    from sabr_jax.training.loop import train

    cfg = _tfds_config(built["data"], num_patches=0)
    cfg.model.video_dim = 0
    cfg.update(batch_size=2, total_steps=2, checkpoint_every=2, eval_every=2, eval_batches=1, log_every=1)
    result = train(cfg, str(tmp_path / "run"))
    assert result["status"] == "done" and result["step"] == 2
    saved = result["meta"]["config"]
    assert (saved["data"]["num_patches"], saved["model"]["video_dim"]) == (8, 32)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in records) and np.isfinite(records[-1]["val_x0_mse"])


def test_old_formats_are_rebuilt_or_refused(built, tmp_path):
    from sabr_jax.data.store import tfds_builder

    # a prepared clip of format 1 (no motion_mask) is prepared again
    settings = Settings(**SETTINGS)
    shutil.copytree(built["data"] / P.PREPARED / "good1", tmp_path / P.PREPARED / "good1")
    assert P._is_finished(tmp_path / P.PREPARED, "good1", settings)
    meta_path = tmp_path / P.PREPARED / "good1" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["format"], meta["settings"]["format"], meta["settings"]["context_frames"]
    meta_path.write_text(json.dumps(meta))
    assert not P._is_finished(tmp_path / P.PREPARED, "good1", settings)
    # a dataset of format 1 is refused with what to do
    shutil.copytree(P.dataset_dir(built["data"]), tmp_path / "ds")
    index = json.loads((tmp_path / "ds" / tfds_builder.INDEX_FILE).read_text())
    (tmp_path / "ds" / tfds_builder.INDEX_FILE).write_text(json.dumps(dict(index, format=1)))
    with pytest.raises(
        tfds_source.DatasetMismatchError, match="dataset format 1, this sabr_jax reads format 2 .* rerun sabr-prepare"
    ):
        tfds_source.open_tfds(tmp_path / "ds", "train")


def test_rerun_skips_finished_clips(built, capsys):
    data = built["data"]
    created = {c: PreparedClip(data / P.PREPARED / c).meta["created"] for c in GOOD}
    settings = Settings(**SETTINGS, validation_fraction=0.2)
    P.prepare(built["clips"], data, settings)
    out = capsys.readouterr().out
    report = json.loads((data / P.REPORT).read_text())
    assert "error" not in report
    assert report["resumed"] == GOOD and report["prepared_now"] == []
    assert "loading encoder" in out  # the bad clips are retried (and fail again)
    assert sorted(s["clip_id"] for s in report["skipped"]) == sorted(BAD)
    assert {c: PreparedClip(data / P.PREPARED / c).meta["created"] for c in GOOD} == created
    assert report["dataset"]["rebuilt"] is False


def test_long_clips_are_cut_into_parts(built, tmp_path):
    shutil.copytree(built["data"] / P.PREPARED, tmp_path / P.PREPARED)
    settings = Settings(**SETTINGS, max_seconds=1.0, validation_fraction=0.0)
    P.build_dataset(tmp_path, settings, GOOD, log=lambda s: None)
    source, _ = tfds_source.open_tfds(tmp_path, "train")
    ids = [source.clip_id(i) for i in range(len(source))]
    assert "good0#0" in ids and "good0#1" in ids
    for i in range(len(source)):
        assert source.num_frames(i) <= 24
    part = ids.index("good0#1")
    start = source.clips[part]["source_frames"][0]
    full = PreparedClip(tmp_path / P.PREPARED / "good0").motion()
    np.testing.assert_array_equal(source.read(part, 0, 3)["motion"], full[start : start + 3])
    assert sum(source.num_frames(i) for i in range(len(source)) if ids[i].startswith("good0#")) == len(full)


def test_mirror_adds_the_train_clips_mirror_images(built, tmp_path):
    """--mirror: each train clip's mirror image joins the train split as <clip_id>.mirror (the
    validation split gets none): its motion is camera.mirror of the clip's, holds.json mirrored,
    its tokens those of the flipped frames; the originals are not encoded again."""
    from sabr_jax.body import camera
    from sabr_jax.eval.metrics import mirror_holds

    shutil.copytree(built["data"] / P.PREPARED, tmp_path / P.PREPARED)
    settings = Settings(**SETTINGS, validation_fraction=0.2, mirror=True)
    lines = []
    report = P.prepare(built["clips"], tmp_path, settings, log=lines.append)
    train, val = (tfds_source.TfdsClips(tmp_path, split) for split in ("train", "validation"))
    train_ids, val_ids = ([s.clip_id(i) for i in range(len(s))] for s in (train, val))
    originals = [c for c in train_ids if not c.endswith(P.MIRROR_SUFFIX)]
    assert sorted(train_ids) == sorted(originals + [P.mirrored_id(c) for c in originals])
    assert val_ids and not any(c.endswith(P.MIRROR_SUFFIX) for c in val_ids)
    assert sorted(report["prepared_now"]) == sorted(P.mirrored_id(c) for c in originals)  # originals resumed
    clip, image = originals[0], PreparedClip(tmp_path / P.PREPARED / originals[0])
    mirror = PreparedClip(tmp_path / P.PREPARED / P.mirrored_id(clip))
    tracked = image.motion_mask()
    np.testing.assert_array_equal(mirror.motion_mask(), tracked)
    np.testing.assert_allclose(mirror.motion()[tracked], camera.mirror(image.motion()[tracked]), atol=1e-6)
    assert mirror.meta["holds"] == mirror_holds(image.meta["holds"]) and mirror.meta["mirror_of"] == clip
    twice = mirror_holds(mirror_holds(image.meta["holds"]))  # the holds back, to float rounding (W - (W - x))
    assert twice.keys() == image.meta["holds"].keys() and twice["route_color"] == image.meta["holds"]["route_color"]
    for field in ("route", "distractors", "view"):
        if field in twice:
            np.testing.assert_allclose(twice[field], image.meta["holds"][field], rtol=0, atol=1e-9)
    encoder = FrameEncoder(make_encoder(settings), settings)
    frames = [np.ascontiguousarray(f[:, ::-1]) for _, _, f in _decoded(built["clips"] / clip, settings)][:4]
    expected = []
    encoder.stream(iter(frames), expected.append)
    np.testing.assert_allclose(mirror.video()[:4].astype(np.float32), np.concatenate(expected)[:4], atol=2e-2)


def _decoded(clip_dir, settings):
    """The frames sabr-prepare encodes of a clip (its tracked span, resampled and resized)."""
    from sabr_jax.data import video as vid

    meta = json.loads((clip_dir.parent.parent / "data" / P.PREPARED / clip_dir.name / "meta.json").read_text())
    kept = set(meta["source_frame_of"])
    return vid.resampled_frames(clip_dir / "video.mp4", kept.__contains__, settings.frame_size, settings.fps)


def test_split_is_deterministic_and_by_clip():
    ids = [f"c{i}" for i in range(20)]
    train, val = P.split_clips(ids, 0.25, seed=1)
    assert len(val) == 5 and not set(train) & set(val) and sorted(train + val) == sorted(ids)
    assert P.split_clips(list(reversed(ids)), 0.25, seed=1) == (train, val)
    assert P.split_clips(ids, 0.25, seed=2) != (train, val)
    assert P.split_clips(["a"], 0.5) == (["a"], [])
    assert P.cut(100, 45) == [(0, 33), (33, 67), (67, 100)]


def test_exit_status_1_when_no_dataset_is_built(tmp_path):
    (tmp_path / "clips").mkdir()
    done = script("sabr-prepare", tmp_path / "clips", "--data_dir", tmp_path / "data", "--encoder", "random-tiny")
    assert done.returncode == 1, done.stderr[-3000:]
    assert (
        json.loads((tmp_path / "data" / P.REPORT).read_text())["error"] == "no clip could be prepared: nothing to build"
    )
    assert "ERROR: no clip could be prepared" in done.stdout


def test_hosts_split_clips(built, tmp_path):
    settings = Settings(encoder="random-tiny", frame_size=(64, 112), encoder_size=(28, 56))
    done = []
    for host in range(2):
        r = P.encode_clips(built["clips"], tmp_path, settings, process_index=host, process_count=2, log=lambda s: None)
        done.append(set(r["prepared"]) | set(r["failed"]))
    assert done[0].isdisjoint(done[1])
    assert done[0] | done[1] == set(GOOD) | set(BAD)


def test_encoder_data_parallel_over_local_devices(tmp_path):
    """Two CPU devices: the batch is split between them and the tokens equal one device's."""
    child = textwrap.dedent(
        """
        import jax, numpy as np
        from sabr_jax.encoders.frames import FrameEncoder, make_encoder
        from sabr_jax.data.prepare.settings import Settings
        s = Settings(encoder="random-tiny", frame_size=(64, 112), encoder_size=(28, 56), batch_size=3)
        enc = FrameEncoder(make_encoder(s), s)
        assert len(jax.local_devices()) == 2 and enc.batch == 4
        frames = np.random.default_rng(0).integers(0, 255, (7, 64, 112, 3), dtype=np.uint8)
        out = []
        enc.stream(iter(frames), out.append)
        np.save("%s", np.concatenate(out))
        """
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    subprocess.run([sys.executable, "-c", child % (tmp_path / "two.npy")], check=True, env=env)
    two = np.load(tmp_path / "two.npy")
    s = Settings(encoder="random-tiny", frame_size=(64, 112), encoder_size=(28, 56), batch_size=4)
    enc = FrameEncoder(make_encoder(s), s)
    frames = np.random.default_rng(0).integers(0, 255, (7, 64, 112, 3), dtype=np.uint8)
    out = []
    enc.stream(iter(frames), out.append)
    np.testing.assert_allclose(two, np.concatenate(out), rtol=1e-5, atol=1e-5)


def test_synth_cli_writes_the_user_layout(tmp_path):
    done = script("sabr-synth", "--out", tmp_path, "--clips", "2", "--holds", "3", "--size", "32x48")
    assert done.returncode == 0, done.stderr[-3000:]
    for clip in ("clip000", "clip001"):
        folder = tmp_path / clip
        assert (folder / "video.mp4").stat().st_size > 0 and (folder / "holds.json").is_file()
        assert sorted(p.name for p in (folder / "context").iterdir()) == ["000.png", "001.png"]
        with open(folder / "tracks.pkl", "rb") as f:
            assert f.read(1) == b"x"  # zlib: joblib.dump(..., compress=3)
        tracks = P.tr.load_tracks(folder / "tracks.pkl")
        with av.open(str(folder / "video.mp4")) as video:
            frames = sum(1 for _ in video.decode(video=0))
        assert len(tracks) == frames == 24 and {"tid", "tracked_ids", "bbox", "smpl", "camera_bbox", "size"} <= set(
            tracks["000001.jpg"]
        )
