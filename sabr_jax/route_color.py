"""Route images from the wall video itself: the holds of one colour on a neutral grey ground.

Gyms colour-code their routes, so without a segmentation model a route is "the holds of
that colour". `route_context(frames, colour)` keeps, in each given video frame, the pixels
of the colour and paints every other pixel the neutral grey of SynthClimb's route images
(sabr_jax.data.synth_wall.NEUTRAL), as those images show the route's holds in place.

A pixel is of the colour when, among the reference colours (the named colours below, the
wanted one, and the frame's median colour, which stands for the wall), the wanted one is
nearest to it, and nearer than MAX_DISTANCE. Distances are Euclidean in an HSV cone with
the value axis halved: (c cos h, c sin h, v / 2), c = max - min of RGB in [0, 1] (the
chroma), h the hue, v = max; shading changes value more than hue, and dark or grey pixels
(low chroma) are far from every saturated colour. A 3x3 opening then drops isolated pixels.
Clothes or chalk bags of the route's colour are kept too: the method sees colours, not holds.
"""

from __future__ import annotations

import re

import numpy as np
from scipy import ndimage

from sabr_jax.cli import UserError
from sabr_jax.data.synth_wall import NEUTRAL, PALETTE

# Named colours (RGB): SynthClimb's hold palette, which holds the usual gym colours.
NAMES = ("red", "blue", "green", "yellow", "orange", "purple", "pink", "cyan", "black", "white")
COLOURS = dict(zip(NAMES, (tuple(int(v) for v in rgb) for rgb in PALETTE), strict=True))
MAX_DISTANCE = 0.3  # in the cone's units (chroma and value in [0, 1])
MIN_FRACTION = 2e-4  # of a frame's pixels, on average over the frames: less is "no hold of that colour"


def parse_colour(text: str) -> tuple[int, int, int]:
    """A colour name (NAMES, any case) or '#rrggbb' -> RGB; UserError naming what is accepted."""
    name = text.strip().lower()
    if name in COLOURS:
        return COLOURS[name]
    if re.fullmatch(r"#?[0-9a-f]{6}", name):
        digits = name.lstrip("#")
        return tuple(int(digits[i : i + 2], 16) for i in (0, 2, 4))
    raise UserError(f"--route_color={text}: expected a colour name ({', '.join(NAMES)}) or #rrggbb, e.g. #d22828")


def features(rgb) -> np.ndarray:
    """uint8 RGB [..., 3] -> float32 [..., 3] points of the HSV cone (see the module docstring)."""
    x = np.asarray(rgb, np.float32) / 255
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    high, low = x.max(-1), x.min(-1)
    chroma = high - low
    hue = np.arctan2(np.sqrt(3) * (g - b), 2 * r - g - b)  # radians; any value where chroma is 0
    return np.stack([chroma * np.cos(hue), chroma * np.sin(hue), high / 2], axis=-1)


def colour_mask(frame: np.ndarray, colour) -> np.ndarray:
    """bool [H, W]: the pixels of frame uint8 [H, W, 3] that are of `colour` (RGB), cleaned by a 3x3 opening."""
    wall = np.median(frame.reshape(-1, 3), axis=0)
    references = np.stack([features(colour), *features(list(COLOURS.values())), features(wall)])  # wanted first
    points = features(frame)
    distances = np.linalg.norm(points[..., None, :] - references, axis=-1)  # [H, W, R]
    mask = (distances.argmin(-1) == 0) & (distances[..., 0] < MAX_DISTANCE)
    return ndimage.binary_opening(mask, structure=np.ones((3, 3), bool))


def route_context(frames: np.ndarray, colour, name: str) -> np.ndarray:
    """Route images uint8 [C, H, W, 3] from video frames uint8 [C, H, W, 3]: the pixels of
    `colour` (RGB) kept, the rest NEUTRAL grey. UserError when they cover less than
    MIN_FRACTION of the frames (no hold of that colour), naming the colours the frames do have;
    `name` is how the user gave the colour."""
    masks = np.stack([colour_mask(frame, colour) for frame in frames])
    if masks.mean() < MIN_FRACTION:
        present = [
            n for n, rgb in COLOURS.items() if np.mean([colour_mask(f, rgb).mean() for f in frames]) >= MIN_FRACTION
        ]
        raise UserError(
            f"--route_color={name}: no hold of that colour in the video (under {MIN_FRACTION:.2%} of the pixels of "
            f"{len(frames)} frames); colours the video has: {', '.join(present) or 'none of ' + ', '.join(NAMES)}"
        )
    return np.where(masks[..., None], frames, np.asarray(NEUTRAL, np.uint8))


def spread(num_frames: int, count: int) -> list[int]:
    """`count` frame indices spread evenly over 0..num_frames-1, first and last included
    (where SynthClimb takes its route images' views)."""
    return [round(c * (num_frames - 1) / max(count - 1, 1)) for c in range(count)]
