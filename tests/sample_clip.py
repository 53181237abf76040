"""A sampling fixture shared by the sabr-sample and notebook tests: a small wall clip and a
random tiny export that records the encoder settings a trained export records."""

import dataclasses
import json

import numpy as np
import pytest

from sabr_jax.data import tracks as tr
from sabr_jax.data import video as vid
from sabr_jax.data.synthclimb import wall as synth_wall
from sabr_jax.sample import route_color

FRAMES, HW = 24, (64, 112)  # a 3-hold SynthClimb climb lasts 24 frames at 24 FPS; its video is 64x112


def write_clip(folder, rng) -> np.ndarray:
    """A wall clip like sabr-prepare's input: video.mp4 (FRAMES frames of HW, red route holds and
    blue others on a brown wall), context/ (2 route images: the red holds on grey) and
    tracks.pkl (PHALP's layout: one climber, track 7, random poses). Returns the climber's
    motion vectors [FRAMES, 161] as sabr-prepare reads them."""
    import joblib
    from PIL import Image

    from sabr_jax import motion as M

    folder.mkdir(parents=True)
    (folder / "context").mkdir()
    route = synth_wall.Holds.random(rng, [[20.0, 20.0, 5.0], [60.0, 30.0, 5.0]], [route_color.COLOURS["red"]] * 2)
    other = synth_wall.Holds.random(rng, [[90.0, 45.0, 5.0]], [route_color.COLOURS["blue"]])
    wall = np.full((*HW, 3), (150, 120, 100), np.uint8)
    route.draw(wall, shade=True)
    other.draw(wall, shade=True)
    with vid.VideoWriter(folder / "video.mp4", 24) as writer:
        for _ in range(FRAMES):
            writer.write(wall)
    for c in range(2):
        image = np.full((*HW, 3), synth_wall.NEUTRAL, np.uint8)
        route.draw(image)
        Image.fromarray(image).save(folder / "context" / f"{c:03d}.png")
    rotations = M.axis_angle_to_matrix(rng.normal(0, 0.3, (FRAMES, 24, 3)))
    tracks = {
        f"{t:06d}.jpg": {
            "tid": [7],
            "bbox": [np.array([30.0 + t, 10.0, 40.0, 50.0])],
            "camera_bbox": [np.array([0.9, 0.01, 0.02])],
            "smpl": [{"global_orient": rotations[t, :1], "body_pose": rotations[t, 1:], "betas": rng.normal(size=10)}],
            "size": [np.array(HW)],
        }
        for t in range(FRAMES)
    }
    joblib.dump(tracks, folder / "tracks.pkl", compress=3)
    return tr.climber_motion(tr.load_tracks(folder / "tracks.pkl"))[3]


@pytest.fixture(scope="session")
def wall(tmp_path_factory):
    """A clip, and a random tiny export (in a workdir) whose meta records the random-tiny
    encoder's settings the way a run on a prepared dataset records them (checkpoint.meta
    reads the dataset's report.json)."""
    import jax
    from flax import nnx

    from sabr_jax.config import demo_config
    from sabr_jax.data.prepare.settings import Settings
    from sabr_jax.model.factory import build_model
    from sabr_jax.motion import NormStats
    from sabr_jax.training import checkpoint

    root = tmp_path_factory.mktemp("sample")
    motion = write_clip(root / "clip", np.random.default_rng(0))
    settings = Settings(encoder="random-tiny", frame_size=HW, encoder_size=(28, 56))  # 2x4 patches of width 32
    (root / "data").mkdir()
    (root / "data" / "report.json").write_text(json.dumps({"settings": dataclasses.asdict(settings)}))
    cfg = demo_config()
    cfg.model.update(width=32, heads=2, depth=2)
    cfg.data.update(source="tfds", dir=str(root / "data"))
    shapes = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: build_model(cfg, 0))))
    leaves, treedef = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))  # random everywhere: the zero-initialised output too
    params = jax.tree.unflatten(treedef, [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    meta = checkpoint.meta(cfg, NormStats.from_data(motion))
    assert meta["encoder"]["encoder"] == "random-tiny" and meta["encoder"]["frame_size"] == list(HW)
    (root / "workdir" / "checkpoints").mkdir(parents=True)
    checkpoint.export_ema(str(root / "workdir" / "export"), params, meta)
    return {"root": root, "clip": root / "clip", "workdir": str(root / "workdir"), "motion": motion}
