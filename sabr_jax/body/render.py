"""The overlay video: the avatar drawn on the input frames, written as H.264 mp4 with PyAV.

Two modes. Skeleton: the built-in 24 joints (sabr_jax.body.skeleton) as bones and dots at given
pixel positions, drawn with Pillow; no SMPL file needed. Mesh: the SMPL body rendered with
a perspective camera (sabr_jax.body.render_gl, moderngl under EGL) and alpha-composited over the
frame. The mesh camera is 4D-Humans' full-image one (sabr_jax.body.camera.crop_to_full): focal
5000 / 256 * max(H, W) pixels, principal point at the image centre, the body translated by
cam_t in our camera frame (x right, y DOWN, z away from the camera, metres).

Frames stream through one at a time (decode, draw, encode): a 1100-frame video is never
held in memory, and the motion arrays are read one frame at a time.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable

import numpy as np

from sabr_jax.body import camera, skeleton
from sabr_jax.data import video as vid
from sabr_jax.errors import UserError

_LEFT, _RIGHT, _CENTRE = (255, 140, 0), (0, 160, 255), (240, 240, 240)  # RGB, by the body's side
_COLOURS = tuple(_LEFT if n[:2] == "L_" else _RIGHT if n[:2] == "R_" else _CENTRE for n in skeleton.JOINT_NAMES)


def camera_to_pixels(points, cam_t, image_hw, focal=None) -> np.ndarray:
    """Perspective projection of the mesh camera: points [..., N, 3] camera frame metres (body
    frame, before translation), cam_t [..., 3] metres -> pixels [..., N, 2] (u right, v down):
    with p = points + cam_t, u = f p_x / p_z + W / 2 and v = f p_y / p_z + H / 2; focal f in
    pixels (default `camera.full_focal(image_hw)`)."""
    height, width = image_hw
    focal = camera.full_focal(image_hw) if focal is None else focal
    p = np.asarray(points, np.float64) + np.asarray(cam_t, np.float64)[..., None, :]
    return focal * p[..., :2] / p[..., 2:3] + np.array([width / 2, height / 2])


def draw_skeleton(frame: np.ndarray, joints_px: np.ndarray) -> np.ndarray:
    """The 24 joints drawn on a copy of frame uint8 [H, W, 3]: bones as thick lines, joints as
    dots, coloured by the body's side (left orange, right blue). joints_px [24, 2] pixels
    (u right, v down; pixel i spans [i, i + 1)); a joint that is not finite is left out with its bones."""
    from PIL import Image, ImageDraw

    image = Image.fromarray(frame)
    draw = ImageDraw.Draw(image)
    width = max(2, round(max(frame.shape[:2]) / 160))
    finite = np.isfinite(joints_px).all(-1)
    joints_px = joints_px - 0.5  # Pillow puts pixel i's centre at i
    for k, p in enumerate(skeleton.PARENTS):
        if p >= 0 and finite[k] and finite[p]:
            draw.line([tuple(joints_px[p]), tuple(joints_px[k])], fill=_COLOURS[k], width=width)
    for k in np.flatnonzero(finite):
        u, v = joints_px[k]
        draw.ellipse([u - width, v - width, u + width, v + width], fill=_COLOURS[k])
    return np.asarray(image)


def composite(frame: np.ndarray, rgba: np.ndarray) -> np.ndarray:
    """frame uint8 [H, W, 3] under premultiplied rgba float [H, W, 4] in [0, 1] -> uint8 [H, W, 3]."""
    out = frame * (1 - rgba[..., 3:]) + 255 * rgba[..., :3]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def write_overlay(
    frames: Iterable[np.ndarray],
    out_path: str | os.PathLike,
    fps: int = 24,
    *,
    joints_px=None,
    mesh=None,
    focal: float | None = None,
    progress: Callable[[int, int], object] | None = None,
) -> int:
    """Draw the avatar on every frame and write the H.264 mp4 out_path; returns the frame count.

    frames: uint8 [H, W, 3] images, any iterable (a generator streams); fps: the output rate.
    Exactly one of
      joints_px [T, 24, 2] pixels: skeleton mode;
      mesh = (vertices [T, V, 3] camera-frame metres before translation, faces [F, 3] int,
              cam_t [T, 3] metres): mesh mode, focal pixels (default `camera.full_focal((H, W))`).
    A frame whose joints, vertices or cam_t are not finite is written unchanged.
    progress(done, T) is called after each frame. UserError when the frames are not T, or
    the GL renderer cannot start (naming the system libraries it needs).
    """
    if (joints_px is None) == (mesh is None):
        raise ValueError("write_overlay: give exactly one of joints_px (skeleton) and mesh (vertices, faces, cam_t)")
    total = len(joints_px) if mesh is None else len(mesh[0])
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise UserError(f"{out_path}: the video has no frames; the motion has {total}")
    renderer = None
    if mesh is not None:
        from sabr_jax.body.render_gl import MeshRenderer

        image_hw = first.shape[:2]
        focal = camera.full_focal(image_hw) if focal is None else focal
        renderer = MeshRenderer(mesh[1], image_hw, focal, what=f"the mesh overlay {out_path}")
    done = 0
    try:
        with vid.VideoWriter(out_path, fps) as writer:
            for frame in itertools.chain([first], frames):
                if done == total:
                    raise UserError(f"{out_path}: the video has more frames than the motion's {total}")
                if renderer is None:
                    frame = draw_skeleton(frame, np.asarray(joints_px[done], np.float64))
                else:
                    vertices = np.asarray(mesh[0][done], np.float32) + np.asarray(mesh[2][done], np.float32)
                    if np.isfinite(vertices).all():
                        frame = composite(frame, renderer.render(vertices))
                writer.write(frame)
                done += 1
                if progress is not None:
                    progress(done, total)
    finally:
        if renderer is not None:
            renderer.close()
    if done != total:
        raise UserError(f"{out_path}: the video has {done} frames but the motion has {total}")
    return done
