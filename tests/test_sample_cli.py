"""sabr-sample end to end on a tiny export and a SynthClimb wall: the files it writes, motion
completion, route images from a colour, and the input errors (one line, status 1)."""

import json
import re

import numpy as np
import pytest
from console import script
from PIL import Image
from sample_clip import FRAMES, HW

from sabr_jax.data import video as vid
from sabr_jax.data.synthclimb import synth
from sabr_jax.data.synthclimb import wall as synth_wall
from sabr_jax.errors import UserError
from sabr_jax.sample import route_color
from sabr_jax.sample.run import sample_video


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
    # the wall's two red holds are no route: sabr-sample samples, and its log says so in a WARNING line
    assert "      WARNING: --route_color=red: the holds of that colour do not look like a route (only 2 holds; " in log
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


def test_route_colour_warns_when_its_holds_do_not_look_like_a_route(tmp_path):
    """On a SynthClimb wall, the route's colour (holds.json's route_color) gives no warning; each
    distractor colour gives one line that says so and names the route's colour."""
    info = synth.make_clip(tmp_path / "wall", seed=3, holds=6, height=112, width=196, context=0, pan=True)
    frames = [pixels for _, _, pixels in vid.resampled_frames(tmp_path / "wall" / "video.mp4", lambda i: True, None)]
    frames = np.stack(frames)[route_color.spread(len(frames), 2)]  # as sabr-sample takes the demo's 2 route images
    right, wrong = info["holds"]["route_color"], info["holds"]["distractor_colors"]
    warnings = []
    images = route_color.route_context(frames, route_color.parse_colour(right), right, warnings.append)
    assert warnings == [] and images.shape == frames.shape
    assert len(wrong) >= 2
    for colour in wrong:
        warnings = []
        route_color.route_context(frames, route_color.parse_colour(colour), colour, warnings.append)
        assert len(warnings) == 1, warnings
        assert warnings[0].startswith(f"--route_color={colour}: the holds of that colour do not look like a route ")
        assert f"the holds of {right} look more like a route. Is {colour} the route's colour?" in warnings[0]


def test_input_errors_name_the_input(wall, tmp_path):
    video = str(wall["clip"] / "video.mp4")
    with pytest.raises(UserError, match=re.escape(f"--checkpoint={tmp_path / 'nope'}: no such folder")):
        sample_video(str(tmp_path / "nope"), video, str(tmp_path / "out"))
    (tmp_path / "w" / "checkpoints").mkdir(parents=True)
    with pytest.raises(UserError, match=r"is a training workdir without an export \(.*export is missing\)"):
        sample_video(str(tmp_path / "w"), video, str(tmp_path / "out"))
    with pytest.raises(
        UserError,
        match=r"the encoder random-s .* does not match the checkpoint: model.video_dim=32 but the encoder's tokens are 384 wide",
    ):
        sample_video(wall["workdir"], video, str(tmp_path / "out"), encoder="random-s")
    with pytest.raises(UserError, match=r"--route_color=pink: no hold of that colour .* has: red, blue"):
        run(wall, tmp_path / "out", context=None, route_color="pink")


@pytest.mark.parametrize("frames", [1, 11])
def test_a_video_too_short_to_sample_is_refused(wall, tmp_path, frames):
    """Fewer frames than sabr-prepare's --min_frames (12 for the fixture's export: the shortest clip its
    training data can hold) is refused in one line naming the video's length and the minimum."""
    short = tmp_path / "short.mp4"
    with vid.VideoWriter(short, 24) as writer:
        for _ in range(frames):
            writer.write(np.full((*HW, 3), 120, np.uint8))
    with pytest.raises(UserError) as raised:
        sample_video(wall["workdir"], str(short), str(tmp_path / "out"), context=str(wall["clip"] / "context"))
    assert str(raised.value) == (
        f"{short}: {frames} frame{'s' * (frames > 1)} at 24 FPS ({frames / 24:.2f} s), too short to sample: the "
        "model needs at least 12 (0.50 s), the shortest clip sabr-prepare let into its training data (--min_frames)"
    )
    assert not (tmp_path / "out" / "sample_0").exists()


def test_the_demo_ends_with_a_ready_command_for_a_held_out_wall(wall, tmp_path):
    """sabr-demo's closing lines (benchmark.sampling_hint) on a demo-like workdir: the model's window,
    and a sabr-sample command for a held-out wall with its route colour, which runs as printed (with
    fewer steps) and warns about no colour."""
    import shlex

    from sabr_jax.config import demo_config
    from sabr_jax.data.prepare import build as prepare
    from sabr_jax.data.prepare.settings import Settings
    from sabr_jax.data.store.tfds_source import TfdsClips
    from sabr_jax.data.synthclimb.benchmark import sampling_hint
    from sabr_jax.training import checkpoint

    workdir, size = tmp_path / "demo", (112, 196)  # the demo's walls: synth.size, synth.holds
    synth.write_clips(workdir / "clips", 3, holds=6, height=size[0], width=size[1], context=2)
    settings = Settings(encoder="random-tiny", frame_size=size, encoder_size=(28, 56), validation_fraction=0.34)
    assert "error" not in prepare.prepare(workdir / "clips", workdir / "data", settings, log=lambda line: None)
    params, meta = checkpoint.load_export(f"{wall['workdir']}/export")  # its tokens: 2x4 patches of width 32
    meta["encoder"]["frame_size"] = list(size)  # the demo's frames (its route colours are found in them)
    checkpoint.export_ema(str(workdir / "export"), params, meta)
    cfg = demo_config()  # the fixture export's: data.max_frames 32, data.context_frames 4
    lines = sampling_hint(cfg, str(workdir), str(workdir / "data")).splitlines()
    (held_out,) = [c["source_clip"] for c in TfdsClips(workdir / "data", "validation").clips]
    colour = json.loads((workdir / "clips" / held_out / "holds.json").read_text())["route_color"]
    assert lines[0] == (
        "the model takes at most 28 motion frames (data.max_frames 32 less data.context_frames 4 route images) "
        "= 1.17 s at 24 FPS: a longer video is cut to its first 1.17 s"
    )
    assert lines[1] == f"sample a held-out wall ({held_out}: route colour {colour}, climb 72 frames = 3.00 s):"
    command = shlex.split(lines[2])
    assert command == [
        "sabr-sample",
        "--checkpoint",
        str(workdir),
        "--video",
        str(workdir / "clips" / held_out / "video.mp4"),
        "--route_color",
        colour,
        "--out",
        str(workdir / "samples"),
    ]
    done = script(*command, "--steps", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"the holds of colour {colour}" in done.stdout and "WARNING: --route_color" not in done.stdout
    assert "checkpoint_manager.py" not in done.stderr, done.stderr  # no Orbax warnings about the read-only load
    assert (workdir / "samples" / "sample_0" / "overlay.mp4").is_file()


def test_undecodable_video_is_one_line_on_the_command_line(wall, tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all" * 100)
    proc = script("sabr-sample", "--checkpoint", wall["workdir"], "--video", bad, "--out", tmp_path / "out")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"sabr-sample: error: {bad}: cannot open video"), last
