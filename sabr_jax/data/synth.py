"""`sabr-synth`: write synthetic clips in exactly the layout users bring, for demos and tests.

    sabr-synth --out CLIPS --clips 4

writes CLIPS/<clip_id>/ with

    video.mp4          a climbing wall with coloured holds, panning, with moving shapes
                       (H.264, --fps frames per second, --seconds long)
    context/*.png      two route images (the wall with the route's holds outlined)
    tracks.pkl         PHALP-format tracks, joblib.dump(..., compress=3): the climber (the
                       longest detected track, id 7), a distractor detected for a while
                       (id 2) and a "ghost" (id 3) listed in every frame but detected in few;
                       people are listed in a random order per frame; the climber is missing
                       in a few frames (those frames are dropped by sabr-prepare)
    holds.json         {"route": [[x, y, r], ...], "distractors": [...]} in pixels

Everything derives from --seed and the clip number.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from sabr_jax import motion as M

CLIMBER, DISTRACTOR, GHOST = 7, 2, 3


def _wall(rng: np.random.Generator, height: int, width: int, holds: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """A wall texture twice the frame width (for panning) with round holds."""
    h, w = height, 2 * width
    yy, xx = np.mgrid[0:h, 0:w]
    base = 150 + 40 * np.sin(xx / 23.0) * np.cos(yy / 17.0) + rng.normal(0, 6, (h, w))
    img = np.repeat(base[..., None], 3, axis=2)
    for (x, y, r), colour in zip(holds, colours):
        img[(xx - x) ** 2 + (yy - y) ** 2 <= r**2] = colour
    return img.clip(0, 255).astype(np.uint8)


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: int) -> None:
    """uint8 [N, H, W, 3] (H, W even) -> H.264 mp4 with PyAV."""
    import av

    n, h, w, _ = frames.shape
    with av.open(os.fspath(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "23", "preset": "veryfast"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def climber_track(rng: np.random.Generator, n: int, fps: float, height: int, width: int) -> dict[str, np.ndarray]:
    """Smooth per-frame PHALP fields of one climber: bbox (pixels), camera_bbox, SMPL."""
    seconds = np.arange(n)[:, None] / fps

    def wave(size, amplitude):
        freq, phase = rng.uniform(0.2, 1.0, size), rng.uniform(0, 2 * np.pi, size)
        return amplitude * np.sin(2 * np.pi * freq * seconds + phase)

    axis_angle = (rng.normal(0, 0.3, M.NUM_JOINTS * 3) + wave(M.NUM_JOINTS * 3, 0.4)).reshape(n, M.NUM_JOINTS, 3)
    rotations = M.axis_angle_to_matrix(axis_angle)  # [n, 24, 3, 3] float64
    progress = seconds / max(seconds[-1, 0], 1 / fps)
    box_w, box_h = rng.uniform(0.15, 0.3) * width, rng.uniform(0.3, 0.45) * height
    x0 = rng.uniform(0.2, 0.6) * width + wave(1, 0.03 * width)
    y0 = (0.5 - 0.35 * progress) * height + wave(1, 0.02 * height)
    bbox = np.concatenate([x0, y0, np.full((n, 1), box_w), np.full((n, 1), box_h)], axis=1)
    camera_bbox = np.concatenate([0.9 + wave(1, 0.05), wave(2, 0.1)], axis=1)
    betas = np.broadcast_to(rng.normal(0, 0.5, M.NUM_BETAS), (n, M.NUM_BETAS))
    return {"bbox": bbox, "camera_bbox": camera_bbox, "rotations": rotations, "betas": betas}


def _entry(fields: dict, i: int, height: int, width: int) -> dict:
    x0, y0, w, h = fields["bbox"][i]
    s, tx, ty = fields["camera_bbox"][i]
    b = max(w, h)
    rot = fields["rotations"][i]
    return {
        "bbox": fields["bbox"][i].astype(np.float32),
        "camera_bbox": fields["camera_bbox"][i].astype(np.float32),
        # full-image translation (4D-Humans' cam_crop_to_full); ignored by sabr-prepare
        "camera": np.array(
            [tx + 2 * (x0 + w / 2 - width / 2) / (b * s), ty + 2 * (y0 + h / 2 - height / 2) / (b * s), 2 * 5000 / (b * s)],
            np.float32,
        ),
        "size": np.array([height, width], np.int64),
        "smpl": {
            "global_orient": rot[:1].astype(np.float32),
            "body_pose": rot[1:].astype(np.float32),
            "betas": fields["betas"][i].astype(np.float32),
        },
        "conf": np.float32(0.9),
    }


def make_tracks(rng: np.random.Generator, n: int, fps: float, height: int, width: int) -> tuple[dict, np.ndarray]:
    """PHALP-format results for n frames; returns (results, climber present [n] bool)."""
    people = {tid: climber_track(rng, n, fps, height, width) for tid in (CLIMBER, DISTRACTOR, GHOST)}
    present = np.ones(n, bool)
    gap = int(rng.integers(n // 3, max(n // 3 + 1, n - 4)))
    present[gap : gap + 3] = False  # the tracker lost the climber for 3 frames
    d0 = int(rng.integers(0, n // 2))
    distractor = np.zeros(n, bool)
    distractor[d0 : d0 + max(2, n // 3)] = True
    ghost_detected = rng.random(n) < 0.15
    results = {}
    for i in range(n):
        listed = [CLIMBER] * bool(present[i]) + [DISTRACTOR] * bool(distractor[i]) + [GHOST]
        detected = [t for t in listed if t == CLIMBER or (t == DISTRACTOR) or (t == GHOST and ghost_detected[i])]
        order = rng.permutation(len(listed))
        listed = [listed[j] for j in order]
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


def make_clip(
    folder: str | os.PathLike,
    *,
    seed: int = 0,
    seconds: float = 3.0,
    fps: int = 30,
    height: int = 180,
    width: int = 320,
    context: int = 2,
) -> dict:
    """Write one synthetic clip folder; returns {"tracks", "present", "fps", "size"}."""
    import joblib
    from PIL import Image

    if height % 2 or width % 2:
        raise ValueError(f"height and width must be even for H.264, got {height}x{width}")
    folder = Path(folder)
    rng = np.random.default_rng([seed, 1234])
    n = max(2, int(round(seconds * fps)))
    num_holds = 12
    holds = np.stack(
        [rng.uniform(0, 2 * width, num_holds), rng.uniform(0, height, num_holds), rng.uniform(3, 8, num_holds) * height / 180],
        axis=1,
    )
    on_route = rng.random(num_holds) < 0.5
    colours = np.where(on_route[:, None], [220, 40, 40], [40, 40, 220])
    wall = _wall(rng, height, width, holds, colours)
    pan = np.linspace(0, width * 0.5, n).astype(int)
    frames = np.stack([wall[:, p : p + width] for p in pan])
    # a moving shape (a swinging rope) so that frames differ beyond the pan
    yy, xx = np.mgrid[0:height, 0:width]
    for i in range(n):
        cx = width / 2 + width / 4 * np.sin(2 * np.pi * i / max(n, 1))
        frames[i][np.abs(xx - cx - (yy - height / 2) * 0.2) < 2] = (30, 160, 30)
    folder.mkdir(parents=True, exist_ok=True)
    write_video(folder / "video.mp4", frames, fps)

    (folder / "context").mkdir(exist_ok=True)
    for c in range(context):
        img = wall[:, int(c * width / 2) : int(c * width / 2) + width].copy()
        for (x, y, r), route in zip(holds, on_route):
            x -= c * width / 2
            if route and 0 <= x < width:
                ring = np.abs(np.hypot(xx - x, yy - y) - r - 2) < 1.0
                img[ring] = (255, 255, 0)
        Image.fromarray(img).save(folder / "context" / f"{c:03d}.png")

    tracks, present = make_tracks(rng, n, fps, height, width)
    joblib.dump(tracks, folder / "tracks.pkl", compress=3)
    with open(folder / "holds.json", "w") as f:
        json.dump({"route": holds[on_route].round(1).tolist(), "distractors": holds[~on_route].round(1).tolist()}, f)
    return {"tracks": tracks, "present": present, "fps": fps, "size": (height, width)}


def write_clips(out: str | os.PathLike, num_clips: int, *, seed: int = 0, prefix: str = "clip", **kwargs) -> list[Path]:
    """Write clips out/<prefix>NNN for clip numbers 0..num_clips-1."""
    paths = []
    for i in range(num_clips):
        path = Path(out) / f"{prefix}{i:03d}"
        make_clip(path, seed=seed * 100003 + i, **kwargs)
        paths.append(path)
    return paths


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="sabr-synth",
        description="Write synthetic clips (video.mp4, context/*.png, PHALP tracks.pkl, holds.json) "
        "in the layout sabr-prepare reads. For demos and tests.",
    )
    parser.add_argument("--out", required=True, help="folder to write CLIPS/<clip_id>/ into")
    parser.add_argument("--clips", type=int, default=4, help="number of clips (default 4)")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each clip in seconds (default 3)")
    parser.add_argument("--fps", type=int, default=30, help="frame rate of the videos (default 30; sabr-prepare resamples to 24)")
    parser.add_argument("--size", default="180x320", help="video HxW, both even (default 180x320)")
    parser.add_argument("--context", type=int, default=2, help="route images per clip (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    height, width = (int(v) for v in args.size.lower().split("x"))
    paths = write_clips(
        args.out, args.clips, seed=args.seed, seconds=args.seconds, fps=args.fps, height=height, width=width, context=args.context
    )
    print(f"wrote {len(paths)} clips to {args.out}")


if __name__ == "__main__":
    main()
