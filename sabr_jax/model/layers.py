"""The DiT's layers: projections as einsums with logical axis names, the adaLN modulation,
layer norm, and fixed sine-cosine position embeddings.

Every kernel carries logical axis names (sabr_jax.parallel.sharding.RULES maps them to the mesh), and
the head-split projections keep whole heads on each tensor shard.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from sabr_jax.parallel.sharding import whole

if TYPE_CHECKING:
    from sabr_jax.model.dit_config import DiTConfig

zeros = nnx.initializers.zeros_init()


def logical(init, names: tuple[str, ...]):
    """Tag an initialiser's parameter with logical axis names (no mesh needed to build the model)."""
    return nnx.with_partitioning(init, names, eager_sharding=False)


def einsum(cfg: DiTConfig, spec: str, shape: tuple[int, ...], axes: tuple[str, ...], rngs, init=None) -> nnx.Einsum:
    """A projection `spec` ('input,kernel->output'), its kernel of `shape` with logical axis
    names `axes` (sabr_jax.parallel.sharding.RULES maps them to mesh axes), ViT init: xavier-uniform
    kernel (fan in: the contracted dims; fan out: the new ones) and a zero bias over the
    kernel's dims in the output (where a bias's width is named 'embed_vec', not 'embed')."""
    lhs, kernel, out = spec.replace("->", ",").split(",")
    dims = lambda keep: tuple(i for i, ch in enumerate(kernel) if keep(ch))
    init = init or nnx.initializers.xavier_uniform(
        in_axis=dims(lambda ch: ch not in out),
        out_axis=dims(lambda ch: ch in out and ch not in lhs),
        batch_axis=dims(lambda ch: ch in out and ch in lhs),
    )
    bias = [kernel.index(ch) for ch in out if ch in kernel]
    return nnx.Einsum(
        spec,
        shape,
        tuple(shape[i] for i in bias),
        dtype=cfg.compute_dtype,
        rngs=rngs,
        kernel_init=logical(init, axes),
        bias_init=logical(zeros, tuple("embed_vec" if axes[i] == "embed" else axes[i] for i in bias)),
    )


def dense(cfg: DiTConfig, din: int, dout: int, axes: tuple[str, str], rngs, init=None) -> nnx.Einsum:
    return einsum(cfg, "...i,io->...o", (din, dout), axes, rngs, init)


def to_heads(cfg: DiTConfig, n: int | None, rngs) -> nnx.Einsum:
    """[..., D] -> [n, ..., H, Dh]: n projections fused in one matmul (q, k, v: n = 3), each split
    into heads ([..., H, Dh] with n None). The kernel [D, n, H, Dh] is sharded by heads (tensor
    axis): each shard holds whole heads of every projection, so `q, k, v = self.qkv(x)` moves
    no data between devices."""
    fused, names = ((n,), ("fused",)) if n else ((), ())
    shape, axes = (cfg.width, *fused, cfg.heads, cfg.width // cfg.heads), ("embed", *names, "heads", "head_dim")
    return einsum(cfg, "...d,dnhk->n...hk" if n else "...d,dhk->...hk", shape, axes, rngs)


def from_heads(cfg: DiTConfig, rngs, init=None) -> nnx.Einsum:
    """[..., H, Dh] -> [..., D], kernel [H, Dh, D] sharded by heads: the attention's output
    projection; each shard's heads give a partial sum, one all-reduce over the tensor axis."""
    shape = (cfg.heads, cfg.width // cfg.heads, cfg.width)
    return einsum(cfg, "...hk,hkd->...d", shape, ("heads", "head_dim", "embed"), rngs, init)


class Modulation(nnx.Module):
    """adaLN: c [B, D] -> [n, B, D] (shift, scale, gate, ...), zero-initialised. The kernel [D, n, D]
    is sharded over each one's width (tensor axis): splitting them moves no data. The small output
    is gathered whole, so the [B, L, S, D] activations it modulates stay whole (not split by width)."""

    def __init__(self, cfg: DiTConfig, n: int, rngs):
        self.linear = einsum(cfg, "bd,dne->nbe", (cfg.width, n, cfg.width), ("embed", "fused", "mod"), rngs, zeros)

    def __call__(self, c):
        return whole(self.linear(nnx.silu(c)), batch_axis=1)


def layer_norm(cfg: DiTConfig, affine: bool, rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        cfg.width,
        epsilon=1e-6,
        use_scale=affine,
        use_bias=affine,
        dtype=cfg.compute_dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
        scale_init=logical(nnx.initializers.ones_init(), ("embed_vec",)),
        bias_init=logical(zeros, ("embed_vec",)),
    )


def sincos_embedding(length: int, dim: int) -> jax.Array:
    """Fixed 1D sine-cosine position embedding [length, dim] (positions 0..length-1)."""
    omega = 1.0 / 10000 ** (jnp.arange(dim // 2, dtype=jnp.float32) / (dim // 2))
    angles = jnp.arange(length, dtype=jnp.float32)[:, None] * omega[None]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def sincos_2d_embedding(rows: int, cols: int, dim: int) -> jax.Array:
    """Fixed 2D sine-cosine position embedding [rows * cols, dim] of a row-major patch grid:
    half the channels encode the row, half the column."""
    row = jnp.repeat(sincos_embedding(rows, dim // 2), cols, axis=0)
    col = jnp.tile(sincos_embedding(cols, dim // 2), (rows, 1))
    return jnp.concatenate([row, col], axis=-1)


def modulate(x, shift, scale):
    """x [B, L, S, D]; shift, scale [B, D]."""
    return x * (1 + scale[:, None, None]) + shift[:, None, None]


class Mlp(nnx.Module):
    """[..., D] -> [..., D]: the transformer MLP (hidden width D * mlp_ratio, tanh-approximate GELU)."""

    def __init__(self, cfg: DiTConfig, rngs):
        hidden = int(cfg.width * cfg.mlp_ratio)
        self.fc1 = dense(cfg, cfg.width, hidden, ("embed", "mlp"), rngs)
        self.fc2 = dense(cfg, hidden, cfg.width, ("mlp", "embed"), rngs)

    def __call__(self, x):
        return self.fc2(nnx.gelu(self.fc1(x), approximate=True))
