"""The loss's weighting of frames (config loss_weighting) through the trainer: gradient
accumulation over micro-batches holding unequal numbers of counted frames gives the one-batch
loss and gradient, for both weightings."""

import jax
import numpy as np
import pytest
from util import tiny_batch

from sabr_jax.config import base_config, demo_config, validate
from sabr_jax.errors import UserError
from sabr_jax.parallel import sharding
from sabr_jax.training.trainer import Trainer

CONTEXT = 4
# Counted (motion) frames per example: 8, 1, 6, 0. With grad_accum=2 the micro-batches are rows
# (0, 2) and (1, 3): 14 frames in two clips, and 1 frame in one clip (row 3 counts nothing).
LENGTHS = (12, 5, 10, 4)


def trainer(grad_accum: int, weighting: str) -> Trainer:
    cfg = demo_config()
    cfg.update(batch_size=len(LENGTHS), grad_accum=grad_accum, loss_weighting=weighting)
    cfg.model.update(width=32, heads=4, depth=2, video_dim=16)
    cfg.data.update(max_frames=16, context_frames=CONTEXT, num_patches=8)
    cfg.mesh.update(data=1, fsdp=1, tensor=1)
    return Trainer(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))


@pytest.fixture(scope="module")
def results():
    """(accum, weighting) -> (loss, mse term, gradients) of one batch, the same random parameters
    (random everywhere, the zero-initialised layers too, so that every gradient is nonzero)."""
    batch = tiny_batch(batch=4, length=16, patches=8, video_dim=16, lengths=LENGTHS, context=CONTEXT)
    assert (batch["frame_mask"] & ~batch["context_mask"]).sum(-1).tolist() == [8, 1, 6, 0]
    shapes = trainer(1, "frame").abstract_state()["params"]
    leaves, treedef = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = jax.tree.unflatten(treedef, [0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    out = {}
    for accum in (1, 2):
        for weighting in ("frame", "clip"):
            t = trainer(accum, weighting)
            step = jax.jit(lambda p, b, t=t: t.gradients(p, b, t.draw(jax.random.PRNGKey(2), b)))
            with jax.set_mesh(t.mesh):
                (loss, terms), grads = step(params, batch)
            out[accum, weighting] = float(loss), float(terms["mse"]), jax.tree.map(np.asarray, grads)
    return out


@pytest.mark.parametrize("weighting", ["frame", "clip"])
def test_accumulation_over_unequal_micro_batches_equals_the_one_batch_gradient(results, weighting):
    loss, mse, grads = results[1, weighting]
    loss2, mse2, grads2 = results[2, weighting]
    assert loss2 == pytest.approx(loss, rel=1e-5) and mse2 == pytest.approx(mse, rel=1e-5)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads))
    for a, b in zip(jax.tree.leaves(grads2), jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


def test_the_weightings_differ_and_frame_is_the_default(results):
    """On clips of 8, 1 and 6 counted frames the two weightings give different losses; the base
    config weighs by frame, and validate names the key of an unknown weighting."""
    assert abs(results[1, "frame"][1] - results[1, "clip"][1]) > 1e-3
    assert base_config().loss_weighting == "frame"
    cfg = base_config()
    cfg.loss_weighting = "example"
    with pytest.raises(UserError, match="loss_weighting"):
        validate(cfg, data_dir=False)
