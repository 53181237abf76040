import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from util import dit_config, forward, spoil, tiny_batch, tiny_model

from sabr_jax.config import PAPER_SHAPES, base_config
from sabr_jax.errors import UserError
from sabr_jax.model.cross_attention import window
from sabr_jax.model.dit import Block, BlockPair, DiT
from sabr_jax.model.factory import model_config
from sabr_jax.parallel.flops import jaxpr_flops

LAYOUTS = [
    ("slots", {}),
    ("slots", {"cross_window": 1}),
    ("slots", {"route_frames": 2, "cross_route": True, "route_adaln": True, "patch_grid": (1, 3), "video_norm": True}),
    ("frame", {}),
    ("frame", {"route_frames": 2, "cross_route": True, "route_adaln": True, "patch_grid": (3, 1)}),
    ("slots", {"video_latents": 2, "kv_share": True}),
    ("frame", {"kv_share": True}),
    ("frame", {"video_latents": 2, "route_frames": 2, "cross_route": True, "route_adaln": True}),
]


@pytest.mark.parametrize("layout", ["slots", "frame"])
def test_output_is_zero_at_initialisation(layout):
    model = tiny_model(layout, randomize=False)
    out = forward(model, tiny_batch())
    assert out.shape == (2, 10, 322)
    assert float(jnp.abs(out).max()) == 0.0


@pytest.mark.parametrize("layout,extra", LAYOUTS)
def test_padding_changes_nothing_real(layout, extra):
    model = tiny_model(layout, **extra)
    batch = tiny_batch()
    out = forward(model, batch)
    assert float(jnp.abs(out).max()) > 0.1  # the randomised model is not trivial
    padded = ~batch["frame_mask"]
    out_spoiled = forward(model, spoil(batch, padded))
    np.testing.assert_allclose(out_spoiled[batch["frame_mask"]], out[batch["frame_mask"]], rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(out_spoiled[padded]).max()) == 0.0


@pytest.mark.parametrize("layout,extra", LAYOUTS)
def test_context_motion_is_never_read(layout, extra):
    model = tiny_model(layout, **extra)
    batch = tiny_batch()
    spoiled = spoil(batch, batch["context_mask"])
    spoiled["video"] = batch["video"]  # only the (ignored) motion input of the context frames changes
    np.testing.assert_allclose(forward(model, spoiled), forward(model, batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout,extra", LAYOUTS)
def test_video_conditions_the_output(layout, extra):
    model = tiny_model(layout, **extra)
    batch = tiny_batch()
    other = dict(batch, video=batch["video"][::-1].copy())
    assert float(jnp.abs(forward(model, other) - forward(model, batch)).max()) > 1e-3


@pytest.mark.parametrize("layout,extra", LAYOUTS)
def test_cached_keys_values_match(layout, extra):
    model = tiny_model(layout, **extra)
    batch = tiny_batch()
    emb = model.embed_video(jnp.asarray(batch["video"]))
    args = (jnp.asarray(batch["motion"]), jnp.array([3, 600]), batch["frame_mask"], batch["context_mask"])
    cached = model(*args, kv=model.video_kv(emb), route=model.route_vector(emb, batch["context_mask"]))
    # atol as the other equalities here: the uncached forward may absorb the projections (the same
    # sums in another order; every difference was one float32 rounding of the output in a float64 run)
    np.testing.assert_allclose(cached, model(*args, video_emb=emb), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout,extra", [LAYOUTS[i] for i in (1, 2, 4, 5)])  # window, route (both), kv_share
def test_absorbed_projections_match_projected(layout, extra, monkeypatch):
    """A block pair given the video tokens, its frame-aligned cross-attentions absorbing their
    key/value projections (queries and output in the token space), gives the outputs and the
    gradients of the pair given its projected keys and values: with a window, with the route
    images (both layouts), and with kv_share (both slots blocks read the spatial projection)."""
    import sabr_jax.model.dit

    monkeypatch.setattr(sabr_jax.model.dit, "absorbs", lambda *_: True)
    calls = []
    absorbed_attention = sabr_jax.model.dit.absorbed_attention
    monkeypatch.setattr(sabr_jax.model.dit, "absorbed_attention", lambda *a: calls.append(1) or absorbed_attention(*a))
    cfg = dit_config(layout=layout, width=32, heads=4, depth=2, video_dim=16, dtype="float32", **extra)
    graphdef, state = nnx.split(randomized(BlockPair(cfg, nnx.Rngs(0))))
    batch = tiny_batch()
    masks = (jnp.asarray(batch["frame_mask"]), jnp.asarray(batch["context_mask"]))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 10, cfg.num_slots, 32)), jnp.float32)
    c = jnp.asarray(rng.normal(size=(2, 32)), jnp.float32)
    emb = jnp.asarray(rng.normal(size=(2, 10, 3, 32)), jnp.float32)

    def loss(state, emb, cached):
        pair = nnx.merge(graphdef, state)
        out = pair(x, c, pair.video_kv(emb) if cached else emb, *masks)
        return jnp.sum(out * jnp.cos(out)), out

    (grads, out), (grads_absorbed, out_absorbed) = (
        jax.grad(loss, argnums=(0, 1), has_aux=True)(state, emb, cached) for cached in (True, False)
    )
    assert len(calls) == (2 if layout == "slots" else 1)  # the frame layout's temporal block cannot absorb
    assert float(jnp.abs(out_absorbed - out).max()) < 1e-5 * float(jnp.abs(out).max())
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads))
    for g, g_absorbed in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_absorbed), strict=True):
        np.testing.assert_allclose(g_absorbed, g, rtol=1e-4, atol=1e-5 * scale)


def test_remat_and_bf16_run_and_agree():
    batch = tiny_batch()
    ref = forward(tiny_model("slots"), batch)
    np.testing.assert_allclose(forward(tiny_model("slots", remat="full"), batch), ref, rtol=1e-5, atol=1e-5)
    low = forward(tiny_model("slots", dtype="bfloat16"), batch)
    assert low.dtype == jnp.float32
    assert float(jnp.abs(low - ref).max()) < 0.1 * float(jnp.abs(ref).max())


def test_window_gathers_neighbours_and_masks_edges():
    kv = jnp.arange(5.0).reshape(1, 5, 1, 1, 1) + 1  # frame t holds t + 1
    mask = jnp.array([[True, True, True, True, False]])
    out, valid = window(kv, mask, jnp.zeros_like(mask), 1)
    assert out.shape == (1, 5, 3, 1, 1)
    np.testing.assert_array_equal(out[0, :, :, 0, 0], [[0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5], [4, 5, 0]])
    np.testing.assert_array_equal(valid[0], [[0, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 0, 0]])


def randomized(module, seed=0):
    graphdef, state = nnx.split(module)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    leaves = [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def test_cross_window_never_crosses_the_prompt_boundary():
    """With cross_window, a motion frame next to the route images does not read their tokens,
    nor they its. A spatial block (self-attention within a frame, MLP per token) is used: its
    output at frame t depends on frame t's input and the video tokens its cross-attention
    reads, nothing else. (The whole model mixes frames in its temporal blocks by design.)"""
    cfg = dit_config(width=32, heads=4, depth=2, video_dim=16, cross_window=2, dtype="float32")
    block = randomized(Block(cfg, "slots", "frame", nnx.Rngs(0)))
    batch = tiny_batch(lengths=(10, 7), context=3)
    frame_mask, context_mask = jnp.asarray(batch["frame_mask"]), jnp.asarray(batch["context_mask"])
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 10, 27, 32)), jnp.float32)
    c = jnp.asarray(rng.normal(size=(2, 32)), jnp.float32)
    video = rng.normal(size=(2, 10, 3, 32)).astype(np.float32)

    def run(video):
        return np.asarray(block(x, c, block.video_kv(jnp.asarray(video)), frame_mask, context_mask))

    out = run(video)
    motion = batch["frame_mask"] & ~batch["context_mask"]
    for changed, unchanged in ((batch["context_mask"], motion), (motion, batch["context_mask"])):
        other = video.copy()
        other[changed] += rng.normal(size=other[changed].shape).astype(np.float32) * 10
        spoiled = run(other)
        np.testing.assert_allclose(spoiled[unchanged], out[unchanged], rtol=1e-5, atol=1e-5)
        assert np.abs(spoiled[changed] - out[changed]).max() > 1e-2  # the change is seen where it should be
    # The window is open on its own side: motion frame 3 (the first) reads frame 5's tokens.
    other = video.copy()
    other[:, 5] += 10
    assert np.abs(run(other)[:, 3] - out[:, 3]).max() > 1e-2


def test_window_mask_stops_at_the_prompt_boundary():
    kv = jnp.zeros((1, 5, 1, 1, 1))
    frame_mask = jnp.array([[True, True, True, True, False]])
    context_mask = jnp.array([[True, True, False, False, False]])
    _, valid = window(kv, frame_mask, context_mask, 1)
    np.testing.assert_array_equal(valid[0], [[0, 1, 1], [1, 1, 0], [0, 1, 1], [1, 1, 0], [1, 0, 0]])


def test_config_errors_are_clear():
    with pytest.raises(UserError, match="model.layout='tokens': expected one of 'slots', 'frame'"):
        dit_config(layout="tokens")
    with pytest.raises(UserError, match="model.depth=3: expected an even number"):
        dit_config(depth=3)
    with pytest.raises(UserError, match="model.width=100: expected a multiple of model.heads=3"):
        dit_config(width=100, heads=3)


@pytest.mark.parametrize("layout", ["slots", "frame"])
def test_sabr_l_has_about_600m_parameters(layout):
    cfg = base_config()
    cfg.model.update(width=1024, heads=16, depth=24, video_dim=1024, layout=layout)
    abstract = nnx.eval_shape(lambda: DiT(model_config(cfg), rngs=nnx.Rngs(0)))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert 550e6 <= count <= 650e6, count


@pytest.mark.parametrize("layout", ["slots", "frame"])
def test_every_block_norm_is_parameter_free(layout):
    """As the authors' DiTBlock (norm1, norm2 before the cross-attention, norm3) and final layer:
    LayerNorms without scale or bias; the adaLN modulations do the scaling."""
    cfg = dit_config(layout=layout, width=32, heads=4, depth=2, video_dim=16)
    model = nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0)))
    for norm in (model.blocks.spatial.norm2, model.blocks.temporal.norm2, model.blocks.spatial.norm1):
        assert norm.scale is None and norm.bias is None
        assert not jax.tree.leaves(nnx.state(norm, nnx.Param))
    assert not jax.tree.leaves(nnx.state(model.final_layer.norm, nnx.Param))
    affine = nnx.eval_shape(lambda: DiT(dataclasses.replace(cfg, cross_norm_affine=True), rngs=nnx.Rngs(0)))
    assert affine.blocks.spatial.norm2.scale is not None and affine.blocks.temporal.norm2.bias is not None
    assert affine.blocks.spatial.norm1.scale is None


def test_dit_config_fields_are_the_config_model_keys():
    """Every key of the config's model section is a DiTConfig field of the same name and value (its
    defaults live in sabr_jax.config alone), and route_frames is data.context_frames."""
    cfg = base_config()
    cfg.model.video_dim = PAPER_SHAPES["model.video_dim"]
    built = model_config(cfg)
    assert {f.name for f in dataclasses.fields(built)} == set(cfg.model) | {"route_frames"}
    assert built.route_frames == cfg.data.context_frames
    for key, value in cfg.model.items():
        expected = {"auto": None, (): None}.get(value, value) if key in ("attention", "patch_grid") else value
        assert getattr(built, key) == expected, key


def _forward_flops(model, patches):
    graphdef, state = nnx.split(model)
    batch = tiny_batch(patches=patches)
    return jaxpr_flops(jax.make_jaxpr(lambda state: forward(nnx.merge(graphdef, state), batch))(state))


@pytest.mark.parametrize("layout", ["slots", "frame"])
def test_cheaper_conditioning_cuts_the_video_projections(layout):
    """kv_share removes exactly one key/value projection per pair from the sampler's cache (and
    from the forward, where a block of the pair projects); video_latents 4 of 64 tokens per frame
    removes nearly all of the forward's projections and adds one, the resampler's."""
    b, length, p, d = 2, 10, 64, 32
    projection = 2 * (b * length * p) * d * (2 * d)  # one block's keys and values of every token
    full, shared = tiny_model(layout), tiny_model(layout, kv_share=True)
    assert shared.blocks.temporal.cross_kv is None

    def cache_flops(model):
        graphdef, state = nnx.split(model)
        video = jnp.zeros((b, length, p, 16))
        cache = lambda state: (m := nnx.merge(graphdef, state)).video_kv(m.embed_video(video))
        return jaxpr_flops(jax.make_jaxpr(cache)(state))

    assert cache_flops(full) - cache_flops(shared) == 2 * projection  # one per pair, 2 pairs
    if layout == "slots":  # both blocks project in the forward at this size (27 slots x 4 heads of 32 wide)
        assert _forward_flops(full, p) - _forward_flops(shared, p) == 2 * projection
    made = 4 if layout == "slots" else 2  # the frame layout's spatial blocks absorb theirs
    latents = _forward_flops(tiny_model(layout, video_latents=4), p)
    assert _forward_flops(full, p) - latents > (made - 1.5) * projection  # less 4/64 of them, the resampler's


def test_absorbing_cuts_the_frame_layouts_forward(monkeypatch):
    """The frame layout's spatial blocks (one query per frame) absorb their key/value projections
    in the forward: 4 D^2 + 4 H P D FLOPs per frame instead of 4 P D^2 + 4 P D."""
    import sabr_jax.model.dit

    b, length, p, d, heads = 2, 10, 64, 32, 4
    absorbed = _forward_flops(tiny_model("frame"), p)
    monkeypatch.setattr(sabr_jax.model.dit, "absorbs", lambda *_: False)
    projected = _forward_flops(tiny_model("frame"), p)
    per_frame = lambda flops: 2 * b * length * flops  # 2 spatial blocks
    assert projected - absorbed == per_frame(4 * p * d * d + 4 * p * d) - per_frame(4 * d * d + 4 * heads * p * d)
