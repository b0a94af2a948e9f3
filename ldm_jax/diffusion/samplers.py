"""Samplers (DDPM, DDIM, PLMS, DPM-Solver++ 2M, Euler, Euler-ancestral) and the one driver, `sample`.

A sampler is a frozen config dataclass (static: steps, timestep spacing, options) plus a `flax.struct`
object holding its per-step float32 tables. The tables are pytree leaves, so a sampler passed into `jax.jit`
is traced, not baked in as constants; DDIM's `eta` is a leaf too, so `sampler.replace(eta=...)` does not
recompile. Tables are computed on the host in float64 (alphas_cumprod re-accumulated from the schedule's
betas), then cast to float32. Every sampler has the same methods, which is all the driver uses:

  prior(noise) -> x                  the starting point of a from-noise run, noise ~ N(0, I)
  noise_to(x0, noise, step) -> x     x0 noised to the level of `step` (img2img start, inpainting blend)
  init_state(x, step) -> state       a flax.struct state with at least `x` and `step`
  model_input(state) -> (x_in, t)    what the model sees at this evaluation; t is a scalar timestep
  update(state, prediction, key) -> state
  num_steps, num_evals               static ints: steps, and model evaluations (PLMS: steps + 1)

`sample` runs `num_evals` evaluations as one `lax.scan` (use it inside `jax.jit`). Steps run from high noise
to low: `sampler.timesteps[0]` is the noisiest. Samplers in "VP" coordinates (DDPM, DDIM, PLMS, DPM-Solver++)
keep x_t = alpha x0 + sigma eps; Euler and Euler-a keep x = x_t / alpha = x0 + (sigma/alpha) eps (k-diffusion
coordinates) and scale the model input back. Model timesteps are int32 for the discrete samplers and float32
for Euler/Euler-a, as in the diffusers references. Timesteps follow these spacings:

  "uniform"  CompVis DDIM: range(0, T, T // steps) + 1 (the +1 is `steps_offset`; when steps does not
             divide T this gives more than `steps` steps, exactly as CompVis does)
  "quad"     CompVis DDIM: int(linspace(0, sqrt(0.8 T), steps)^2) + 1
  "leading", "linspace", "trailing"   diffusers `timestep_spacing` (leading honours `steps_offset`)

Partial runs (`sample(first_step=, stop_step=, start_latent=)`, bounds traced: changing them does not recompile)
serve an ensemble of expert denoisers, SDXL base + refiner as diffusers' denoising_end / denoising_start: both
use one sampler (same schedule, steps, spacing); the base runs steps [0, m) and returns its unfinished x in the
sampler's coordinates (what diffusers returns with output_type="latent": for Euler the unscaled sample); the
refiner continues from that x at step m without noising it. `denoising_bounds` turns diffusers' fractions into
(first_step, stop_step) on the host. Each run starts with a fresh sampler state, as diffusers' refiner pipeline
does with its own scheduler: DPM-Solver++ takes a first-order step first (lower_order_nums = 0 after
set_begin_index) and PLMS its two-evaluation warm-up again (CompVis; diffusers' PNDMScheduler is no reference
for a run that starts mid-schedule: its warm-up relies on the repeated timestep at the head of its list, and
when the base stops after one step PNDM returns the warm-up's first-order prediction where ours finishes the
step). Single-step samplers given the same key and model make the same split and unsplit runs (step i's
noise is fold_in(key, i) either way).

diffusers agreement (tests/test_samplers.py, tests/test_samplers_sdxl.py, SDXL's betas): same timesteps,
sigmas, model-input scaling and steps, to float32 rounding. Known difference: diffusers' DDIMScheduler steps
to timestep t - T // N whatever the spacing (diffusers issue #12633), which is not the next timestep for
"linspace", nor for "trailing" when N does not divide T; our DDIM steps to the next timestep.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.config import build_dataclass
from ldm_jax.diffusion.schedule import PREDICTION_TYPES, NoiseSchedule, split_prediction

TIMESTEP_SPACINGS = ("uniform", "quad", "leading", "linspace", "trailing")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
ModelFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


# ----------------------------------------------------------------------------------------------- timesteps


def make_timesteps(spacing: str, steps: int, num_train_timesteps: int, steps_offset: int | None = None, *,
                   round_linspace: bool = True) -> np.ndarray:
    """Descending sampling timesteps (float64 numpy, values in [0, T)) for a spacing in TIMESTEP_SPACINGS.

    `steps_offset=None` means the spacing's default: 1 for "uniform"/"quad" (CompVis), 0 otherwise.
    "linspace" and "trailing" take no offset. `round_linspace=False` keeps "linspace" fractional (Euler).
    """
    T = num_train_timesteps
    if not isinstance(steps, (int, np.integer)) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an integer in [1, {T}] (the training timesteps), got {steps!r}")
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"unknown timestep_spacing {spacing!r}; expected one of {TIMESTEP_SPACINGS}")
    if steps_offset is None:
        steps_offset = 1 if spacing in ("uniform", "quad") else 0
    if spacing in ("linspace", "trailing") and steps_offset != 0:
        raise ValueError(f"steps_offset={steps_offset} is not used by timestep_spacing {spacing!r}; pass 0 or None")
    if spacing == "uniform":
        ts = np.arange(0, T, T // steps, dtype=np.float64) + steps_offset
    elif spacing == "quad":
        ts = (np.linspace(0, np.sqrt(T * 0.8), steps) ** 2).astype(np.int64).astype(np.float64) + steps_offset
    elif spacing == "leading":
        ts = np.arange(steps, dtype=np.float64) * (T // steps) + steps_offset
    elif spacing == "linspace":
        ts = np.linspace(0, T - 1, steps)
        ts = ts.round() if round_linspace else ts
    else:
        ts = (np.round(np.arange(T, 0, -T / steps)) - 1)[::-1]
    ts = ts[::-1].copy()
    if ts.min() < 0 or ts.max() > T - 1:
        raise ValueError(f"timestep_spacing {spacing!r} with steps={steps}, steps_offset={steps_offset} gives "
                         f"timesteps outside [0, {T - 1}]: {ts.min():g}..{ts.max():g}")
    return ts


def _alphas_cumprod64(schedule: NoiseSchedule) -> np.ndarray:
    """alphas_cumprod in float64 from the schedule's betas: 1 - a_t / a_prev stays accurate near t = 0."""
    if isinstance(schedule.betas, jax.core.Tracer):
        raise ValueError("make a sampler outside jax.jit: its tables are built on the host from the schedule")
    return np.cumprod(1.0 - np.asarray(schedule.betas, np.float64))


def _f32(x: Any) -> jax.Array:
    return jnp.asarray(np.asarray(x, np.float64), jnp.float32)


def _check_common(config: Any) -> None:
    if config.prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"{type(config).__name__}.prediction_type={config.prediction_type!r}; expected one of "
                         f"{PREDICTION_TYPES}")


def _karras(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) noise levels, descending from sigma_max to sigma_min, float64 (n,)."""
    ramp = np.linspace(0, 1, n)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def _sigma_to_t(sigmas: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps whose (log-linearly interpolated) noise level is `sigmas`."""
    log_train = np.log(train_sigmas)
    return np.interp(np.log(np.maximum(sigmas, 1e-10)), log_train, np.arange(len(train_sigmas), dtype=np.float64))


def _per_example(key: jax.Array) -> bool:
    """Whether `key` is a (B,) array of typed per-example keys (rather than one key)."""
    return jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) and key.ndim == 1


def _normal(key: jax.Array, like: jax.Array) -> jax.Array:
    """N(0, I) shaped like `like`; a (B,) array of per-example keys draws example b's noise from key[b]."""
    if _per_example(key):
        return jax.vmap(lambda k, x: jax.random.normal(k, x.shape, jnp.float32))(key, like)
    return jax.random.normal(key, like.shape, jnp.float32)


def _fold_in(key: jax.Array, data: jax.Array) -> jax.Array:
    """fold_in for one key or for a (B,) array of per-example keys."""
    if _per_example(key):
        return jax.vmap(jax.random.fold_in, in_axes=(0, None))(key, data)
    return jax.random.fold_in(key, data)


# ---------------------------------------------------------------------------------------------------- states


@flax.struct.dataclass
class StepState:
    """State of the one-evaluation-per-step samplers: x (B, H, W, C) float32 and the step index ()."""

    x: jax.Array
    step: jax.Array


@flax.struct.dataclass
class PLMSState:
    """PLMS state: `count` evaluations done; `ets` (3, B, H, W, C) the last eps, newest first; `x_pred` the
    warm-up's Euler prediction that the second evaluation (count == 1) looks at."""

    x: jax.Array
    step: jax.Array
    count: jax.Array
    x_pred: jax.Array
    ets: jax.Array


@flax.struct.dataclass
class DPMSolverState:
    """DPM-Solver++ state: `count` steps done in this run and the previous step's x0 prediction."""

    x: jax.Array
    step: jax.Array
    count: jax.Array
    prev_x0: jax.Array


def _step_state(x: jax.Array, step: Any) -> StepState:
    return StepState(x=x.astype(jnp.float32), step=jnp.asarray(step, jnp.int32))


# ------------------------------------------------------------------------------------- VP (alpha_bar) tables


def _vp_tables(schedule: NoiseSchedule, timesteps: np.ndarray, final_alpha: float) -> dict[str, np.ndarray]:
    ac = _alphas_cumprod64(schedule)
    idx = timesteps.astype(np.int64)
    a_t = ac[idx]
    a_prev = np.append(ac[idx[1:]], final_alpha)
    return dict(a_t=a_t, a_prev=a_prev)


def _vp_noise_to(sqrt_alpha: jax.Array, sqrt_one_minus_alpha: jax.Array, x0: jax.Array, noise: jax.Array,
                 step: jax.Array) -> jax.Array:
    return sqrt_alpha[step] * x0 + sqrt_one_minus_alpha[step] * noise


# ------------------------------------------------------------------------------------------------------ DDIM


class _VPStepSampler:
    """The methods DDIM and DDPM share: one model evaluation per step, x in the variance-preserving
    coordinates, tables `timesteps`, `sqrt_alpha`, `sqrt_one_minus_alpha` indexed by the step."""

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    @property
    def num_evals(self) -> int:
        return self.num_steps

    def prior(self, noise: jax.Array) -> jax.Array:
        return noise.astype(jnp.float32)

    def noise_to(self, x0: jax.Array, noise: jax.Array, step: jax.Array) -> jax.Array:
        return _vp_noise_to(self.sqrt_alpha, self.sqrt_one_minus_alpha, x0, noise, step)

    def init_state(self, x: jax.Array, step: Any = 0) -> StepState:
        return _step_state(x, step)

    def model_input(self, state: StepState) -> tuple[jax.Array, jax.Array]:
        return state.x, self.timesteps[state.step]


@dataclasses.dataclass(frozen=True)
class DDIMConfig:
    """DDIM (Song et al. 2021). Defaults are CompVis: "uniform" spacing, +1 offset, last alpha_prev = a[0].

    `set_alpha_to_one=True` makes the last step land on alpha = 1 (diffusers option). `clip_sample` clips
    the x0 prediction to [-c, c] (diffusers option; None = no clipping, as CompVis).
    """

    steps: int
    timestep_spacing: str = "uniform"
    steps_offset: int | None = None
    prediction_type: str = "eps"
    set_alpha_to_one: bool = False
    clip_sample: float | None = None


@flax.struct.dataclass
class DDIMSampler(_VPStepSampler):
    """DDIM with a traced `eta` (0: deterministic DDIM, 1: DDPM-like ancestral noise). Tables are (N,)."""

    config: DDIMConfig = flax.struct.field(pytree_node=False)
    timesteps: jax.Array
    sqrt_alpha: jax.Array
    sqrt_one_minus_alpha: jax.Array
    alpha_prev: jax.Array
    variance: jax.Array  # DDIM sigma_t^2 at eta = 1
    eta: jax.Array

    @classmethod
    def create(cls, schedule: NoiseSchedule, config: DDIMConfig, eta: float = 0.0) -> DDIMSampler:
        """Builds the tables; `eta` >= 0 is a traced leaf (replace it without recompiling)."""
        _check_common(config)
        ac = _alphas_cumprod64(schedule)
        ts = make_timesteps(config.timestep_spacing, config.steps, len(ac), config.steps_offset)
        tab = _vp_tables(schedule, ts, 1.0 if config.set_alpha_to_one else ac[0])
        a_t, a_prev = tab["a_t"], tab["a_prev"]
        if not isinstance(eta, jax.core.Tracer) and not float(eta) >= 0:
            raise ValueError(f"DDIM eta must be >= 0, got {eta}")
        return cls(config=config, timesteps=jnp.asarray(ts, jnp.int32), sqrt_alpha=_f32(np.sqrt(a_t)),
                   sqrt_one_minus_alpha=_f32(np.sqrt(1 - a_t)), alpha_prev=_f32(a_prev),
                   variance=_f32((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)), eta=jnp.asarray(eta, jnp.float32))

    def update(self, state: StepState, prediction: jax.Array, key: jax.Array) -> StepState:
        k = state.step
        x0, eps = split_prediction(prediction, state.x, self.sqrt_alpha[k], self.sqrt_one_minus_alpha[k],
                                   self.config.prediction_type)
        if self.config.clip_sample is not None:
            x0 = jnp.clip(x0, -self.config.clip_sample, self.config.clip_sample)
        std = self.eta * jnp.sqrt(self.variance[k])
        a_prev = self.alpha_prev[k]
        x = jnp.sqrt(a_prev) * x0 + jnp.sqrt(jnp.maximum(1 - a_prev - std**2, 0.0)) * eps
        # eta = 0 (the usual DDIM) skips the draw: on CPU threefry is a few % of a small model's step.
        noise = jax.lax.cond(self.eta > 0, lambda: std * _normal(key, x), lambda: jnp.zeros_like(x))
        return StepState(x=x + noise, step=k + 1)


# ------------------------------------------------------------------------------------------------------ PLMS


@dataclasses.dataclass(frozen=True)
class PLMSConfig:
    """PLMS, the CompVis variant (eta = 0 only): a pseudo improved-Euler warm-up step (two model
    evaluations), then Adams-Bashforth of order 2, 3, 4 on eps, each step a DDIM (eta = 0) update."""

    steps: int
    timestep_spacing: str = "uniform"
    steps_offset: int | None = None
    prediction_type: str = "eps"
    set_alpha_to_one: bool = False


# Rows: coefficients of (this eps, ets[0], ets[1], ets[2]) by phase: warm-up predictor, warm-up corrector,
# then Adams-Bashforth with 1, 2, 3 stored eps.
_PLMS_COEFFS = np.array([
    [1.0, 0.0, 0.0, 0.0],
    [0.5, 0.5, 0.0, 0.0],
    [3 / 2, -1 / 2, 0.0, 0.0],
    [23 / 12, -16 / 12, 5 / 12, 0.0],
    [55 / 24, -59 / 24, 37 / 24, -9 / 24],
])


@flax.struct.dataclass
class PLMSSampler:
    """PLMS (Liu et al. 2022, as CompVis): num_evals = steps + 1."""

    config: PLMSConfig = flax.struct.field(pytree_node=False)
    timesteps: jax.Array
    sqrt_alpha: jax.Array
    sqrt_one_minus_alpha: jax.Array
    alpha_prev: jax.Array

    @classmethod
    def create(cls, schedule: NoiseSchedule, config: PLMSConfig) -> PLMSSampler:
        """Builds the tables (N,)."""
        _check_common(config)
        ac = _alphas_cumprod64(schedule)
        ts = make_timesteps(config.timestep_spacing, config.steps, len(ac), config.steps_offset)
        tab = _vp_tables(schedule, ts, 1.0 if config.set_alpha_to_one else ac[0])
        return cls(config=config, timesteps=jnp.asarray(ts, jnp.int32), sqrt_alpha=_f32(np.sqrt(tab["a_t"])),
                   sqrt_one_minus_alpha=_f32(np.sqrt(1 - tab["a_t"])), alpha_prev=_f32(tab["a_prev"]))

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    @property
    def num_evals(self) -> int:
        return self.num_steps + 1

    def prior(self, noise: jax.Array) -> jax.Array:
        return noise.astype(jnp.float32)

    def noise_to(self, x0: jax.Array, noise: jax.Array, step: jax.Array) -> jax.Array:
        return _vp_noise_to(self.sqrt_alpha, self.sqrt_one_minus_alpha, x0, noise, step)

    def init_state(self, x: jax.Array, step: Any = 0) -> PLMSState:
        x = x.astype(jnp.float32)
        return PLMSState(x=x, step=jnp.asarray(step, jnp.int32), count=jnp.zeros((), jnp.int32), x_pred=x,
                         ets=jnp.zeros((3,) + x.shape, jnp.float32))

    def _input_index(self, state: PLMSState) -> jax.Array:
        # The warm-up's second evaluation looks at the next timestep (CompVis clamps it at the last one).
        return jnp.where(state.count == 1, jnp.minimum(state.step + 1, self.num_steps - 1), state.step)

    def model_input(self, state: PLMSState) -> tuple[jax.Array, jax.Array]:
        return jnp.where(state.count == 1, state.x_pred, state.x), self.timesteps[self._input_index(state)]

    def update(self, state: PLMSState, prediction: jax.Array, key: jax.Array) -> PLMSState:
        del key  # deterministic
        k, count = state.step, state.count
        j = self._input_index(state)
        x_in = jnp.where(count == 1, state.x_pred, state.x)
        _, eps = split_prediction(prediction, x_in, self.sqrt_alpha[j], self.sqrt_one_minus_alpha[j],
                                  self.config.prediction_type)
        row = jnp.where(count <= 1, count, jnp.minimum(count - 1, 3) + 1)
        c = jnp.asarray(_PLMS_COEFFS, jnp.float32)[row]
        eps_prime = c[0] * eps + c[1] * state.ets[0] + c[2] * state.ets[1] + c[3] * state.ets[2]
        x0 = (state.x - self.sqrt_one_minus_alpha[k] * eps_prime) / self.sqrt_alpha[k]
        a_prev = self.alpha_prev[k]
        x_next = jnp.sqrt(a_prev) * x0 + jnp.sqrt(1 - a_prev) * eps_prime
        pushed = jnp.concatenate([eps[None], state.ets[:2]], axis=0)
        return PLMSState(
            x=jnp.where(count == 0, state.x, x_next),
            step=k + (count > 0).astype(jnp.int32),
            count=count + 1,
            x_pred=x_next,
            ets=jnp.where(count == 1, state.ets, pushed),
        )


# ------------------------------------------------------------------------------------------------------ DDPM


@dataclasses.dataclass(frozen=True)
class DDPMConfig:
    """Ancestral DDPM with the fixed small variance (posterior variance, log clipped at 1e-20). With fewer
    steps than training timesteps it takes the strided posterior (as diffusers' DDPMScheduler)."""

    steps: int
    timestep_spacing: str = "leading"
    steps_offset: int | None = None
    prediction_type: str = "eps"
    clip_sample: float | None = None


@flax.struct.dataclass
class DDPMSampler(_VPStepSampler):
    """DDPM: x_prev = c_x0 x0 + c_xt x_t + std noise; no noise on the last step. Tables are (N,)."""

    config: DDPMConfig = flax.struct.field(pytree_node=False)
    timesteps: jax.Array
    sqrt_alpha: jax.Array
    sqrt_one_minus_alpha: jax.Array
    coef_x0: jax.Array
    coef_xt: jax.Array
    std: jax.Array

    @classmethod
    def create(cls, schedule: NoiseSchedule, config: DDPMConfig) -> DDPMSampler:
        """Builds the tables (N,)."""
        _check_common(config)
        ac = _alphas_cumprod64(schedule)
        ts = make_timesteps(config.timestep_spacing, config.steps, len(ac), config.steps_offset)
        tab = _vp_tables(schedule, ts, 1.0)
        a_t, a_prev = tab["a_t"], tab["a_prev"]
        beta = 1 - a_t / a_prev
        variance = (1 - a_prev) / (1 - a_t) * beta
        std = np.exp(0.5 * np.log(np.maximum(variance, 1e-20)))
        std[-1] = 0.0
        return cls(config=config, timesteps=jnp.asarray(ts, jnp.int32), sqrt_alpha=_f32(np.sqrt(a_t)),
                   sqrt_one_minus_alpha=_f32(np.sqrt(1 - a_t)), coef_x0=_f32(np.sqrt(a_prev) * beta / (1 - a_t)),
                   coef_xt=_f32(np.sqrt(a_t / a_prev) * (1 - a_prev) / (1 - a_t)), std=_f32(std))

    def update(self, state: StepState, prediction: jax.Array, key: jax.Array) -> StepState:
        k = state.step
        x0, _ = split_prediction(prediction, state.x, self.sqrt_alpha[k], self.sqrt_one_minus_alpha[k],
                                 self.config.prediction_type)
        if self.config.clip_sample is not None:
            x0 = jnp.clip(x0, -self.config.clip_sample, self.config.clip_sample)
        x = self.coef_x0[k] * x0 + self.coef_xt[k] * state.x
        return StepState(x=x + self.std[k] * _normal(key, x), step=k + 1)


# ------------------------------------------------------------------------------------- sigma-based samplers


def _train_sigmas(schedule: NoiseSchedule) -> np.ndarray:
    ac = _alphas_cumprod64(schedule)
    return np.sqrt((1 - ac) / ac)


def _final_sigma(kind: str, train_sigmas: np.ndarray) -> float:
    if kind not in FINAL_SIGMAS_TYPES:
        raise ValueError(f"unknown final_sigmas_type {kind!r}; expected one of {FINAL_SIGMAS_TYPES}")
    return 0.0 if kind == "zero" else float(train_sigmas[0])


@dataclasses.dataclass(frozen=True)
class DPMSolverConfig:
    """DPM-Solver++ 2M (Lu et al. 2022), multistep, data prediction, midpoint form (diffusers defaults).

    The first step of a run is first order; so is the last when `final_sigmas_type="zero"` or when
    `lower_order_final` and steps < 15. `use_karras_sigmas` spaces noise levels as Karras et al. (2022).
    """

    steps: int
    timestep_spacing: str = "linspace"
    steps_offset: int | None = None
    prediction_type: str = "eps"
    lower_order_final: bool = True
    use_karras_sigmas: bool = False
    final_sigmas_type: str = "zero"


@flax.struct.dataclass
class DPMSolverSampler:
    """DPM-Solver++ 2M in VP coordinates: x' = ratio x + b x0 + c (x0 - x0_prev). Tables are (N,)."""

    config: DPMSolverConfig = flax.struct.field(pytree_node=False)
    timesteps: jax.Array
    alpha: jax.Array  # (N,) alpha_t, sigma_t of each step's own level
    sigma: jax.Array
    ratio: jax.Array
    coef_x0: jax.Array
    coef_d1: jax.Array  # zero where the step is first order

    @classmethod
    def create(cls, schedule: NoiseSchedule, config: DPMSolverConfig) -> DPMSolverSampler:
        """Builds the tables (N,); noise levels as diffusers' DPMSolverMultistepScheduler."""
        _check_common(config)
        train = _train_sigmas(schedule)
        T, n = len(train), config.steps
        if config.timestep_spacing in ("linspace", "leading"):
            if not 1 <= n < T:
                raise ValueError(f"steps must be an integer in [1, {T - 1}] for DPM-Solver++ with "
                                 f"{config.timestep_spacing!r} spacing, got {n!r}")
            ts = make_timesteps(config.timestep_spacing, n + 1, T, config.steps_offset)[:-1]
        else:
            ts = make_timesteps(config.timestep_spacing, n, T, config.steps_offset)
        if config.use_karras_sigmas:
            sig = _karras(train[0], train[-1], n)
            ts = np.round(_sigma_to_t(sig, train))
        else:
            sig = np.interp(ts, np.arange(T), train)
        sig = np.append(sig, _final_sigma(config.final_sigmas_type, train))  # (N + 1,) k-diffusion sigmas
        alpha = 1 / np.sqrt(sig**2 + 1)
        vp_sigma = sig * alpha
        ratio = vp_sigma[1:] / vp_sigma[:-1]
        coef_x0 = alpha[1:] * (1 - sig[1:] / sig[:-1])  # alpha_t (1 - exp(-h)), exp(-h) = sig_t / sig_s
        coef_d1 = np.zeros(n)
        last_first_order = config.final_sigmas_type == "zero" or (config.lower_order_final and n < 15)
        for k in range(1, n if not last_first_order else n - 1):
            h = np.log(sig[k] / sig[k + 1])
            h0 = np.log(sig[k - 1] / sig[k])
            coef_d1[k] = 0.5 * coef_x0[k] * h / h0  # 0.5 alpha_t (1 - exp(-h)) / r0, r0 = h0 / h
        return cls(config=config, timesteps=jnp.asarray(ts, jnp.int32), alpha=_f32(alpha[:-1]),
                   sigma=_f32(vp_sigma[:-1]), ratio=_f32(ratio), coef_x0=_f32(coef_x0), coef_d1=_f32(coef_d1))

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    @property
    def num_evals(self) -> int:
        return self.num_steps

    def prior(self, noise: jax.Array) -> jax.Array:
        return noise.astype(jnp.float32)

    def noise_to(self, x0: jax.Array, noise: jax.Array, step: jax.Array) -> jax.Array:
        return self.alpha[step] * x0 + self.sigma[step] * noise

    def init_state(self, x: jax.Array, step: Any = 0) -> DPMSolverState:
        x = x.astype(jnp.float32)
        return DPMSolverState(x=x, step=jnp.asarray(step, jnp.int32), count=jnp.zeros((), jnp.int32),
                              prev_x0=jnp.zeros_like(x))

    def model_input(self, state: DPMSolverState) -> tuple[jax.Array, jax.Array]:
        return state.x, self.timesteps[state.step]

    def update(self, state: DPMSolverState, prediction: jax.Array, key: jax.Array) -> DPMSolverState:
        del key  # deterministic
        k = state.step
        x0, _ = split_prediction(prediction, state.x, self.alpha[k], self.sigma[k], self.config.prediction_type)
        c = jnp.where(state.count > 0, self.coef_d1[k], 0.0)
        x = self.ratio[k] * state.x + self.coef_x0[k] * x0 + c * (x0 - state.prev_x0)
        return DPMSolverState(x=x, step=k + 1, count=state.count + 1, prev_x0=x0)


@dataclasses.dataclass(frozen=True)
class EulerConfig:
    """Euler (Karras et al. 2022, Algorithm 2 without churn) on the probability-flow ODE, as diffusers'
    EulerDiscreteScheduler: linear interpolation of sigmas, optional Karras spacing."""

    steps: int
    timestep_spacing: str = "linspace"
    steps_offset: int | None = None
    prediction_type: str = "eps"
    use_karras_sigmas: bool = False
    final_sigmas_type: str = "zero"


@dataclasses.dataclass(frozen=True)
class EulerAncestralConfig:
    """Euler ancestral, as diffusers' EulerAncestralDiscreteScheduler (eta = 1)."""

    steps: int
    timestep_spacing: str = "linspace"
    steps_offset: int | None = None
    prediction_type: str = "eps"


def _euler_sigmas(schedule: NoiseSchedule, config: Any, karras: bool, final: str) -> tuple[np.ndarray, np.ndarray]:
    train = _train_sigmas(schedule)
    ts = make_timesteps(config.timestep_spacing, config.steps, len(train), config.steps_offset,
                        round_linspace=False)
    sig = np.interp(ts, np.arange(len(train)), train)
    if karras:
        sig = _karras(sig[-1], sig[0], config.steps)
        ts = _sigma_to_t(sig, train)
    return ts, np.append(sig, _final_sigma(final, train))


@flax.struct.dataclass
class EulerSampler:
    """Euler / Euler-ancestral in k-diffusion coordinates x = x0 + sigma eps.

    `sigmas` (N + 1,) ends at the final level; `sigma_up`, `sigma_down` (N,) are zero / the next level for
    plain Euler and the ancestral split for Euler-a.
    """

    config: EulerConfig | EulerAncestralConfig = flax.struct.field(pytree_node=False)
    timesteps: jax.Array
    sigmas: jax.Array
    sigma_down: jax.Array
    sigma_up: jax.Array
    init_sigma: jax.Array

    @classmethod
    def create(cls, schedule: NoiseSchedule, config: EulerConfig | EulerAncestralConfig) -> EulerSampler:
        """Builds the tables; `EulerAncestralConfig` selects the ancestral variant."""
        _check_common(config)
        ancestral = isinstance(config, EulerAncestralConfig)
        if ancestral:
            ts, sig = _euler_sigmas(schedule, config, False, "zero")
            up = np.sqrt(sig[1:] ** 2 * (sig[:-1] ** 2 - sig[1:] ** 2) / sig[:-1] ** 2)
            down = np.sqrt(sig[1:] ** 2 - up**2)
        else:
            ts, sig = _euler_sigmas(schedule, config, config.use_karras_sigmas, config.final_sigmas_type)
            up, down = np.zeros(len(ts)), sig[1:]
        # diffusers: the start is scaled by sigma_max, or by sqrt(sigma_max^2 + 1) for "leading"-type spacings.
        init = sig.max() if config.timestep_spacing in ("linspace", "trailing") else np.sqrt(sig.max() ** 2 + 1)
        return cls(config=config, timesteps=_f32(ts), sigmas=_f32(sig), sigma_down=_f32(down), sigma_up=_f32(up),
                   init_sigma=_f32(init))

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    @property
    def num_evals(self) -> int:
        return self.num_steps

    def prior(self, noise: jax.Array) -> jax.Array:
        return noise.astype(jnp.float32) * self.init_sigma

    def noise_to(self, x0: jax.Array, noise: jax.Array, step: jax.Array) -> jax.Array:
        return x0 + self.sigmas[step] * noise

    def init_state(self, x: jax.Array, step: Any = 0) -> StepState:
        return _step_state(x, step)

    def model_input(self, state: StepState) -> tuple[jax.Array, jax.Array]:
        return state.x / jnp.sqrt(self.sigmas[state.step] ** 2 + 1), self.timesteps[state.step]

    def update(self, state: StepState, prediction: jax.Array, key: jax.Array) -> StepState:
        k = state.step
        sigma = self.sigmas[k]
        alpha = 1 / jnp.sqrt(sigma**2 + 1)  # VP coordinates of the model input: x_t = alpha x
        x0, _ = split_prediction(prediction, state.x * alpha, alpha, sigma * alpha, self.config.prediction_type)
        derivative = (state.x - x0) / sigma
        x = state.x + derivative * (self.sigma_down[k] - sigma) + self.sigma_up[k] * _normal(key, state.x)
        return StepState(x=x, step=k + 1)


# ------------------------------------------------------------------------------------------------- registry

SAMPLERS: dict[str, tuple[type, Any]] = {
    "ddim": (DDIMConfig, DDIMSampler.create),
    "plms": (PLMSConfig, PLMSSampler.create),
    "ddpm": (DDPMConfig, DDPMSampler.create),
    "dpm++": (DPMSolverConfig, DPMSolverSampler.create),
    "euler": (EulerConfig, EulerSampler.create),
    "euler-a": (EulerAncestralConfig, EulerSampler.create),
}


class Sampler(Protocol):
    """What every sampler provides (and all the driver uses). x is (B, H, W, C) float32 in the sampler's
    coordinates; `step` an int32 index into `timesteps` (N,), descending from the noisiest."""

    timesteps: jax.Array

    @property
    def num_steps(self) -> int:
        """N, the number of steps (static)."""

    @property
    def num_evals(self) -> int:
        """Model evaluations in a full run (static): N, or N + 1 for PLMS's warm-up."""

    def prior(self, noise: jax.Array) -> jax.Array:
        """The starting x of a from-noise run, from noise ~ N(0, I)."""

    def noise_to(self, x0: jax.Array, noise: jax.Array, step: jax.Array) -> jax.Array:
        """Clean x0 noised with `noise` to the level of `step`, in the sampler's coordinates."""

    def init_state(self, x: jax.Array, step: Any = 0) -> Any:
        """A flax.struct state (with `x` and `step`) starting at `x`, which is at the level of `step`."""

    def model_input(self, state: Any) -> tuple[jax.Array, jax.Array]:
        """(x_in (B, H, W, C), t scalar int32 or float32): what the model sees at this evaluation."""

    def update(self, state: Any, prediction: jax.Array, key: jax.Array) -> Any:
        """The next state from the model's prediction (B, H, W, C); `key` feeds the step's noise."""


def make_sampler(name: str, schedule: NoiseSchedule, steps: int, **opts: Any) -> Sampler:
    """A sampler by name ("ddim", "plms", "dpm++", "euler", "euler-a", "ddpm") with `steps` steps.

    `opts` are the fields of that sampler's config dataclass; "ddim" also takes `eta` (a traced leaf,
    default 0) and "plms" accepts only `eta=0`. Unknown names or options raise ValueError.
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {sorted(SAMPLERS)}")
    config_cls, create = SAMPLERS[name]
    eta = opts.pop("eta", 0.0) if name in ("ddim", "plms") else None
    if name == "plms" and eta != 0:
        raise ValueError(f"plms requires eta == 0 (the CompVis PLMS sampler is deterministic), got eta={eta}")
    T = schedule.num_timesteps
    if not isinstance(steps, (int, np.integer)) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an integer in [1, {T}] (the training timesteps), got {steps!r}")
    config = build_dataclass(config_cls, dict(steps=int(steps), **opts), where=f"sampler {name!r}")
    return create(schedule, config, eta) if name == "ddim" else create(schedule, config)


# --------------------------------------------------------------------------------------------------- driver


def _raise_if_bad_strength(strength: Any) -> None:
    value = float(np.asarray(strength))
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"img2img strength must be in [0, 1], got {value}")


def check_strength(strength: Any) -> None:
    """ValueError if strength is outside [0, 1]; a traced strength is checked when the program runs."""
    if isinstance(strength, jax.core.Tracer):
        jax.debug.callback(_raise_if_bad_strength, strength)
    else:
        _raise_if_bad_strength(strength)


def img2img_steps(strength: Any, num_steps: int) -> jax.Array:
    """Steps run for img2img at `strength` (CompVis: t_enc = int(strength * steps)), int32 scalar.

    The 1e-4 slack makes decimal strengths whose float32 value falls just short (0.7 * 10 = 6.9999995)
    count as written. (diffusers computes int(steps * strength) in float64, without slack: 0.29 * 100 gives
    28 there and 29 here; `strength_first_step` is diffusers' rule.)
    """
    return jnp.floor(jnp.asarray(strength, jnp.float32) * num_steps + 1e-4).astype(jnp.int32)


def strength_first_step(strength: float, num_steps: int) -> int:
    """The first step an img2img run at `strength` takes, by diffusers' rule (host, float64):
    num_steps - min(int(num_steps * strength), num_steps), as `StableDiffusionXLImg2ImgPipeline.get_timesteps`.

    Pass it to `sample` as `first_step=` (with `init_latent`) to reproduce diffusers' img2img, which noises
    the init latent to that step's level also at strength 1 (where `strength=1` starts from pure noise).
    """
    value = float(strength)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"img2img strength must be in [0, 1], got {value}")
    return num_steps - min(int(num_steps * value), num_steps)


def _concrete_timesteps(sampler: Sampler) -> np.ndarray:
    if isinstance(sampler.timesteps, jax.core.Tracer):
        raise ValueError("compute denoising bounds on the host, outside jax.jit: they need the sampler's timesteps")
    return np.asarray(sampler.timesteps)


def denoising_cutoff(fraction: float, num_train_timesteps: int) -> int:
    """diffusers' discrete_timestep_cutoff for denoising_start / denoising_end = `fraction` in (0, 1):
    int(round(T - fraction * T)), in Python floats (round half to even) exactly as diffusers computes it."""
    if isinstance(fraction, bool) or not isinstance(fraction, (float, int, np.floating)) or not 0 < fraction < 1:
        raise ValueError(f"a denoising fraction must be a number in (0, 1), got {fraction!r}")
    T = int(num_train_timesteps)
    return int(round(T - float(fraction) * T))


def denoising_bounds(sampler: Sampler, num_train_timesteps: int, *, denoising_start: float | None = None,
                     denoising_end: float | None = None) -> tuple[int, int]:
    """(first_step, stop_step) for `sample` from diffusers' SDXL denoising fractions (host ints).

    An ensemble of expert denoisers splits one sampler's steps at the cutoff c = `denoising_cutoff(d, T)`:
    StableDiffusionXLPipeline(denoising_end=d) runs the steps whose timestep is >= c (the first ones) and
    StableDiffusionXLImg2ImgPipeline(denoising_start=d) the steps whose timestep is < c (the last ones), so
    with the same d the base's stop_step is the refiner's first_step. No start: first_step 0; no end: stop_step N.
    diffusers adds one step to the refiner's count for second-order schedulers (Heun, DPM2) when it is even;
    every sampler here takes one model evaluation per step in diffusers' sense (order 1), so none is added.
    Raises ValueError for a fraction outside (0, 1) (diffusers silently ignores one) or start >= end.
    """
    ts = _concrete_timesteps(sampler)
    n = len(ts)
    first, stop = 0, n
    if denoising_start is not None:
        first = n - int((ts < denoising_cutoff(denoising_start, num_train_timesteps)).sum())
    if denoising_end is not None:
        stop = int((ts >= denoising_cutoff(denoising_end, num_train_timesteps)).sum())
    if denoising_start is not None and denoising_end is not None and not denoising_start < denoising_end:
        raise ValueError(f"denoising_start={denoising_start} must be smaller than denoising_end={denoising_end}")
    return first, stop


def _raise_if_bad_steps(first: Any, stop: Any, n: int) -> None:
    first, stop = int(np.asarray(first)), int(np.asarray(stop))
    if not 0 <= first <= stop <= n:
        raise ValueError(f"step bounds must satisfy 0 <= first_step <= stop_step <= {n} (the sampler's steps), "
                         f"got first_step={first}, stop_step={stop}")


def _check_steps(first: Any, stop: Any, n: int) -> None:
    """ValueError for bad step bounds; traced bounds are checked when the program runs."""
    if isinstance(first, jax.core.Tracer) or isinstance(stop, jax.core.Tracer):
        jax.debug.callback(_raise_if_bad_steps, first, stop, n)
    else:
        _raise_if_bad_steps(first, stop, n)


def _check_inputs(noise: jax.Array, init_latent: Any, mask: Any, extra_channels: Any) -> None:
    if noise.ndim != 4:
        raise ValueError(f"noise must be (B, H, W, C), got shape {noise.shape}")
    b, h, w, c = noise.shape
    if init_latent is not None and init_latent.shape != noise.shape:
        raise ValueError(f"init_latent has shape {init_latent.shape}; expected the noise shape {noise.shape}")
    if mask is not None:
        if init_latent is None:
            raise ValueError("inpainting with a mask needs init_latent (the known latent to keep)")
        if mask.shape not in ((b, h, w, 1), (b, h, w, c)):
            raise ValueError(f"inpainting mask has shape {mask.shape}; expected {(b, h, w, 1)} or {(b, h, w, c)}")
    if extra_channels is not None and (extra_channels.ndim != 4 or extra_channels.shape[:3] != (b, h, w)):
        raise ValueError(f"extra_channels has shape {extra_channels.shape}; expected ({b}, {h}, {w}, C_extra)")


def sample(sampler: Sampler, model_fn: ModelFn, noise: jax.Array | None, key: jax.Array, cond: Any = None, *,
           init_latent: jax.Array | None = None, strength: Any = 1.0, mask: jax.Array | None = None,
           extra_channels: jax.Array | None = None, first_step: Any = None, stop_step: Any = None,
           start_latent: jax.Array | None = None, step_cond: Callable[[Any, jax.Array], Any] | None = None
           ) -> jax.Array:
    """Runs `sampler` with `model_fn` as one `lax.scan`; call it inside `jax.jit`.

    Args:
      sampler: from `make_sampler`; a pytree, so pass it as a jit argument (no recompiling on eta).
      model_fn: (x (B, H, W, C + C_extra) float32, t (B,) int32 or float32, cond) -> prediction (B, H, W, C)
        of the sampler's prediction_type. Wrap with `guidance.classifier_free_guidance` for CFG.
      noise: (B, H, W, C) standard normal: the start of a from-noise run, and img2img's added noise. May be
        None when `start_latent` is given (nothing is noised then).
      key: PRNG key; step i's stochastic noise uses fold_in(key, i). Same key, same result. Or a (B,) array
        of typed per-example keys: example b's noise then comes from key[b] alone (independent of the batch).
      cond: any pytree, passed through to model_fn.
      init_latent: (B, H, W, C) clean latent for img2img (SDEdit) and mask blending.
      strength: img2img strength in [0, 1], may be traced: the last int(strength * steps) steps run, starting
        from init_latent noised to the first of them; strength 1 starts from pure noise as txt2img, strength 0
        returns init_latent.
      mask: (B, H, W, 1 or C) in [0, 1], 1 where to generate. Before each model evaluation the known region
        (mask 0) is replaced by init_latent noised to the current level (CompVis); at the end init_latent is
        pasted back there (also when stop_step < N, as diffusers' inpainting does after its last step).
      extra_channels: (B, H, W, C_extra) appended to the model input (e.g. SD inpainting: mask and masked
        latent, see `guidance.inpaint_channels`).
      first_step: int32 scalar in [0, N], may be traced (no recompiling): run steps first_step.. only, instead
        of `strength`. The run starts from `start_latent` if given, else from init_latent noised to the level
        of step first_step (diffusers' img2img `add_noise`, also at first_step 0; see `strength_first_step`).
        first_step N runs nothing and returns start_latent / init_latent.
      stop_step: int32 scalar in [first_step, N], may be traced: run only the steps before it and return x at
        the level of `timesteps[stop_step]`, in the sampler's coordinates (Euler: x0 + sigma eps, not
        scaled), unfinished unless stop_step = N: what diffusers' denoising_end returns as "latent".
      start_latent: (B, H, W, C) x in the sampler's coordinates at the level of step `first_step` (default 0),
        taken as it is (diffusers' denoising_start, add_noise=False): e.g. a base model's stop_step output.
      step_cond: optional step_cond(cond, step) -> the cond model_fn sees at the evaluations of step `step`
        (int32 scalar, the index into `timesteps` of the state being denoised; PLMS's warm-up evaluates step
        first_step twice): per-step conditioning such as ControlNets' guidance start / end.
    Returns:
      (B, H, W, C) float32, the final sample (or, with stop_step < N, the state after stop_step steps).
    """
    ref = start_latent if start_latent is not None else noise
    if ref is None:
        raise ValueError("sample needs noise (or start_latent to continue from)")
    _check_inputs(ref, init_latent, mask, extra_channels)
    if start_latent is not None and noise is not None and noise.shape != start_latent.shape:
        raise ValueError(f"start_latent has shape {start_latent.shape}; expected the noise shape {noise.shape}")
    if _per_example(key) and key.shape[0] != ref.shape[0]:
        raise ValueError(f"{key.shape[0]} per-example keys for a batch of {ref.shape[0]}")
    plain_strength = isinstance(strength, (int, float)) and strength == 1.0
    if first_step is not None and not plain_strength:
        raise ValueError("pass either strength or first_step (the first step to run), not both")
    n = sampler.num_steps
    noise = None if noise is None else noise.astype(jnp.float32)
    init_latent = None if init_latent is None else init_latent.astype(jnp.float32)
    returns_init = None  # traced bool: nothing runs and init_latent is the answer
    if start_latent is not None:
        first = jnp.asarray(0 if first_step is None else first_step, jnp.int32)
        if not plain_strength:
            raise ValueError("strength applies to init_latent; with start_latent give first_step instead")
        x = start_latent.astype(jnp.float32)
    elif first_step is not None:
        if init_latent is None or noise is None:
            raise ValueError("first_step needs start_latent (to continue from) or init_latent and noise (img2img)")
        first = jnp.asarray(first_step, jnp.int32)
        x = sampler.noise_to(init_latent, noise, jnp.minimum(first, n - 1))
        returns_init = first >= n
    elif init_latent is not None:
        if noise is None:
            raise ValueError("img2img needs noise")
        check_strength(strength)
        first = n - img2img_steps(strength, n)
        noised = sampler.noise_to(init_latent, noise, jnp.minimum(first, n - 1))
        x = jnp.where(first == 0, sampler.prior(noise), noised)
        returns_init = first >= n
    else:
        if not plain_strength:
            raise ValueError(f"strength={strength} needs init_latent (img2img); without it pass strength=1.0")
        first = jnp.zeros((), jnp.int32)
        x = sampler.prior(noise)
    stop = jnp.asarray(n if stop_step is None else stop_step, jnp.int32)
    if first_step is not None or stop_step is not None:
        _check_steps(first, stop, n)
    gated = init_latent is not None or start_latent is not None or first_step is not None or stop_step is not None
    state = sampler.init_state(x, first)
    batch = ref.shape[0]

    def evaluate(state):
        step_key = _fold_in(key, state.step)
        if mask is not None:
            known = sampler.noise_to(init_latent, _normal(_fold_in(step_key, 1), state.x), state.step)
            state = state.replace(x=mask * state.x + (1 - mask) * known)
        x_in, t = sampler.model_input(state)
        if extra_channels is not None:
            x_in = jnp.concatenate([x_in, extra_channels.astype(x_in.dtype)], axis=-1)
        step_input = cond if step_cond is None else step_cond(cond, state.step)
        prediction = model_fn(x_in, jnp.full((batch,), t, t.dtype), step_input)
        if prediction.shape != ref.shape:
            raise ValueError(f"model_fn returned shape {prediction.shape}; expected {ref.shape}")
        return sampler.update(state, prediction.astype(jnp.float32), step_key)

    def body(state, i):
        if not gated:
            return evaluate(state), None
        # Evaluation i runs from step `first` on (PLMS's warm-up takes two evaluations at its first step, so
        # a run from `first` needs N + 1 - first of its N + 1) and while the state has not reached `stop`.
        return jax.lax.cond((i >= first) & (state.step < stop), evaluate, lambda s: s, state), None

    state, _ = jax.lax.scan(body, state, jnp.arange(sampler.num_evals))
    x = state.x
    if mask is not None:
        x = mask * x + (1 - mask) * init_latent
    if returns_init is not None:
        x = jnp.where(returns_init, init_latent, x)
    return x
