"""The built-in skeleton's forward kinematics and the weak-perspective bbox camera."""

import jax
import jax.numpy as jnp
import numpy as np

from sabr_jax import motion as M
from sabr_jax.body import camera, skeleton


def _random_rotations(seed, shape):
    rng = np.random.default_rng(seed)
    return M.axis_angle_to_matrix(rng.normal(0, 0.5, shape + (24, 3)))


def test_skeleton_tables():
    assert len(skeleton.JOINT_NAMES) == len(skeleton.PARENTS) == 24
    assert skeleton.PARENTS[0] == -1 and all(0 <= p < k for k, p in enumerate(skeleton.PARENTS) if k)
    rest = skeleton.REST_JOINTS
    assert rest.shape == (24, 3) and rest.dtype == np.float32
    assert np.abs(rest[0]).max() < 0.05  # pelvis near the origin
    height = rest[15, 1] - rest[10:12, 1].min() + 0.25  # head joint to sole plus the skull top
    assert 1.55 < height < 1.85
    assert rest[22, 0] > 0.5 and rest[23, 0] < -0.5  # T-pose, the body's left is +x
    assert skeleton.END_EFFECTORS == {"left_hand": 22, "right_hand": 23, "left_foot": 10, "right_foot": 11}


def test_forward_kinematics_rest_and_bone_lengths():
    eye = np.broadcast_to(np.eye(3, dtype=np.float32), (24, 3, 3))
    np.testing.assert_allclose(skeleton.forward_kinematics(eye), skeleton.REST_JOINTS, atol=1e-6)
    rot = _random_rotations(0, (5,)).astype(np.float32)
    posed = np.asarray(skeleton.forward_kinematics(rot))
    assert posed.shape == (5, 24, 3)
    parents = np.array(skeleton.PARENTS[1:])
    rest_len = np.linalg.norm(skeleton.REST_JOINTS[1:] - skeleton.REST_JOINTS[parents], axis=-1)
    posed_len = np.linalg.norm(posed[:, 1:] - posed[:, parents], axis=-1)
    np.testing.assert_allclose(posed_len, np.broadcast_to(rest_len, posed_len.shape), atol=1e-5)
    np.testing.assert_allclose(posed[:, 0], np.broadcast_to(skeleton.REST_JOINTS[0], (5, 3)), atol=1e-6)


def test_forward_kinematics_matches_explicit_chain():
    """Rotating only the left elbow swings the forearm about the elbow, in the shoulder's frame."""
    aa = np.zeros((24, 3))
    aa[0] = [0.0, 0.0, np.pi]  # back to the camera
    aa[18] = [0.0, 0.7, 0.0]
    rot = M.axis_angle_to_matrix(aa)
    posed = np.asarray(skeleton.forward_kinematics(rot))
    g, r = rot[0], rot[18]
    rest = skeleton.REST_JOINTS.astype(np.float64)
    np.testing.assert_allclose(posed[20], g @ (rest[18] + r @ (rest[20] - rest[18])), atol=1e-5)
    np.testing.assert_allclose(posed[16], g @ rest[16], atol=1e-6)


def test_forward_kinematics_is_differentiable_and_jittable():
    rot = jnp.asarray(_random_rotations(1, (3,)), jnp.float32)
    f = jax.jit(jax.vmap(lambda r: skeleton.forward_kinematics(r)[22].sum()))
    grads = jax.grad(lambda r: f(r).sum())(rot)
    assert np.isfinite(np.asarray(grads)).all() and np.abs(np.asarray(grads)).max() > 0


def test_camera_for_box_inverts_project():
    rng = np.random.default_rng(2)
    points = rng.normal(0, 0.5, (4, 24, 3))
    bbox = np.concatenate([rng.uniform(0, 100, (4, 2)), rng.uniform(20, 80, (4, 2))], axis=1)
    k = 37.5
    root_pixel = rng.uniform(0, 200, (4, 2))
    cam = camera.camera_for_box(root_pixel, points[:, 0], bbox, k)
    pixels = np.asarray(camera.project(points, bbox, cam))
    expected = root_pixel[:, None] + k * (points[..., :2] - points[:, :1, :2])
    np.testing.assert_allclose(pixels, expected, atol=1e-4)
    np.testing.assert_allclose(np.asarray(cam[:, 0]), 2 * k / bbox[:, 2:].max(1), rtol=1e-6)


def test_crop_to_full_formula():
    cam = np.array([0.8, 0.1, -0.2])
    bbox = np.array([30.0, 40.0, 50.0, 90.0])
    h, w = 180, 320
    b, cx, cy = 90.0, 55.0, 85.0
    f = 5000 / 256 * 320
    expected = [0.1 + 2 * (cx - w / 2) / (b * 0.8), -0.2 + 2 * (cy - h / 2) / (b * 0.8), 2 * f / (b * 0.8)]
    np.testing.assert_allclose(np.asarray(camera.crop_to_full(cam, bbox, (h, w))), expected, rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(camera.crop_to_full(cam, bbox, (h, w), focal=1000.0))[2], 2000 / 72, rtol=1e-6
    )


def test_joint_pixels_reads_the_motion_vector():
    rot = _random_rotations(3, (2,))
    bbox = np.array([[10.0, 20.0, 40.0, 60.0], [50.0, 5.0, 30.0, 30.0]])
    cam = np.array([[0.9, 0.1, 0.2], [1.1, -0.3, 0.0]])
    h, w = 120, 200
    vec = np.concatenate(
        [bbox / [w, h, w, h], cam, M.matrix_to_rot6d(rot).reshape(2, -1), np.zeros((2, M.NUM_BETAS))], axis=1
    )
    assert vec.shape == (2, M.MOTION_DIM)
    got = np.asarray(camera.joint_pixels(vec, (h, w)))
    want = np.asarray(camera.project(skeleton.forward_kinematics(rot), bbox, cam))
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_mirror_is_the_mirror_image_and_its_own_inverse():
    """camera.mirror of raw motion vectors: its joints (forward kinematics, then the bbox camera) are
    the original's mirrored in the frame (u -> W - u) with left and right swapped, and mirroring
    twice gives the vectors back; all-zero vectors (untracked frames) stay zero."""
    rng = np.random.default_rng(3)
    rotations = np.asarray(_random_rotations(3, (6,)), np.float32)
    bbox = np.stack(
        [rng.uniform(0.1, 0.5, 6), rng.uniform(0.1, 0.5, 6), rng.uniform(0.2, 0.4, 6), rng.uniform(0.3, 0.5, 6)], 1
    )
    cam = np.stack([rng.uniform(0.8, 1.2, 6), rng.normal(0, 0.1, 6), rng.normal(0, 0.1, 6)], 1)
    vectors = np.concatenate(
        [bbox, cam, np.asarray(M.matrix_to_rot6d(rotations)).reshape(6, -1), rng.normal(0, 1, (6, 10))], 1
    )
    vectors = np.concatenate([vectors, np.zeros((1, M.MOTION_DIM))]).astype(np.float32)
    mirrored = camera.mirror(vectors)
    np.testing.assert_allclose(camera.mirror(mirrored), vectors, atol=1e-5)
    assert np.all(mirrored[-1] == 0)
    hw = (112, 196)
    joints = np.asarray(camera.joint_pixels(vectors[:-1], hw))
    expected = joints[:, list(skeleton.MIRRORED)]
    expected[..., 0] = hw[1] - expected[..., 0]
    np.testing.assert_allclose(np.asarray(camera.joint_pixels(mirrored[:-1], hw)), expected, atol=1e-3)
    np.testing.assert_array_equal(mirrored[:-1, M.BETAS], vectors[:-1, M.BETAS])
    assert [skeleton.JOINT_NAMES[j] for j in skeleton.MIRRORED[:3]] == ["pelvis", "R_hip", "L_hip"]
