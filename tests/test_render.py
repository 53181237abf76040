"""sabr_jax.body.render: the overlay video (skeleton and SMPL-mesh modes) and its camera math."""

import av
import numpy as np
import pytest

from sabr_jax.body import camera, render, skeleton
from sabr_jax.data.video import probe, resampled_frames
from sabr_jax.errors import UserError

H, W, FPS = 48, 64, 24
GREY = 90


def grey_frames(n, height=H, width=W):
    return (np.full((height, width, 3), GREY, np.uint8) for _ in range(n))


def decoded(path):
    return np.stack([pixels for _, _, pixels in resampled_frames(path, keep=lambda i: True, size=None)])


def skeleton_pixels(frames):
    """A standing skeleton ~20 pixels tall, moving right one pixel a frame: [frames, 24, 2]."""
    rest = skeleton.REST_JOINTS[:, :2] * np.array([1.0, -1.0])  # y up -> v down
    return np.stack([np.array([24.0 + t, 22.0]) + 12 * rest for t in range(frames)])


def distance_to_bones(joints_px, height, width):
    """[H, W] distance in pixels from each pixel centre to the nearest bone segment."""
    v, u = np.mgrid[:height, :width] + 0.5
    pixel = np.stack([u, v], -1)[:, :, None]  # [H, W, 1, 2]
    a = joints_px[[p for p in skeleton.PARENTS[1:]]]
    b = joints_px[1:]
    t = np.clip(((pixel - a) * (b - a)).sum(-1) / ((b - a) ** 2).sum(-1), 0, 1)
    return np.linalg.norm(pixel - (a + t[..., None] * (b - a)), axis=-1).min(-1)


def test_skeleton_overlay_video(tmp_path):
    out = tmp_path / "overlay.mp4"
    joints = skeleton_pixels(3)
    seen = []
    assert render.write_overlay(grey_frames(3), out, FPS, joints_px=joints, progress=lambda *a: seen.append(a)) == 3
    assert seen == [(1, 3), (2, 3), (3, 3)]
    info = probe(out)
    assert (info["height"], info["width"], info["fps"]) == (H, W, FPS)
    with av.open(str(out)) as container:
        assert container.streams.video[0].codec_context.name == "h264"
    video = decoded(out).astype(int)
    assert video.shape == (3, H, W, 3)
    for t in range(3):
        change = np.abs(video[t] - GREY).max(-1)
        far = distance_to_bones(joints[t], H, W) > 12  # H.264 spreads edges over its 8x8 blocks
        assert far.sum() > H * W / 3 and change[far].max() <= 6  # untouched away from the skeleton (codec noise)
        u, v = np.floor(joints[t]).astype(int).T
        near_joint = np.max([change[v + dv, u + du] for dv in (-1, 0, 1) for du in (-1, 0, 1)], axis=0)
        assert (near_joint > 60).all()  # drawn at every joint (within a pixel: 4:2:0 chroma blurs the colours)


def test_frame_count_mismatch_and_odd_size(tmp_path):
    with pytest.raises(UserError, match="has more frames than the motion's 2"):
        render.write_overlay(grey_frames(3), tmp_path / "a.mp4", FPS, joints_px=skeleton_pixels(2))
    with pytest.raises(UserError, match="the video has 1 frames but the motion has 2"):
        render.write_overlay(grey_frames(1), tmp_path / "b.mp4", FPS, joints_px=skeleton_pixels(2))
    render.write_overlay(grey_frames(2, H - 1, W - 1), tmp_path / "c.mp4", FPS, joints_px=skeleton_pixels(2))
    assert decoded(tmp_path / "c.mp4").shape == (2, H, W, 3)  # yuv420p: padded to even


def test_mesh_camera_agrees_with_the_bbox_camera():
    """The full-image perspective camera (crop_to_full's translation, 4D-Humans' focal) puts
    the body's origin where PHALP's weak-perspective bbox camera does."""
    bbox = np.array([[10.0, 4.0, 20.0, 36.0], [30.0, 0.0, 30.0, 40.0]])
    camera_bbox = np.array([[0.9, 0.1, -0.2], [1.1, -0.3, 0.05]])
    cam_t = np.asarray(camera.crop_to_full(camera_bbox, bbox, (H, W)))
    origin = np.zeros((2, 1, 3))
    want = np.asarray(camera.project(origin, bbox, camera_bbox))
    np.testing.assert_allclose(render.camera_to_pixels(origin, cam_t, (H, W)), want, atol=1e-3)


TRIANGLE = np.array([[-0.05, -0.04, 0.0], [0.06, -0.03, 0.01], [0.0, 0.07, -0.01]])  # camera frame, y down
FACES = np.array([[0, 1, 2]], np.int32)


def mesh_renderer():
    """A MeshRenderer of TRIANGLE on an H x W image, or the test skipped with why GL cannot start."""
    from sabr_jax.body.render_gl import MeshRenderer

    try:
        return MeshRenderer(FACES, (H, W), camera.full_focal((H, W)))
    except UserError as e:
        pytest.skip(f"no OpenGL renderer here: {e}")


@pytest.mark.parametrize("cam_t", [(0.0, 0.0, 10.0), (0.1, 0.06, 12.0), (-0.12, -0.05, 9.0)])
def test_mesh_drawn_where_the_camera_puts_it(cam_t):
    cam_t = np.array(cam_t)
    corners = render.camera_to_pixels(TRIANGLE, cam_t, (H, W))
    with mesh_renderer() as renderer:
        alpha = renderer.render(TRIANGLE + cam_t)[..., 3]
    v, u = np.mgrid[:H, :W] + 0.5  # pixel centres
    edges = [(corners[i], corners[(i + 1) % 3]) for i in range(3)]
    side = np.stack([(b[0] - a[0]) * (v - a[1]) - (b[1] - a[1]) * (u - a[0]) for a, b in edges])
    inside = (side > 0).all(0) | (side < 0).all(0)
    length = np.array([np.linalg.norm(b - a) for a, b in edges])[:, None, None]
    near_edge = (np.abs(side) / length < 1.0).any(0)
    assert inside.sum() > 30
    assert (alpha[inside & ~near_edge] > 0.99).all() and (alpha[~inside & ~near_edge] == 0).all()


def test_mesh_overlay_video(tmp_path):
    mesh_renderer().close()  # skips without GL
    cam_t = np.array([[0.0, 0.0, 10.0], [0.05, 0.03, 10.0], [np.nan, np.nan, np.nan]])  # no body in frame 3
    vertices = np.broadcast_to(TRIANGLE, (3, 3, 3))
    out = tmp_path / "mesh.mp4"
    assert render.write_overlay(grey_frames(3), out, FPS, mesh=(vertices, FACES, cam_t)) == 3
    video = decoded(out).astype(int)
    assert video.shape == (3, H, W, 3)
    for t in range(2):
        u, v = render.camera_to_pixels(TRIANGLE, cam_t[t], (H, W)).mean(0).astype(int)
        assert np.abs(video[t, v, u] - GREY).max() > 40 and video[t, v, u, 2] > video[t, v, u, 0]  # light blue body
        assert np.abs(video[t, 2, 2] - GREY).max() <= 6 and np.abs(video[t, H - 3, W - 3] - GREY).max() <= 6
    assert np.abs(video[2] - GREY).max() <= 6


def test_gl_that_cannot_start_is_a_one_line_user_error(tmp_path, monkeypatch):
    pytest.importorskip("moderngl")
    monkeypatch.setenv("GLCONTEXT_LINUX_LIBEGL", str(tmp_path / "libEGL.so.1"))  # glcontext's own override
    with pytest.raises(
        UserError, match="cannot start OpenGL under EGL .*libegl1 libegl-mesa0 libgl1 libgl1-mesa-dri"
    ) as e:
        render.write_overlay(grey_frames(1), tmp_path / "x.mp4", FPS, mesh=(TRIANGLE[None], FACES, np.ones((1, 3))))
    assert "\n" not in str(e.value) and "x.mp4" in str(e.value)
    assert not (tmp_path / "x.mp4").exists()
