import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sabr_jax.diffusion import GaussianDiffusion, linear_betas, masked_mean, space_timesteps


def test_linear_schedule_closed_forms():
    d = GaussianDiffusion.create()
    t = np.arange(1000)
    betas = 1e-4 + (2e-2 - 1e-4) * t / 999
    np.testing.assert_allclose(d.betas, betas, rtol=1e-12)
    acp = np.cumprod(1 - betas)
    np.testing.assert_allclose(d.alphas_cumprod, acp, rtol=1e-12)
    # posterior q(x_{t-1} | x_t, x0): variance beta_t (1 - acp_{t-1}) / (1 - acp_t)
    acp_prev = np.append(1.0, acp[:-1])
    np.testing.assert_allclose(d.posterior_variance, betas * (1 - acp_prev) / (1 - acp), rtol=1e-12)
    assert d.posterior_variance[0] == 0.0
    assert d.posterior_log_variance_clipped[0] == pytest.approx(np.log(d.posterior_variance[1]))
    assert d.alphas_cumprod[-1] < 5e-5  # x_T is almost pure noise


def test_posterior_mean_is_the_gaussian_product():
    d = GaussianDiffusion.create()
    rng = np.random.default_rng(0)
    x0, xt = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 3, 4))
    t = jnp.array([5, 700])
    mean, var, _ = d.q_posterior_mean_variance(jnp.asarray(x0), jnp.asarray(xt), t)
    for i, ti in enumerate(np.asarray(t)):
        a, ab_prev = 1 - d.betas[ti], d.alphas_cumprod[ti - 1]
        # product of N(x_{t-1}; sqrt(ab_prev) x0, 1 - ab_prev) and N(x_t; sqrt(a) x_{t-1}, 1 - a)
        precision = 1 / (1 - ab_prev) + a / (1 - a)
        expected = (np.sqrt(ab_prev) * x0[i] / (1 - ab_prev) + np.sqrt(a) * xt[i] / (1 - a)) / precision
        np.testing.assert_allclose(mean[i], expected, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(var[i], 1 / precision, rtol=1e-4)


def test_q_sample_statistics():
    d = GaussianDiffusion.create()
    x0 = jnp.full((1, 20000, 1), 2.0)
    t = jnp.array([300])
    xt = d.q_sample(x0, t, jax.random.normal(jax.random.PRNGKey(0), x0.shape))
    assert float(xt.mean()) == pytest.approx(2.0 * np.sqrt(d.alphas_cumprod[300]), abs=0.03)
    assert float(xt.var()) == pytest.approx(1 - d.alphas_cumprod[300], abs=0.03)


def test_respacing_keeps_cumulative_alphas():
    full = GaussianDiffusion.create()
    spaced = GaussianDiffusion.create(respace=250)
    assert spaced.num_steps == 250
    assert spaced.timesteps[0] == 0 and spaced.timesteps[-1] == 999
    np.testing.assert_allclose(spaced.alphas_cumprod, full.alphas_cumprod[spaced.timesteps], rtol=1e-12)
    assert len(set(space_timesteps(1000, 250))) == 250
    with pytest.raises(ValueError):
        space_timesteps(10, 11)


def test_learned_range_variance_interpolates():
    d = GaussianDiffusion.create()
    xt = jnp.zeros((1, 1, 2))
    t = jnp.array([10])
    out = jnp.concatenate([jnp.zeros((1, 1, 2)), jnp.array([[[-1.0, 1.0]]])], axis=-1)
    _, log_var = d.split_output(out, xt, t)
    np.testing.assert_allclose(log_var[0, 0], [d.posterior_log_variance_clipped[10], np.log(d.betas[10])], rtol=1e-5)


def test_loss_ignores_masked_frames_and_vlb_does_not_train_the_mean():
    d = GaussianDiffusion.create()
    rng = np.random.default_rng(0)
    x0, xt = jnp.asarray(rng.normal(size=(2, 6, 3))), jnp.asarray(rng.normal(size=(2, 6, 3)))
    out = jnp.asarray(rng.normal(size=(2, 6, 6)) * 0.5)
    mask = jnp.asarray(np.arange(6)[None] < np.array([[6], [3]]))
    t = jnp.array([0, 400])
    loss, terms = d.loss(out, x0, xt, t, mask)
    spoiled = out.at[1, 3:].set(1e3)
    assert float(d.loss(spoiled, x0, xt, t, mask)[0]) == pytest.approx(float(loss))
    # per example mean then mean over examples
    se = np.mean((np.asarray(out[..., :3]) - np.asarray(x0)) ** 2, -1)
    assert float(terms["mse"]) == pytest.approx((se[0].mean() + se[1, :3].mean()) / 2, rel=1e-5)
    # the vlb gradient reaches only the variance half of the output
    grad = jax.grad(lambda o: d.loss(o, x0, xt, t, mask)[1]["vlb"])(out)
    assert float(jnp.abs(grad[..., :3]).max()) == 0.0 and float(jnp.abs(grad[..., 3:]).max()) > 0


def test_masked_mean_of_empty_example():
    values = jnp.ones((2, 4))
    mask = jnp.array([[True, True, False, False], [False] * 4])
    assert float(masked_mean(values, mask)) == 1.0


def test_linear_betas_other_lengths_scale():
    np.testing.assert_allclose(linear_betas(100)[[0, -1]], [1e-3, 0.2])


def test_feature_weights_reweigh_the_fit_but_not_the_reported_mse():
    d = GaussianDiffusion.create(100)
    rng = np.random.default_rng(0)
    x0, x_t = (jnp.asarray(rng.normal(size=(2, 5, 4)), jnp.float32) for _ in range(2))
    out = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
    t, mask = jnp.array([3, 50]), jnp.ones((2, 5), bool)
    plain, terms = d.loss(out, x0, x_t, t, mask)
    same, _ = d.loss(out, x0, x_t, t, mask, np.ones(4, np.float32))
    np.testing.assert_allclose(same, plain, rtol=1e-6)
    only_first, weighted = d.loss(out, x0, x_t, t, mask, np.array([1.0, 0, 0, 0], np.float32))
    np.testing.assert_allclose(weighted["mse"], terms["mse"])  # the logged figure stays the plain mean
    first_err = masked_mean(jnp.square(out[..., :1] - x0[..., :1])[..., 0], mask)
    np.testing.assert_allclose(only_first, first_err + terms["vlb"], rtol=1e-5)
