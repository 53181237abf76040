"""sabr-sample end to end on a tiny export and a SynthClimb wall: the files it writes, motion
completion, route images from a colour, and the input errors (one line, status 1)."""

import re

import numpy as np
import pytest
from console import script
from PIL import Image
from sample_clip import FRAMES, HW

from sabr_jax import route_color
from sabr_jax.cli import UserError
from sabr_jax.data import synth_wall
from sabr_jax.data import video as vid
from sabr_jax.sample_video import sample_video


def run(wall, out, **kwargs):
    kwargs = {"context": str(wall["clip"] / "context"), "steps": 3, **kwargs}
    lines = []
    folders = sample_video(wall["workdir"], str(wall["clip"] / "video.mp4"), str(out), log=lines.append, **kwargs)
    return folders, "\n".join(lines)


def test_writes_motion_bvh_and_overlay_per_sample(wall, tmp_path):
    folders, log = run(wall, tmp_path, samples=2)
    assert folders == [str(tmp_path / "sample_0"), str(tmp_path / "sample_1")]
    assert "[4/5] sampling 2 x 3 ddpm steps" in log and "built-in 24-joint skeleton" in log
    motions = []
    for folder in folders:
        saved = np.load(f"{folder}/motion.npz")
        assert saved["motion"].shape == (FRAMES, 161) and np.isfinite(saved["motion"]).all()
        assert saved["axis_angle"].shape == (FRAMES, 24, 3) and saved["betas"].shape == (FRAMES, 10)
        assert saved["bbox"].shape == (FRAMES, 4) and saved["cam_t"].shape == (FRAMES, 3)
        np.testing.assert_allclose(saved["bbox"] / [HW[1], HW[0], HW[1], HW[0]], saved["motion"][:, :4], rtol=1e-6)
        assert int(saved["fps"]) == 24 and list(saved["image_size"]) == list(HW) and not saved["known"].any()
        motions.append(saved["motion"])
        lines = open(f"{folder}/motion.bvh").read().splitlines()
        assert lines[0] == "HIERARCHY" and f"Frames: {FRAMES}" in lines and "Frame Time: 0.04166667" in lines
        assert len(lines) - lines.index("Frame Time: 0.04166667") - 1 == FRAMES
        frames = [pixels for _, _, pixels in vid.resampled_frames(f"{folder}/overlay.mp4", lambda i: True, None)]
        assert len(frames) == FRAMES and frames[0].shape == (*HW, 3)
    assert not np.allclose(motions[0], motions[1])  # each sample from its own noise
    assert "sample_<k>/" in (tmp_path / "README.md").read_text()


def test_completion_from_colour_route_images_keeps_the_given_seconds_exactly(wall, tmp_path):
    kwargs = {"context": None, "route_color": "red", "complete": str(wall["clip"] / "tracks.pkl"), "keep_seconds": 0.5}
    (folder,), log = run(wall, tmp_path, **kwargs)
    assert "the holds of colour red" in log and "12 of the first 12 frames kept from the tracks" in log
    route = [np.asarray(Image.open(path)) for path in sorted((tmp_path / "route").glob("*.png"))]
    assert len(route) == 4  # the demo config's data.context_frames, from frames spread over the video
    assert (route[0][20, 20] != synth_wall.NEUTRAL).any() and (route[0][45, 90] == synth_wall.NEUTRAL).all()
    saved = np.load(f"{folder}/motion.npz")
    assert saved["known"].tolist() == [True] * 12 + [False] * (FRAMES - 12)
    np.testing.assert_array_equal(saved["motion"][:12], wall["motion"][:12])  # bitwise: the tracker's values
    assert not np.isclose(saved["motion"][12:], wall["motion"][12:]).all(axis=1).any()  # the rest is sampled


def test_route_context_keeps_the_holds_of_the_colour_only():
    rng = np.random.default_rng(0)
    frame = np.full((60, 80, 3), (150, 140, 120), np.uint8) + rng.integers(0, 12, (60, 80, 3)).astype(np.uint8)
    xyr = np.array([[20.0, 20.0, 6.0], [60.0, 40.0, 6.0]])
    red, blue = route_color.COLOURS["red"], route_color.COLOURS["blue"]
    synth_wall.Holds.random(rng, xyr, np.array([red, blue])).draw(frame, shade=True)
    (image,) = route_color.route_context(frame[None], route_color.parse_colour("Red"), "Red")
    kept = (image != synth_wall.NEUTRAL).any(-1)
    assert kept[20, 20] and not kept[40, 60] and kept.sum() > 50  # the red hold, not the blue one nor the wall
    assert (image[kept] == frame[kept]).all()
    with pytest.raises(
        UserError, match=r"--route_color=green: no hold of that colour .* colours the video has: red, blue"
    ):
        route_color.route_context(frame[None], route_color.COLOURS["green"], "green")
    with pytest.raises(UserError, match=r"--route_color=teal: expected a colour name \(red, blue"):
        route_color.parse_colour("teal")


def test_input_errors_name_the_input(wall, tmp_path):
    video = str(wall["clip"] / "video.mp4")
    with pytest.raises(UserError, match=re.escape(f"--checkpoint={tmp_path / 'nope'}: no such folder")):
        sample_video(str(tmp_path / "nope"), video, str(tmp_path / "out"))
    (tmp_path / "w" / "checkpoints").mkdir(parents=True)
    with pytest.raises(UserError, match=r"is a training workdir without an export \(.*export is missing\)"):
        sample_video(str(tmp_path / "w"), video, str(tmp_path / "out"))
    with pytest.raises(UserError, match=r"the encoder random-s .* does not match the checkpoint: tokens 384 wide"):
        sample_video(wall["workdir"], video, str(tmp_path / "out"), encoder="random-s")
    with pytest.raises(UserError, match=r"--route_color=pink: no hold of that colour .* has: red, blue"):
        run(wall, tmp_path / "out", context=None, route_color="pink")


def test_undecodable_video_is_one_line_on_the_command_line(wall, tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all" * 100)
    proc = script("sabr-sample", "--checkpoint", wall["workdir"], "--video", bad, "--out", tmp_path / "out")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"sabr-sample: error: {bad}: cannot open video"), last
