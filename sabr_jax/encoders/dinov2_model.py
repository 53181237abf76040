"""DINOv2 with registers (Darcet et al. 2024) in Flax NNX: the ViT itself.

Holds the architecture (`Dinov2Config`, `CONFIGS` for the four public sizes
S/14, B/14, L/14 and g/14 (SwiGLU FFN), all with LayerScale), the model
(`Dinov2Model`: patch embedding, position embedding resized to the patch grid,
register tokens, the scanned transformer blocks `Dinov2Blocks`, final
LayerNorm) and its frozen, jitted wrapper `Dinov2Encoder`. Weights come from
`dinov2_checkpoint.load` or seeded random ones from `dinov2.random_encoder`.

Numerical conventions follow the reference implementations (HF
`Dinov2WithRegistersModel` and the torch-hub `dinov2` code, which agree for
the register models):

* Position embeddings are learnt on a 37x37 grid (518 px) and resized to the
  input's patch grid with torch's antialiased bicubic (`resize.resize_matrix`, exact to ~5e-7).
* LayerNorm epsilon 1e-6, exact (erf) GELU, attention scale head_dim**-0.5.

Layout: pixels and tokens are channels-last, [N, H, W, 3] and [N, T, D].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from sabr_jax.encoders.resize import resize_2d

__all__ = ["CONFIGS", "Dinov2Blocks", "Dinov2Config", "Dinov2Encoder", "Dinov2Model"]


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

    Why not `sabr_jax.model.attention.dot_product_attention`: on CPU its XLA path is 3.6-3.9x slower at T = 705 (4 frames,
    6 or 16 heads: 0.42 vs 0.12 s) and on TPU it would pick splash, which needs a mesh in context that
    `frame_encoder.FrameEncoder`'s multi-device jit does not set.
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
        params = {name: value[...] for name, value in vars(self).items() if isinstance(value, nnx.Param)}

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

    def __init__(self, config: Dinov2Config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
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
        grid = resize_2d(grid, grid_h, grid_w, "cubic")
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
        registers = jnp.broadcast_to(self.register_tokens[...].astype(jnp.float32), (n, c.num_registers, c.width))
        x = jnp.concatenate([x[:, :1], registers, x[:, 1:]], axis=1)

        x = self.blocks(x, self.dtype)
        x = _layer_norm(x, self.norm_scale[...], self.norm_bias[...], c.eps).astype(self.dtype)
        r = c.num_registers
        return {"patch_tokens": x[:, 1 + r :], "cls_token": x[:, 0], "register_tokens": x[:, 1 : 1 + r]}


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
