"""Route images from the wall video itself: the holds of one colour on a neutral grey ground.

Gyms colour-code their routes, so without a segmentation model a route is "the holds of
that colour". `route_context(frames, colour)` keeps, in each given video frame, the pixels
of the colour and paints every other pixel the neutral grey of SynthClimb's route images
(sabr_jax.data.synthclimb.wall.NEUTRAL), as those images show the route's holds in place.

A pixel is of the colour when, among the reference colours (the named colours below, the
wanted one, and the frame's median colour, which stands for the wall), the wanted one is
nearest to it, and nearer than MAX_DISTANCE. Distances are Euclidean in an HSV cone with
the value axis halved: (c cos h, c sin h, v / 2), c = max - min of RGB in [0, 1] (the
chroma), h the hue, v = max; shading changes value more than hue, and dark or grey pixels
(low chroma) are far from every saturated colour. A 3x3 opening then drops isolated pixels.
Clothes or chalk bags of the route's colour are kept too: the method sees colours, not holds.

A wrong colour still finds holds (a wall has holds of many colours), so `route_context` also
says, as a warning, when the holds it keeps do not look like a route (`route_problems`):
fewer than MIN_HOLDS blobs, spanning less than MIN_SPAN of the frame's height, or spread
across the wall more than up it (the horizontal spread of their pixels over the vertical
one above MAX_ASPECT; a route climbs, holds scattered over a wall are as wide as the wall);
and it names the colours whose holds look more like one (`route_like`). Each is judged on
every given frame and the median taken.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
from scipy import ndimage

from sabr_jax.data.synthclimb.wall import COLOUR_NAMES, NEUTRAL, PALETTE
from sabr_jax.errors import UserError

# Named colours (RGB): SynthClimb's hold palette, which holds the usual gym colours.
NAMES = COLOUR_NAMES
COLOURS = dict(zip(NAMES, (tuple(int(v) for v in rgb) for rgb in PALETTE), strict=True))
MAX_DISTANCE = 0.3  # in the cone's units (chroma and value in [0, 1])
MIN_FRACTION = 2e-4  # of a frame's pixels, on average over the frames: less is "no hold of that colour"
# what the holds of a route look like (route_problems)
MIN_HOLDS = 3  # blobs at least 1/8 of the largest one's area
MIN_SPAN = 0.25  # of the frame's height, between the 2% and 98% quantiles of the holds' pixel rows
MAX_ASPECT = 1.0  # standard deviation of the holds' pixel columns over that of their rows
BETTER = 0.75  # another colour that looks like a route with an aspect below this times the chosen one's fits better


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


def named_masks(frame: np.ndarray) -> np.ndarray:
    """bool [len(NAMES), H, W]: `colour_mask` of frame uint8 [H, W, 3] for every named colour, at
    the cost of one (the pixels' distances to the references are computed once)."""
    wall = np.median(frame.reshape(-1, 3), axis=0)
    references = np.stack([*features(list(COLOURS.values())), features(wall)])
    distances = np.linalg.norm(features(frame)[..., None, :] - references, axis=-1)  # [H, W, R]
    nearest, closest = distances.argmin(-1), distances.min(-1)
    structure = np.ones((3, 3), bool)
    return np.stack(
        [ndimage.binary_opening((nearest == k) & (closest < MAX_DISTANCE), structure) for k in range(len(COLOURS))]
    )


def shape_of(masks: np.ndarray) -> tuple[float, float, float]:
    """(blobs, vertical span, aspect) of the pixels masks bool [C, H, W] keep, medians over the C
    frames: blobs at least 1/8 of the largest one's area; the span between the 2% and 98% quantiles
    of their rows, as a fraction of the height; aspect the standard deviation of their columns over
    that of their rows (inf for a frame without any)."""
    figures = []
    for mask in masks:
        labels, count = ndimage.label(mask)
        if count == 0:
            figures.append((0, 0.0, np.inf))
            continue
        sizes = ndimage.sum(mask, labels, range(1, count + 1))
        rows, columns = np.nonzero(mask)
        span = float(np.diff(np.quantile(rows, [0.02, 0.98]))[0]) / mask.shape[0]
        figures.append((int((sizes >= sizes.max() / 8).sum()), span, columns.std() / max(rows.std(), 1e-9)))
    blobs, span, aspect = np.median(np.asarray(figures, np.float64), axis=0)
    return float(blobs), float(span), float(aspect)


def route_problems(blobs: float, span: float, aspect: float) -> list[str]:
    """Why holds of `shape_of` these figures do not look like a route (empty: they do)."""
    problems = []
    if blobs < MIN_HOLDS:
        problems.append(f"only {blobs:g} hold{'' if blobs == 1 else 's'}")
    if span < MIN_SPAN:
        problems.append(f"spanning {span:.0%} of the frame's height, a route at least {MIN_SPAN:.0%}")
    if aspect > MAX_ASPECT:
        problems.append(f"spread across the wall more than up it, {aspect:.1f} times as wide as tall")
    return problems


def route_like(frames: np.ndarray, chosen_aspect: float, skip=()) -> list[str]:
    """The named colours (but `skip`) whose holds in frames [C, H, W, 3] look like a route with an
    aspect below BETTER * chosen_aspect, most route-like (lowest aspect) first."""
    found = []
    every = np.stack([named_masks(frame) for frame in frames], axis=1)  # [colours, C, H, W]
    for name, masks in zip(COLOURS, every):
        if name in skip or masks.mean() < MIN_FRACTION:
            continue
        figures = shape_of(masks)
        if not route_problems(*figures) and figures[2] < BETTER * chosen_aspect:
            found.append((figures[2], name))
    return [name for _, name in sorted(found)]


def route_context(frames: np.ndarray, colour, name: str, warn: Callable[[str], object] | None = None) -> np.ndarray:
    """Route images uint8 [C, H, W, 3] from video frames uint8 [C, H, W, 3]: the pixels of
    `colour` (RGB) kept, the rest NEUTRAL grey. UserError when they cover less than
    MIN_FRACTION of the frames (no hold of that colour), naming the colours the frames do have;
    `name` is how the user gave the colour. `warn` (if given) gets one line when the holds kept
    do not look like a route, or another named colour's look more like one (see the module docstring)."""
    masks = np.stack([colour_mask(frame, colour) for frame in frames])
    if masks.mean() < MIN_FRACTION:
        every = np.stack([named_masks(frame) for frame in frames], axis=1)  # [colours, C, H, W]
        present = [n for n, named in zip(COLOURS, every) if named.mean() >= MIN_FRACTION]
        raise UserError(
            f"--route_color={name}: no hold of that colour in the video (under {MIN_FRACTION:.2%} of the pixels of "
            f"{len(frames)} frames); colours the video has: {', '.join(present) or 'none of ' + ', '.join(NAMES)}"
        )
    if warn is not None:
        figures = shape_of(masks)
        problems = route_problems(*figures)
        chosen = [n for n, rgb in COLOURS.items() if tuple(rgb) == tuple(int(v) for v in colour)]
        better = route_like(frames, figures[2] if not problems else np.inf, skip=chosen)
        if problems or better:
            text = f"the holds of that colour do not look like a route ({'; '.join(problems)})" if problems else ""
            if better:
                text += f"{'; ' if text else ''}the holds of {' or '.join(better)} look more like a route"
            warn(
                f"--route_color={name}: {text}. Is {name} the route's colour? (a SynthClimb wall's holds.json "
                "names it: route_color)"
            )
    return np.where(masks[..., None], frames, np.asarray(NEUTRAL, np.uint8))


def spread(num_frames: int, count: int) -> list[int]:
    """`count` frame indices spread evenly over 0..num_frames-1, first and last included
    (where SynthClimb takes its route images' views)."""
    return [round(c * (num_frames - 1) / max(count - 1, 1)) for c in range(count)]
