"""Headless OpenGL rendering of a triangle mesh (the SMPL body) with moderngl under EGL.

Note: moderngl's standalone EGL context runs without a display: on a GPU through the
vendor's EGL, on a CPU through Mesa's software rasteriser (llvmpipe). It needs the system
libraries libEGL and libGL with Mesa's drivers (Debian/Ubuntu: libegl1 libegl-mesa0 libgl1
libgl1-mesa-dri).
glcontext's environment variables pick another EGL device or library:
GLCONTEXT_DEVICE_INDEX, GLCONTEXT_LINUX_LIBEGL, GLCONTEXT_LINUX_LIBGL.

Geometry is in our camera frame (x right, y DOWN, z away from the camera, metres; see
sabr_jax.body.camera); pixels are (u right, v down) with u = f x / z + cx, v = f y / z + cy.
"""

from __future__ import annotations

import numpy as np

from sabr_jax.errors import UserError, one_line

BODY_COLOUR = (0.65, 0.74, 0.86)  # light blue, RGB in [0, 1]
_LIGHT = (0.3, -0.5, -1.0)  # towards the light, camera frame: from the camera, above and to the right
_AMBIENT = 0.35

_VERTEX_SHADER = """
#version 330
uniform mat4 projection;
in vec3 position;
in vec3 normal;
out vec3 v_normal;
void main() {
    v_normal = normal;
    gl_Position = projection * vec4(position, 1.0);
}
"""
_FRAGMENT_SHADER = """
#version 330
uniform vec3 colour;
uniform vec3 light;
uniform float ambient;
in vec3 v_normal;
out vec4 f_colour;
void main() {
    float lambert = abs(dot(normalize(v_normal), light));  // two-sided: winding may face either way
    f_colour = vec4(colour * (ambient + (1.0 - ambient) * lambert), 1.0);
}
"""


def projection_matrix(focal: float, centre: tuple[float, float], image_hw: tuple[int, int], near: float, far: float):
    """The OpenGL clip-from-camera matrix [4, 4] float32 for points in OUR camera frame.

    It is OpenGL's perspective matrix for pinhole intrinsics (focal pixels, centre = (cx, cy)
    pixels) composed with the change of axes diag(1, -1, -1) from our frame (y down, z away)
    to OpenGL's eye frame (y up, z towards the viewer). Pixel rows then come out bottom-up:
    `MeshRenderer.render` flips them. near, far: the clipping depths in metres.
    """
    height, width = image_hw
    cx, cy = centre
    gl_from_eye = np.array(
        [
            [2 * focal / width, 0, 1 - 2 * cx / width, 0],
            [0, 2 * focal / height, 2 * cy / height - 1, 0],
            [0, 0, -(far + near) / (far - near), -2 * far * near / (far - near)],
            [0, 0, -1, 0],
        ]
    )
    return (gl_from_eye @ np.diag([1.0, -1.0, -1.0, 1.0])).astype(np.float32)


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted vertex normals [V, 3] float32 (unit length; zero for unused vertices)."""
    corners = vertices[faces]  # [F, 3, 3]
    face_normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    normals = np.stack(
        [np.bincount(faces.ravel(), np.repeat(face_normals[:, i], 3), len(vertices)) for i in range(3)], axis=-1
    )
    length = np.linalg.norm(normals, axis=-1, keepdims=True)
    return (normals / np.maximum(length, 1e-12)).astype(np.float32)


class MeshRenderer:
    """Renders one mesh (fixed faces, moving vertices) into premultiplied RGBA images of one size.

    faces [F, 3] int vertex indices; image_hw = (H, W) pixels; focal pixels; centre = (cx, cy)
    the principal point in pixels (default: the image centre); samples: multisampling
    (anti-aliased edges). Use as a context manager, or call `close()`.
    """

    def __init__(self, faces, image_hw, focal, centre=None, colour=BODY_COLOUR, samples=4, what="the mesh overlay"):
        try:
            import moderngl
        except ImportError as e:
            raise UserError(f"{what}: the mesh renderer needs moderngl ({e}); pip install moderngl") from None
        try:
            self.ctx = moderngl.create_standalone_context(backend="egl")
        except Exception as e:  # glcontext raises a bare Exception: a library missing, no EGL device, ...
            raise UserError(
                f"{what}: cannot start OpenGL under EGL ({one_line(e)}); the mesh renderer needs the system "
                "libraries libegl1 libegl-mesa0 libgl1 libgl1-mesa-dri (Debian/Ubuntu: apt-get install them)"
            ) from None
        self.image_hw = tuple(int(x) for x in image_hw)
        self.focal = float(focal)
        height, width = self.image_hw
        self.centre = (width / 2, height / 2) if centre is None else tuple(centre)
        self.faces = np.ascontiguousarray(faces, np.int32)
        ctx = self.ctx
        self.program = ctx.program(vertex_shader=_VERTEX_SHADER, fragment_shader=_FRAGMENT_SHADER)
        self.program["colour"].value = tuple(colour)
        self.program["light"].value = tuple(np.asarray(_LIGHT) / np.linalg.norm(_LIGHT))
        self.program["ambient"].value = _AMBIENT
        self.positions = ctx.buffer(reserve=(int(self.faces.max()) + 1) * 12)  # resized to the vertices given
        self.normals = ctx.buffer(reserve=self.positions.size)
        self.vao = ctx.vertex_array(
            self.program,
            [(self.positions, "3f", "position"), (self.normals, "3f", "normal")],
            index_buffer=ctx.buffer(self.faces.tobytes()),
        )
        size = (width, height)
        self.msaa = ctx.framebuffer(
            color_attachments=[ctx.renderbuffer(size, 4, samples=samples)],
            depth_attachment=ctx.depth_renderbuffer(size, samples=samples),
        )
        self.resolved = ctx.framebuffer(color_attachments=[ctx.renderbuffer(size, 4)])

    def render(self, vertices) -> np.ndarray:
        """vertices [V, 3] camera frame, metres (already translated) -> premultiplied RGBA [H, W, 4]
        float32 in [0, 1], row 0 at the top; alpha is the mesh's pixel coverage. Vertices at
        z <= 0 (behind the camera) are clipped."""
        vertices = np.asarray(vertices, np.float32)
        if len(vertices) <= self.faces.max():
            raise ValueError(f"{len(vertices)} vertices, but the faces index up to {self.faces.max()}")
        depth = vertices[:, 2][vertices[:, 2] > 0]
        height, width = self.image_hw
        if depth.size == 0:
            return np.zeros((height, width, 4), np.float32)
        near, far = max(float(depth.min()) * 0.5, 1e-3), float(depth.max()) * 2
        projection = projection_matrix(self.focal, self.centre, self.image_hw, near, far)
        self.program["projection"].write(np.ascontiguousarray(projection.T))  # GLSL reads column-major
        if vertices.nbytes != self.positions.size:
            self.positions.orphan(vertices.nbytes)
            self.normals.orphan(vertices.nbytes)
        self.positions.write(np.ascontiguousarray(vertices).tobytes())
        self.normals.write(vertex_normals(vertices, self.faces).tobytes())
        self.msaa.use()
        self.ctx.enable(self.ctx.DEPTH_TEST)
        self.msaa.clear(0.0, 0.0, 0.0, 0.0)
        self.vao.render()
        self.ctx.copy_framebuffer(self.resolved, self.msaa)
        pixels = np.frombuffer(self.resolved.read(components=4), np.uint8).reshape(height, width, 4)
        return pixels[::-1].astype(np.float32) / 255

    def close(self) -> None:
        self.ctx.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
