"""Gaussian diffusion in the ADM parameterisation: x0 prediction, learned-range variance.

Shapes: `x0`, `x_t` are [B, L, F] (F = 161 motion features); `t` is [B] int32 step
indices into this (possibly respaced) schedule; `model_out` is [B, L, 2F] = predicted
x0 and the variance interpolation value v in [-1, 1]. Masks are [B, L] bool, True where a
frame counts (valid and not context); the loss takes them as per-frame weights [B, L]
(`frame_weights`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

LOSS_WEIGHTINGS = ("frame", "clip")  # how `frame_weights` weighs a batch's frames (config: loss_weighting)
SAMPLING_METHODS = ("ddpm", "ddim")  # the reverse steps of `GaussianDiffusion.reverse_step` (config: sample.method)


def linear_betas(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2) -> np.ndarray:
    """ADM's linear schedule, scaled so that 1000 steps give beta_start..beta_end."""
    scale = 1000.0 / num_steps
    return np.linspace(scale * beta_start, scale * beta_end, num_steps, dtype=np.float64)


def space_timesteps(num_steps: int, count: int) -> np.ndarray:
    """`count` evenly spaced steps out of `num_steps`, first and last included (ADM's rule)."""
    if not 1 <= count <= num_steps:
        raise ValueError(f"cannot keep {count} of {num_steps} diffusion steps")
    if count == 1:
        return np.array([0])
    stride = (num_steps - 1) / (count - 1)
    return np.array(sorted({round(i * stride) for i in range(count)}))


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianDiffusion:
    """A schedule and the math on it. Arrays are float64 numpy, cast to float32 when used.

    `timesteps[i]` is the original (1000-step) index of step i: what the network sees.
    """

    betas: np.ndarray  # [K]
    timesteps: np.ndarray  # [K] int

    @classmethod
    def from_config(cls, diffusion_cfg, respace: int | None = None):
        """The run's diffusion from its config's `diffusion` section (num_steps, beta_start,
        beta_end); respace: the sampler's step count (None: every step, for training)."""
        d = diffusion_cfg
        return cls.create(d.num_steps, d.beta_start, d.beta_end, respace=respace)

    @classmethod
    def create(cls, num_steps=1000, beta_start=1e-4, beta_end=2e-2, respace: int | None = None):
        betas = linear_betas(num_steps, beta_start, beta_end)
        if respace is None or respace == num_steps:
            return cls(betas, np.arange(num_steps))
        keep = space_timesteps(num_steps, respace)
        alphas_cumprod = np.cumprod(1.0 - betas)[keep]
        prev = np.concatenate([[1.0], alphas_cumprod[:-1]])
        return cls(1.0 - alphas_cumprod / prev, keep)

    def __post_init__(self):
        betas = np.asarray(self.betas, np.float64)
        alphas_cumprod = np.cumprod(1.0 - betas)
        prev = np.concatenate([[1.0], alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
        derived = dict(
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=prev,
            sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
            posterior_variance=posterior_variance,
            # The posterior variance is 0 at step 0: clip the log to the next value (ADM).
            posterior_log_variance_clipped=np.log(
                np.append(posterior_variance[1], posterior_variance[1:]) if len(betas) > 1 else betas
            ),
            posterior_mean_coef1=betas * np.sqrt(prev) / (1.0 - alphas_cumprod),
            posterior_mean_coef2=(1.0 - prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
            log_betas=np.log(betas),
        )
        for name, value in derived.items():
            object.__setattr__(self, name, value)

    @property
    def num_steps(self) -> int:
        return len(self.betas)

    # -------------------------------------------------------------- forward process
    def q_sample(self, x0, t, noise):
        """Sample x_t ~ q(x_t | x0)."""
        return (
            at_step(self.sqrt_alphas_cumprod, t, x0) * x0 + at_step(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def q_posterior_mean_variance(self, x0, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0)."""
        mean = at_step(self.posterior_mean_coef1, t, x0) * x0 + at_step(self.posterior_mean_coef2, t, x0) * x_t
        return mean, at_step(self.posterior_variance, t, x0), at_step(self.posterior_log_variance_clipped, t, x0)

    # -------------------------------------------------------------- reverse process
    def split_output(self, model_out, x_t, t, clamp: bool = False):
        """model_out [..., 2F] -> (x0 prediction, log variance of p(x_{t-1} | x_t)), ADM learned range.

        The log variance interpolates between the posterior's (v = -1) and beta_t's
        (v = +1), as in ADM, which trains v unconstrained. clamp=True (sampling) keeps it
        inside that range, where every true reverse-process variance lies: an
        undertrained network can otherwise ask for far more noise than beta_t.
        """
        x0, v = jnp.split(model_out, 2, axis=-1)
        min_log = at_step(self.posterior_log_variance_clipped, t, x_t)
        max_log = at_step(self.log_betas, t, x_t)
        frac = (v + 1.0) / 2.0
        if clamp:
            frac = jnp.clip(frac, 0.0, 1.0)
        return x0, frac * max_log + (1.0 - frac) * min_log

    def reverse_step(self, x0, x_t, t, log_var, noise, method: str, eta: float = 0.0):
        """x_{t-1} from x_t and the x0 prediction: 'ddpm' draws from p(x_{t-1} | x_t) with the
        (learned) log_var, 'ddim' takes the DDIM step with noise scale eta (0: deterministic).
        noise is standard normal like x_t (zero at the last step)."""
        if method == "ddpm":
            mean, _, _ = self.q_posterior_mean_variance(x0, x_t, t)
            return mean + jnp.exp(0.5 * log_var) * noise
        if method != "ddim":
            raise ValueError(f"sampling method must be one of {SAMPLING_METHODS}, got {method!r}")
        eps = self.predict_eps(x0, x_t, t)
        alpha, alpha_prev = at_step(self.alphas_cumprod, t, x_t), at_step(self.alphas_cumprod_prev, t, x_t)
        sigma = eta * jnp.sqrt((1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev))
        return x0 * jnp.sqrt(alpha_prev) + jnp.sqrt(1 - alpha_prev - sigma**2) * eps + sigma * noise

    def predict_eps(self, x0_pred, x_t, t):
        """The noise implied by an x0 prediction at x_t."""
        return (x_t - at_step(self.sqrt_alphas_cumprod, t, x_t) * x0_pred) / at_step(
            self.sqrt_one_minus_alphas_cumprod, t, x_t
        )

    # -------------------------------------------------------------- training loss
    def loss(self, model_out, x0, x_t, t, weights, feature_weights=None):
        """ADM hybrid loss: weighted MSE on x0 plus L_vlb for the variance.

        weights [B, L] float: each frame's weight in the batch's loss (`frame_weights`: they
        sum to 1 over the batch, 0 on frames that do not count). The loss is the weighted sum
        over frames of per-frame terms, so the sum of the losses of micro-batches split from
        one batch (with their rows of its weights) is that batch's loss, exactly.

        feature_weights [F] (optional) weighs the features in the x0 term of the loss, as
        sum(w * err^2) / sum(w); the returned "mse" term is always the plain mean.

        The L_vlb term sees the predicted mean through a stop-gradient, so it trains only
        the variance. At step 0 it is the Gaussian negative log-likelihood of x0 under
        p(x_0 | x_1) (the motion is continuous: no discretised decoder). Both terms are in
        per-feature means; L_vlb in bits. Returns (loss scalar, dict of scalar terms).
        """
        if weights.dtype == jnp.bool_:
            raise TypeError("GaussianDiffusion.loss takes per-frame weights (frame_weights(mask)), not a mask")
        x0_pred, log_var = self.split_output(model_out, x_t, t)
        mse = jnp.mean(jnp.square(x0_pred - x0), axis=-1)  # [B, L]
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, x_t, t)
        pred_mean, _, _ = self.q_posterior_mean_variance(jax.lax.stop_gradient(x0_pred), x_t, t)
        kl = normal_kl(true_mean, true_log_var, pred_mean, log_var)
        nll = -gaussian_log_likelihood(x0, pred_mean, log_var)
        first = (t == 0).reshape(-1, *([1] * (x0.ndim - 1)))
        vlb = jnp.mean(jnp.where(first, nll, kl), axis=-1) / math.log(2.0)  # [B, L]
        terms = {"mse": jnp.sum(mse * weights), "vlb": jnp.sum(vlb * weights)}
        fit = terms["mse"]
        if feature_weights is not None:
            w = jnp.asarray(feature_weights, jnp.float32)
            fit = jnp.sum(jnp.sum(w * jnp.square(x0_pred - x0), axis=-1) / jnp.sum(w) * weights)
        return fit + terms["vlb"], terms


def at_step(array: np.ndarray, t, like):
    """array[t] as float32, shaped [B, 1, ..., 1] to broadcast against `like`."""
    values = jnp.asarray(array, jnp.float32)[t]
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp logvar1) || N(mean2, exp logvar2)) per element, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def gaussian_log_likelihood(x, mean, log_var):
    """log N(x; mean, exp log_var) per element, in nats."""
    return -0.5 * (math.log(2.0 * math.pi) + log_var + jnp.square(x - mean) * jnp.exp(-log_var))


def frame_weights(mask, weighting: str = "frame"):
    """Each frame's weight in a batch's loss: mask [B, L] bool (True where a frame counts) ->
    [B, L] float32, summing to 1 over the batch (all 0 when no frame counts).

    'frame' (the default): every counted frame of the batch weighs the same, so the loss is
    the mean over all of them, as the paper's per-frame MSE (and ADM's fixed-length batches)
    have it: a clip weighs in proportion to its counted frames. 'clip': every example with a
    counted frame weighs the same, shared equally by its frames (a clip with none weighs 0).

    The sums run over the whole of `mask`: given the global batch inside jit (sharded over
    devices and hosts), they are global, and micro-batches split from it keep their share.
    """
    mask = mask.astype(jnp.float32)
    if weighting == "frame":
        return mask / jnp.maximum(mask.sum(), 1.0)
    if weighting == "clip":
        count = mask.sum(-1, keepdims=True)
        return mask / jnp.maximum(count, 1.0) / jnp.maximum((count > 0).sum(), 1.0)
    raise ValueError(f"loss weighting must be one of {LOSS_WEIGHTINGS}, got {weighting!r}")
