"""Small models and batches shared by the tests."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sabr_jax.config import base_config
from sabr_jax.model.dit import DiT
from sabr_jax.model.dit_config import DiTConfig
from sabr_jax.model.factory import model_config


def dit_config(route_frames: int | None = None, **model) -> DiTConfig:
    """The DiTConfig of base_config() with `model` overriding keys of its model section (and
    route_frames its data.context_frames): how every DiTConfig is made (model_config)."""
    cfg = base_config()
    cfg.model.update(model)
    if route_frames is not None:
        cfg.data.context_frames = route_frames
    return model_config(cfg)


def tiny_model(layout="slots", seed=0, randomize=True, **overrides):
    """A 2-pair DiT; with randomize, every parameter (the zero-initialised ones too) is random."""
    fields = dict(layout=layout, width=32, heads=4, depth=4, video_dim=16, dtype="float32", remat="none")
    fields.update(overrides)
    model = DiT(dit_config(**fields), rngs=nnx.Rngs(seed))
    if randomize:
        graphdef, state = nnx.split(model)
        leaves, treedef = jax.tree.flatten(state)
        keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
        leaves = [0.2 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
        model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    return model


def tiny_batch(batch=2, length=10, patches=3, video_dim=16, lengths=(10, 7), context=2, seed=0):
    """motion [B, L, 161], video [B, L, P, Dv], frame_mask / context_mask [B, L] (numpy)."""
    rng = np.random.default_rng(seed)
    positions = np.arange(length)[None]
    return {
        "motion": rng.normal(size=(batch, length, 161)).astype(np.float32),
        "video": rng.normal(size=(batch, length, patches, video_dim)).astype(np.float32),
        "frame_mask": positions < np.asarray(lengths)[:, None],
        "context_mask": np.broadcast_to(positions < context, (batch, length)).copy(),
    }


def spoil(batch, where, seed=1):
    """A copy of batch with motion and video replaced by junk where `where` [B, L] is True."""
    rng = np.random.default_rng(seed)
    out = {k: v.copy() for k, v in batch.items()}
    out["motion"][where] = rng.normal(size=out["motion"][where].shape) * 100
    out["video"][where] = rng.normal(size=out["video"][where].shape) * 100
    return out


def forward(model, batch, t=(3, 600)):
    emb = model.embed_video(jnp.asarray(batch["video"]))
    return model(
        jnp.asarray(batch["motion"]), jnp.asarray(t), batch["frame_mask"], batch["context_mask"], video_emb=emb
    )
