"""Phone videos: the container's display rotation is applied when decoding (sabr_jax.data.video).

The test files are written by PyAV with a display matrix (VideoStream.set_display_rotation,
counterclockwise degrees, what phones record as the 'rotate' tag or the mp4 track matrix)."""

import av
import numpy as np
import pytest

from sabr_jax.data import video as vid

STORED_HW = (32, 64)  # the frames as stored in the file: landscape


def write_rotated(path, degrees: int, frames: int = 6) -> None:
    """A 24-FPS H.264 mp4 of STORED_HW frames, white in the stored top-left 8x8 corner, the rest
    black, with a display rotation of `degrees` counterclockwise (0: no display matrix)."""
    height, width = STORED_HW
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if degrees:
            stream.set_display_rotation(degrees)
        image = np.zeros((height, width, 3), np.uint8)
        image[:8, :8] = 255
        for _ in range(frames):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


def white_corner(pixels: np.ndarray) -> tuple[str, str]:
    """Where the white patch of a decoded frame is: ('top' | 'bottom', 'left' | 'right')."""
    rows, cols = np.nonzero(pixels.mean(-1) > 128)
    height, width = pixels.shape[:2]
    return ("top" if rows.mean() < height / 2 else "bottom", "left" if cols.mean() < width / 2 else "right")


@pytest.mark.parametrize(
    "degrees, upright_hw, corner",
    [
        (0, (32, 64), ("top", "left")),
        (90, (64, 32), ("bottom", "left")),  # turned a quarter counterclockwise: the top-left goes bottom-left
        (-90, (64, 32), ("top", "right")),  # clockwise (an iPhone held upright records 'rotate' 90)
        (180, (32, 64), ("bottom", "right")),
    ],
)
def test_frames_are_decoded_upright(tmp_path, degrees, upright_hw, corner):
    path = tmp_path / "phone.mp4"
    write_rotated(path, degrees)
    info = vid.probe(path)
    assert (info["height"], info["width"]) == upright_hw
    stats = {}
    frames = list(vid.resampled_frames(path, lambda i: True, size=None, stats=stats))
    assert len(frames) == 6 and stats["output_frames"] == 6
    assert (stats["height"], stats["width"]) == upright_hw and stats["rotation"] == info["rotation"]
    for _, _, pixels in frames:
        assert pixels.shape == (*upright_hw, 3) and pixels.flags.c_contiguous
        assert white_corner(pixels) == corner
    # a size is the landscape size, turned for portrait (upright) videos, as sabr-prepare resizes
    (_, _, small), *_ = vid.resampled_frames(path, lambda i: True, size=(16, 32))
    assert small.shape[:2] == ((32, 16) if upright_hw[0] > upright_hw[1] else (16, 32))
    assert white_corner(small) == corner


def test_track_size_must_have_the_upright_orientation():
    assert vid.orientation_mismatch((640, 368), (1280, 720)) is None  # both portrait
    assert vid.orientation_mismatch((500, 500), (1280, 720)) is None  # square: nothing to disagree with
    problem = vid.orientation_mismatch((720, 1280), (1280, 720))
    assert problem.startswith("is landscape 720x1280 (HxW) but the video decodes upright to portrait 1280x720")
