"""DINOv2 with registers (Darcet et al. 2024): the frozen video encoder's front end.

SABR-CLIMB conditions its diffusion model on the patch tokens of a frozen
DINOv2 ViT-L/14 with 4 registers, computed once per video frame at 280x490
pixels (20x35 = 700 patches; 490x280 for portrait video). This module is the
entry point:

* `load` a public checkpoint (a HuggingFace folder or `.safetensors` file,
  `facebook/dinov2-with-registers-*`, or a torch-hub
  `dinov2_vit{s,b,l,g}14_reg4_pretrain.pth` state dict; see
  `dinov2_checkpoint`), or build a `random_encoder` with seeded weights (the
  `random-s` / `random-tiny` encoders of tests and demos);
* `preprocess` uint8 video frames exactly like the reference: resized on float
  pixels in [0, 1] with torch's antialiased bilinear kernel (torchvision's
  tensor resize with `antialias=True`; see `resize`), then
  ImageNet-normalised;
* `encode_frames`: preprocess and encode frames in fixed-shape batches.

The ViT itself (`Dinov2Config`, `CONFIGS` for the sizes S/B/L/g,
`Dinov2Model`, the jitted `Dinov2Encoder`) is in `dinov2_model`.

Layout: pixels and tokens are channels-last, [N, H, W, 3] and [N, T, D].
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sabr_jax.encoders.dinov2_checkpoint import CheckpointError, load
from sabr_jax.encoders.dinov2_model import CONFIGS, Dinov2Config, Dinov2Encoder, Dinov2Model
from sabr_jax.encoders.resize import resize_2d

__all__ = [
    "CONFIGS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CheckpointError",
    "Dinov2Config",
    "Dinov2Encoder",
    "encode_frames",
    "load",
    "preprocess",
    "random_encoder",
    "target_size",
]

PATCH = Dinov2Config.patch_size  # pixels per patch side (14)
# Seeded random weights instead of a checkpoint, by size (tests and demos; sabr_jax.encoders.frames.make_encoder)
RANDOM_ENCODERS = ("random-s", "random-b", "random-l", "random-g", "random-tiny")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The paper's encoder input: 280x490 pixels = 20x35 patches of 14 px.
LANDSCAPE_SIZE = (280, 490)
PORTRAIT_SIZE = (490, 280)


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
    x = resize_2d(x, out_h, out_w, "linear")
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)
    return (x - mean) / std


def random_encoder(
    size: str | Dinov2Config = "s", seed: int = 0, *, dtype=jnp.float32, param_dtype=None
) -> Dinov2Encoder:
    """An encoder of a named size ("s", "b", "l", "g") or config with seeded random weights.

    For tests and pipelines without downloaded weights (`--encoder random-s`).
    Weights: truncated normal (std 0.02) kernels and embeddings, zero biases,
    unit LayerNorm scales and LayerScale.
    """
    config = CONFIGS[size.lower()] if isinstance(size, str) else size
    model = Dinov2Model(config, dtype=dtype, param_dtype=param_dtype or dtype, rngs=nnx.Rngs(params=seed))
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
