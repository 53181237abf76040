"""sabr-sample's outputs: one sampled motion -> its folder's motion.npz, motion.bvh, motion.glb and overlay.mp4.

LAYOUT (below) documents the output folder; sabr-sample writes it to OUT/README.md too.
Only the motion frames reach these files: never a route image's or a padded position.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import numpy as np

from sabr_jax import motion as M
from sabr_jax.body import bvh, camera, gltf, render

LAYOUT = """\
OUT/
  README.md            this description
  route/<c>.png        with --route_color: the route images made from the video (the model's prompt)
  sample_<k>/          one per --samples (k = 0, 1, ...), each from its own noise
    motion.npz         T = the motion frames (every 24-FPS frame of the video used, from its first):
                         motion      [T, 161] float32  the raw (denormalised) motion vectors
                                                       (sabr_jax.motion: bbox / [W, H, W, H], camera_bbox,
                                                       24 rotations in 6D, betas)
                         axis_angle  [T, 24, 3]        the 24 joint rotations as axis * angle (radians),
                                                       SMPL order, joint 0 the global orient in the camera
                                                       frame (x right, y down, z away from the camera)
                         betas       [T, 10]           SMPL shape
                         camera_bbox [T, 3]            weak-perspective camera [s, tx, ty] of the bbox
                         bbox        [T, 4]            [x0, y0, w, h] pixels of the input video (upright)
                         cam_t       [T, 3]            full-image camera translation, metres (4D-Humans'
                                                       cam_crop_to_full, focal 5000 / 256 * max(H, W) px)
                         known       [T] bool          frames kept from --complete's tracks (exactly
                                                       the tracker's values); all False without it
                         fps, image_size ([H, W] pixels), focal (pixels)
    motion.bvh         the skeleton's motion (rest offsets from the SMPL model's mean shape with
                       --smpl, else the built-in skeleton; root translated by cam_t), y up, metres,
                       placed: frame 0's pelvis at x = z = 0, frame 0's lowest joint on the floor y = 0
    motion.glb         glTF 2.0, the same world and placement: the 24 joints as a node hierarchy (and
                       skin) with one animation (joint rotations, the root's translation, fps), the
                       video's camera as a camera node; with --smpl the mean-shape SMPL mesh skinned
                       to the joints (4 largest blend weights, no pose blend shapes)
    overlay.mp4        the avatar drawn on the input video at fps and the input's size: the SMPL
                       mesh in its mean shape with --smpl, the built-in skeleton otherwise
"""


def motion_arrays(raw: np.ndarray, image_hw: tuple[int, int], fps: int, known: np.ndarray | None = None) -> dict:
    """motion.npz's arrays (LAYOUT) from raw motion vectors [T, 161] of an image_hw = (H, W) video."""
    bbox, camera_bbox, rotations = (np.asarray(a) for a in camera.from_motion(raw, image_hw))
    return {
        "motion": np.asarray(raw, np.float32),
        "axis_angle": M.matrix_to_axis_angle(rotations).astype(np.float32),
        "rotations": rotations.astype(np.float32),
        "betas": np.asarray(raw[:, M.BETAS], np.float32),
        "camera_bbox": camera_bbox.astype(np.float32),
        "bbox": bbox.astype(np.float32),
        "cam_t": np.asarray(camera.crop_to_full(camera_bbox, bbox, image_hw), np.float32),
        "known": np.zeros(len(raw), bool) if known is None else np.asarray(known, bool),
        "fps": np.int32(fps),
        "image_size": np.asarray(image_hw, np.int32),
        "focal": np.float32(camera.full_focal(image_hw)),
    }


def write_sample(
    folder: str,
    arrays: dict,
    body,
    frames: Iterable[np.ndarray],
    progress: Callable[[int, int], object] | None = None,
) -> None:
    """Write folder/{motion.npz, motion.bvh, motion.glb, overlay.mp4} for `motion_arrays(...)`; body: a
    sabr_jax.body.smpl model or its built-in skeleton (mean shape: zero betas); frames: the
    video's first T frames, uint8 [H, W, 3] at its size; progress(done, T) per overlay frame."""
    os.makedirs(folder, exist_ok=True)
    np.savez(os.path.join(folder, "motion.npz"), **{k: v for k, v in arrays.items() if k != "rotations"})
    rotations, cam_t = arrays["rotations"], arrays["cam_t"]
    mean_shape = np.zeros((len(rotations), M.NUM_BETAS), np.float32)
    rest = np.asarray(body.rest_joints(mean_shape[:1]))[0]
    fps, image_hw = int(arrays["fps"]), tuple(int(n) for n in arrays["image_size"])
    shift = bvh.placement(rotations, rest, cam_t)  # the same world for both files
    bvh.write(os.path.join(folder, "motion.bvh"), rotations, rest, cam_t, float(fps), world_shift=shift)
    camera_args = (float(fps), image_hw, float(arrays["focal"]))
    mesh = gltf.mean_shape_mesh(body)
    gltf.write(os.path.join(folder, "motion.glb"), rotations, rest, cam_t, *camera_args, mesh=mesh, world_shift=shift)
    overlay = os.path.join(folder, "overlay.mp4")
    if body.faces is None:
        joints = np.asarray(body(mean_shape, rotations)["joints"])
        joints_px = np.asarray(camera.project(joints, arrays["bbox"], arrays["camera_bbox"]))
        render.write_overlay(frames, overlay, fps, joints_px=joints_px, progress=progress)
    else:
        vertices = np.asarray(body(mean_shape, rotations)["vertices"])
        render.write_overlay(frames, overlay, fps, mesh=(vertices, np.asarray(body.faces), cam_t), progress=progress)
