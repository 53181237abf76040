"""Frames where the tracker lost the climber: they keep their place in the window (video
tokens and time position) and a False motion_mask takes them out of the loss, as padding is."""

import jax
import numpy as np
import pytest

from sabr_jax.config import demo_config
from sabr_jax.data import pipeline
from sabr_jax.motion import MOTION_DIM, NormStats
from sabr_jax.parallel import sharding
from sabr_jax.training.trainer import Trainer

GAP = slice(8, 11)  # motion frames 8..10 of the clip are untracked
CONTEXT, LENGTH, POSITIONS = 4, 20, 32


def clip(seed=0, gap=True, junk=False):
    """A source clip (what ClipSource.read returns); junk: other values at the untracked frames."""
    rng = np.random.default_rng(seed)
    mask = np.ones(LENGTH, bool)
    if gap:
        mask[GAP] = False
    motion = rng.normal(size=(LENGTH, MOTION_DIM)).astype(np.float32)
    motion[~mask] = 0.0  # what sabr-prepare stores there
    if junk:
        motion[~mask] = 100 * np.random.default_rng(5).normal(size=((~mask).sum(), MOTION_DIM))
    return {
        "motion": motion,
        "motion_mask": mask,
        "video": rng.normal(size=(LENGTH, 8, 32)).astype(np.float32),
        "context": rng.normal(size=(CONTEXT, 8, 32)).astype(np.float32),
    }


STATS = NormStats(np.full(MOTION_DIM, 0.1, np.float32), np.full(MOTION_DIM, 2.0, np.float32))


def batch(gap=True, junk=False):
    rows = [
        pipeline.assemble(clip(0, gap, junk), POSITIONS, CONTEXT, STATS),
        pipeline.assemble(clip(1, False), POSITIONS, CONTEXT, STATS),
    ]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def test_untracked_frames_keep_their_place_in_the_window():
    b = batch()
    positions = np.arange(POSITIONS)
    gap = np.zeros(POSITIONS, bool)
    gap[CONTEXT + GAP.start : CONTEXT + GAP.stop] = True
    np.testing.assert_array_equal(b["frame_mask"][0], positions < CONTEXT + LENGTH)  # not spliced: 20 frames in place
    np.testing.assert_array_equal(b["motion_mask"][0], (positions >= CONTEXT) & (positions < CONTEXT + LENGTH) & ~gap)
    np.testing.assert_array_equal(b["video"][0, CONTEXT : CONTEXT + LENGTH], clip(0)["video"])  # their tokens stay
    # their motion (a noised input only): the interpolation of the tracked frames 7 and 11 around them
    before, after = STATS.normalize(clip(0)["motion"][[GAP.start - 1, GAP.stop]])
    for i, w in enumerate((0.25, 0.5, 0.75)):
        np.testing.assert_allclose(
            b["motion"][0, CONTEXT + GAP.start + i], (1 - w) * before + w * after, rtol=1e-5, atol=1e-6
        )
    assert b["motion_mask"][1].sum() == LENGTH  # a clip without gaps: every motion frame counts


def test_fill_gaps_at_the_ends_and_without_known_frames():
    from sabr_jax.motion import fill_gaps

    x = np.arange(5, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    np.testing.assert_array_equal(fill_gaps(x, [False, True, False, True, False])[:, 0], [1, 1, 2, 3, 3])
    np.testing.assert_array_equal(fill_gaps(x, [False] * 5), np.zeros_like(x))
    assert fill_gaps(x, [True] * 5) is x


@pytest.fixture(scope="module")
def trainer_and_params():
    cfg = demo_config()
    cfg.model.update(width=32, heads=4, depth=2)
    cfg.batch_size = 2
    trainer = Trainer(cfg, sharding.make_mesh(cfg.mesh))
    params = trainer.init_state(0)["params"]
    leaves, treedef = jax.tree.flatten(params)  # random everywhere (the zero-initialised output layer too)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = jax.tree.unflatten(
        treedef, [x + 0.2 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    )

    @jax.jit
    def loss(params, batch):
        return trainer.loss(params, batch, trainer.draw(jax.random.PRNGKey(3), batch))[0]

    with jax.set_mesh(trainer.mesh):
        yield lambda b: float(loss(params, b))


def test_untracked_motion_values_do_not_change_the_loss(trainer_and_params):
    loss = trainer_and_params
    b = batch()
    base = loss(b)
    junk = batch(junk=True)  # other stored motion at the untracked frames: the same batch, the same loss
    for k in b:
        np.testing.assert_array_equal(junk[k], b[k])
    assert loss(junk) == base
    unmasked = dict(b, motion_mask=b["frame_mask"] & ~b["context_mask"])
    assert loss(unmasked) != base  # (they would count as targets without the mask)
    tracked = dict(b, motion=b["motion"].copy())
    tracked["motion"][0, CONTEXT + 2] += 1.0
    assert loss(tracked) != base  # a tracked frame counts
    video = dict(b, video=b["video"].copy())
    video["video"][0, CONTEXT + GAP.start : CONTEXT + GAP.stop] += 1.0
    assert loss(video) != base  # the untracked frames' video still conditions the model


def test_without_gaps_the_loss_is_what_it_was(trainer_and_params):
    """All frames tracked: the same loss as a batch without motion_mask (the benchmark's numbers)."""
    loss = trainer_and_params
    b = batch(gap=False)
    assert b["motion_mask"][:, CONTEXT : CONTEXT + LENGTH].all()
    assert loss(b) == loss({k: v for k, v in b.items() if k != "motion_mask"})


def test_norm_stats_over_tracked_frames_only():
    class Source:
        def __len__(self):
            return 2

        def num_frames(self, i):
            return LENGTH

        def read(self, i, start, stop):
            return {k: (v[start:stop] if k != "context" else v) for k, v in clip(i, gap=i == 0).items()}

    stats = pipeline.compute_stats(Source())
    tracked = np.concatenate([clip(0)["motion"][clip(0)["motion_mask"]], clip(1, False)["motion"]])
    np.testing.assert_allclose(stats.mean, tracked.mean(0), rtol=1e-5, atol=1e-6)
