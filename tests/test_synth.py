"""SynthClimb: the IK climber, the camera round trip through PHALP tracks, the written clip's files."""

import json

import av
import numpy as np
import pytest
from PIL import Image

from sabr_jax import motion as M
from sabr_jax.body import camera
from sabr_jax.data import tracks as tr
from sabr_jax.data.synthclimb import climber as C
from sabr_jax.data.synthclimb import synth
from sabr_jax.data.synthclimb import wall as Wl
from sabr_jax.errors import UserError

HEIGHT, WIDTH = 112, 196


@pytest.fixture(scope="module")
def climbs():
    """Two solved climbs of random 5- and 7-hold routes at 24 FPS, with their routes."""
    out = []
    for seed, holds in ((0, 5), (1, 7)):
        route = C.make_route(np.random.default_rng(seed), holds, WIDTH / (HEIGHT / C.VIEW_HEIGHT))
        out.append((route, C.climb(route, C.Timing.at(24))))
    return out


def test_plan_is_a_fixed_function_of_the_route(climbs):
    timing = C.Timing.at(24)
    for route, climb in climbs:
        plan = climb.plan
        assert len(plan.targets) == timing.frames(len(route))
        moving = (~plan.resting).sum(1)
        assert moving.max() == 1, "one limb at a time"
        # hands visit every route hold, in order, starting on holds 0 and 1
        visited = [h for h in dict.fromkeys(plan.holds[:, :2].T.reshape(-1).tolist()) if h >= 0]
        assert sorted(visited) == list(range(len(route)))
        assert plan.holds[0, 0] == 0 and plan.holds[0, 1] == 1 and plan.holds[-1, :2].max() == len(route) - 1
    again = C.climb(climbs[0][0], timing)
    np.testing.assert_array_equal(again.rotations, climbs[0][1].rotations)  # deterministic


def test_ik_puts_resting_limbs_on_their_targets(climbs):
    for route, climb in climbs:
        plan = climb.plan
        err = np.linalg.norm(climb.joints[:, C.LIMB_JOINTS] - plan.targets, axis=-1)  # [n, 4] metres
        resting = err[plan.resting]
        assert np.percentile(resting, 90) < 0.01, np.percentile(resting, 90)
        on_hold = plan.holds >= 0
        radius = route[np.maximum(plan.holds, 0), 2]
        assert (err[on_hold] < 0.3 * radius[on_hold]).all(), (err[on_hold] / radius[on_hold]).max()
        assert np.abs(climb.joints[:, :, 2]).max() < 1.5  # the body stays by the wall


def test_ik_rotations_are_bounded_and_unused_joints_constant(climbs):
    unused = [j for j in range(24) if j not in C.MOVING]
    assert unused and 0 in unused  # the body keeps facing the wall
    for _, climb in climbs:
        rot = climb.rotations
        assert rot.dtype == np.float32 and np.isfinite(rot).all()
        np.testing.assert_allclose(rot @ np.swapaxes(rot, -1, -2), np.broadcast_to(np.eye(3), rot.shape), atol=1e-5)
        offsets = np.swapaxes(C.BASE_POSE, -1, -2)[None] @ rot  # relative to the base pose
        angles = np.linalg.norm(M.matrix_to_axis_angle(offsets.astype(np.float64)), axis=-1)
        assert angles.max() < np.pi and angles[:, 0].max() < 0.35  # global orient moves only a little
        # unused joints: exactly the base pose, bitwise, in every frame of every climb
        assert (rot[:, unused] == C.BASE_POSE[unused]).all()
        assert rot[:, C.MOVING].std(0).max() > 1e-3


def test_route_spans_the_view_and_fits():
    for holds in (3, 5, 8, C.MAX_HOLDS):
        route = C.make_route(np.random.default_rng(holds), holds, 5.0)
        assert (np.diff(route[:, 1]) > 0).all() and route[:, 1].min() >= 1.0 and route[:, 1].max() <= C.VIEW_HEIGHT
        assert (route[:, 2] > 0.03).all() and (route[:, 2] <= 0.16).all()
    with pytest.raises(UserError, match="holds"):
        C.make_route(np.random.default_rng(0), C.MAX_HOLDS + 1, 5.0)


@pytest.fixture(scope="module", params=[False, True], ids=["static", "pan"])
def clip(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("synth") / "clip"
    info = synth.make_clip(folder, seed=3, holds=5, height=HEIGHT, width=WIDTH, context=3, pan=request.param)
    return folder, info


def _to_frame(xy, views):
    """Wall pixels [m, 2] -> frame pixels [n, m, 2] under views [n, 3]."""
    return views[:, None, :1] * xy[None] + views[:, None, 1:]


def test_clip_round_trips_through_tracks_to_joint_pixels(clip):
    folder, info = clip
    tracks = tr.load_tracks(folder / "tracks.pkl")
    tid, names, present, vectors = tr.climber_motion(tracks, "tracks.pkl")
    assert tid == synth.CLIMBER and present.all(), "the climber is detected in every frame"
    pixels = np.asarray(camera.joint_pixels(vectors, (HEIGHT, WIDTH)))
    np.testing.assert_allclose(pixels, info["joint_pixels"], atol=0.05)
    bbox = vectors[:, M.BBOX] * [WIDTH, HEIGHT, WIDTH, HEIGHT]
    assert (pixels >= bbox[:, None, :2]).all() and (pixels <= bbox[:, None, :2] + bbox[:, None, 2:]).all()
    assert not vectors[:, M.BETAS].any(), "one typical adult body: betas are zero"
    unused = [j for j in range(24) if j not in C.MOVING]
    rot6d = vectors[:, M.ROTATIONS].reshape(-1, 24, 6)
    assert (rot6d[:, unused] == rot6d[:1, unused]).all(), "unused joints are bitwise constant"
    with av.open(str(folder / "video.mp4")) as video:
        assert sum(1 for _ in video.decode(video=0)) == len(names) == len(info["present"])


def test_limbs_rest_on_route_holds_and_avoid_distractors(clip):
    folder, info = clip
    holds = json.loads((folder / "holds.json").read_text())
    n = len(info["present"])
    views = np.asarray(holds["view"]) if "view" in holds else np.tile([1.0, 0.0, 0.0], (n, 1))
    route, distractors = np.asarray(holds["route"]), np.asarray(holds["distractors"])
    limbs = info["joint_pixels"][:, C.LIMB_JOINTS]  # [n, 4, 2]
    resting = info["resting"]
    centres = _to_frame(route[:, :2], views)  # [n, k, 2]
    for f, limb in zip(*np.nonzero(resting >= 0)):
        h = resting[f, limb]
        assert np.linalg.norm(limbs[f, limb] - centres[f, h]) < 0.3 * views[f, 0] * route[h, 2], (f, limb, h)
    # every route hold is touched (a hand or foot within 2 r) for at least 3 frames
    dist = np.linalg.norm(limbs[:, :, None] - centres[:, None], axis=-1)  # [n, 4, k]
    touched = (dist < 2 * views[:, None, None, 0] * route[:, 2]).any(1).sum(0)
    assert (touched >= 3).all(), touched
    assert len(distractors) >= 5
    dist = np.linalg.norm(limbs[:, :, None] - _to_frame(distractors[:, :2], views)[:, None], axis=-1)
    assert (dist >= 2 * views[:, None, None, 0] * distractors[:, 2]).all(), "a distractor is touched"


def test_holds_json_and_route_images(clip):
    folder, info = clip
    holds = json.loads((folder / "holds.json").read_text())
    assert holds == info["holds"] and holds["image_size"] == [HEIGHT, WIDTH]
    route = np.asarray(holds["route"])
    assert route.shape == (5, 3) and np.asarray(holds["distractors"]).shape[1] == 3
    assert (np.diff(route[:, 1]) < 0).all(), "climbing order: start at the bottom, top last"
    k = HEIGHT / C.VIEW_HEIGHT
    assert route[0, 1] > 0.5 * HEIGHT and route[-1, 1] < 0.35 * HEIGHT, "the route spans most of the frame"
    assert (route[:, 2] >= 0.03 * k).all()
    if "view" in holds:
        assert len(holds["view"]) == len(info["present"]) and holds["view"][0] == [1.0, 0.0, 0.0]
    colours = set()
    for c in range(3):
        image = np.asarray(Image.open(folder / "context" / f"{c:03d}.png"))
        assert image.shape == (HEIGHT, WIDTH, 3)
        colours |= set(map(tuple, np.unique(image.reshape(-1, 3), axis=0).tolist()))
    assert len(colours) == 2 and Wl.NEUTRAL in colours, colours  # the neutral background and the route colour
    # the video shows the route colour (shaded) where the route images do, at frame 0's view
    first = np.asarray(Image.open(folder / "context" / "000.png"))
    with av.open(str(folder / "video.mp4")) as video:
        frame = next(video.decode(video=0)).to_ndarray(format="rgb24")
    route_pixels = (first != Wl.NEUTRAL).any(-1)
    route_colour = first[route_pixels][0].astype(int)
    # holds.json names the route's colour (what sabr-sample --route_color takes) and the distractors' colours
    assert Wl.PALETTE[Wl.COLOUR_NAMES.index(holds["route_color"])].tolist() == route_colour.tolist()
    assert holds["distractor_colors"] and holds["route_color"] not in holds["distractor_colors"]
    assert set(holds["distractor_colors"]) <= set(Wl.COLOUR_NAMES)
    close = np.abs(frame[route_pixels].astype(int) - route_colour).max(-1) < 90
    assert close.mean() > 0.8


def test_walls_differ_between_seeds_and_runs(tmp_path):
    seeds = {synth.wall_seed(s, i) for s in (0, 1) for i in range(50)}
    assert len(seeds) == 100
    a = synth.make_clip(tmp_path / "a", seed=5, holds=3, height=64, width=112)
    b = synth.make_clip(tmp_path / "b", seed=5, holds=3, height=64, width=112)
    c = synth.make_clip(tmp_path / "c", seed=6, holds=3, height=64, width=112)
    assert a["holds"] == b["holds"] and a["holds"]["route"] != c["holds"]["route"]
    assert (tmp_path / "a" / "tracks.pkl").read_bytes() == (tmp_path / "b" / "tracks.pkl").read_bytes()
    # the image scale is the same for every wall: the climber's bbox camera scale s * b / 2 = k
    for info in (a, c):
        tracks = info["tracks"]
        frame = tracks[sorted(tracks)[0]]
        p = frame["tid"].index(synth.CLIMBER)
        s, b = frame["camera_bbox"][p][0], frame["bbox"][p][2:].max()
        assert s * b / 2 == pytest.approx(64 / C.VIEW_HEIGHT, rel=1e-5)


def test_seconds_picks_the_route_length():
    assert synth.holds_for_seconds(1.0, 24) == 3
    for fps in (24, 30):
        for seconds in (2.0, 3.0, 4.0):
            frames = C.Timing.at(fps).frames(synth.holds_for_seconds(seconds, fps))
            assert fps * seconds <= frames < fps * seconds + 2 * C.Timing.at(fps).move
