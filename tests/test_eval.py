"""The paper's metrics on hand-built climbs, and sabr-eval end to end on a tiny prepared dataset."""

import csv
import json
import re

import numpy as np
import pytest

from sabr_jax import motion as M
from sabr_jax.body import camera, skeleton
from sabr_jax.errors import UserError
from sabr_jax.eval import evaluate, metrics
from sabr_jax.eval.plots import plot_losses

HW = (400, 600)  # image H, W in pixels
LEFT_HAND = skeleton.END_EFFECTORS["left_hand"]
PIXELS_PER_METRE = 100.0
_AA = np.zeros((M.NUM_JOINTS, 3))
_AA[0] = [0.0, 0.0, np.pi]  # SMPL's y up -> the camera's y down: upright, facing the wall
UPRIGHT = M.axis_angle_to_matrix(_AA)  # [24, 3, 3] global orient + identity joints: a T-pose
UPRIGHT_JOINTS = np.asarray(skeleton.forward_kinematics(UPRIGHT.astype(np.float32)), np.float64)  # [24, 3] metres


def climb(hand_xy, shift=(0.0, 0.0)) -> np.ndarray:
    """Raw motion vectors [T, 161] of an upright T-pose whose left hand is at pixel hand_xy [T, 2]
    (then everything moved by `shift` pixels), through a real bbox and weak-perspective camera."""
    hand_xy = np.asarray(hand_xy, np.float64)
    t = len(hand_xy)
    rotations = np.broadcast_to(UPRIGHT, (t, M.NUM_JOINTS, 3, 3))
    bbox = np.concatenate([hand_xy - [200.0, 50.0], np.full((t, 2), 180.0)], axis=1) + [*shift, 0, 0]
    cam = np.asarray(
        camera.camera_for_box(
            hand_xy + shift, np.broadcast_to(UPRIGHT_JOINTS[LEFT_HAND], (t, 3)), bbox, PIXELS_PER_METRE
        )
    )
    height, width = HW
    return np.concatenate(
        [
            bbox / [width, height, width, height],
            cam,
            M.matrix_to_rot6d(rotations).reshape(t, -1),
            np.zeros((t, M.NUM_BETAS)),
        ],
        axis=1,
    ).astype(np.float32)


def holds(route, distractors=(), view=None) -> metrics.Holds:
    data = {"image_size": list(HW), "route": [list(h) for h in route], "distractors": [list(h) for h in distractors]}
    if view is not None:
        data["view"] = view
    return metrics.Holds.from_json(json.loads(json.dumps(data)))


A, B, C = (100.0, 300.0, 10.0), (150.0, 200.0, 10.0), (400.0, 100.0, 10.0)  # x, y, r


def test_the_hand_is_where_the_vector_puts_it():
    vectors = climb([[100.0, 300.0], [120.0, 280.0]])
    pixels = np.asarray(camera.joint_pixels(vectors, HW))
    np.testing.assert_allclose(pixels[:, LEFT_HAND], [[100, 300], [120, 280]], atol=1e-3)
    right = pixels[:, skeleton.END_EFFECTORS["right_hand"]]
    assert (np.abs(right[:, 0] - [100, 120]) > 100).all()  # the other hand is far away (T-pose)


def test_ground_truth_full_adherence_zero_mse():
    truth = climb([A[:2]] * 4 + [B[:2]] * 4)
    h = holds([A, B], [C])
    assert metrics.movement_mse(truth, truth) == 0.0
    stats = M.NormStats.from_data(truth + np.random.default_rng(0).normal(size=truth.shape))
    assert metrics.movement_mse(truth, truth, stats) == 0.0
    got = metrics.route_adherence(truth, h)
    assert got == {
        "route_adherence": 1.0,
        "route_touched": 2,
        "route_holds": 2,
        "distractors_touched": 0,
        "distractor_holds": 1,
    }


def test_movement_mse_units():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, M.MOTION_DIM)), rng.normal(size=(5, M.MOTION_DIM))
    stats = M.NormStats(np.zeros(M.MOTION_DIM, np.float32), np.full(M.MOTION_DIM, 2.0, np.float32))
    assert metrics.movement_mse(a, b) == pytest.approx(np.mean((a - b) ** 2))
    assert metrics.movement_mse(a, b, stats) == pytest.approx(np.mean((a - b) ** 2) / 4)
    with pytest.raises(ValueError, match=r"\[T, 161\]"):
        metrics.movement_mse(a, b[:3])


def test_far_away_climber_touches_nothing():
    away = climb([A[:2]] * 4 + [B[:2]] * 4, shift=(0.0, 5000.0))  # bbox and body moved off the wall
    got = metrics.route_adherence(away, holds([A, B], [C]))
    assert got["route_adherence"] == 0.0 and got["distractors_touched"] == 0


def test_distractor_touch_is_counted():
    vectors = climb([A[:2]] * 3 + [C[:2]] * 3)
    got = metrics.route_adherence(vectors, holds([A, B], [C]))
    assert got["route_touched"] == 1 and got["route_adherence"] == 0.5
    assert got["distractors_touched"] == 1 and got["distractor_holds"] == 1


def test_min_frames_counts_frames_in_total():
    away = (500.0, 50.0)
    two = climb([A[:2], away, A[:2], away])
    assert metrics.route_adherence(two, holds([A]))["route_touched"] == 0
    assert metrics.route_adherence(two, holds([A]), min_frames=2)["route_touched"] == 1
    apart = climb([A[:2], away, A[:2], away, A[:2]])  # three frames, never consecutive
    assert metrics.route_adherence(apart, holds([A]))["route_touched"] == 1


def test_radius_scale():
    near = climb([[A[0] + 1.5 * A[2], A[1]]] * 3)  # 1.5 radii from the centre
    assert metrics.route_adherence(near, holds([A]))["route_touched"] == 1  # default 2 radii
    assert metrics.route_adherence(near, holds([A]), radius_scale=1.0)["route_touched"] == 0


def test_view_transform_is_applied():
    # the holds are in a reference image; frame t shows them at s * xy + (dx, dy), radius s * r
    view = [[2.0, 10.0, -5.0]] * 3 + [[1.0, 0.0, 0.0]] * 3
    seen = (2 * A[0] + 10.0, 2 * A[1] - 5.0)
    vectors = climb([seen] * 3 + [(500.0, 50.0)] * 3)
    assert metrics.route_adherence(vectors, holds([A]))["route_touched"] == 0  # static camera: not on A
    assert metrics.route_adherence(vectors, holds([A], view=view))["route_touched"] == 1
    assert metrics.route_adherence(vectors[:3], holds([A], view=view), frames=[3, 4, 5])["route_touched"] == 0
    # the radius scales with s: 3 radii of A's reference size is 1.5 radii of its size in view
    off = climb([(seen[0] + 3 * A[2], seen[1])] * 3)
    assert metrics.route_adherence(off, holds([A], view=view[:3]))["route_touched"] == 1
    with pytest.raises(UserError, match="holds.json: field 'view' lists 6 frames"):
        metrics.route_adherence(vectors, holds([A], view=view), frames=np.arange(6) + 1)


def test_joint_pixels_hook():
    vectors = climb([A[:2]] * 3)
    shifted = lambda v, hw: np.asarray(camera.joint_pixels(v, hw)) + [1000.0, 0.0]  # noqa: E731
    assert metrics.route_adherence(vectors, holds([A]), joint_pixels=shifted)["route_touched"] == 0


@pytest.mark.parametrize(
    "data,message",
    [
        ({"route": [[1, 2, 3]]}, "field 'image_size' must be \\[H, W\\]"),
        ({"image_size": [10, 20]}, "missing field 'route'"),
        ({"image_size": [10, 20], "route": [[1, 2]]}, "field 'route' must be \\[\\[x, y, r\\], ...\\]"),
        ({"image_size": [10, 20], "route": [[1, 2, 0]]}, "field 'route': every radius r must be > 0"),
        ({"image_size": [10, 20], "route": [], "view": [[0, 1, 1]]}, "field 'view': every scale s must be > 0"),
    ],
)
def test_holds_json_errors_name_the_field(data, message):
    with pytest.raises(UserError, match="clipX/holds.json: " + message):
        metrics.Holds.from_json(data, "clipX/holds.json")


def test_empty_route_has_no_adherence():
    got = metrics.route_adherence(climb([A[:2]] * 3), holds([], [A]))
    assert got["route_adherence"] is None and got["distractors_touched"] == 1


def test_plot_losses(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss": 10.0 / s, "mse": 1.0 / s, "vlb": 0.1} for s in range(1, 6)]
    records[-1]["val_x0_mse"] = 0.5
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    plot_losses(path, tmp_path / "losses.png")
    assert (tmp_path / "losses.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- sabr-eval end to end
@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """synth clips -> sabr-prepare (random-tiny encoder) -> a random tiny exported model -> evaluate."""
    import jax
    from flax import nnx

    from sabr_jax.config import demo_config
    from sabr_jax.data.prepare import build as prepare
    from sabr_jax.data.prepare.settings import Settings
    from sabr_jax.data.store.tfds_source import open_tfds
    from sabr_jax.data.synthclimb import synth
    from sabr_jax.model.factory import build_model
    from sabr_jax.training import checkpoint

    root = tmp_path_factory.mktemp("eval")
    synth.write_clips(root / "clips", 5, holds=3, height=64, width=112, context=2, pan=True)  # holds.json with views
    settings = Settings(encoder="random-tiny", frame_size=(64, 112), encoder_size=(28, 56), validation_fraction=0.4)
    assert "error" not in prepare.prepare(root / "clips", root / "data", settings)
    cfg = demo_config()
    cfg.model.update(width=32, heads=2, depth=2)
    _, stats = open_tfds(root / "data", "train")
    params = nnx.to_pure_dict(nnx.state(build_model(cfg, 0)))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))  # random everywhere: the zero-initialised output too
    params = jax.tree.unflatten(treedef, [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    checkpoint.export_ema(str(root / "export"), params, checkpoint.meta(cfg, stats))
    lines = []
    result = evaluate.evaluate(
        str(root / "export"), str(root / "data"), str(root / "out"), steps=3, batch_size=2, log=lines.append
    )
    print("\n".join(lines))
    return {"root": root, "result": result, "log": "\n".join(lines)}


def test_evaluate_writes_every_output(evaluated):
    out, result = evaluated["root"] / "out", evaluated["result"]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert list(saved["rows"]) == ["model", "mean_motion", "random_clip", "shuffled_video", "ground_truth"]
    clips = [v["clip_id"] for v in saved["rows"]["model"]["per_video"]]
    assert len(clips) == saved["settings"]["clips"] == 2
    for row in saved["rows"].values():
        assert {"movement_mse", "movement_mse_raw", "route_adherence", "distractors_touched", "per_video"} <= set(row)
        assert [v["clip_id"] for v in row["per_video"]] == clips
        assert row["movement_mse"] == pytest.approx(np.mean([v["movement_mse"] for v in row["per_video"]]))
    rows = saved["rows"]
    assert rows["ground_truth"]["movement_mse"] == 0 and rows["ground_truth"]["movement_mse_raw"] == 0
    assert rows["ground_truth"]["route_adherence"] == 1.0  # the SynthClimb climber touches every route hold
    assert rows["ground_truth"]["distractors_touched"] == 0  # and no other
    assert rows["model"]["movement_mse"] > 0 and rows["model"]["movement_mse"] != rows["shuffled_video"]["movement_mse"]
    assert rows["mean_motion"]["movement_mse"] == pytest.approx(
        np.mean([v["movement_mse"] for v in rows["mean_motion"]["per_video"]])
    )
    with open(out / "metrics.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 5 * 2 and {r["row"] for r in table} == set(rows)
    assert float(next(r for r in table if r["row"] == "ground_truth")["movement_mse"]) == 0.0
    assert (out / "adherence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = np.load(out / "samples.npz")
    assert sorted(samples.files) == sorted(clips)
    for v in rows["model"]["per_video"]:
        assert samples[v["clip_id"]].shape == (v["frames"], M.MOTION_DIM)
    assert "movement MSE" in evaluated["log"] and "ground_truth" in evaluated["log"]


def test_evaluate_pairs_the_model_with_its_controls(evaluated):
    """metrics.json's "paired": per wall, model minus shuffled_video and minus random_clip, the mean
    of those differences and a bootstrap interval around it; the table prints them."""
    result = evaluated["result"]
    rows = result["rows"]
    for other in ("shuffled_video", "random_clip"):
        for metric in ("movement_mse", "route_adherence"):
            d = result["paired"][f"model - {other}"][metric]
            diffs = [a[metric] - b[metric] for a, b in zip(rows["model"]["per_video"], rows[other]["per_video"])]
            assert d["mean"] == pytest.approx(np.mean(diffs)) and d["videos"] == 2
            assert min(diffs) - 1e-12 <= d["low"] <= d["mean"] <= d["high"] <= max(diffs) + 1e-12
    assert "model - shuffled_video" in evaluated["log"] and "bootstrap 95% interval" in evaluated["log"]


def test_paired_difference_interval():
    rng = np.random.default_rng(0)
    a = rng.normal(1.0, 1.0, 400)
    d = metrics.paired_difference(list(a), [0.0] * 400, seed=1)
    assert d["low"] < 1.0 < d["high"] and d["high"] - d["low"] == pytest.approx(4 * 1.96 / 20 / 2, rel=0.2)
    assert metrics.paired_difference([0.1, None, 0.3], [0.0, 0.5, None])["videos"] == 1  # pairs with a None dropped
    assert metrics.paired_difference([None], [1.0]) is None
    assert metrics.paired_difference([1.0, 2.0], [1.0, 2.0]) == {"mean": 0.0, "low": 0.0, "high": 0.0, "videos": 2}


def test_guidance_needs_a_model_trained_with_condition_dropout(evaluated, tmp_path):
    from sabr_jax.errors import UserError
    from sabr_jax.sample import export
    from sabr_jax.training import checkpoint

    guided = export.load(str(evaluated["root"] / "export"), guidance=2.0)  # the demo config: cond_drop_prob 0.1
    assert guided.cfg.sample.guidance_scale == 2.0
    params, meta = checkpoint.load_export(str(evaluated["root"] / "export"))
    meta["config"]["cond_drop_prob"] = 0.0
    checkpoint.export_ema(str(tmp_path / "plain"), params, meta)
    with pytest.raises(UserError, match="trained with cond_drop_prob=0.0, so it has no unconditional branch"):
        export.load(str(tmp_path / "plain"), guidance=2.0)
    assert export.load(str(tmp_path / "plain"), guidance=1.0).cfg.sample.guidance_scale == 1.0


def test_route_oracle_states_the_holds(evaluated):
    """data.route_tokens='oracle': each clip's context tokens are its route holds' Fourier features
    (hold k in token k, the rest zero); the video tokens are the dataset's."""
    from sabr_jax.config import demo_config
    from sabr_jax.data.route_oracle import hold_tokens
    from sabr_jax.data.store.tfds_source import open_tfds

    data = evaluated["root"] / "data"
    cfg = demo_config()
    cfg.data.update(source="tfds", dir=str(data), route_tokens="oracle", context_frames=2)
    oracle, _ = open_tfds(data, "train", cfg=cfg)
    plain, _ = open_tfds(data, "train")
    clip, truth = oracle.read(0, 0, 5), plain.read(0, 0, 5)
    np.testing.assert_array_equal(clip["video"], truth["video"])
    holds = plain.clips[0]["holds"]
    k = len(holds["route"])
    assert clip["context"].shape == truth["context"].shape
    np.testing.assert_allclose(clip["context"], hold_tokens(holds, *truth["context"].shape), atol=1e-2)  # (bf16)
    assert np.all(clip["context"][:, k:] == 0) and np.all(np.abs(clip["context"][:, :k]).sum(-1) > 1)
    x, y = holds["route"][0][0] / holds["image_size"][1], holds["route"][0][1] / holds["image_size"][0]
    tokens = hold_tokens(holds, 1, 8, 8)
    np.testing.assert_allclose(
        tokens[0, 0],
        [
            np.sin(np.pi * x),
            np.sin(2 * np.pi * x),
            np.cos(np.pi * x),
            np.cos(2 * np.pi * x),
            np.sin(np.pi * y),
            np.sin(2 * np.pi * y),
            np.cos(np.pi * y),
            np.cos(2 * np.pi * y),
        ],
        rtol=1e-5,
    )


def test_tracker_lost_frames_are_out_of_the_movement_mse(evaluated, tmp_path, monkeypatch):
    """Frames where the tracker lost the climber (motion_mask False; their motion is zeros, here junk)
    are left out of every row's movement MSE, and of its route adherence: the figures are those of the
    frames whose true motion is known."""
    from sabr_jax.data.store.tfds_source import TfdsClips

    read = TfdsClips.read

    def with_lost_frames(self, index, start, stop):
        clip = read(self, index, start, stop)
        lost = (np.arange(start, stop) % 5) == 2  # every fifth frame
        clip["motion_mask"] = clip["motion_mask"] & ~lost
        clip["motion"] = np.where(lost[:, None], 1e3, clip["motion"]).astype(np.float32)
        return clip

    monkeypatch.setattr(TfdsClips, "read", with_lost_frames)
    result = evaluate.evaluate(
        str(evaluated["root"] / "export"), str(evaluated["root"] / "data"), str(tmp_path), steps=3, batch_size=2,
        log=lambda line: None,
    )  # fmt: skip
    source, stats = evaluate.open_tfds(evaluated["root"] / "data", "validation")
    samples = np.load(tmp_path / "samples.npz")
    for v in result["rows"]["model"]["per_video"]:
        i = [source.clip_id(k) for k in range(len(source))].index(v["clip_id"])
        clip = source.read(i, 0, source.num_frames(i))
        known = clip["motion_mask"]
        assert 0 < (~known).sum() < len(known)
        expected = metrics.movement_mse(samples[v["clip_id"]][known], clip["motion"][known], stats)
        assert v["movement_mse"] == pytest.approx(expected, rel=1e-6)
    truth = result["rows"]["ground_truth"]
    assert truth["movement_mse"] == 0 and truth["route_adherence"] == 1.0  # its known frames touch every route hold
    assert result["rows"]["mean_motion"]["movement_mse"] < 10  # the junk frames would make it ~1e7


def test_evaluate_without_holds_reports_null(evaluated, tmp_path):
    import shutil

    from sabr_jax.data.store.tfds_builder import INDEX_FILE
    from sabr_jax.data.store.tfds_source import find_dataset

    data = tmp_path / "data"
    shutil.copytree(find_dataset(evaluated["root"] / "data"), data)
    index = json.loads((data / INDEX_FILE).read_text())
    for clips in index["splits"].values():
        for clip in clips:
            clip["holds"] = None
    (data / INDEX_FILE).write_text(json.dumps(index))
    lines = []
    result = evaluate.evaluate(
        str(evaluated["root"] / "export"), str(data), str(tmp_path / "out"), steps=3, max_clips=1, log=lines.append
    )
    assert result["rows"]["model"]["route_adherence"] is None and result["rows"]["model"]["movement_mse"] > 0
    assert any("no holds annotations" in line for line in lines)
    assert (tmp_path / "out" / "adherence.png").is_file()


def test_input_errors_name_the_input(evaluated, tmp_path):
    """The errors sabr-eval shows as one line (tests/test_cli.py runs the command line)."""
    root = evaluated["root"]
    export, data, out = str(root / "export"), str(root / "data"), str(tmp_path / "out")
    with pytest.raises(UserError, match=re.escape(f"no exported model at {tmp_path / 'missing'}")):
        evaluate.evaluate(str(tmp_path / "missing"), data, out)
    with pytest.raises(UserError, match=re.escape("no split 'test' (has ['train', 'validation']")):
        evaluate.evaluate(export, data, out, split="test")
    with pytest.raises(FileNotFoundError, match="no prepared SABR dataset"):
        evaluate.evaluate(export, str(tmp_path), out)
