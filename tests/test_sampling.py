import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from util import tiny_batch, tiny_model

from sabr_jax.config import base_config
from sabr_jax.data.pipeline import motion_frames
from sabr_jax.diffusion.gaussian import GaussianDiffusion
from sabr_jax.diffusion.kv_cache import HEADROOM, device_bytes, kv_policy, plan_kv_cache
from sabr_jax.diffusion.sampling import denoiser, guided, make_sampler, plan, sample
from sabr_jax.errors import UserError
from sabr_jax.model.factory import build_model

SHAPE = (2, 12, 161)


def oracle(x0):
    """A denoiser that knows the answer: predicts x0, variance value 0."""
    return lambda x, t: jnp.concatenate([x0, jnp.zeros_like(x0)], axis=-1)


@pytest.mark.parametrize("method,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
@pytest.mark.parametrize("steps", [1000, 250, 10])
def test_oracle_denoiser_recovers_x0(method, eta, steps):
    x0 = jax.random.normal(jax.random.PRNGKey(0), SHAPE)
    diffusion = GaussianDiffusion.create(respace=steps)
    out = jax.jit(lambda k: sample(oracle(x0), diffusion, k, SHAPE, method=method, eta=eta))(jax.random.PRNGKey(1))
    np.testing.assert_allclose(out, x0, atol=1e-5)


def test_same_key_same_output_other_key_other_output():
    diffusion = GaussianDiffusion.create(respace=20)
    noisy = lambda x, t: jnp.concatenate([0.5 * x, jnp.zeros_like(x)], -1)  # not an oracle: keeps noise
    run = jax.jit(lambda k: sample(noisy, diffusion, k, SHAPE))
    a, b, c = run(jax.random.PRNGKey(3)), run(jax.random.PRNGKey(3)), run(jax.random.PRNGKey(4))
    np.testing.assert_array_equal(a, b)
    assert float(jnp.abs(a - c).max()) > 1e-3


def test_guidance_formula():
    cond = jnp.concatenate([jnp.full((1, 2, 4), 2.0), jnp.full((1, 2, 4), 0.3)], -1)
    uncond = jnp.concatenate([jnp.full((1, 2, 4), 1.0), jnp.full((1, 2, 4), -0.9)], -1)
    out = guided(jnp.concatenate([cond, uncond]), 3.0)
    assert out.shape == (1, 2, 8)
    np.testing.assert_allclose(out[..., :4], 1.0 + 3.0 * (2.0 - 1.0))
    np.testing.assert_allclose(out[..., 4:], 0.3)  # the conditional variance


def test_guidance_runs_both_branches_in_one_forward():
    """The batched guided denoiser equals the two branches run apart: the model given the video,
    and the model given the null video, combined on x0."""
    graphdef, params, batch = model_and_batch()
    x = jax.random.normal(jax.random.PRNGKey(1), batch["motion"].shape)
    t = jnp.array([7, 400])
    masks = batch["frame_mask"], batch["context_mask"]
    out = denoiser(graphdef, params, batch["video"], *masks, guidance_scale=2.5)(x, t)
    model = nnx.merge(graphdef, params)
    branch = lambda drop: model(x, t, *masks, video_emb=model.embed_video(batch["video"], jnp.full(2, drop)))
    apart = guided(jnp.concatenate([branch(False), branch(True)]), 2.5)
    np.testing.assert_allclose(out, apart, rtol=1e-5, atol=1e-5)
    matmuls = lambda scale: str(
        jax.make_jaxpr(denoiser(graphdef, params, batch["video"], *masks, guidance_scale=scale))(x, t)
    ).count("dot_general")
    assert matmuls(2.5) == matmuls(1.0)  # one forward (of a doubled batch), not two


def sampler_config(**sample):
    cfg = ml_collections.ConfigDict()
    cfg.model = dict(depth=4)  # tiny_model's: 2 block pairs
    cfg.diffusion = dict(num_steps=1000, beta_start=1e-4, beta_end=2e-2)
    cfg.sample = dict(steps=8, method="ddpm", eta=0.0, guidance_scale=1.0, kv_cache="all")
    cfg.sample.update(sample)
    return cfg


def model_and_batch(layout="slots"):
    model = tiny_model(layout)
    graphdef, params = nnx.split(model)
    batch = {k: jnp.asarray(v) for k, v in tiny_batch().items()}
    return graphdef, nnx.to_pure_dict(params), batch


def test_every_cache_policy_gives_the_same_sample():
    """kv_cache='auto' given a memory between caching none and all block pairs' video keys/values
    caches the first pair; caching none, one or both pairs gives the same sample."""
    graphdef, params, batch = model_and_batch()
    args = (params, batch, jax.random.PRNGKey(0), None, None)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
    sampler = make_sampler(graphdef, sampler_config(kv_cache="auto"))
    assert sampler.kv_pairs(*args) == 2 and list(sampler.plans.values())[0].measured == {}  # CPU: no limit, all

    sampler = make_sampler(graphdef, sampler_config(kv_cache="auto"), memory=1)
    with pytest.raises(UserError, match="even recomputing"):
        sampler.padded(*args)
    (plan,) = sampler.plans.values()
    none, full = plan.measured[0], plan.measured[2]
    assert none < full
    sampler.memory, sampler.plans = int((none + 0.75 * (full - none)) / (1 - HEADROOM)), {}
    chunked, _ = sampler.padded(*args)
    (plan,) = sampler.plans.values()
    assert plan.chosen == 1 and none < plan.measured[1] < full

    assert bool(jnp.all(jnp.isfinite(chunked)))
    for k in (0, 2):
        other, _ = sampler.compile(abstract, k)(*args)
        np.testing.assert_allclose(other, chunked, rtol=1e-5, atol=1e-5, err_msg=f"{k} block pairs cached")


def test_cache_policies_agree_with_the_frame_layout_and_guidance():
    graphdef, params, batch = model_and_batch("frame")
    key = jax.random.PRNGKey(0)
    cached, _ = make_sampler(graphdef, sampler_config(guidance_scale=2.0)).padded(params, batch, key)
    chunked, _ = make_sampler(graphdef, sampler_config(guidance_scale=2.0, kv_cache="2")).padded(params, batch, key)
    assert bool(jnp.all(jnp.isfinite(cached)))
    np.testing.assert_allclose(cached, chunked, rtol=1e-5, atol=1e-5)


def test_kv_policy_reads_old_and_new_keys():
    sample = lambda **keys: ml_collections.ConfigDict(dict(steps=8, **keys))
    assert kv_policy(sample(), 24) == "auto"  # neither key
    assert kv_policy(sample(cache_kv=True), 24) == "auto"
    assert kv_policy(sample(cache_kv=False), 24) == 0
    for value, pairs in [("auto", "auto"), ("all", 12), ("none", 0), (14, 7), ("14", 7), (24, 12)]:
        assert kv_policy(sample(kv_cache=value, cache_kv=False), 24) == pairs
    for bad in ("some", 3, "3", 26, -2, True):
        with pytest.raises(UserError, match="config.sample.kv_cache"):
            kv_policy(sample(kv_cache=bad), 24)


def test_plan_kv_cache_takes_the_most_pairs_that_fit():
    calls = []

    def measure(k):  # 10 + 3 per pair, and the line's guess at 3 pairs is 1 byte off
        calls.append(k)
        return 10 + 3 * k + (k == 3)

    assert plan_kv_cache(measure, 6, None).chosen == 6 and calls == []
    assert plan_kv_cache(measure, 6, 28).chosen == 6
    assert plan_kv_cache(measure, 6, 20).chosen == 3
    stepped = plan_kv_cache(measure, 6, 19)  # the line's guess, 3 pairs, measures 20: one pair fewer
    assert stepped.chosen == 2 and set(stepped.measured) == {0, 2, 3, 6}
    assert plan_kv_cache(measure, 6, 9).chosen is None
    every = plan_kv_cache(measure, 6, 100, every=True)
    assert every.chosen == 6 and set(every.measured) == {0, 6}


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_completion_keeps_known_frames_exactly(method):
    graphdef, params, batch = model_and_batch()
    known_mask = batch["frame_mask"] & ~batch["context_mask"] & (jnp.arange(10)[None] < 5)
    run = make_sampler(graphdef, sampler_config(method=method))
    out, _ = run.padded(params, batch, jax.random.PRNGKey(0), batch["motion"], known_mask)
    np.testing.assert_array_equal(
        np.asarray(out)[np.asarray(known_mask)], np.asarray(batch["motion"])[np.asarray(known_mask)]
    )
    unknown = np.asarray(batch["frame_mask"] & ~known_mask)
    assert not np.allclose(np.asarray(out)[unknown], np.asarray(batch["motion"])[unknown])


def test_completion_with_an_oracle_fills_the_rest():
    x0 = jax.random.normal(jax.random.PRNGKey(0), SHAPE)
    mask = jnp.arange(12)[None].repeat(2, 0) < 4
    out = sample(
        oracle(x0), GaussianDiffusion.create(respace=25), jax.random.PRNGKey(1), SHAPE, known=x0 + 1.0, known_mask=mask
    )
    np.testing.assert_array_equal(out[mask], (x0 + 1.0)[mask])
    np.testing.assert_allclose(out[~mask], x0[~mask], atol=1e-5)


def test_guidance_runs_with_the_null_video():
    graphdef, params, batch = model_and_batch()
    key = jax.random.PRNGKey(0)
    plain, _ = make_sampler(graphdef, sampler_config()).padded(params, batch, key)
    guided_out, _ = make_sampler(graphdef, sampler_config(guidance_scale=2.0)).padded(params, batch, key)
    assert bool(jnp.all(jnp.isfinite(guided_out)))
    assert float(jnp.abs(plain - guided_out).max()) > 1e-4


def test_sampler_returns_the_motion_frames_only():
    """Users get each example's motion frames, nothing of its context (route image) or padded
    positions; the jitted `padded` form is exactly zero there. The motion frames are what the
    reverse process over every position (the sampler's old output) gives at them."""
    graphdef, params, batch = model_and_batch()  # 2 context frames; 10 and 7 real frames
    key = jax.random.PRNGKey(0)
    run = make_sampler(graphdef, sampler_config())
    motions = run(params, batch, key)
    assert [m.shape for m in motions] == [(8, 161), (5, 161)]
    assert all(isinstance(m, np.ndarray) for m in motions)
    motion = np.asarray(motion_frames(batch))
    x0, mask = run.padded(params, batch, key)
    np.testing.assert_array_equal(mask, motion)
    assert np.all(np.asarray(x0)[~motion] == 0.0)
    np.testing.assert_array_equal(np.asarray(x0)[motion], np.concatenate(motions))

    diffusion = GaussianDiffusion.create(respace=8)
    every = jax.jit(
        lambda params, key: sample(
            denoiser(graphdef, params, batch["video"], batch["frame_mask"], batch["context_mask"]),
            diffusion,
            key,
            x0.shape,
        )
    )(params, key)
    assert float(jnp.abs(every[~motion]).max()) > 0.1  # the values that used to reach users
    for r, m in enumerate(motions):
        np.testing.assert_allclose(m, np.asarray(every[r])[motion[r]], rtol=1e-6, atol=1e-6)


def test_sampler_completion_returns_motion_frames_only():
    graphdef, params, batch = model_and_batch()
    known_mask = motion_frames(batch) & (jnp.arange(10)[None] < 4)  # motion frames 0 and 1 of each example
    run = make_sampler(graphdef, sampler_config())
    motions = run(params, batch, jax.random.PRNGKey(0), batch["motion"], known_mask)
    for r, m in enumerate(motions):
        np.testing.assert_array_equal(m[:2], np.asarray(batch["motion"])[r, 2:4])


def test_mask_zeroes_what_is_not_generated():
    x0 = jax.random.normal(jax.random.PRNGKey(0), SHAPE)
    mask = jnp.arange(12)[None].repeat(2, 0) >= 3
    out = sample(oracle(x0), GaussianDiffusion.create(respace=10), jax.random.PRNGKey(1), SHAPE, mask=mask)
    assert float(jnp.abs(out[~mask]).max()) == 0.0
    np.testing.assert_allclose(out[mask], x0[mask], atol=1e-5)


def test_bad_method_is_refused():
    with pytest.raises(ValueError, match="ddpm"):
        sample(
            oracle(jnp.zeros(SHAPE)), GaussianDiffusion.create(respace=5), jax.random.PRNGKey(0), SHAPE, method="euler"
        )


def test_dry_run_plan_for_a_tiny_config():
    """The dry run's plan: everything fits an unlimited device, a device between caching none and
    all gets a chunk, a device below caching none gets nothing; the text says which."""
    cfg = base_config()
    cfg.model.update(width=32, heads=4, depth=4, video_dim=16, dtype="float32", remat="none")
    cfg.data.update(num_patches=3, context_frames=2)
    cfg.sample.update(steps=8)
    free = plan(cfg, 10, "cpu")
    assert free.kv.chosen == 2 and free.kv_cache == "all"
    assert free.pair_bytes == 2 * 2 * 1 * 10 * 3 * 32 * 4  # 2 blocks x (K, V) x B x L x P x D x float32
    none = free.kv.measured[0]
    assert free.kv.measured[2] == none + 2 * free.pair_bytes

    middle = free.on(int((none + 1.5 * free.pair_bytes) / (1 - HEADROOM)))
    assert middle.kv.chosen == 1 and middle.kv_cache == 2
    rows = {line.split()[0]: line.split() for line in middle.text().splitlines()}
    assert rows["all"][1] == "4" and rows["all"][4] == "no"
    assert rows["chunked"][1] == "2" and rows["chunked"][4:] == ["yes", "<-", "chosen"]
    assert rows["none"][1] == "0" and rows["none"][4] == "yes"
    assert "chosen: kv_cache=2 " in middle.text()

    small = free.on(none // 2)
    assert small.kv.chosen is None and small.kv_cache is None and "nothing fits" in small.text()
    with pytest.raises(UserError, match="--device"):
        device_bytes("v100")


@pytest.mark.parametrize("over", [{"kv_share": True}, {"video_latents": 2}])
def test_dry_run_counts_the_cache_of_cheaper_conditioning(over):
    """The plan's bytes per block pair are those of the keys/values the model caches."""
    cfg = base_config()
    cfg.model.update(width=32, heads=4, depth=4, video_dim=16, dtype="float32", remat="none", **over)
    cfg.data.update(num_patches=3, context_frames=2)
    cfg.sample.update(steps=2)
    model = build_model(cfg, 0)
    kv = model.video_kv(model.embed_video(jnp.zeros((1, 10, 3, 16))), 1)
    assert plan(cfg, 10, "cpu").pair_bytes == sum(a.nbytes for a in jax.tree.leaves(kv))
