"""Tracks: the restricted unpickler, choosing the climber, validation, motion vectors; pooling."""

import os
import pickle

import joblib
import numpy as np
import pytest

from sabr_jax import motion as M
from sabr_jax.data import tracks as tr
from sabr_jax.data import video as vid
from sabr_jax.data.synthclimb import synth
from sabr_jax.data.video import pool_tokens


class Exploit:
    """Unpickling this would run a shell command."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def expected_vector(entry, height, width):
    """Independent conversion of one PHALP entry to the 161 values of the authors' code."""
    rot = np.concatenate([entry["smpl"]["global_orient"], entry["smpl"]["body_pose"]]).astype(np.float64)
    six = np.concatenate([rot[:, :, 0], rot[:, :, 1]], axis=1).reshape(-1)  # col0 then col1, per joint
    return np.concatenate(
        [entry["bbox"] / np.array([width, height, width, height]), entry["camera_bbox"], six, entry["smpl"]["betas"]]
    )


@pytest.fixture(scope="module")
def phalp():
    rng = np.random.default_rng(0)
    climber = synth.random_person(rng, 30, 30.0, 180, 320)
    results, present = synth.make_tracks(rng, climber, 30.0, 180, 320, tracker_gaps=True)
    assert not present.all(), "the tracker should lose the climber for a few frames"
    return results, present


def test_joblib_roundtrip_through_restricted_loader(tmp_path, phalp):
    results, _ = phalp
    joblib.dump(results, tmp_path / "t.pkl", compress=3)
    loaded = tr.load_tracks(tmp_path / "t.pkl")
    name = "000005.jpg"
    assert loaded[name]["tid"] == results[name]["tid"]
    np.testing.assert_array_equal(loaded[name]["smpl"][0]["body_pose"], results[name]["smpl"][0]["body_pose"])
    # uncompressed joblib and a plain pickle load too
    joblib.dump(results, tmp_path / "u.pkl")
    with open(tmp_path / "p.pkl", "wb") as f:
        pickle.dump(results, f)
    for path in ("u.pkl", "p.pkl"):
        np.testing.assert_array_equal(tr.load_tracks(tmp_path / path)[name]["bbox"][0], results[name]["bbox"][0])


@pytest.mark.parametrize("compress", [3, 0])
def test_pickle_that_runs_code_is_refused(tmp_path, compress):
    sentinel = tmp_path / "PWNED"
    joblib.dump({"000001.jpg": {"tid": [Exploit(sentinel)]}}, tmp_path / "evil.pkl", compress=compress)
    with pytest.raises(tr.TrackError, match=r"evil.pkl: unsafe or invalid pickle: refusing to load posix.system"):
        tr.load_tracks(tmp_path / "evil.pkl")
    assert not sentinel.exists()


def test_unreadable_file_names_the_file(tmp_path):
    (tmp_path / "bad.pkl").write_bytes(b"not a pickle at all")
    with pytest.raises(tr.TrackError, match="bad.pkl: cannot read tracks"):
        tr.load_tracks(tmp_path / "bad.pkl")


def test_climber_is_longest_detected_track_not_ghost_or_list_position(phalp):
    results, present = phalp
    tid, names, got_present, vectors = tr.climber_motion(results, "tracks.pkl")
    # the ghost (id 3) is *listed* in every frame, more often than the climber; it must not win
    assert tid == synth.CLIMBER
    np.testing.assert_array_equal(got_present, present)
    positions = {results[n]["tid"].index(synth.CLIMBER) for n in names if synth.CLIMBER in results[n]["tid"]}
    assert len(positions) > 1, "the synthetic tracks should list the climber at varying positions"
    for i, name in enumerate(names):
        if present[i]:
            entry = {k: results[name][k][results[name]["tid"].index(tid)] for k in ("bbox", "camera_bbox", "smpl")}
            np.testing.assert_allclose(vectors[i], expected_vector(entry, 180, 320), rtol=1e-6, atol=1e-6)
        else:
            assert not vectors[i].any()


def test_tie_goes_to_smallest_id():
    assert tr.choose_track({5: 10, 2: 10, 9: 3}) == 2
    assert tr.choose_track({}) is None


def test_natural_frame_order():
    names = ["frame_10.jpg", "frame_9.jpg", "frame_100.jpg", "frame_1.jpg"]
    assert sorted(names, key=vid.natural_key) == ["frame_1.jpg", "frame_9.jpg", "frame_10.jpg", "frame_100.jpg"]


def _climber_entry(results, name):
    frame = results[name]
    return frame, frame["tid"].index(synth.CLIMBER)


def test_validation_errors_name_file_frame_and_field(phalp):
    import copy

    results, present = phalp
    name = next(n for i, n in enumerate(sorted(results)) if present[i] and i > 2)

    bad = copy.deepcopy(results)
    frame, pos = _climber_entry(bad, name)
    del frame["smpl"][pos]["betas"]
    with pytest.raises(tr.TrackError, match=rf"x.pkl: frame '{name}', track 7: missing field 'smpl.betas'"):
        tr.climber_motion(bad, "x.pkl")

    bad = copy.deepcopy(results)
    frame, pos = _climber_entry(bad, name)
    frame["smpl"][pos]["body_pose"] = frame["smpl"][pos]["body_pose"].copy()
    frame["smpl"][pos]["body_pose"][4, 1, 1] = np.nan
    with pytest.raises(tr.TrackError, match=rf"frame '{name}', track 7: field 'smpl.body_pose' has non-finite values"):
        tr.climber_motion(bad, "x.pkl")

    bad = copy.deepcopy(results)
    frame, pos = _climber_entry(bad, name)
    frame["smpl"][pos]["body_pose"] = frame["smpl"][pos]["body_pose"][:22]
    with pytest.raises(tr.TrackError, match=r"'smpl.body_pose' has shape \(22, 3, 3\), expected \(23, 3, 3\)"):
        tr.climber_motion(bad, "x.pkl")

    bad = copy.deepcopy(results)
    del bad[name]["camera_bbox"]
    with pytest.raises(tr.TrackError, match=rf"frame '{name}', track 7: missing field 'camera_bbox'"):
        tr.climber_motion(bad, "x.pkl")

    bad = copy.deepcopy(results)
    del bad[name]["tid"]
    with pytest.raises(tr.TrackError, match=rf"frame '{name}': missing field 'tid'"):
        tr.climber_motion(bad, "x.pkl")

    with pytest.raises(tr.TrackError, match="expected a dict keyed by frame name"):
        tr.climber_motion([1, 2], "x.pkl")


def test_frames_with_unusable_values_can_be_masked(phalp):
    """With `bad` (a dict) a frame whose values are non-finite or not rotations is masked like a frame
    where the tracker lost the climber (present False, zeros) and named in `bad`; its other frames
    are as without the fault. A structural fault (a missing field) stays an error."""
    import copy

    results, present = phalp
    names = sorted(results, key=vid.natural_key)
    i, j = [k for k in range(len(names)) if present[k] and k > 2][:2]
    bad_tracks = copy.deepcopy(results)
    frame, pos = _climber_entry(bad_tracks, names[i])
    frame["smpl"][pos]["body_pose"] = np.full((23, 3, 3), np.nan, np.float32)
    frame, pos = _climber_entry(bad_tracks, names[j])
    frame["camera_bbox"][pos] = np.array([np.inf, 0.0, 0.0], np.float32)
    bad = {}
    _, _, got_present, vectors = tr.climber_motion(bad_tracks, "x.pkl", bad=bad)
    _, _, _, clean = tr.climber_motion(results, "x.pkl")
    assert bad == {
        i: f"x.pkl: frame '{names[i]}', track 7: field 'smpl.body_pose' has non-finite values (NaN or inf)",
        j: f"x.pkl: frame '{names[j]}', track 7: field 'camera_bbox' has non-finite values (NaN or inf)",
    }
    expected = present.copy()
    expected[[i, j]] = False
    np.testing.assert_array_equal(got_present, expected)
    assert not vectors[[i, j]].any()
    np.testing.assert_array_equal(vectors[expected], clean[expected])
    frame, pos = _climber_entry(bad_tracks, names[i])
    frame["smpl"][pos]["body_pose"] = np.broadcast_to(2 * np.eye(3), (23, 3, 3))  # finite, but no rotations
    bad = {}
    tr.climber_motion(bad_tracks, "x.pkl", bad=bad)
    assert "'smpl' holds matrices that are not rotations" in bad[i]
    del frame["smpl"][pos]["betas"]
    with pytest.raises(tr.TrackError, match="missing field 'smpl.betas'"):
        tr.climber_motion(bad_tracks, "x.pkl", bad={})


def test_betas_with_batch_axis_and_size_fallback(phalp):
    import copy

    results, _ = phalp
    r = copy.deepcopy(results)
    for frame in r.values():
        del frame["size"]
        for s in frame["smpl"]:
            s["betas"] = s["betas"][None]
    _, _, _, a = tr.climber_motion(r, "x.pkl", image_hw=(180, 320))
    _, _, _, b = tr.climber_motion(results, "x.pkl")
    np.testing.assert_array_equal(a, b)
    with pytest.raises(tr.TrackError, match="missing field 'size'"):
        tr.climber_motion(r, "x.pkl")


def test_pool_tokens_ceil_mode():
    grid = (3, 5)
    tokens = np.arange(2 * 15 * 4, dtype=np.float32).reshape(2, 15, 4)
    pooled, pgrid = pool_tokens(tokens, grid, 2)
    assert pgrid == (2, 3) and pooled.shape == (2, 6, 4)
    x = tokens.reshape(2, 3, 5, 4)
    np.testing.assert_allclose(pooled[:, 0], x[:, 0:2, 0:2].mean((1, 2)))
    np.testing.assert_allclose(pooled[:, 2], x[:, 0:2, 4].mean(1))  # last column alone
    np.testing.assert_allclose(pooled[:, 5], x[:, 2, 4])  # corner: one patch
    assert pool_tokens(np.zeros((1, 700, 8), np.float32), (20, 35), 2)[1] == (10, 18)
    same, g = pool_tokens(tokens, grid, 1)
    assert same is tokens and g == grid


def test_motion_vector_layout_matches_motion_module(phalp):
    results, _ = phalp
    _, _, present, vectors = tr.climber_motion(results, "x.pkl")
    v = vectors[present][0]
    rot = M.rot6d_to_matrix(v[M.ROTATIONS].reshape(24, 6))
    np.testing.assert_allclose(np.swapaxes(rot, -1, -2) @ rot, np.broadcast_to(np.eye(3), (24, 3, 3)), atol=1e-5)


def test_tracker_size_turned_against_the_video_is_an_error(phalp):
    """A tracker that saw the frames turned (size landscape, video upright portrait) is refused."""
    results, present = phalp
    name = next(n for n, p in zip(sorted(results, key=vid.natural_key), present) if p)
    frame = results[name]
    tid = frame["tid"][0]
    h, w = frame["size"][0]
    assert h < w, "the synthetic tracker frames are landscape"
    tr.motion_vector(frame, tid, "x.pkl", name, (int(h), int(w)))  # agrees: no error
    with pytest.raises(tr.TrackError, match=r"x.pkl: frame .*field 'size' is landscape .* portrait"):
        tr.motion_vector(frame, tid, "x.pkl", name, (int(w), int(h)))
