import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from util import tiny_batch, tiny_model

from sabr_jax.diffusion import GaussianDiffusion
from sabr_jax.sampling import guided, make_sampler, sample

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
    cond = lambda x, t: jnp.concatenate([jnp.full_like(x, 2.0), jnp.full_like(x, 0.3)], -1)
    uncond = lambda x, t: jnp.concatenate([jnp.full_like(x, 1.0), jnp.full_like(x, -0.9)], -1)
    out = guided(cond, uncond, 3.0)(jnp.zeros((1, 2, 4)), jnp.zeros(1))
    np.testing.assert_allclose(out[..., :4], 1.0 + 3.0 * (2.0 - 1.0))
    np.testing.assert_allclose(out[..., 4:], 0.3)  # the conditional variance


def sampler_config(**sample):
    cfg = ml_collections.ConfigDict()
    cfg.diffusion = dict(num_steps=1000, beta_start=1e-4, beta_end=2e-2)
    cfg.sample = dict(steps=8, method="ddpm", eta=0.0, guidance_scale=1.0, cache_kv=True)
    cfg.sample.update(sample)
    return cfg


def model_and_batch(layout="slots"):
    model = tiny_model(layout)
    graphdef, params = nnx.split(model)
    batch = {k: jnp.asarray(v) for k, v in tiny_batch().items()}
    return graphdef, nnx.to_pure_dict(params), batch


@pytest.mark.parametrize("layout", ["slots", "frame"])
def test_cached_keys_values_give_the_same_sample(layout):
    graphdef, params, batch = model_and_batch(layout)
    key = jax.random.PRNGKey(0)
    cached = make_sampler(graphdef, sampler_config(cache_kv=True))(params, batch, key)
    fresh = make_sampler(graphdef, sampler_config(cache_kv=False))(params, batch, key)
    assert bool(jnp.all(jnp.isfinite(cached)))
    np.testing.assert_allclose(cached, fresh, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_completion_keeps_known_frames_exactly(method):
    graphdef, params, batch = model_and_batch()
    known_mask = batch["frame_mask"] & ~batch["context_mask"] & (jnp.arange(10)[None] < 5)
    run = make_sampler(graphdef, sampler_config(method=method))
    out = run(params, batch, jax.random.PRNGKey(0), batch["motion"], known_mask)
    np.testing.assert_array_equal(np.asarray(out)[np.asarray(known_mask)], np.asarray(batch["motion"])[np.asarray(known_mask)])
    unknown = np.asarray(batch["frame_mask"] & ~known_mask)
    assert not np.allclose(np.asarray(out)[unknown], np.asarray(batch["motion"])[unknown])


def test_completion_with_an_oracle_fills_the_rest():
    x0 = jax.random.normal(jax.random.PRNGKey(0), SHAPE)
    mask = jnp.arange(12)[None].repeat(2, 0) < 4
    out = sample(oracle(x0), GaussianDiffusion.create(respace=25), jax.random.PRNGKey(1), SHAPE, known=x0 + 1.0, known_mask=mask)
    np.testing.assert_array_equal(out[mask], (x0 + 1.0)[mask])
    np.testing.assert_allclose(out[~mask], x0[~mask], atol=1e-5)


def test_guidance_runs_with_the_null_video():
    graphdef, params, batch = model_and_batch()
    key = jax.random.PRNGKey(0)
    plain = make_sampler(graphdef, sampler_config())(params, batch, key)
    guided_out = make_sampler(graphdef, sampler_config(guidance_scale=2.0))(params, batch, key)
    assert bool(jnp.all(jnp.isfinite(guided_out)))
    assert float(jnp.abs(plain - guided_out).max()) > 1e-4


def test_bad_method_is_refused():
    with pytest.raises(ValueError, match="ddpm"):
        sample(oracle(jnp.zeros(SHAPE)), GaussianDiffusion.create(respace=5), jax.random.PRNGKey(0), SHAPE, method="euler")
