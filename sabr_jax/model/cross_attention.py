"""Frame-aligned cross-attention: each frame's motion tokens attend to that frame's video tokens.

Notation as in sabr_jax.model.dit: B batch, L frames, S query tokens per frame, N key tokens per
frame (P patches, or (2w+1) P with a window), C route images, H heads, Dh head size, D width.

Two ways to compute the same attention of queries q [B, L, S, H, Dh] to the video tokens
e [B, L, N, D] through a block's key/value projection (Wk, bk, Wv, bv; W [D, H, Dh]):

* projected: k = e Wk + bk, v = e Wv + bv, then attention (what the sampler caches);
* absorbed: the projections move to the query and the output side,

      scores_h = (q_h Wk_h^T) e^T * Dh**-0.5      (q_h . bk_h is the same for every key of a
                                                   row: the softmax cancels it)
      out_h    = (softmax(scores_h) e) Wv_h + bv_h (the weights sum to one)

  which never projects the N tokens. Per frame it costs 4 S D^2 + 4 S H N D FLOPs forward
  against 4 P D^2 + 4 S N D: cheaper when S H is small against D (the frame layout's spatial
  block, S = 1: 59x fewer at S size; the slots layout, S = 27: 2.3x fewer). `absorbs` decides.
  The model absorbs where it is cheaper and no cache is given (training, the uncached forward).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from einops import rearrange, repeat
from flax import nnx

from sabr_jax.model.attention import MASKED_LOGIT, zero_rows


class VideoTokens(NamedTuple):
    """A block's video input when nothing is cached: the tokens [B, L, P, D] and the key/value
    projection (an `nnx.Einsum`, kernel [D, 2, H, Dh]) that reads them."""

    emb: jax.Array
    projection: nnx.Einsum

    def project(self):
        """-> keys, values [B, L, P, H, Dh]."""
        return tuple(self.projection(self.emb))


def absorbs(queries: int, heads: int, keys: int, width: int, patches: int) -> bool:
    """Whether absorbing the key/value projection costs fewer FLOPs per frame than projecting
    the frame's `patches` tokens: `queries` query tokens, `keys` key tokens (window and route
    images included), model `width`, `heads` heads (module docstring)."""
    absorbed = queries * width + queries * heads * keys
    projected = patches * width + queries * keys
    return absorbed < projected


def window(kv: jax.Array, frame_mask: jax.Array, context_mask: jax.Array, w: int):
    """Gather, for each frame t, the tokens of frames t-w..t+w.

    kv [B, L, P, ...] -> [B, L, (2w+1)*P, ...]; masks [B, L] -> key mask [B, L, (2w+1)*P]:
    False outside the clip, on padded frames, and across the prompt boundary (a motion frame
    never reads a route image's tokens through the window, nor a route image a video frame's).
    """
    length, tokens = kv.shape[1], kv.shape[2]
    pad = lambda a: jnp.pad(a, ((0, 0), (w, w)) + ((0, 0),) * (a.ndim - 2))
    offsets = jnp.arange(length)[:, None] + jnp.arange(2 * w + 1)[None]  # [L, 2w+1]
    kv = rearrange(pad(kv)[:, offsets], "b l o p ... -> b l (o p) ...")
    valid = pad(frame_mask)[:, offsets] & (pad(context_mask)[:, offsets] == context_mask[:, :, None])
    return kv, repeat(valid, "b l o -> b l (o p)", p=tokens)


def rows_with_keys(mask, route_mask):
    """[B, L] bool, True where a frame's row has a key (its own, mask [B, L, N], or a route image's,
    route_mask [B, C]); None when every row has one (mask None: no own key is masked)."""
    if mask is None:
        return None
    has_key = jnp.any(mask, axis=-1)
    return has_key if route_mask is None else has_key | jnp.any(route_mask, axis=-1)[:, None]


def frame_attention(q, k, v, mask=None, route=None, *, scale: float):
    """Each frame's queries attend to its own keys and, with `route`, the route images' keys,
    in one softmax, as XLA einsums.

    q [B, L, S, H, E]; k, v [B, L, N, H, E], or [B, L, N, E] shared by every head (the absorbed
    form, E = D); mask [B, L, N] or None; route None or (route_k, route_v, route_mask): keys and
    values [B, C, P, (H,) E] of the route images, shared by every frame (not copied per frame),
    and [B, C], False where an example has fewer route images. Returns [B, L, S, H, E] in q's
    dtype; zeros in a row with no key.
    """
    shape = q.shape
    if k.ndim == 4:  # shared keys: (S, H) as one query axis, 1.4-1.6x faster on a CPU (one S block, measured)
        q, spec = q.reshape(*shape[:2], -1, shape[-1]), {"q": "blxe", "k": "e", "w": "blx"}
    else:
        spec = {"q": "blshe", "k": "he", "w": "blhs"}
    keys_axis = lambda m: m.reshape(m.shape[:2] + (1,) * (len(spec["w"]) - 2) + m.shape[2:])  # [B, L|1, 1.., N]
    logits = jnp.einsum(f"{spec['q']},bln{spec['k']}->{spec['w']}n", q, k, preferred_element_type=jnp.float32)
    if mask is not None:
        logits = jnp.where(keys_axis(mask), logits, MASKED_LOGIT)
    if route is not None:
        route_k, route_v, route_mask = route
        route_k, route_v = (rearrange(a, "b c p ... -> b (c p) ...") for a in (route_k, route_v))
        route_logits = jnp.einsum(
            f"{spec['q']},bk{spec['k']}->{spec['w']}k", q, route_k, preferred_element_type=jnp.float32
        )
        per_key = repeat(route_mask, "b c -> b 1 (c p)", p=route_k.shape[1] // route_mask.shape[1])
        logits = jnp.concatenate([logits, jnp.where(keys_axis(per_key), route_logits, MASKED_LOGIT)], axis=-1)
    weights = jax.nn.softmax(logits * scale, axis=-1).astype(q.dtype)
    n = k.shape[2]
    out = jnp.einsum(f"{spec['w']}n,bln{spec['k']}->{spec['q']}", weights[..., :n], v)
    if route is not None:
        out = out + jnp.einsum(f"{spec['w']}k,bk{spec['k']}->{spec['q']}", weights[..., n:], route_v)
    return zero_rows(out.reshape(shape), rows_with_keys(mask, None if route is None else route[2]))


def absorbed_attention(q, tokens: VideoTokens, mask=None, route=None):
    """`frame_attention` of q [B, L, S, H, Dh] to the keys and values `tokens.projection` would
    make of `tokens.emb` (windowed: [B, L, N, D]), without making them (module docstring).
    mask as for `frame_attention`; route None or (route tokens [B, C, P, D], route mask [B, C]).
    Returns [B, L, S, H, Dh] in q's dtype."""
    kernel = tokens.projection.kernel[...].astype(q.dtype)  # [D, 2, H, Dh]: keys, values
    value_bias = tokens.projection.bias[...][1].astype(q.dtype)  # [H, Dh]; the key bias cancels
    queries = jnp.einsum("blshk,dhk->blshd", q, kernel[:, 0])  # [B, L, S, H, D]
    if route is not None:  # the route tokens stand for its keys and its values
        route = (route[0], route[0], route[1])
    mixed = frame_attention(queries, tokens.emb, tokens.emb, mask, route, scale=q.shape[-1] ** -0.5)
    out = jnp.einsum("blshd,dhk->blshk", mixed, kernel[:, 1]) + value_bias
    return zero_rows(out, rows_with_keys(mask, None if route is None else route[2]))
