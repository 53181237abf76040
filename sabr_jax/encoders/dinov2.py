"""DINOv2 with registers (Darcet et al. 2024) in Flax NNX: the frozen video encoder.

SABR-CLIMB conditions its diffusion model on the patch tokens of a frozen
DINOv2 ViT-L/14 with 4 registers, computed once per video frame at 280x490
pixels (20x35 = 700 patches; 490x280 for portrait video). This module

* defines the ViT (`Dinov2Config`, `Dinov2Model`) for the four public sizes
  S/14, B/14, L/14 and g/14 (SwiGLU FFN), all with LayerScale;
* loads the public checkpoints (`load`): a HuggingFace folder or
  `.safetensors` file (`facebook/dinov2-with-registers-*`) or a torch-hub
  `dinov2_vit{s,b,l,g}14_reg4_pretrain.pth` state dict;
* preprocesses uint8 video frames exactly like the reference (`preprocess`)
  and encodes them in batches (`encode_frames`).

Numerical conventions follow the reference implementations (HF
`Dinov2WithRegistersModel` and the torch-hub `dinov2` code, which agree for
the register models):

* Position embeddings are learnt on a 37x37 grid (518 px) and resized to the
  input's patch grid with `torch.nn.functional.interpolate(mode="bicubic",
  align_corners=False, antialias=True)`, given an output *size* (the hub's
  register models use `interpolate_offset=0`, so no scale-factor kludge).
  With `antialias=True` torch uses its separable antialiasing path, whose
  cubic kernel has a = -0.5 (Pillow's), not the a = -0.75 of the plain bicubic
  path, and whose support widens by the scale factor when downsampling.
  `jax.image.resize` differs from both, so we build the interpolation matrices
  in numpy with the same float32 arithmetic as torch (`resize_matrix`) and
  apply them with einsums; they match torch to ~5e-7.
* Frames are resized with the same antialiased kernel machinery in its
  bilinear form (torchvision's tensor resize with `antialias=True` ==
  `interpolate(mode="bilinear", antialias=True, align_corners=False)`), on
  float pixels in [0, 1], then ImageNet-normalised.
* LayerNorm epsilon 1e-6, exact (erf) GELU, attention scale head_dim**-0.5.

Layout: pixels and tokens are channels-last, [N, H, W, 3] and [N, T, D].
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "CONFIGS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CheckpointError",
    "Dinov2Config",
    "Dinov2Encoder",
    "Dinov2Model",
    "encode_frames",
    "load",
    "preprocess",
    "random_encoder",
    "resize_matrix",
    "target_size",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The paper's encoder input: 280x490 pixels = 20x35 patches of 14 px.
LANDSCAPE_SIZE = (280, 490)
PORTRAIT_SIZE = (490, 280)

_HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Dinov2Config:
    """Architecture of a DINOv2-with-registers ViT.

    Attributes:
      width: token width D.
      depth: number of transformer blocks.
      num_heads: attention heads (DINOv2 always uses head_dim = 64).
      patch_size: patch side in pixels (14).
      mlp_ratio: FFN width / D before the SwiGLU 2/3 rule.
      num_registers: register tokens R (4 for the public checkpoints).
      ffn: "mlp" (fc1-GELU-fc2) or "swiglu" (ViT-g).
      layerscale: per-channel residual scales (LayerScale) present.
      eps: LayerNorm epsilon.
      pos_grid: side of the square patch grid the position embedding was
        trained on (518 px / 14 = 37 for the public checkpoints).
      ffn_hidden: explicit FFN hidden width; None derives it from mlp_ratio
        (SwiGLU: 2/3 of it rounded up to a multiple of 8, like the reference).
    """

    width: int
    depth: int
    num_heads: int
    patch_size: int = 14
    mlp_ratio: float = 4.0
    num_registers: int = 4
    ffn: str = "mlp"
    layerscale: bool = True
    eps: float = 1e-6
    pos_grid: int = 37
    ffn_hidden: int | None = None

    def __post_init__(self):
        if self.ffn not in ("mlp", "swiglu"):
            raise ValueError(f"ffn must be 'mlp' or 'swiglu', got {self.ffn!r}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")

    @property
    def hidden(self) -> int:
        """FFN hidden width (for SwiGLU: the width of each of the two branches)."""
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        hidden = int(self.width * self.mlp_ratio)
        if self.ffn == "swiglu":
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        return hidden

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


CONFIGS: dict[str, Dinov2Config] = {
    "s": Dinov2Config(width=384, depth=12, num_heads=6),
    "b": Dinov2Config(width=768, depth=12, num_heads=12),
    "l": Dinov2Config(width=1024, depth=24, num_heads=16),
    "g": Dinov2Config(width=1536, depth=40, num_heads=24, ffn="swiglu"),
}


# --------------------------------------------------------------------------
# Resizing: torch's antialiased separable interpolation, as matrices
# --------------------------------------------------------------------------


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


def _resize_2d(x: jax.Array, out_h: int, out_w: int, kind: str) -> jax.Array:
    """Resize [..., H, W, C] to [..., out_h, out_w, C] with torch's AA kernel (float32)."""
    h, w = x.shape[-3], x.shape[-2]
    if (h, w) == (out_h, out_w) and kind == "linear":
        return x  # the linear kernel at scale 1 is the identity
    rows = jnp.asarray(resize_matrix(h, out_h, kind))
    cols = jnp.asarray(resize_matrix(w, out_w, kind))
    x = jnp.einsum("...hwc,vw->...hvc", x, cols, precision=_HIGHEST)
    return jnp.einsum("...hvc,uh->...uvc", x, rows, precision=_HIGHEST)


def target_size(height: int, width: int) -> tuple[int, int]:
    """Encoder input size for a frame: 280x490, or 490x280 when portrait (H > W)."""
    return PORTRAIT_SIZE if height > width else LANDSCAPE_SIZE


@partial(jax.jit, static_argnames=("size",))
def preprocess(frames: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
    """uint8 video frames -> normalised encoder pixels.

    Args:
      frames: uint8 [N, H, W, 3] RGB frames.
      size: (height, width) in pixels; default `target_size(H, W)`: 280x490,
        or 490x280 for portrait frames (H > W).

    Returns:
      float32 [N, height, width, 3]: pixels scaled to [0, 1], resized with
      antialiased bilinear interpolation (== torchvision's tensor resize with
      antialias=True), then normalised per channel with the ImageNet mean and
      std. Jitted; compiled once per input shape.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [N, H, W, 3], got shape {frames.shape}")
    out_h, out_w = size if size is not None else target_size(frames.shape[1], frames.shape[2])
    x = frames.astype(jnp.float32) / 255.0
    x = _resize_2d(x, out_h, out_w, "linear")
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)
    return (x - mean) / std


# --------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------


def _layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis, statistics in float32; returns float32."""
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)


def _attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Softmax attention, scale head_dim**-0.5: q, k, v [N, T, heads, hd] -> [N, T, heads, hd].

    On NVIDIA GPUs in bf16/fp16: cuDNN flash attention via
    `jax.nn.dot_product_attention(implementation="cudnn")`, falling back to
    XLA where cuDNN refuses the shapes; on other accelerators: XLA. On CPU, XLA would materialise all N * heads [T, T] logits at once
    (48 MB for 4 frames of ViT-S) and stream them through memory for the
    softmax and the second matmul; instead we loop over heads (and over groups
    of frames when N is large), reading each head straight out of the
    [N, T, heads, hd] layout, so that one step's logits stay cache-sized.
    1.4-3.5x faster than the all-at-once version at T = 705 (ViT-L, ViT-S on
    2 cores); same numbers to float rounding.
    """
    backend = jax.default_backend()
    if backend == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        try:
            return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
        except Exception:  # cuDNN missing or these shapes unsupported: XLA below
            pass
    if backend != "cpu":
        return jax.nn.dot_product_attention(q, k, v)
    n, t, heads, hd = q.shape
    q = q * jnp.asarray(hd**-0.5, q.dtype)
    frames_per_step = max(1, (2 << 20) // (t * t))  # ~8 MB of float32 logits per step

    def one_frame(qkv):
        q, k, v = qkv  # [T, hd] each
        logits = jnp.dot(q, k.T, preferred_element_type=jnp.float32)
        weights = jnp.exp(logits - logits.max(-1, keepdims=True))
        out = jnp.dot(weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return (out / weights.sum(-1, keepdims=True)).astype(q.dtype)

    def one_head(h):
        q_h, k_h, v_h = (jax.lax.dynamic_index_in_dim(x, h, axis=2, keepdims=False) for x in (q, k, v))
        return jax.lax.map(one_frame, (q_h, k_h, v_h), batch_size=frames_per_step)  # [N, T, hd]

    out = jax.lax.map(one_head, jnp.arange(heads))  # [heads, N, T, hd]
    return out.transpose(1, 2, 0, 3)


def _dense(x: jax.Array, kernel: jax.Array, bias: jax.Array, dtype) -> jax.Array:
    """x @ kernel + bias in the compute dtype."""
    return jnp.dot(x.astype(dtype), kernel.astype(dtype)) + bias.astype(dtype)


class Dinov2Blocks(nnx.Module):
    """The `depth` pre-norm transformer blocks, parameters stacked on a leading axis.

    Applied with `jax.lax.scan`: one compiled block body, so compile time does
    not grow with depth (ViT-g has 40 blocks). Per block, with x [N, T, D]:

        x = x + ls1 * proj(attention(norm1(x)))
        x = x + ls2 * ffn(norm2(x))

    where attention uses a fused qkv projection and `_attention` (cuDNN/XLA
    `jax.nn.dot_product_attention` on accelerators, a cache-blocked loop on CPU), and ffn is
    fc2(gelu(fc1(x))) or, for SwiGLU, fc2(silu(a) * b) with [a, b] = fc1(x).
    Kernels are [in, out] (the transpose of torch's Linear weight).
    """

    def __init__(self, config: Dinov2Config, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        d, h, n = config.width, config.hidden, config.depth
        fc1_out = 2 * h if config.ffn == "swiglu" else h
        normal = nnx.initializers.truncated_normal(stddev=0.02)

        def kernel(*shape):  # drawn in float32 so that the weights do not depend on param_dtype
            return nnx.Param(normal(rngs.params(), (n, *shape)).astype(param_dtype))

        def const(value, *shape):
            return nnx.Param(jnp.full((n, *shape), value, param_dtype))

        self.norm1_scale, self.norm1_bias = const(1.0, d), const(0.0, d)
        self.qkv_kernel, self.qkv_bias = kernel(d, 3 * d), const(0.0, 3 * d)
        self.proj_kernel, self.proj_bias = kernel(d, d), const(0.0, d)
        self.norm2_scale, self.norm2_bias = const(1.0, d), const(0.0, d)
        self.fc1_kernel, self.fc1_bias = kernel(d, fc1_out), const(0.0, fc1_out)
        self.fc2_kernel, self.fc2_bias = kernel(h, d), const(0.0, d)
        if config.layerscale:
            self.ls1, self.ls2 = const(1.0, d), const(1.0, d)
        self.config = config

    def __call__(self, x: jax.Array, dtype=jnp.float32) -> jax.Array:
        """x: float32 [N, T, D] residual stream -> float32 [N, T, D]."""
        params = {
            name: value[...]
            for name, value in vars(self).items()
            if isinstance(value, nnx.Param)
        }

        def body(x, p):
            return self._block(x, p, dtype), None

        x, _ = jax.lax.scan(body, x, params)
        return x

    def _block(self, x: jax.Array, p: Mapping[str, jax.Array], dtype) -> jax.Array:
        c = self.config
        n, t, d = x.shape

        y = _layer_norm(x, p["norm1_scale"], p["norm1_bias"], c.eps)
        qkv = _dense(y, p["qkv_kernel"], p["qkv_bias"], dtype).reshape(n, t, 3, c.num_heads, c.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [N, T, heads, head_dim]
        y = _attention(q, k, v).reshape(n, t, d)
        y = _dense(y, p["proj_kernel"], p["proj_bias"], dtype).astype(jnp.float32)
        x = x + (y * p["ls1"].astype(jnp.float32) if c.layerscale else y)

        y = _layer_norm(x, p["norm2_scale"], p["norm2_bias"], c.eps)
        y = _dense(y, p["fc1_kernel"], p["fc1_bias"], dtype)
        if c.ffn == "swiglu":
            gate, up = jnp.split(y, 2, axis=-1)
            y = jax.nn.silu(gate) * up
        else:
            y = jax.nn.gelu(y, approximate=False)
        y = _dense(y, p["fc2_kernel"], p["fc2_bias"], dtype).astype(jnp.float32)
        return x + (y * p["ls2"].astype(jnp.float32) if c.layerscale else y)


class Dinov2Model(nnx.Module):
    """DINOv2 with registers, inference only (no dropout, drop-path or masking).

    Call on normalised pixels [N, H, W, 3] (H, W multiples of 14); returns a
    dict of final-LayerNorm outputs:

      patch_tokens     [N, (H/14) * (W/14), D]  row-major over the patch grid
      cls_token        [N, D]
      register_tokens  [N, R, D]

    Token sequence inside: [CLS, R registers, patches]; the position embedding
    (CLS + patch grid) is added before the registers are inserted, so registers
    carry no position.

    Args:
      config: architecture.
      dtype: compute dtype of the matmuls (float32, or bfloat16 on
        accelerators); LayerNorm, softmax and the residual stream stay float32.
      param_dtype: storage dtype of the parameters.
      rngs: initialisation randomness (weights are normally loaded by `load`).
    """

    def __init__(
        self, config: Dinov2Config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs
    ):
        d, p = config.width, config.patch_size
        normal = nnx.initializers.truncated_normal(stddev=0.02)
        self.config = config
        self.dtype = dtype
        # Patch embedding: a stride-p conv == a matmul on flattened (py, px, c) patches.
        self.patch_kernel = nnx.Param(normal(rngs.params(), (p * p * 3, d)).astype(param_dtype))
        self.patch_bias = nnx.Param(jnp.zeros((d,), param_dtype))
        self.cls_token = nnx.Param(normal(rngs.params(), (d,)).astype(param_dtype))
        self.register_tokens = nnx.Param(normal(rngs.params(), (config.num_registers, d)).astype(param_dtype))
        # Row 0: the CLS position; rows 1..: the pos_grid x pos_grid patch grid, row-major.
        self.pos_embed = nnx.Param(normal(rngs.params(), (1 + config.pos_grid**2, d)).astype(param_dtype))
        self.blocks = Dinov2Blocks(config, param_dtype=param_dtype, rngs=rngs)
        self.norm_scale = nnx.Param(jnp.ones((d,), param_dtype))
        self.norm_bias = nnx.Param(jnp.zeros((d,), param_dtype))

    def position_embedding(self, grid_h: int, grid_w: int) -> jax.Array:
        """float32 [1 + grid_h * grid_w, D]: CLS position + patch positions for a grid.

        Like the reference, the learnt square grid is used as is when the
        requested grid is the same square, and otherwise resized with torch's
        antialiased bicubic (`resize_matrix(..., "cubic")`).
        """
        pos = self.pos_embed[...].astype(jnp.float32)
        m = self.config.pos_grid
        if grid_h == grid_w == m:
            return pos
        grid = pos[1:].reshape(m, m, -1)
        grid = _resize_2d(grid, grid_h, grid_w, "cubic")
        return jnp.concatenate([pos[:1], grid.reshape(grid_h * grid_w, -1)], axis=0)

    def __call__(self, pixels: jax.Array) -> dict[str, jax.Array]:
        c = self.config
        n, height, width, channels = pixels.shape
        p = c.patch_size
        if height % p or width % p or channels != 3:
            raise ValueError(f"pixels must be [N, H, W, 3] with H, W multiples of {p}, got {pixels.shape}")
        gh, gw = height // p, width // p

        patches = pixels.reshape(n, gh, p, gw, p, 3).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(n, gh * gw, p * p * 3)
        x = _dense(patches, self.patch_kernel[...], self.patch_bias[...], self.dtype).astype(jnp.float32)

        cls = jnp.broadcast_to(self.cls_token[...].astype(jnp.float32), (n, 1, c.width))
        x = jnp.concatenate([cls, x], axis=1) + self.position_embedding(gh, gw)
        registers = jnp.broadcast_to(
            self.register_tokens[...].astype(jnp.float32), (n, c.num_registers, c.width)
        )
        x = jnp.concatenate([x[:, :1], registers, x[:, 1:]], axis=1)

        x = self.blocks(x, self.dtype)
        x = _layer_norm(x, self.norm_scale[...], self.norm_bias[...], c.eps).astype(self.dtype)
        r = c.num_registers
        return {
            "patch_tokens": x[:, 1 + r :],
            "cls_token": x[:, 0],
            "register_tokens": x[:, 1 : 1 + r],
        }


class Dinov2Encoder:
    """A frozen, jitted `Dinov2Model`: what `load` and `random_encoder` return.

    `encoder(pixels)` takes normalised float pixels [N, H, W, 3] (H, W
    multiples of 14, e.g. from `preprocess`) and returns the dict of
    `Dinov2Model.__call__` (patch_tokens [N, H/14 * W/14, D], cls_token [N, D],
    register_tokens [N, R, D], in the compute dtype). One compilation per input
    shape; the weights are passed as arguments, not baked into the program.
    Use `.model` to embed the NNX module in your own code.
    """

    def __init__(self, model: Dinov2Model):
        self.model = model
        self.config = model.config
        graphdef, self.state = nnx.split(model)

        def apply(state, pixels):
            return nnx.merge(graphdef, state)(pixels)

        self._apply = jax.jit(apply)

    @property
    def dtype(self):
        return self.model.dtype

    def __call__(self, pixels: jax.Array) -> dict[str, jax.Array]:
        return self._apply(self.state, pixels)

    def __repr__(self) -> str:
        return f"Dinov2Encoder({self.config}, dtype={jnp.dtype(self.dtype).name})"


def random_encoder(
    size: str | Dinov2Config = "s", seed: int = 0, *, dtype=jnp.float32, param_dtype=None
) -> Dinov2Encoder:
    """An encoder of a named size ("s", "b", "l", "g") or config with seeded random weights.

    For tests and pipelines without downloaded weights (`--encoder random-s`).
    Weights: truncated normal (std 0.02) kernels and embeddings, zero biases,
    unit LayerNorm scales and LayerScale.
    """
    config = CONFIGS[size.lower()] if isinstance(size, str) else size
    model = Dinov2Model(
        config, dtype=dtype, param_dtype=param_dtype or dtype, rngs=nnx.Rngs(params=seed)
    )
    return Dinov2Encoder(model)


def encode_frames(
    encoder: Dinov2Encoder,
    frames: np.ndarray | Sequence[np.ndarray],
    *,
    batch_size: int = 16,
    size: tuple[int, int] | None = None,
    out_dtype=np.float32,
) -> np.ndarray:
    """Preprocess and encode uint8 frames in batches; returns numpy patch tokens.

    Args:
      encoder: from `load` or `random_encoder`.
      frames: uint8 [N, H, W, 3] RGB frames (an array or a sequence of frames).
      batch_size: frames per encoder call; the last batch is padded so that
        every call has the same shape (one compilation).
      size: encoder input (height, width); default 280x490 or 490x280 for
        portrait frames (see `target_size`).
      out_dtype: numpy dtype of the result (e.g. `ml_dtypes.bfloat16` for storage).

    Returns:
      [N, P, D] patch tokens (P = 700 at 280x490), after the final LayerNorm.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4:
        raise ValueError(f"frames must be uint8 [N, H, W, 3], got {frames.dtype} {frames.shape}")
    size = size or target_size(frames.shape[1], frames.shape[2])
    n = len(frames)
    outputs = []
    for start in range(0, n, batch_size):
        batch = frames[start : start + batch_size]
        count = len(batch)
        if count < batch_size and n > batch_size:
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - count, axis=0)])
        tokens = encoder(preprocess(jnp.asarray(batch), size=size))["patch_tokens"]
        outputs.append(np.asarray(tokens[:count].astype(jnp.float32)).astype(out_dtype))
    if not outputs:
        p = encoder.config.patch_size
        return np.zeros((0, (size[0] // p) * (size[1] // p), encoder.config.width), out_dtype)
    return np.concatenate(outputs)


# --------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------


class CheckpointError(ValueError):
    """A checkpoint lacks a tensor, has one of the wrong shape, or cannot be understood."""


# Our parameter names (see Dinov2Model / Dinov2Blocks) -> how to build them.
# A `_Source` lists the checkpoint tensors (name, expected shape) that make one
# of our arrays and the function that combines them into our layout.
@dataclasses.dataclass(frozen=True)
class _Source:
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    convert: Callable[..., np.ndarray]


def _linear_t(w: np.ndarray) -> np.ndarray:
    """torch Linear weight [out, in] -> our kernel [in, out]."""
    return w.T


def _concat_linear_t(*ws: np.ndarray) -> np.ndarray:
    """Several torch Linear weights (e.g. q, k, v) -> one fused kernel [in, sum(out)]."""
    return np.concatenate([w.T for w in ws], axis=1)


def _concat(*bs: np.ndarray) -> np.ndarray:
    return np.concatenate(bs)


def _conv_to_patch_kernel(w: np.ndarray) -> np.ndarray:
    """Conv weight [D, 3, p, p] -> [p * p * 3, D] matching our (py, px, c) patch flattening."""
    d = w.shape[0]
    return w.transpose(2, 3, 1, 0).reshape(-1, d)


def _vector(x: np.ndarray) -> np.ndarray:
    """[1, 1, D] -> [D]."""
    return x.reshape(-1)


def _rows(x: np.ndarray) -> np.ndarray:
    """[1, T, D] -> [T, D]."""
    return x.reshape(-1, x.shape[-1])


def _same(x: np.ndarray) -> np.ndarray:
    return x


def _embedding_sources(c: Dinov2Config, names: Mapping[str, str]) -> dict[str, _Source]:
    d, p = c.width, c.patch_size
    return {
        "patch_kernel": _Source((names["patch_w"],), ((d, 3, p, p),), _conv_to_patch_kernel),
        "patch_bias": _Source((names["patch_b"],), ((d,),), _same),
        "cls_token": _Source((names["cls"],), ((1, 1, d),), _vector),
        "register_tokens": _Source((names["reg"],), ((1, c.num_registers, d),), _rows),
        "pos_embed": _Source((names["pos"],), ((1, 1 + c.pos_grid**2, d),), _rows),
        "norm_scale": _Source((names["norm_w"],), ((d,),), _same),
        "norm_bias": _Source((names["norm_b"],), ((d,),), _same),
    }


def _hf_sources(
    c: Dinov2Config, modern: bool = False
) -> tuple[dict[str, _Source], dict[str, Callable[[int], _Source]]]:
    """The HuggingFace `Dinov2WithRegistersModel` checkpoint layout.

    `modern=False`: the names on the Hub and written by `save_pretrained`
    (attention.attention.query, mlp.weights_in, ...). `modern=True`: the
    in-memory names of transformers >= 5 (attention.q_proj, mlp.gate_proj,
    ...), found in a raw `state_dict()` dump.
    """
    d, h = c.width, c.hidden
    top = _embedding_sources(
        c,
        {
            "patch_w": "embeddings.patch_embeddings.projection.weight",
            "patch_b": "embeddings.patch_embeddings.projection.bias",
            "cls": "embeddings.cls_token",
            "reg": "embeddings.register_tokens",
            "pos": "embeddings.position_embeddings",
            "norm_w": "layernorm.weight",
            "norm_b": "layernorm.bias",
        },
    )
    pre = "encoder.layer.{}."
    if modern:
        qkv = tuple(f"attention.{n}_proj" for n in "qkv")
        proj = "attention.o_proj"
    else:
        qkv = tuple(f"attention.attention.{n}" for n in ("query", "key", "value"))
        proj = "attention.output.dense"
    if c.ffn == "swiglu":  # fc1 = [gate; up] along the output axis
        fc1 = ("mlp.gate_proj", "mlp.up_proj") if modern else ("mlp.weights_in",)
        fc2 = "mlp.down_proj" if modern else "mlp.weights_out"
    else:
        fc1, fc2 = ("mlp.fc1",), "mlp.fc2"
    fc1_out = (2 * h if c.ffn == "swiglu" else h) // len(fc1)

    def one(suffix, shape, convert=_same):
        return lambda i: _Source((pre.format(i) + suffix,), (shape,), convert)

    def fused(modules, suffix, shape, convert):
        return lambda i: _Source(
            tuple(pre.format(i) + f"{m}.{suffix}" for m in modules), (shape,) * len(modules), convert
        )

    per_layer = {
        "norm1_scale": one("norm1.weight", (d,)),
        "norm1_bias": one("norm1.bias", (d,)),
        "qkv_kernel": fused(qkv, "weight", (d, d), _concat_linear_t),
        "qkv_bias": fused(qkv, "bias", (d,), _concat),
        "proj_kernel": one(proj + ".weight", (d, d), _linear_t),
        "proj_bias": one(proj + ".bias", (d,)),
        "norm2_scale": one("norm2.weight", (d,)),
        "norm2_bias": one("norm2.bias", (d,)),
        "fc1_kernel": fused(fc1, "weight", (fc1_out, d), _concat_linear_t),
        "fc1_bias": fused(fc1, "bias", (fc1_out,), _concat),
        "fc2_kernel": one(fc2 + ".weight", (d, h), _linear_t),
        "fc2_bias": one(fc2 + ".bias", (d,)),
    }
    if c.layerscale:
        per_layer |= {
            "ls1": one("layer_scale1.lambda1", (d,)),
            "ls2": one("layer_scale2.lambda1", (d,)),
        }
    return top, per_layer


def _hub_sources(c: Dinov2Config) -> tuple[dict[str, _Source], dict[str, Callable[[int], _Source]]]:
    """The torch-hub `facebookresearch/dinov2` state-dict layout (`*_reg4_pretrain.pth`)."""
    d, h = c.width, c.hidden
    top = _embedding_sources(
        c,
        {
            "patch_w": "patch_embed.proj.weight",
            "patch_b": "patch_embed.proj.bias",
            "cls": "cls_token",
            "reg": "register_tokens",
            "pos": "pos_embed",
            "norm_w": "norm.weight",
            "norm_b": "norm.bias",
        },
    )
    pre = "blocks.{}."

    def one(suffix, shape, convert=_same):
        return lambda i: _Source((pre.format(i) + suffix,), (shape,), convert)

    if c.ffn == "swiglu":  # w12 = [gate; up] along the output axis
        fc1, fc2, fc1_out = "mlp.w12", "mlp.w3", 2 * h
    else:
        fc1, fc2, fc1_out = "mlp.fc1", "mlp.fc2", h
    per_layer = {
        "norm1_scale": one("norm1.weight", (d,)),
        "norm1_bias": one("norm1.bias", (d,)),
        "qkv_kernel": one("attn.qkv.weight", (3 * d, d), _linear_t),
        "qkv_bias": one("attn.qkv.bias", (3 * d,)),
        "proj_kernel": one("attn.proj.weight", (d, d), _linear_t),
        "proj_bias": one("attn.proj.bias", (d,)),
        "norm2_scale": one("norm2.weight", (d,)),
        "norm2_bias": one("norm2.bias", (d,)),
        "fc1_kernel": one(fc1 + ".weight", (fc1_out, d), _linear_t),
        "fc1_bias": one(fc1 + ".bias", (fc1_out,)),
        "fc2_kernel": one(fc2 + ".weight", (d, h), _linear_t),
        "fc2_bias": one(fc2 + ".bias", (d,)),
    }
    if c.layerscale:
        per_layer |= {"ls1": one("ls1.gamma", (d,)), "ls2": one("ls2.gamma", (d,))}
    return top, per_layer


_LAYOUTS = {"hf": _hf_sources, "hf-modern": partial(_hf_sources, modern=True), "hub": _hub_sources}
# Tensors that the checkpoints carry and inference does not use.
_UNUSED = {"embeddings.mask_token", "mask_token"}


class _Tensors:
    """Lazy name -> numpy array access to a checkpoint, with shapes available up front."""

    def __init__(self, path: str, shapes: dict[str, tuple[int, ...]], get: Callable[[str], np.ndarray]):
        self.path, self.shapes, self._get = path, shapes, get

    def __getitem__(self, name: str) -> np.ndarray:
        return self._get(name)


def _open_safetensors(path: str) -> _Tensors:
    from safetensors import safe_open  # numpy API: no torch needed

    handle = safe_open(path, framework="numpy")
    shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    return _Tensors(path, shapes, handle.get_tensor)


def _open_torch(path: str) -> _Tensors:
    import torch  # only this path needs torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "teacher"):  # common wrappers around a state dict
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}")
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}

    def get(name):
        t = state[name].detach()
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()

    return _Tensors(path, {k: tuple(v.shape) for k, v in state.items()}, get)


def _normalise_names(tensors: _Tensors) -> tuple[str, dict[str, str]]:
    """Detect the layout and map canonical names to the file's names.

    Strips a common prefix (e.g. "dinov2_with_registers." or "backbone.") found
    in front of the CLS token, and flattens the hub's chunked block names
    ("blocks.<chunk>.<i>.") to "blocks.<i>.".
    """
    cls_names = [k for k in tensors.shapes if k.endswith("cls_token")]
    if len(cls_names) != 1:
        raise CheckpointError(
            f"{tensors.path}: cannot find a single CLS token tensor ('cls_token' or "
            f"'embeddings.cls_token'); found {cls_names or 'none'}. Is this a DINOv2 checkpoint?"
        )
    cls_name = cls_names[0]
    if cls_name.endswith("embeddings.cls_token"):
        layout, prefix = "hf", cls_name[: -len("embeddings.cls_token")]
        if any(k.endswith("attention.q_proj.weight") for k in tensors.shapes):
            layout = "hf-modern"
    else:
        layout, prefix = "hub", cls_name[: -len("cls_token")]
    names = {}
    for name in tensors.shapes:
        if name.startswith(prefix):
            canonical = name[len(prefix) :]
            if layout == "hub":
                canonical = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", canonical)
            names[canonical] = name
    return layout, names


def _infer_config(layout: str, shapes: Mapping[str, tuple[int, ...]], num_heads: int | None) -> Dinov2Config:
    """Architecture from tensor shapes (canonical names). Heads: width / 64 unless given."""
    if layout.startswith("hf"):
        cls, patch, reg, pos = (
            "embeddings.cls_token",
            "embeddings.patch_embeddings.projection.weight",
            "embeddings.register_tokens",
            "embeddings.position_embeddings",
        )
        layer_re = r"^encoder\.layer\.(\d+)\."
    else:
        cls, patch, reg, pos = "cls_token", "patch_embed.proj.weight", "register_tokens", "pos_embed"
        layer_re = r"^blocks\.(\d+)\."
    for name in (cls, patch, reg, pos):
        if name not in shapes:
            raise CheckpointError(f"tensor '{name}' is missing")
    width = shapes[cls][-1]
    depth = 1 + max((int(m.group(1)) for k in shapes if (m := re.match(layer_re, k))), default=-1)
    if depth == 0:
        raise CheckpointError("no transformer blocks found")

    # Decide the FFN type and LayerScale from any block, so that a tensor missing
    # from one block is reported as missing rather than changing the architecture.
    def first(pattern):
        return next((shapes[k] for k in sorted(shapes) if re.search(pattern, k)), None)

    swiglu_fused = first(r"\.mlp\.(w12|weights_in)\.weight$")  # [2 * hidden, D]
    swiglu_gate = first(r"\.mlp\.gate_proj\.weight$")  # [hidden, D]
    mlp_fc1 = first(r"\.mlp\.fc1\.weight$")  # [hidden, D]
    swiglu = swiglu_fused is not None or swiglu_gate is not None
    if swiglu_gate is not None:
        hidden = swiglu_gate[0]
    elif swiglu_fused is not None:
        hidden = swiglu_fused[0] // 2
    elif mlp_fc1 is not None:
        hidden = mlp_fc1[0]
    else:
        raise CheckpointError("no FFN weights found (mlp.fc1 / mlp.w12 / mlp.weights_in)")
    layerscale = first(r"\.(ls1\.gamma|layer_scale1\.lambda1)$") is not None
    pos_grid = math.isqrt(shapes[pos][-2] - 1)
    return Dinov2Config(
        width=width,
        depth=depth,
        num_heads=num_heads or max(width // 64, 1),
        patch_size=shapes[patch][-1],
        mlp_ratio=4.0 if swiglu else hidden / width,
        num_registers=shapes[reg][-2] if len(shapes[reg]) > 1 else 1,
        ffn="swiglu" if swiglu else "mlp",
        layerscale=layerscale,
        pos_grid=pos_grid,
        ffn_hidden=hidden,
    )


def _config_from_hf_json(config_path: str) -> Dinov2Config:
    with open(config_path) as f:
        cfg = json.load(f)
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{config_path}: hidden_act {cfg['hidden_act']!r} is not supported (gelu)")
    if not cfg.get("qkv_bias", True):
        raise CheckpointError(f"{config_path}: qkv_bias=false is not supported")
    image, patch = cfg.get("image_size", 518), cfg.get("patch_size", 14)
    image = image[0] if isinstance(image, (list, tuple)) else image
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    width, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    if cfg.get("head_dim", width // heads) * heads != width:
        raise CheckpointError(f"{config_path}: head_dim * num_attention_heads != hidden_size")
    return Dinov2Config(
        width=width,
        depth=cfg["num_hidden_layers"],
        num_heads=heads,
        patch_size=patch,
        mlp_ratio=float(cfg.get("mlp_ratio", 4)),
        num_registers=cfg.get("num_register_tokens", 4),
        ffn="swiglu" if cfg.get("use_swiglu_ffn", False) else "mlp",
        # HF always has LayerScale; a checkpoint without it is an error worth reporting.
        layerscale=True,
        eps=float(cfg.get("layer_norm_eps", 1e-6)),
        pos_grid=image // patch,
    )


def _read_arrays(
    tensors: _Tensors, layout: str, names: Mapping[str, str], config: Dinov2Config
) -> dict[str, np.ndarray]:
    """Our parameter name -> numpy array (blocks stacked), with name/shape checks."""
    top, per_layer = _LAYOUTS[layout](config)
    used = set()

    def build(source: _Source) -> np.ndarray:
        parts = []
        for canonical, expected in zip(source.names, source.shapes):
            if canonical not in names:
                raise CheckpointError(
                    f"{tensors.path}: tensor '{canonical}' is missing (expected shape {expected}, "
                    f"{layout} layout, {config.depth} blocks)"
                )
            found = tensors.shapes[names[canonical]]
            if tuple(found) != tuple(expected):
                raise CheckpointError(
                    f"{tensors.path}: tensor '{names[canonical]}' has shape {tuple(found)}, "
                    f"expected {tuple(expected)} (for {config})"
                )
            used.add(canonical)
            parts.append(np.asarray(tensors[names[canonical]], dtype=np.float32))
        return source.convert(*parts)

    arrays = {name: build(source) for name, source in top.items()}
    for name, source_of in per_layer.items():
        arrays["blocks." + name] = np.stack([build(source_of(i)) for i in range(config.depth)])
    unused = sorted(set(names) - used - _UNUSED)
    if unused:
        warnings.warn(f"{tensors.path}: ignoring {len(unused)} unused tensors, e.g. {unused[:5]}")
    return arrays


def _model_from_arrays(
    config: Dinov2Config, arrays: Mapping[str, np.ndarray], dtype, param_dtype
) -> Dinov2Model:
    """Build a Dinov2Model without random init and fill it with `arrays`."""
    model = nnx.eval_shape(
        lambda: Dinov2Model(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    )
    graphdef, abstract = nnx.split(model)
    flat = []
    for path, variable in nnx.to_flat_state(abstract):
        name = ".".join(str(k) for k in path)
        expected = variable.get_value().shape
        if arrays[name].shape != expected:  # guarded by _read_arrays; an internal invariant
            raise AssertionError(f"{name}: {arrays[name].shape} != {expected}")
        flat.append((path, variable.replace(jnp.asarray(arrays[name], dtype=param_dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load(
    path: str | os.PathLike,
    *,
    dtype=jnp.float32,
    param_dtype=None,
    num_heads: int | None = None,
) -> Dinov2Encoder:
    """Load a public DINOv2-with-registers checkpoint into a ready, frozen encoder.

    Args:
      path: one of
        * a HuggingFace model folder (`config.json` + `model.safetensors`),
          e.g. a download of `facebook/dinov2-with-registers-large`;
        * a `.safetensors` file in that layout (a `config.json` beside it is
          used when present, otherwise the architecture comes from the tensor
          shapes);
        * a torch-hub state dict `dinov2_vit{s,b,l,g}14_reg4_pretrain.pth`
          (needs torch; read with `weights_only=True`, so nothing executes).
      dtype: compute dtype (float32; bfloat16 on accelerators).
      param_dtype: parameter storage dtype; default: `dtype`.
      num_heads: attention heads when they cannot be read from a config.json
        (default width / 64, true of every public DINOv2).

    Returns:
      a `Dinov2Encoder`: `encoder(pixels)` -> {patch_tokens, cls_token,
      register_tokens}.

    Raises:
      CheckpointError: a tensor is missing or misshapen (the message names the
        tensor, the expected and found shapes and the file), or the file is
        not a DINOv2 checkpoint.
      FileNotFoundError: `path` does not exist.
    """
    path = os.fspath(path)
    config_json = None
    if os.path.isdir(path):
        config_json = os.path.join(path, "config.json")
        weights = os.path.join(path, "model.safetensors")
        if not os.path.exists(weights):
            raise FileNotFoundError(f"{path}: no model.safetensors in this folder")
        if not os.path.exists(config_json):
            config_json = None
    elif os.path.exists(path):
        weights = path
        sibling = os.path.join(os.path.dirname(path), "config.json")
        if path.endswith(".safetensors") and os.path.exists(sibling):
            config_json = sibling
    else:
        raise FileNotFoundError(path)

    tensors = _open_safetensors(weights) if weights.endswith(".safetensors") else _open_torch(weights)
    layout, names = _normalise_names(tensors)
    shapes = {canonical: tensors.shapes[name] for canonical, name in names.items()}
    if layout.startswith("hf") and config_json is not None:
        config = _config_from_hf_json(config_json)
    else:
        try:
            config = _infer_config(layout, shapes, num_heads)
        except CheckpointError as e:
            raise CheckpointError(f"{weights}: {e}") from None
    arrays = _read_arrays(tensors, layout, names, config)
    param_dtype = param_dtype or dtype
    return Dinov2Encoder(_model_from_arrays(config, arrays, dtype, param_dtype))
