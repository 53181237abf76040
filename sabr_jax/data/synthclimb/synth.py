"""SynthClimb, a learnable procedural climbing benchmark, in the layout users bring.

`write_clips(CLIPS, n)` (the command line: `sabr-synth`, sabr_jax.cli.synth) writes
CLIPS/<prefix>NNN/ with

    video.mp4       the EMPTY wall (no climber drawn: the paper's videos have the climber inpainted
                    away): a smooth procedural texture with holds of several colours, shapes and sizes;
                    optionally a slow pan and zoom (H.264, 24 FPS by default)
    context/*.png   the route's holds only, drawn in place (at the views of frames spread over the
                    clip) on a plain neutral grey background: the analogue of segmented route objects
    tracks.pkl      PHALP-format tracks, joblib.dump(..., compress=3): the climber (id 7, detected in
                    every frame unless tracker_gaps), a distractor person detected for a while (id 2)
                    and a "ghost" (id 3) listed in every frame but detected in few; listed in a random
                    order per frame. Per person: bbox [x0, y0, w, h] pixels (the projected joints with
                    a 10% margin), camera_bbox [s, tx, ty] (sabr_jax.body.camera.project's convention, so
                    camera.joint_pixels of the motion vectors lands on the rendered holds), smpl
                    {global_orient (1,3,3), body_pose (23,3,3), betas (10)}, camera (crop_to_full), size
    holds.json      {"image_size": [H, W], "route": [[x, y, r], ...], "distractors": [[x, y, r], ...],
                     "view": [[s, dx, dy], ...], "route_color": "cyan", "distractor_colors": [...]}:
                    x, y, r in pixels of the video frame (of frame 0's view when "view" is given:
                    frame f shows pixel = s * xy + [dx, dy]; without "view" the camera is static);
                    route holds in climbing order (start first, top last); the colour names are
                    wall.COLOUR_NAMES' (what sabr-sample --route_color takes). The same format
                    describes real clips (the colour keys are optional).

The climber is the built-in skeleton (sabr_jax.body.skeleton) with zero betas (one typical adult
body), back to the camera. Its motion is a deterministic function of the route (see
synth_climber: a fixed limb order and a fixed number of frames per move, from the start hold to the
top); joints the climb does not need keep one constant rotation; the image scale is
VIEW_HEIGHT metres per frame height for every wall. Distractor holds are placed after the climb
is solved, clear of every hand and foot. Everything derives from the seed.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sabr_jax import motion as M
from sabr_jax.body import camera, skeleton
from sabr_jax.data import video as vid
from sabr_jax.data.synthclimb import climber as C
from sabr_jax.data.synthclimb import wall as Wl
from sabr_jax.errors import UserError

CLIMBER, DISTRACTOR, GHOST = 7, 2, 3
DEFAULT_HOLDS = 8


# ---------------------------------------------------------------- PHALP tracks
def random_person(rng: np.random.Generator, n: int, fps: float, height: int, width: int) -> dict[str, np.ndarray]:
    """Smooth random per-frame fields of a bystander: bbox [n, 4] pixels, camera_bbox [n, 3],
    rotations [n, 24, 3, 3], betas [n, 10]."""
    seconds = np.arange(n)[:, None] / fps

    def wave(size, amplitude):
        freq, phase = rng.uniform(0.2, 1.0, size), rng.uniform(0, 2 * np.pi, size)
        return amplitude * np.sin(2 * np.pi * freq * seconds + phase)

    axis_angle = (rng.normal(0, 0.3, M.NUM_JOINTS * 3) + wave(M.NUM_JOINTS * 3, 0.4)).reshape(n, M.NUM_JOINTS, 3)
    progress = seconds / max(seconds[-1, 0], 1 / fps)
    box_w, box_h = rng.uniform(0.15, 0.3) * width, rng.uniform(0.3, 0.45) * height
    x0 = rng.uniform(0.2, 0.6) * width + wave(1, 0.03 * width)
    y0 = (0.5 - 0.35 * progress) * height + wave(1, 0.02 * height)
    return {
        "bbox": np.concatenate([x0, y0, np.full((n, 1), box_w), np.full((n, 1), box_h)], axis=1),
        "camera_bbox": np.concatenate([0.9 + wave(1, 0.05), wave(2, 0.1)], axis=1),
        "rotations": M.axis_angle_to_matrix(axis_angle),
        "betas": np.broadcast_to(rng.normal(0, 0.5, M.NUM_BETAS), (n, M.NUM_BETAS)),
    }


def _entry(fields: dict, i: int, height: int, width: int) -> dict:
    rot = fields["rotations"][i]
    return {
        "bbox": fields["bbox"][i].astype(np.float32),
        "camera_bbox": fields["camera_bbox"][i].astype(np.float32),
        "camera": fields["camera"][i].astype(np.float32),
        "size": np.array([height, width], np.int64),
        "smpl": {
            "global_orient": rot[:1].astype(np.float32),
            "body_pose": rot[1:].astype(np.float32),
            "betas": fields["betas"][i].astype(np.float32),
        },
        "conf": np.float32(0.9),
    }


def make_tracks(
    rng: np.random.Generator, climber: dict, fps: float, height: int, width: int, *, tracker_gaps: bool = False
) -> tuple[dict, np.ndarray]:
    """PHALP-format results for the climber's fields (as `random_person` returns; n frames) beside a
    distractor person and a ghost. tracker_gaps: the tracker loses the climber for 3 frames inside the
    clip (sabr-prepare keeps them in place, masked out of the loss). Returns (results, climber present [n] bool)."""
    n = len(climber["bbox"])
    people = {CLIMBER: dict(climber)}
    people.update({tid: random_person(rng, n, fps, height, width) for tid in (DISTRACTOR, GHOST)})
    for fields in people.values():  # full-image translation (4D-Humans' cam_crop_to_full); ignored by sabr-prepare
        fields["camera"] = np.asarray(camera.crop_to_full(fields["camera_bbox"], fields["bbox"], (height, width)))
    present = np.ones(n, bool)
    if tracker_gaps:
        gap = int(rng.integers(n // 3, max(n // 3 + 1, n - 4)))
        present[gap : gap + 3] = False
    d0 = int(rng.integers(0, n // 2))
    distractor = np.zeros(n, bool)
    distractor[d0 : d0 + max(2, n // 3)] = True
    ghost_detected = rng.random(n) < 0.15
    results = {}
    for i in range(n):
        listed = [CLIMBER] * bool(present[i]) + [DISTRACTOR] * bool(distractor[i]) + [GHOST]
        detected = [t for t in listed if t != GHOST or ghost_detected[i]]
        listed = [listed[j] for j in rng.permutation(len(listed))]
        entries = [_entry(people[t], i, height, width) for t in listed]
        frame = {key: [e[key] for e in entries] for key in ("bbox", "camera_bbox", "camera", "size", "smpl", "conf")}
        frame.update(
            tid=listed,
            tracked_ids=detected,
            time=i,
            shot=0,
            frame_path=f"{i + 1:06d}.jpg",
            class_name=[0] * len(listed),
        )
        results[f"{i + 1:06d}.jpg"] = frame
    return results, present


# ---------------------------------------------------------------- the climber in pixels
def _climber_fields(climb: C.Climb, views: np.ndarray, pixels_per_metre: float, height: int, width: int):
    """-> (PHALP fields of the climber, joint pixels [n, 24, 2] of every frame)."""
    origin = np.array([width / 2, height])  # wall pixel of camera-frame (0, 0): bottom centre of frame 0

    def to_frame(xy):  # camera-frame metres [n, ..., 2] -> frame pixels
        s, d = views[:, None, :1], views[:, None, 1:]
        return s * (origin + pixels_per_metre * xy) + d

    joints_px = to_frame(climb.joints[..., :2])  # [n, 24, 2]
    lo, hi = joints_px.min(1), joints_px.max(1)
    size = (hi - lo) * 1.2
    bbox = np.concatenate([(lo + hi) / 2 - size / 2, size], axis=1)
    # forward_kinematics keeps the pelvis at REST_JOINTS[0]; every other joint follows at this scale
    cam = camera.camera_for_box(joints_px[:, 0], skeleton.REST_JOINTS[0], bbox, pixels_per_metre * views[:, 0])
    fields = {
        "bbox": bbox,
        "camera_bbox": np.asarray(cam, np.float64),
        "rotations": climb.rotations,
        "betas": np.zeros((len(bbox), M.NUM_BETAS)),
    }
    return fields, joints_px


def holds_for_seconds(seconds: float, fps: float) -> int:
    """The shortest route (3 to MAX_HOLDS holds) whose climb lasts at least `seconds` at `fps`."""
    timing = C.Timing.at(fps)
    moves = (seconds * fps - 2 * timing.pause) / (2 * timing.move)
    return int(np.clip(np.ceil(moves - 1e-9) + 2, 3, C.MAX_HOLDS))


def make_clip(
    folder: str | os.PathLike,
    *,
    seed: int = 0,
    holds: int | None = None,
    seconds: float | None = None,
    fps: int = 24,
    height: int = 368,
    width: int = 640,
    context: int = 2,
    pan: bool = False,
    tracker_gaps: bool = False,
) -> dict:
    """Write one SynthClimb clip folder (see the module docstring) from a wall seed.

    holds: route length (default DEFAULT_HOLDS); seconds instead picks the shortest route whose
    climb lasts at least that long; the clip length follows from the route. Returns {"tracks", "present",
    "fps", "size", "holds" (holds.json's content), "joint_pixels" [n, 24, 2] (the climber's
    joints in each frame's pixels), "resting" [n, 4] (the route hold each limb, in
    synth_climber.LIMBS order, rests on, or -1)}.
    """
    import joblib
    from PIL import Image

    if height % 2 or width % 2:
        raise UserError(f"height and width must be even for H.264, got {height}x{width}")
    if holds is not None and seconds is not None:
        raise UserError("give holds or seconds, not both")
    if holds is None:
        holds = DEFAULT_HOLDS if seconds is None else holds_for_seconds(seconds, fps)
    folder = Path(folder)
    rng = np.random.default_rng([seed, 1234])
    k = height / C.VIEW_HEIGHT  # pixels per metre, the same for every wall at this frame size
    route_m = C.make_route(rng, holds, width / k)
    climb = C.climb(route_m, C.Timing.at(fps))
    n = len(climb.rotations)
    views = Wl.make_views(rng, n, height, width, pan)
    fields, joints_px = _climber_fields(climb, views, k, height, width)

    route = np.stack([width / 2 + k * route_m[:, 0], height - k * route_m[:, 1], k * route_m[:, 2]], axis=1)
    limbs_wall = (joints_px[:, C.LIMB_JOINTS] - views[:, None, 1:]) / views[:, None, :1]
    x0, y0, x1, y1 = Wl.seen_region(views, height, width)
    count = int(rng.uniform(1.5, 2.5) * (x1 - x0) * (y1 - y0) / k**2)
    distractors = Wl.place_distractors(
        rng, route, limbs_wall.reshape(-1, 2), (x0, y0, x1, y1), count, (0.08 * k, 0.18 * k), 0.05 * k
    )
    palette = rng.permutation(len(Wl.PALETTE))[: rng.integers(3, 6)]  # [route, distractor colours...]
    colours = Wl.PALETTE[palette]
    route_holds = Wl.Holds.random(rng, route, np.broadcast_to(colours[0], (len(route), 3)))
    distractor_colours = palette[1 + rng.integers(0, len(colours) - 1, len(distractors))]
    other = Wl.Holds.random(rng, distractors, Wl.PALETTE[distractor_colours])
    texture = Wl.Texture.random(rng, k)

    # the wall once, over every part any frame shows, in wall pixels; each frame is a view of it
    left, top = int(np.floor(x0)) - 2, int(np.floor(y0)) - 2
    canvas_view = (1.0, -left, -top)
    canvas = texture.render(int(np.ceil(y1)) + 3 - top, int(np.ceil(x1)) + 3 - left, canvas_view)
    other.draw(canvas, canvas_view, shade=True)
    route_holds.draw(canvas, canvas_view, shade=True)
    frames = np.stack([Wl.view_of(canvas, (left, top), v, height, width) for v in views])
    folder.mkdir(parents=True, exist_ok=True)
    with vid.VideoWriter(folder / "video.mp4", fps, crf=23) as writer:
        for frame in frames:
            writer.write(frame)

    (folder / "context").mkdir(exist_ok=True)
    for c in range(context):
        image = np.empty((height, width, 3), np.uint8)
        image[:] = Wl.NEUTRAL
        route_holds.draw(image, views[round(c * (n - 1) / max(context - 1, 1))])
        Image.fromarray(image).save(folder / "context" / f"{c:03d}.png")

    tracks, present = make_tracks(rng, fields, fps, height, width, tracker_gaps=tracker_gaps)
    joblib.dump(tracks, folder / "tracks.pkl", compress=3)
    info = {
        "image_size": [height, width],
        "route": route.round(2).tolist(),
        "distractors": distractors.round(2).tolist(),
        "route_color": Wl.COLOUR_NAMES[palette[0]],
        "distractor_colors": [Wl.COLOUR_NAMES[c] for c in sorted(set(distractor_colours.tolist()))],
    }
    if pan:
        info["view"] = views.round(5).tolist()
    with open(folder / "holds.json", "w") as f:
        json.dump(info, f)
    return {
        "tracks": tracks,
        "present": present,
        "fps": fps,
        "size": (height, width),
        "holds": info,
        "joint_pixels": joints_px,
        "resting": climb.plan.holds,
    }


def wall_seed(seed: int, index: int) -> int:
    """The wall seed of clip `index` of a run with `seed` (distinct runs give distinct walls)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def write_clips(
    out: str | os.PathLike,
    num_clips: int,
    *,
    seed: int = 0,
    prefix: str = "clip",
    log: Callable[[str], None] | None = None,
    workers: int = 1,
    **kwargs,
) -> list[Path]:
    """Write clips out/<prefix>NNN for clip numbers 0..num_clips-1 (clip i from wall_seed(seed, i));
    kwargs go to make_clip; `log` (e.g. print) gets one progress line per clip as it is done.
    workers > 1 writes that many clips at once, each in a process of its own (the clips are the
    same whatever the number of workers: each depends on its wall seed alone).

    Resumable: a clip folder that is complete (holds.json, written last, is there) is kept,
    so an interrupted run goes on where it stopped. A folder written with another frame size
    is an error, not silently reused.
    """
    paths = [Path(out) / f"{prefix}{i:03d}" for i in range(num_clips)]
    wanted = [kwargs.get("height", 368), kwargs.get("width", 640)]
    todo = []
    for i, path in enumerate(paths):
        if (path / "holds.json").exists():
            size = json.loads((path / "holds.json").read_text()).get("image_size")
            if size != wanted:
                raise UserError(f"{path}: already holds a clip of size {size}, not {wanted}: use another --out")
        else:
            todo.append(i)
    jobs = [(paths[i], wall_seed(seed, i), kwargs) for i in todo]
    if workers > 1 and len(jobs) > 1:
        context = multiprocessing.get_context("spawn")  # (JAX is not fork-safe)
        with concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context) as pool:
            done = pool.map(_write_clip, jobs)
            _report(done, todo, paths, num_clips, log)
    else:
        _report(map(_write_clip, jobs), todo, paths, num_clips, log)
    return paths


def _write_clip(job) -> tuple[int, int, float]:
    """make_clip of one (path, wall seed, kwargs) job -> (route holds, frames, seconds)."""
    path, wall, kwargs = job
    start = time.perf_counter()
    info = make_clip(path, seed=wall, **kwargs)
    return len(info["holds"]["route"]), len(info["present"]), time.perf_counter() - start


def _report(done, todo, paths, num_clips, log) -> None:
    for i, (holds, frames, seconds) in zip(todo, done):
        if log is not None:
            log(f"[{i + 1}/{num_clips}] {paths[i]}: {holds} holds, {frames} frames, {seconds:.2f} s")
