import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sabr_jax.diffusion.gaussian import GaussianDiffusion, frame_weights, linear_betas, space_timesteps


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
    weights = frame_weights(mask)
    loss, terms = d.loss(out, x0, xt, t, weights)
    spoiled = out.at[1, 3:].set(1e3)
    assert float(d.loss(spoiled, x0, xt, t, weights)[0]) == pytest.approx(float(loss))
    # the vlb gradient reaches only the variance half of the output
    grad = jax.grad(lambda o: d.loss(o, x0, xt, t, weights)[1]["vlb"])(out)
    assert float(jnp.abs(grad[..., :3]).max()) == 0.0 and float(jnp.abs(grad[..., 3:]).max()) > 0
    with pytest.raises(TypeError, match="weights"):
        d.loss(out, x0, xt, t, mask)  # a mask is not a weighting


def test_frame_weighting_is_the_mean_over_frames_clip_the_mean_of_clip_means():
    """Two clips with 2 and 20 counted frames: 'frame' (the default) gives the mean over the 22
    frames, 'clip' the mean of the two clips' means."""
    d = GaussianDiffusion.create()
    rng = np.random.default_rng(1)
    shape = (2, 24, 3)
    x0, xt = (jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(2))
    out = jnp.asarray(rng.normal(size=(2, 24, 6)), jnp.float32)
    positions = np.arange(24)[None]
    mask = jnp.asarray((positions >= 1) & (positions < np.array([[3], [21]])))  # frames 1-2 and 1-20
    t = jnp.array([5, 600])
    se = np.mean((np.asarray(out[..., :3]) - np.asarray(x0)) ** 2, -1)
    per_frame = np.concatenate([se[0, 1:3], se[1, 1:21]])
    assert per_frame.size == 22
    _, by_frame = d.loss(out, x0, xt, t, frame_weights(mask))
    _, by_clip = d.loss(out, x0, xt, t, frame_weights(mask, "clip"))
    assert float(by_frame["mse"]) == pytest.approx(per_frame.mean(), rel=1e-5)
    assert float(by_clip["mse"]) == pytest.approx((se[0, 1:3].mean() + se[1, 1:21].mean()) / 2, rel=1e-5)
    assert abs(float(by_frame["mse"]) - float(by_clip["mse"])) > 1e-2  # the two differ on this batch


def test_frame_weights_sum_to_one_and_skip_empty_clips():
    mask = jnp.array([[True, True, False, False], [False] * 4, [True, True, True, True]])
    for weighting, row_sums in (("frame", [2 / 6, 0, 4 / 6]), ("clip", [0.5, 0, 0.5])):
        weights = frame_weights(mask, weighting)
        np.testing.assert_allclose(weights.sum(-1), row_sums, rtol=1e-6)
        assert float(jnp.abs(jnp.where(mask, 0.0, weights)).max()) == 0.0  # nothing off the mask
    assert float(frame_weights(jnp.zeros((2, 3), bool)).sum()) == 0.0  # no counted frame: no loss, no NaN
    with pytest.raises(ValueError, match="weighting"):
        frame_weights(mask, "example")


def test_linear_betas_other_lengths_scale():
    np.testing.assert_allclose(linear_betas(100)[[0, -1]], [1e-3, 0.2])


def test_feature_weights_reweigh_the_fit_but_not_the_reported_mse():
    d = GaussianDiffusion.create(100)
    rng = np.random.default_rng(0)
    x0, x_t = (jnp.asarray(rng.normal(size=(2, 5, 4)), jnp.float32) for _ in range(2))
    out = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
    t, weights = jnp.array([3, 50]), frame_weights(jnp.ones((2, 5), bool))
    plain, terms = d.loss(out, x0, x_t, t, weights)
    same, _ = d.loss(out, x0, x_t, t, weights, np.ones(4, np.float32))
    np.testing.assert_allclose(same, plain, rtol=1e-6)
    only_first, weighted = d.loss(out, x0, x_t, t, weights, np.array([1.0, 0, 0, 0], np.float32))
    np.testing.assert_allclose(weighted["mse"], terms["mse"])  # the logged figure stays the plain mean
    first_err = jnp.mean(jnp.square(out[..., 0] - x0[..., 0]))
    np.testing.assert_allclose(only_first, first_err + terms["vlb"], rtol=1e-5)
