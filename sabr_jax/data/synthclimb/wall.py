"""SynthClimb's wall: a smooth procedural texture, coloured holds of several shapes, camera views.

Coordinates are "wall pixels": pixels of the clip's first frame. A view (s, dx, dy) maps wall
pixels to a frame's pixels, pixel = s * wall_xy + (dx, dy); a static camera has (1, 0, 0) in
every frame. Drawing uses hard masks (no anti-aliasing), so every hold pixel has its hold's colour
(shaded in the video, flat in the route images).
"""

from __future__ import annotations

import dataclasses

import numpy as np

# distinct hold colours (RGB); none of them is the route images' neutral background
PALETTE = np.array(
    [
        (210, 40, 40), (40, 80, 210), (40, 170, 70), (235, 205, 40), (240, 130, 30),
        (140, 60, 180), (240, 110, 170), (40, 190, 200), (30, 30, 30), (245, 245, 245),
    ],
    np.uint8,
)  # fmt: skip
# the names of PALETTE's colours, in its order: holds.json's "route_color", sabr-sample's --route_color
COLOUR_NAMES = ("red", "blue", "green", "yellow", "orange", "purple", "pink", "cyan", "black", "white")
NEUTRAL = (128, 128, 128)  # background of the route images
CIRCLE, ELLIPSE, POLYGON = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Holds:
    """m holds: xyr [m, 3] wall pixels (centre, size r: the radius of a circle of the same scale);
    kind [m] (CIRCLE, ELLIPSE, POLYGON); aspect [m] (ellipse axes r*aspect, r/aspect); angle [m]
    radians; sides [m] (polygons); colour [m, 3] uint8."""

    xyr: np.ndarray
    kind: np.ndarray
    aspect: np.ndarray
    angle: np.ndarray
    sides: np.ndarray
    colour: np.ndarray

    @classmethod
    def random(cls, rng: np.random.Generator, xyr: np.ndarray, colours: np.ndarray) -> Holds:
        """Random shapes for holds at xyr [m, 3] with colours [m, 3]."""
        m = len(xyr)
        return cls(
            xyr=np.asarray(xyr, np.float64),
            kind=rng.integers(0, 3, m),
            aspect=rng.uniform(1.0, 1.5, m),
            angle=rng.uniform(0, np.pi, m),
            sides=rng.integers(5, 8, m),
            colour=np.asarray(colours, np.uint8),
        )

    def draw(self, image: np.ndarray, view=(1.0, 0.0, 0.0), shade: bool = False) -> None:
        """Paint the holds into image [H, W, 3] uint8 (in place) under view (s, dx, dy)."""
        s, dx, dy = view
        height, width = image.shape[:2]
        for (x, y, r), kind, aspect, angle, sides, colour in zip(
            self.xyr, self.kind, self.aspect, self.angle, self.sides, self.colour
        ):
            cx, cy, extent = s * x + dx, s * y + dy, s * r * aspect + 1
            x0, x1 = max(0, int(cx - extent)), min(width, int(cx + extent) + 2)
            y0, y1 = max(0, int(cy - extent)), min(height, int(cy + extent) + 2)
            if x0 >= x1 or y0 >= y1:
                continue
            yy, xx = np.mgrid[y0:y1, x0:x1]
            u, v = (xx - cx) / s, (yy - cy) / s  # wall pixels from the centre
            a, b = np.cos(angle) * u + np.sin(angle) * v, -np.sin(angle) * u + np.cos(angle) * v
            rho = np.hypot(a, b)
            if kind == CIRCLE:
                level = rho / r
            elif kind == ELLIPSE:
                level = np.hypot(a / (r * aspect), b * aspect / r)
            else:
                wedge = 2 * np.pi / sides
                level = rho * np.cos(np.mod(np.arctan2(b, a), wedge) - wedge / 2) / (r * np.cos(wedge / 2))
            inside = level <= 1
            value = (
                colour * (1.0 - 0.3 * level[..., None] ** 2) if shade else np.broadcast_to(colour, level.shape + (3,))
            )
            image[y0:y1, x0:x1][inside] = value[inside].astype(np.uint8)


def make_views(rng: np.random.Generator, n: int, height: int, width: int, pan: bool) -> np.ndarray:
    """Per-frame views [n, 3] = (s, dx, dy): static, or a slow smooth pan and zoom from (1, 0, 0)."""
    views = np.tile([1.0, 0.0, 0.0], (n, 1))
    if pan:
        t = np.linspace(0.0, 1.0, n)
        ramp = t * t * (3 - 2 * t)
        zoom = rng.uniform(-0.1, 0.1)
        shift = rng.uniform(-1, 1, 2) * [0.08 * width, 0.05 * height]
        views[:, 0] = 1 + zoom * ramp
        # zoom about the frame centre, then shift
        views[:, 1] = (1 - views[:, 0]) * width / 2 + shift[0] * ramp
        views[:, 2] = (1 - views[:, 0]) * height / 2 + shift[1] * ramp
    return views


def view_of(canvas: np.ndarray, corner: tuple[int, int], view, height: int, width: int) -> np.ndarray:
    """The frame [height, width, 3] uint8 that view (s, dx, dy) shows of canvas [h, w, 3], a wall
    image whose pixel (0, 0) is wall pixel `corner` (bilinear resampling; exact for (1, 0, 0))."""
    from PIL import Image

    s, dx, dy = view
    left, top = corner
    if (s, dx, dy) == (1.0, 0.0, 0.0):
        return canvas[-top : height - top, -left : width - left].copy()
    affine = (1 / s, 0.0, -dx / s - left, 0.0, 1 / s, -dy / s - top)  # frame pixel -> canvas pixel
    image = Image.fromarray(canvas).transform(
        (width, height), Image.Transform.AFFINE, affine, Image.Resampling.BILINEAR
    )
    return np.asarray(image)


def seen_region(views: np.ndarray, height: int, width: int) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) wall pixels: the part of the wall any frame shows."""
    corners = np.array([[0.0, 0.0], [width, height]])
    wall = (corners[None] - views[:, None, 1:]) / views[:, None, :1]  # [n, 2 corners, 2]
    return wall[..., 0].min(), wall[..., 1].min(), wall[..., 0].max(), wall[..., 1].max()


@dataclasses.dataclass(frozen=True)
class Texture:
    """A smooth wall texture: a base colour, low-frequency waves and plywood panel seams.

    Scales with `pixels_per_metre`, so the same wall looks the same at every frame size.
    """

    base: np.ndarray  # [3] RGB
    waves: np.ndarray  # [w, 4]: kx, ky (radians per metre), phase, amplitude (grey levels)
    panel: float  # metres between seams
    offset: np.ndarray  # [2] metres: where the seams are
    pixels_per_metre: float

    @classmethod
    def random(cls, rng: np.random.Generator, pixels_per_metre: float) -> Texture:
        base = rng.choice([(205, 190, 160), (175, 175, 170), (160, 175, 190), (215, 210, 200), (120, 110, 100)])
        count = 6
        wavelength = rng.uniform(0.5, 3.0, count)
        direction = rng.uniform(0, 2 * np.pi, count)
        waves = np.stack(
            [
                2 * np.pi / wavelength * np.cos(direction),
                2 * np.pi / wavelength * np.sin(direction),
                rng.uniform(0, 2 * np.pi, count),
                rng.uniform(3, 9, count),
            ],
            axis=1,
        )
        return cls(np.asarray(base, np.float64), waves, 1.22, rng.uniform(0, 1.22, 2), pixels_per_metre)

    def render(self, height: int, width: int, view=(1.0, 0.0, 0.0)) -> np.ndarray:
        """uint8 [height, width, 3]: the wall seen under view (s, dx, dy)."""
        s, dx, dy = view
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
        mx, my = (xx - dx) / s / self.pixels_per_metre, (yy - dy) / s / self.pixels_per_metre  # metres
        shade = sum(a * np.sin(kx * mx + ky * my + p) for kx, ky, p, a in self.waves)
        seam_width = max(1.0, 0.012 * self.pixels_per_metre * s) / (self.pixels_per_metre * s)  # metres
        half = self.panel / 2
        seam = [np.abs(np.mod(m - o + half, self.panel) - half) < seam_width / 2 for m, o in zip((mx, my), self.offset)]
        image = self.base + shade[..., None] - 35.0 * (seam[0] | seam[1])[..., None]
        return image.clip(0, 255).astype(np.uint8)


def place_distractors(
    rng: np.random.Generator,
    route: np.ndarray,
    limb_pixels: np.ndarray,
    region: tuple[float, float, float, float],
    count: int,
    radius_range: tuple[float, float],
    margin: float,
) -> np.ndarray:
    """Distractor holds [m <= count, 3] (x, y, r wall pixels) the true climber never touches.

    route [k, 3] wall pixels; limb_pixels [p, 2]: every hand and foot position of every frame,
    in wall pixels. A candidate of radius r is rejected within max(r + 2 R, 2 r) + margin of a
    limb position (R: the largest route radius) and when it would overlap another hold.
    """
    keep_off = 2 * route[:, 2].max()
    holds = [tuple(h) for h in route]
    out = []
    x0, y0, x1, y1 = region
    for _ in range(30 * count):
        if len(out) == count:
            break
        x, y, r = rng.uniform(x0, x1), rng.uniform(y0, y1), rng.uniform(*radius_range)
        if np.hypot(*(limb_pixels - (x, y)).T).min() < max(r + keep_off, 2 * r) + margin:
            continue
        if any(np.hypot(x - hx, y - hy) < r + hr + margin for hx, hy, hr in holds):
            continue
        holds.append((x, y, r))
        out.append((x, y, r))
    return np.asarray(out, np.float64).reshape(-1, 3)
