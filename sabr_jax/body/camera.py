"""PHALP's weak-perspective bbox camera: the one camera convention of the whole project.

Note: points are in camera coordinates (x right, y DOWN, z away from the camera, metres),
the frame PHALP's `global_orient` puts the body in; pixels are (u right, v down) of the
full frame. `joint_pixels` maps raw motion vectors to the 24 joints' pixel positions.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sabr_jax import motion as M
from sabr_jax.body.skeleton import MIRRORED, forward_kinematics

FOCAL_AT_256 = 5000.0  # 4D-Humans' focal length for a 256-pixel crop


def _centre_and_size(bbox):
    """bbox [..., 4] = [x0, y0, w, h] pixels -> (centre [..., 2], b = max(w, h) [...])."""
    bbox = jnp.asarray(bbox)
    centre = bbox[..., :2] + bbox[..., 2:] / 2
    return centre, jnp.maximum(bbox[..., 2], bbox[..., 3])


def project(points, bbox, camera_bbox):
    """Weak-perspective projection into the full frame.

    points [..., N, 3] camera coordinates (metres); bbox [..., 4] = [x0, y0, w, h] pixels;
    camera_bbox [..., 3] = [s, tx, ty]. With b = max(w, h) and c the bbox centre:
    pixel = c + (b / 2) * s * (XY + t). Returns [..., N, 2] pixels.
    """
    points, camera_bbox = jnp.asarray(points), jnp.asarray(camera_bbox)
    centre, b = _centre_and_size(bbox)
    scale = (b / 2 * camera_bbox[..., 0])[..., None, None]
    return centre[..., None, :] + scale * (points[..., :2] + camera_bbox[..., None, 1:3])


def camera_for_box(root_pixel, root_point, bbox, pixels_per_metre):
    """The camera_bbox [..., 3] = [s, tx, ty] under which `project` puts root_point on root_pixel.

    root_pixel [..., 2] pixels; root_point [..., 3] camera coordinates (metres); bbox [..., 4]
    pixels; pixels_per_metre k (scalar or [...]): the image scale, so s = 2k / b and
    t = (root_pixel - c) / k - root_point[:2]. Every other point then lands at
    root_pixel + k * (point - root_point)[:2].
    """
    root_pixel, root_point = jnp.asarray(root_pixel), jnp.asarray(root_point)
    centre, b = _centre_and_size(bbox)
    k = jnp.asarray(pixels_per_metre, root_pixel.dtype)
    t = (root_pixel - centre) / k[..., None] - root_point[..., :2]
    return jnp.concatenate([(2 * k / b)[..., None], t], axis=-1)


def full_focal(image_hw: tuple[int, int]) -> float:
    """4D-Humans' full-image focal length in pixels for an (H, W) frame: 5000 / 256 * max(H, W)."""
    return FOCAL_AT_256 / 256 * max(image_hw)


def crop_to_full(camera_bbox, bbox, image_hw, focal=None):
    """4D-Humans' cam_crop_to_full: full-image camera translation [..., 3] metres.

    camera_bbox [..., 3] = [s, tx, ty]; bbox [..., 4] pixels; image_hw = (H, W);
    focal in pixels (default `full_focal(image_hw)`). With b = max(w, h) and (cx, cy) the
    bbox centre: tz = 2 f / (b s), tx' = tx + 2 (cx - W/2) / (b s), ty' = ty + 2 (cy - H/2) / (b s).
    """
    height, width = image_hw
    focal = full_focal(image_hw) if focal is None else focal
    camera_bbox = jnp.asarray(camera_bbox)
    centre, b = _centre_and_size(bbox)
    bs = b * camera_bbox[..., 0]
    tx = camera_bbox[..., 1] + 2 * (centre[..., 0] - width / 2) / bs
    ty = camera_bbox[..., 2] + 2 * (centre[..., 1] - height / 2) / bs
    return jnp.stack([tx, ty, 2 * focal / bs], axis=-1)


def from_motion(vectors, image_hw):
    """Raw (not normalised) motion vectors [..., 161] -> (bbox [..., 4] pixels, camera_bbox [..., 3],
    rotations [..., 24, 3, 3]); image_hw = (H, W) undoes the bbox's [W, H, W, H] division."""
    vectors = jnp.asarray(vectors)
    height, width = image_hw
    bbox = vectors[..., M.BBOX] * jnp.asarray([width, height, width, height], vectors.dtype)
    rot6d = vectors[..., M.ROTATIONS].reshape(*vectors.shape[:-1], M.NUM_JOINTS, 6)
    return bbox, vectors[..., M.CAMERA], M.rot6d_to_matrix(rot6d)


def joint_pixels(vectors, image_hw):
    """Raw motion vectors [..., 161] -> the 24 joints' pixel positions [..., 24, 2] in the
    (H, W) = image_hw frame: project(forward_kinematics(rotations), bbox, camera_bbox). The betas
    are ignored: the joints are the built-in skeleton's (zero betas)."""
    bbox, camera_bbox, rotations = from_motion(vectors, image_hw)
    return project(forward_kinematics(rotations), bbox, camera_bbox)


def mirror(vectors: np.ndarray) -> np.ndarray:
    """Raw motion vectors [..., 161] of the left-right mirror image of the video (pixel column u ->
    W - u): the bbox flipped in the frame (x0 -> 1 - x0 - w, in frame fractions), the camera's tx
    negated, every rotation reflected across the x = 0 plane (R -> F R F, F = diag(-1, 1, 1), in the
    camera frame for the global orientation and the body frame for the joints, which is the same
    matrix) with the left and right joints swapped (skeleton.MIRRORED), the betas kept. The built-in
    skeleton is left-right symmetric, so the joints of the result, by `joint_pixels`, are those of
    the original mirrored (test_camera); mirroring twice gives the vectors back. All-zero vectors
    (frames the tracker lost, stored as zeros) stay zero."""
    vectors = np.array(vectors, np.float32)
    out = vectors.copy()
    x0, w = vectors[..., M.BBOX.start], vectors[..., M.BBOX.start + 2]
    out[..., M.BBOX.start] = 1.0 - x0 - w
    out[..., M.CAMERA.start + 1] = -vectors[..., M.CAMERA.start + 1]
    rot6d = vectors[..., M.ROTATIONS].reshape(*vectors.shape[:-1], M.NUM_JOINTS, 6)
    flip = np.diag([-1.0, 1.0, 1.0]).astype(np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):  # (the zero vectors' rotations: NaN, replaced below)
        matrices = flip @ np.asarray(M.rot6d_to_matrix(rot6d))[..., list(MIRRORED), :, :] @ flip
    out[..., M.ROTATIONS] = np.asarray(M.matrix_to_rot6d(matrices)).reshape(*vectors.shape[:-1], -1)
    return np.where(np.any(vectors != 0, axis=-1, keepdims=True), out, vectors)
