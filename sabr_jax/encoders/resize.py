"""torch's antialiased separable interpolation, as matrices (numpy) applied with einsums (JAX).

The DINOv2 reference resizes twice, and we must match both to float rounding:

* Position embeddings are learnt on a 37x37 grid (518 px) and resized to the
  input's patch grid with `torch.nn.functional.interpolate(mode="bicubic",
  align_corners=False, antialias=True)`, given an output *size* (the hub's
  register models use `interpolate_offset=0`, so no scale-factor kludge).
  With `antialias=True` torch uses its separable antialiasing path, whose
  cubic kernel has a = -0.5 (Pillow's), not the a = -0.75 of the plain bicubic
  path, and whose support widens by the scale factor when downsampling.
  `jax.image.resize` differs from both, so we build the interpolation matrices
  in numpy with the same float32 arithmetic as torch (`resize_matrix`) and
  apply them with einsums (`resize_2d`); they match torch to ~5e-7.
* Frames are resized with the same antialiased kernel machinery in its
  bilinear form (torchvision's tensor resize with `antialias=True` ==
  `interpolate(mode="bilinear", antialias=True, align_corners=False)`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["resize_2d", "resize_matrix"]

_HIGHEST = jax.lax.Precision.HIGHEST


def _cubic_aa(x: np.ndarray) -> np.ndarray:
    """Keys cubic kernel with a = -0.5 (torch's antialiased bicubic), float32."""
    a = np.float32(-0.5)
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, np.float32(0))).astype(np.float32)


def _linear(x: np.ndarray) -> np.ndarray:
    """Triangle kernel (bilinear), float32."""
    return np.maximum(np.float32(0), np.float32(1) - np.abs(x)).astype(np.float32)


def resize_matrix(n_in: int, n_out: int, kind: str) -> np.ndarray:
    """Matrix M [n_out, n_in] with `y = M @ x` == torch's 1-D antialiased resize.

    Reproduces `torch.nn.functional.interpolate(..., mode="bilinear"|"bicubic",
    align_corners=False, antialias=True)` given an output size, along one axis
    (the 2-D resize is separable). Output pixel i has its centre at
    `c = (i + 0.5) * n_in / n_out` in input pixel units; input pixel j gets
    weight `k((j + 0.5 - c) / s)` with s = max(n_in / n_out, 1) (the kernel is
    stretched when downsampling: that is the antialiasing), restricted to the
    window torch uses and normalised to sum to one. Arithmetic is float32 in
    the same order as torch, so the matrices agree to float rounding.

    Args:
      n_in, n_out: input and output lengths in pixels.
      kind: "linear" (bilinear) or "cubic" (bicubic, a = -0.5).
    """
    f32 = np.float32
    kernel, half_width = {"linear": (_linear, 1.0), "cubic": (_cubic_aa, 2.0)}[kind]
    scale = f32(n_in) / f32(n_out)
    support = f32(half_width) * scale if scale >= 1 else f32(half_width)
    inv_scale = f32(1) / scale if scale >= 1 else f32(1)
    matrix = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        centre = scale * f32(i + 0.5)
        lo = max(int(centre - support + f32(0.5)), 0)
        hi = min(int(centre + support + f32(0.5)), n_in)
        weights = kernel((np.arange(lo, hi, dtype=f32) - centre + f32(0.5)) * inv_scale)
        total = weights.sum(dtype=f32)
        if total != 0:
            matrix[i, lo:hi] = weights / total
    return matrix


def resize_2d(x: jax.Array, out_h: int, out_w: int, kind: str) -> jax.Array:
    """Resize [..., H, W, C] to [..., out_h, out_w, C] with torch's AA kernel (float32)."""
    h, w = x.shape[-3], x.shape[-2]
    if (h, w) == (out_h, out_w) and kind == "linear":
        return x  # the linear kernel at scale 1 is the identity
    rows = jnp.asarray(resize_matrix(h, out_h, kind))
    cols = jnp.asarray(resize_matrix(w, out_w, kind))
    x = jnp.einsum("...hwc,vw->...hvc", x, cols, precision=_HIGHEST)
    return jnp.einsum("...hvc,uh->...uvc", x, rows, precision=_HIGHEST)
