"""The diffusion process: beta schedules, `NoiseSchedule`, q_sample, eps/x0/v conversions, training targets,
per-timestep loss weights and the optional learned per-timestep log-variance.

Contract (matches the reference `ldm.models.diffusion.ddpm.DDPM.register_schedule`):
- Betas and every derived array are computed in float64 numpy, then cast to float32 (`NoiseSchedule`).
- Schedule names are the reference's: "linear" (linspace in sqrt space, squared; diffusers "scaled_linear"),
  "sqrt_linear" (plain linspace; diffusers "linear"), "sqrt" (sqrt of a linspace), "cosine" (iDDPM, betas
  clipped at 0.999).
- Timesteps `t` index the schedule: integers in [0, T). A prediction is one of "eps", "x0", "v", with
  x_t = alpha * x0 + sigma * eps, alpha = sqrt(alphas_cumprod[t]), sigma = sqrt(1 - alphas_cumprod[t]),
  v = alpha * eps - sigma * x0.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "sqrt_linear", "sqrt", "cosine")
PREDICTION_TYPES = ("eps", "x0", "v")
LOSS_WEIGHTINGS = ("uniform", "min_snr")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """The `diffusion` config section: which beta schedule, over how many training timesteps."""

    beta_schedule: str = "linear"
    num_timesteps: int = 1000
    linear_start: float = 1e-4
    linear_end: float = 2e-2
    cosine_s: float = 8e-3
    v_posterior: float = 0.0  # reference: posterior variance = (1 - v) * beta_tilde + v * beta

    def __post_init__(self):
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"diffusion.beta_schedule={self.beta_schedule!r}; expected one of {BETA_SCHEDULES}")
        if self.num_timesteps < 1:
            raise ValueError(f"diffusion.num_timesteps={self.num_timesteps}; expected >= 1")
        if self.beta_schedule != "cosine" and not 0 < self.linear_start <= self.linear_end < 1:
            raise ValueError(f"diffusion.linear_start={self.linear_start}, linear_end={self.linear_end}; expected "
                             "0 < linear_start <= linear_end < 1")
        if self.beta_schedule == "cosine" and not self.cosine_s > 0:
            raise ValueError(f"diffusion.cosine_s={self.cosine_s}; expected > 0")
        if not 0 <= self.v_posterior <= 1:
            raise ValueError(f"diffusion.v_posterior={self.v_posterior}; expected in [0, 1]")


def make_betas(beta_schedule: str, num_timesteps: int, *, linear_start: float = 1e-4, linear_end: float = 2e-2,
               cosine_s: float = 8e-3) -> np.ndarray:
    """Betas of a named schedule as float64 numpy, shape (num_timesteps,), values in (0, 0.999]."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if beta_schedule == "linear":
        return np.linspace(linear_start**0.5, linear_end**0.5, num_timesteps, dtype=np.float64) ** 2
    if beta_schedule == "sqrt_linear":
        return np.linspace(linear_start, linear_end, num_timesteps, dtype=np.float64)
    if beta_schedule == "sqrt":
        return np.linspace(linear_start, linear_end, num_timesteps, dtype=np.float64) ** 0.5
    if beta_schedule == "cosine":
        steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps + cosine_s
        alphas_cumprod = np.cos(steps / (1 + cosine_s) * np.pi / 2) ** 2
        alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
        return np.clip(1 - alphas_cumprod[1:] / alphas_cumprod[:-1], 0.0, 0.999)
    raise ValueError(f"unknown beta_schedule {beta_schedule!r}; expected one of {BETA_SCHEDULES}")


@flax.struct.dataclass
class NoiseSchedule:
    """A discrete noise schedule: float32 arrays of shape (T,), computed in float64 (see `from_betas`)."""

    betas: jax.Array
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    log_one_minus_alphas_cumprod: jax.Array
    sqrt_recip_alphas_cumprod: jax.Array
    sqrt_recipm1_alphas_cumprod: jax.Array
    posterior_variance: jax.Array
    posterior_log_variance_clipped: jax.Array  # log(max(posterior_variance, 1e-20)): finite at t = 0
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    @classmethod
    def from_betas(cls, betas: np.ndarray, *, v_posterior: float = 0.0) -> NoiseSchedule:
        """Builds every derived array from betas (T,) in float64, then casts to float32."""
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not np.all((betas > 0) & (betas <= 1)):
            raise ValueError(f"betas must be a 1-D array with values in (0, 1], got shape {betas.shape}")
        alphas = 1.0 - betas
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = (1 - v_posterior) * betas * (1.0 - ac_prev) / (1.0 - ac) + v_posterior * betas
        arrays = dict(
            betas=betas,
            alphas_cumprod=ac,
            alphas_cumprod_prev=ac_prev,
            sqrt_alphas_cumprod=np.sqrt(ac),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
            log_one_minus_alphas_cumprod=np.log(1.0 - ac),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1),
            posterior_variance=post_var,
            posterior_log_variance_clipped=np.log(np.maximum(post_var, 1e-20)),
            posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
            posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
        )
        return cls(**{k: jnp.asarray(v, dtype=jnp.float32) for k, v in arrays.items()})


def make_schedule(config: ScheduleConfig | None = None, **overrides) -> NoiseSchedule:
    """`NoiseSchedule` from a `ScheduleConfig` (or its fields as keywords)."""
    config = dataclasses.replace(config or ScheduleConfig(), **overrides)
    betas = make_betas(config.beta_schedule, config.num_timesteps, linear_start=config.linear_start,
                       linear_end=config.linear_end, cosine_s=config.cosine_s)
    return NoiseSchedule.from_betas(betas, v_posterior=config.v_posterior)


def _per_example(values: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
    """values[t] for t (B,) int, reshaped to (B, 1, ..., 1) with `ndim` dims in all."""
    t = jnp.asarray(t)
    if t.ndim != 1:
        raise ValueError(f"timesteps must have shape (B,), got {t.shape}")
    return values[t].reshape((t.shape[0],) + (1,) * (ndim - 1))


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def q_sample(schedule: NoiseSchedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Forward process: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise. x0, noise (B, ...), t (B,) int in [0, T)."""
    a = _per_example(schedule.sqrt_alphas_cumprod, t, x0.ndim)
    s = _per_example(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim)
    return a * x0.astype(jnp.float32) + s * noise.astype(jnp.float32)


def split_prediction(pred: jax.Array, x_t: jax.Array, alpha: jax.Array, sigma: jax.Array,
                     prediction_type: str) -> tuple[jax.Array, jax.Array]:
    """(x0, eps) from a model prediction at x_t = alpha x0 + sigma eps (alpha^2 + sigma^2 = 1 for "v").

    pred, x_t (B, ...) float32; alpha, sigma scalars or broadcastable (B, 1, ...), sigma > 0 for "x0".
    """
    _check_prediction_type(prediction_type)
    if prediction_type == "eps":
        return (x_t - sigma * pred) / alpha, pred
    if prediction_type == "x0":
        return pred, (x_t - alpha * pred) / sigma
    return alpha * x_t - sigma * pred, alpha * pred + sigma * x_t


def prediction_from(x0: jax.Array, eps: jax.Array, alpha: jax.Array, sigma: jax.Array,
                    prediction_type: str) -> jax.Array:
    """The inverse of `split_prediction`: what a perfect model predicts given x0 and eps (B, ...)."""
    _check_prediction_type(prediction_type)
    if prediction_type == "eps":
        return eps
    if prediction_type == "x0":
        return x0
    return alpha * eps - sigma * x0


def predict_x0_eps(schedule: NoiseSchedule, pred: jax.Array, x_t: jax.Array, t: jax.Array,
                   prediction_type: str) -> tuple[jax.Array, jax.Array]:
    """(x0, eps) from a prediction at integer timesteps t (B,); pred, x_t (B, ...)."""
    alpha = _per_example(schedule.sqrt_alphas_cumprod, t, x_t.ndim)
    sigma = _per_example(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)
    return split_prediction(pred, x_t, alpha, sigma, prediction_type)


def training_target(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array,
                    prediction_type: str) -> jax.Array:
    """Regression target at t (B,) for the given prediction type: noise, x0, or v = alpha noise - sigma x0."""
    alpha = _per_example(schedule.sqrt_alphas_cumprod, t, x0.ndim)
    sigma = _per_example(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim)
    return prediction_from(x0.astype(jnp.float32), noise.astype(jnp.float32), alpha, sigma, prediction_type)


def snr(schedule: NoiseSchedule, t: jax.Array) -> jax.Array:
    """Signal-to-noise ratio a_t / (1 - a_t) at t (B,), float32 (B,)."""
    ac = schedule.alphas_cumprod[jnp.asarray(t)]
    return ac / (1.0 - ac)


def loss_weights(schedule: NoiseSchedule, t: jax.Array, prediction_type: str, weighting: str = "uniform",
                 min_snr_gamma: float = 5.0) -> jax.Array:
    """Per-example loss weights (B,) for timesteps t (B,).

    "uniform": ones (the reference's L_simple). "min_snr": Min-SNR-gamma (Hang et al. 2023), the weight
    min(SNR, gamma) expressed for the model's own target: / SNR for eps, / (SNR + 1) for v, as is for x0.
    """
    _check_prediction_type(prediction_type)
    if weighting == "uniform":
        return jnp.ones(jnp.shape(t), jnp.float32)
    if weighting != "min_snr":
        raise ValueError(f"unknown loss weighting {weighting!r}; expected one of {LOSS_WEIGHTINGS}")
    s = snr(schedule, t)
    clipped = jnp.minimum(s, min_snr_gamma)
    if prediction_type == "eps":
        return clipped / s
    if prediction_type == "v":
        return clipped / (s + 1.0)
    return clipped


def lvlb_weights(schedule: NoiseSchedule, prediction_type: str) -> jax.Array:
    """The reference's per-timestep VLB weights (T,) (for `original_elbo_weight`), float32.

    eps: beta^2 / (2 posterior_var alpha (1 - a)); x0: 0.5 sqrt(a) / (2 * 1 - a) (the reference's expression,
    kept as written); v: ones. Entry 0 (posterior_var = 0) copies entry 1, as the reference does.
    """
    _check_prediction_type(prediction_type)
    betas = np.asarray(schedule.betas, np.float64)
    ac = np.asarray(schedule.alphas_cumprod, np.float64)
    if prediction_type == "eps":
        with np.errstate(divide="ignore"):
            w = betas**2 / (2 * np.asarray(schedule.posterior_variance, np.float64) * (1 - betas) * (1 - ac))
    elif prediction_type == "x0":
        w = 0.5 * np.sqrt(ac) / (2.0 * 1 - ac)
    else:
        w = np.ones_like(betas)
    w[0] = w[1]
    return jnp.asarray(w, jnp.float32)


class TimestepLogVar(nn.Module):
    """Per-timestep log-variance logvar[t] (reference `logvar`, `logvar_init`, `learn_logvar`).

    Input t (B,) int in [0, num_timesteps); output (B,) float32. With `learn=True` the table is a parameter
    named "logvar" (shape (T,), initialised to `logvar_init`); otherwise it is the constant `logvar_init`.
    """

    num_timesteps: int
    logvar_init: float = 0.0
    learn: bool = False

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        if self.learn:
            table = self.param("logvar", nn.initializers.constant(self.logvar_init), (self.num_timesteps,),
                               jnp.float32)
            return table[t]
        return jnp.full(jnp.shape(t), self.logvar_init, jnp.float32)


def logvar_weighted_loss(loss_simple: jax.Array, logvar_t: jax.Array) -> jax.Array:
    """The reference's loss_simple / exp(logvar_t) + logvar_t, elementwise on (B,) arrays."""
    return loss_simple / jnp.exp(logvar_t) + logvar_t
