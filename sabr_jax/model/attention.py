"""The one attention function of sabr_jax, with a kernel per platform.

Every self- and cross-attention of the model calls :func:`dot_product_attention`, or
:func:`group_mean_attention` (the mean of one query set's attentions to several key groups).
It computes, per example and head,

    out = softmax(q k^T * Dh**-0.5 over the keys with kv_mask True) v

and picks a kernel for the platform it is traced for:

    NVIDIA GPU  'cudnn': cuDNN flash attention (jax.nn.dot_product_attention)
                for bf16/fp16 with head size a multiple of 8 and <= 128,
                else 'xla'.
    TPU         'splash': the Pallas splash-attention kernel when both
                sequence lengths are >= 128, else 'xla' (see below).
    CPU, other  'xla': jax.nn.dot_product_attention(implementation='xla').

The platform is that of the ambient mesh's devices (`jax.set_mesh`; this also
covers compiling ahead of time for a TPU topology on a CPU host), else
`jax.default_backend()`.

Conventions shared by every kernel (the tests hold each kernel to them):

* `kv_mask[b, j] == False` removes key/value j from example b.
* A query whose keys are *all* masked returns zeros (not NaN, not the mean of
  the values) and passes no gradient.

Splash attention on TPU, what callers must know:

* It is a Mosaic kernel, which XLA does not partition. With a mesh in the
  context (`with jax.set_mesh(mesh):` around calling, tracing or lowering the
  jitted function) it runs inside `jax.shard_map` over that mesh: batch
  sharded over every mesh axis except 'tensor' (i.e. ('data', 'fsdp')), heads
  over 'tensor'; sequences and head size unsharded. Axes that do not divide
  the batch (or the heads) are left out, replicating the work over them.
  With Explicit mesh axes the inputs are resharded to that layout and the
  output back to q's. Without a mesh in the context the kernel runs
  unpartitioned, which is only right on a single device (with sharded inputs
  XLA refuses: "Mosaic kernels cannot be automatically partitioned"). Inside
  a caller's own shard_map, its manual axes are left alone; that shard_map
  needs check_vma=False (the kernel does not declare how its output varies).
* Its sequence lengths must be multiples of its 128-wide blocks: q and k/v are
  zero-padded to the next multiple of 128 (padded keys masked, padded queries
  sliced off). For short sequences that is mostly wasted work (27 slot tokens
  run as 128), so the automatic choice keeps XLA when Lq or Lk is below 128:
  then the [Lq, Lk] score matrix is at most 128/Dh times the size of q or k,
  and a flash kernel saves little memory.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from einops import rearrange, repeat
from jax.sharding import PartitionSpec as P

IMPLEMENTATIONS = ("xla", "cudnn", "splash", "splash_interpret")
MASKED_LOGIT = (
    -1e30
)  # the float32 logit of a masked key in the XLA paths (finite: a row with every key masked stays finite)

# Splash tiles sequences in blocks of 128 (the TPU lane width) or a multiple.
_SPLASH_ALIGN = 128
# Automatic choice on TPU: splash only when both lengths reach this.
_SPLASH_MIN_LEN = 128
# Mesh axis the heads are sharded over; the batch goes over all other axes.
_HEAD_AXIS = "tensor"
# group_mean_attention on a CPU: the groups merge into two large matmuls per head for key lengths
# up to _GROUP_MERGE_MAX_LEN, in chunks of groups whose float32 scores fit _GROUP_CHUNK_BYTES.
# Measured on 2 cores, forward: 1.4-3x faster than per-group attentions at 80 and 256 frames;
# 0.7-1.2x at 512 and 0.4-0.6x at 1102 (longer sequences make the per-group matmuls large).
_GROUP_MERGE_MAX_LEN = 256
_GROUP_CHUNK_BYTES = 4 << 20


def dot_product_attention(q, k, v, kv_mask=None, *, implementation=None):
    """Multi-head scaled dot-product attention (no causal mask, no dropout).

    Args:
        q: queries, [B, Lq, H, Dh].
        k: keys, [B, Lk, H, Dh].
        v: values, [B, Lk, H, Dh] (same dtype as k and q).
        kv_mask: optional bool [B, Lk]; True = the key may be attended to.
        implementation: None (choose per platform, see the module docstring),
            'xla', 'cudnn' (NVIDIA GPU only), 'splash' (TPU only) or
            'splash_interpret' (the splash kernel in Pallas interpret mode; runs on
            any backend, slowly: for tests).

    Returns:
        [B, Lq, H, Dh] in q.dtype. The softmax scale is Dh**-0.5. A query row
        whose keys are all masked returns zeros.
    """
    _check_shapes(q, k, v, kv_mask)
    if kv_mask is not None:
        kv_mask = jnp.asarray(kv_mask, dtype=bool)
    if implementation is None:
        implementation = _choose_implementation(q, k)

    if implementation == "xla":
        out = _xla_attention(q, k, v, kv_mask)
    elif implementation == "cudnn":
        out = _cudnn_attention(q, k, v, kv_mask)
    elif implementation in ("splash", "splash_interpret"):
        out = _sharded_splash_attention(q, k, v, kv_mask, interpret=implementation == "splash_interpret")
    else:
        raise ValueError(f"implementation must be None or one of {IMPLEMENTATIONS}, got {implementation!r}")

    return _zero_rows_without_keys(out, kv_mask).astype(q.dtype)


def group_mean_attention(q, k, v, kv_mask=None, *, implementation=None):
    """The mean over G key groups of the same queries' attention to each group:

        out = mean over g of dot_product_attention(q, k[:, :, g], v[:, :, g], kv_mask)

    (the authors' temporal block: each frame's query attends over time to the tokens of one
    patch position, and the P positions' results are averaged).

    Args:
        q: queries, [B, Lq, H, Dh].
        k, v: keys and values, [B, Lk, G, H, Dh].
        kv_mask: optional bool [B, Lk], shared by the groups.
        implementation: as for `dot_product_attention`.

    Returns:
        [B, Lq, H, Dh] in q.dtype; zeros where an example has no key.

    On a CPU, for key lengths up to `_GROUP_MERGE_MAX_LEN`, the queries' independence of g is used:
    each product is one matmul per example and head over all Lk * G keys, [Lq, Dh] x [Dh, Lk G]
    and [Lq, Lk G] x [Lk G, Dh], the mean folded into the second one's sum (the softmax still
    normalises over Lk within each group), in chunks of groups whose float32 scores fit
    `_GROUP_CHUNK_BYTES` (a scan over the chunks, summing). The FLOPs are those of B G H separate
    [Lq, Lk] attentions, but in large matmuls: on 2 CPU cores the 4200 separate 64-frame
    attentions of an S-size block ran at a tenth of the matmul peak. Elsewhere, and for longer
    keys, the groups are folded into the batch of one `dot_product_attention` (flash kernels then
    do not materialise the scores).
    """
    if k.ndim != 5 or k.shape != v.shape or q.ndim != 4:
        raise ValueError(
            f"expected q [B, Lq, H, Dh] and k, v [B, Lk, G, H, Dh], got q {q.shape}, k {k.shape}, v {v.shape}"
        )
    groups = k.shape[2]
    if kv_mask is not None:
        kv_mask = jnp.asarray(kv_mask, dtype=bool)
    implementation = implementation or _choose_implementation(q, k)
    merge = implementation == "xla" and _target_device()[0] == "cpu" and k.shape[1] <= _GROUP_MERGE_MAX_LEN
    if not merge:  # one attention per group, the groups folded into the batch
        fold = lambda a: rearrange(a, "b l g h d -> (b g) l h d")
        mask = None if kv_mask is None else repeat(kv_mask, "b l -> (b g) l", g=groups)
        q = repeat(q, "b l h d -> (b g) l h d", g=groups)
        out = dot_product_attention(q, fold(k), fold(v), mask, implementation=implementation)
        return rearrange(out, "(b g) l h d -> b g l h d", g=groups).mean(axis=1).astype(q.dtype)
    _check_shapes(q, k[:, :, 0], v[:, :, 0], kv_mask)
    batch, len_q, heads, _ = q.shape
    len_k = k.shape[1]
    chunk = _group_chunk(groups, _GROUP_CHUNK_BYTES // (4 * batch * heads * len_q * len_k))
    if chunk == groups:
        total = _group_sum(q, k, v, kv_mask)
    else:  # a scan over chunks of groups; zero keys and values pad the last, adding zeros to the sum
        steps = -(-groups // chunk)
        if steps * chunk != groups:
            k, v = (jnp.pad(a, ((0, 0), (0, 0), (0, steps * chunk - groups), (0, 0), (0, 0))) for a in (k, v))

        # Rematerialised: the backward pass recomputes each chunk's scores (2% more FLOPs in an S
        # train step) instead of the scan stacking every chunk's weights and key/value slices for
        # it (28% of that step's memory at 64 frames).
        @jax.checkpoint
        def add_chunk(total, i):
            k_i, v_i = (jax.lax.dynamic_slice_in_dim(a, i * chunk, chunk, axis=2) for a in (k, v))
            return total + _group_sum(q, k_i, v_i, kv_mask), None

        total, _ = jax.lax.scan(add_chunk, jnp.zeros(q.shape, jnp.float32), jnp.arange(steps))
    return _zero_rows_without_keys(total / groups, kv_mask).astype(q.dtype)


def _group_chunk(groups: int, most: int) -> int:
    """Groups per chunk, at most `most` (at least 1): a divisor of `groups` when one is more than
    half of that (no padding), else `most` (the last chunk padded)."""
    most = max(1, min(groups, most))
    divisor = max(c for c in range(1, most + 1) if groups % c == 0)
    return divisor if 2 * divisor > most else most


def _group_sum(q, k, v, kv_mask):
    """float32 [B, Lq, H, Dh]: the sum over the groups of k, v [B, Lk, G, H, Dh] of q's attention to
    each, as two matmuls per example and head over all Lk * G keys."""
    logits = jnp.einsum("bqhd,bkghd->bhqkg", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    if kv_mask is not None:
        logits = jnp.where(kv_mask[:, None, None, :, None], logits, MASKED_LOGIT)
    weights = jax.nn.softmax(logits, axis=3).astype(v.dtype)  # over the keys of each group
    return jnp.einsum("bhqkg,bkghd->bqhd", weights, v, preferred_element_type=jnp.float32)


def _zero_rows_without_keys(out, kv_mask):
    """The shared convention: an example with no key gets zeros (and passes no gradient)."""
    return out if kv_mask is None else zero_rows(out, jnp.any(kv_mask, axis=1))


def zero_rows(out, has_key):
    """out [B, ...] (or [B, L, ...]) zeroed where has_key [B] ([B, L]) is False (None: nothing zeroed);
    the zeroed rows pass no gradient."""
    if has_key is None:
        return out
    return jnp.where(has_key.reshape(has_key.shape + (1,) * (out.ndim - has_key.ndim)), out, jnp.zeros((), out.dtype))


def _check_shapes(q, k, v, kv_mask):
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(
            f"expected q [B, Lq, H, Dh] and k, v [B, Lk, H, Dh], got q {q.shape}, k {k.shape}, v {v.shape}"
        )
    if (q.shape[0], q.shape[2], q.shape[3]) != (k.shape[0], k.shape[2], k.shape[3]):
        raise ValueError(f"q {q.shape} and k {k.shape} differ in batch, heads or head size")
    if kv_mask is not None and tuple(kv_mask.shape) != (k.shape[0], k.shape[1]):
        raise ValueError(f"kv_mask must be [B, Lk] = {(k.shape[0], k.shape[1])}, got {tuple(kv_mask.shape)}")


def _target_device() -> tuple[str, str]:
    """(platform, device kind) traced for: the ambient mesh's, else the default's."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    if device is None:
        device = jax.devices()[0]
    return device.platform, device.device_kind


def _choose_implementation(q, k) -> str:
    platform, kind = _target_device()
    lq, lk, dh = q.shape[1], k.shape[1], q.shape[3]
    if platform == "tpu":
        return "splash" if min(lq, lk) >= _SPLASH_MIN_LEN else "xla"
    if platform in ("gpu", "cuda") and "amd" not in kind.lower():  # not ROCm
        cudnn_ok = q.dtype in (jnp.bfloat16, jnp.float16) and dh % 8 == 0 and dh <= 128
        return "cudnn" if cudnn_ok else "xla"
    return "xla"


# --------------------------------------------------------------------- XLA --


def _xla_attention(q, k, v, kv_mask):
    """XLA attention; the score matrix [B, H, Lq, Lk] is materialised."""
    mask = None if kv_mask is None else kv_mask[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


# ------------------------------------------------------------------- cuDNN --


def _cudnn_attention(q, k, v, kv_mask, *, implementation="cudnn"):
    """cuDNN flash attention; ``implementation`` is a seam for CPU tests.

    cuDNN takes a boolean mask only as a dense [B, H, Lq, Lk] bias, which would
    cost as much memory as the scores flash attention avoids. It does take key
    *lengths* cheaply, and attention does not depend on the order of the keys:
    so the kept keys are moved to the front (:func:`_compact_keys`) and their
    count passed as the key length.
    """
    if kv_mask is None:
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    k, v, lengths = _compact_keys(k, v, kv_mask)
    return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation=implementation)


def _compact_keys(k, v, kv_mask):
    """Moves the kept keys first, in order.

    Args:
        k, v: [B, Lk, H, Dh].
        kv_mask: bool [B, Lk].

    Returns:
        (k, v, lengths): k and v permuted along Lk, and int32 [B] counts of kept
        keys, at least 1 (a row with no key attends to one masked key and is
        zeroed by the caller; a zero length could give NaN).
    """
    order = jnp.argsort(~kv_mask, axis=1, stable=True)  # kept (False) first
    take = lambda x: jnp.take_along_axis(x, order[:, :, None, None], axis=1)
    lengths = jnp.maximum(jnp.sum(kv_mask, axis=1, dtype=jnp.int32), 1)
    return take(k), take(v), lengths


# ------------------------------------------------------------------ Splash --


def _sharded_splash_attention(q, k, v, kv_mask, *, interpret):
    """Splash attention, inside shard_map over the ambient mesh if there is one.

    Batch goes over the mesh axes other than 'tensor' (those that divide B),
    heads over 'tensor' (if it divides H); axes already manual (a caller's
    shard_map) are left alone. See the module docstring.
    """
    local = functools.partial(_splash_attention, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    free_axes = [a for a in mesh.axis_names if a not in mesh.manual_axes]
    if not free_axes:  # no mesh, or already inside a shard_map over all of it
        return local(q, k, v, kv_mask)

    batch, heads = q.shape[0], q.shape[2]
    batch_axes = []
    for name in free_axes:
        size = math.prod(mesh.shape[a] for a in batch_axes) * mesh.shape[name]
        if name != _HEAD_AXIS and batch % size == 0:
            batch_axes.append(name)
    head_axis = _HEAD_AXIS if _HEAD_AXIS in free_axes and heads % mesh.shape[_HEAD_AXIS] == 0 else None
    qkv_spec = P(tuple(batch_axes) or None, None, head_axis, None)
    mask_spec = P(tuple(batch_axes) or None, None)

    if kv_mask is None:  # shard_map needs array arguments, not None
        fn, args = (lambda q, k, v: local(q, k, v, None)), (q, k, v)
        in_specs = (qkv_spec,) * 3
    else:
        fn, args = local, (q, k, v, kv_mask)
        in_specs = (qkv_spec,) * 3 + (mask_spec,)
    explicit = any(a in mesh.explicit_axes for a in free_axes)
    if explicit:  # shard_map takes Explicit-sharded inputs only as specified
        q_spec = jax.typeof(q).sharding.spec
        args = tuple(jax.reshard(x, s) for x, s in zip(args, in_specs))
    out = jax.shard_map(
        fn, mesh=mesh, in_specs=in_specs, out_specs=qkv_spec, axis_names=set(free_axes), check_vma=False
    )(*args)
    return jax.reshard(out, q_spec) if explicit else out


def _splash_attention(q, k, v, kv_mask, *, interpret):
    """Splash attention on one device's arrays.

    Args:
        q: [B, Lq, H, Dh]; k, v: [B, Lk, H, Dh]; kv_mask: bool [B, Lk] or None.
        interpret: run the Pallas kernel in interpret mode (any backend).

    Returns:
        [B, Lq, H, Dh]. Rows with no key are finite (the mean of the values) and
        zeroed by the caller.
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    batch, len_q, heads, head_dim = q.shape
    len_k = k.shape[1]
    pad_q, pad_k = _round_up(len_q), _round_up(len_k)
    block_q, block_k = _splash_block(pad_q), _splash_block(pad_k)
    kernel = splash.make_splash_mha(
        splash.MultiHeadMask([splash.FullMask((pad_q, pad_k))] * heads),
        block_sizes=splash.BlockSizes(
            block_q=block_q,
            block_kv=block_k,
            block_kv_compute=block_k,
            block_q_dkv=block_q,
            block_kv_dkv=block_k,
            block_kv_dkv_compute=block_k,
            block_q_dq=block_q,
            block_kv_dq=block_k,
        ),
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )

    def to_heads_first(x, length):  # [B, L, H, D] -> [B, H, length, D]
        x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))
        return x.transpose(0, 2, 1, 3)

    q = to_heads_first((q * head_dim**-0.5).astype(q.dtype), pad_q)  # unscaled kernel
    k, v = to_heads_first(k, pad_k), to_heads_first(v, pad_k)

    if kv_mask is None and pad_k == len_k:
        out = jax.vmap(kernel)(q, k, v)
    else:
        # Segment ids carry the mask: queries are segment 1, kept keys 1, masked
        # and padded keys 0. Padded queries see the real keys (finite, dropped).
        if kv_mask is None:
            kv_mask = jnp.ones((batch, len_k), bool)
        kv_ids = jnp.pad(kv_mask, ((0, 0), (0, pad_k - len_k))).astype(jnp.int32)
        q_ids = jnp.ones((batch, pad_q), jnp.int32)
        one_example = lambda q, k, v, qi, ki: kernel(q, k, v, segment_ids=splash.SegmentIds(q=qi, kv=ki))
        out = jax.vmap(one_example)(q, k, v, q_ids, kv_ids)
    return out.transpose(0, 2, 1, 3)[:, :len_q]


def _round_up(length: int) -> int:
    return -(-length // _SPLASH_ALIGN) * _SPLASH_ALIGN


def _splash_block(padded_length: int) -> int:
    """Largest of 512, 256, 128 that divides the (128-aligned) length."""
    return next(b for b in (512, 256, 128) if padded_length % b == 0)
