"""Samplers on an analytic problem: data x0 ~ N(mu, s^2) per channel, with the exact denoiser in closed form.

With x_t = alpha x0 + sigma eps, x_t ~ N(alpha mu, alpha^2 s^2 + sigma^2) and
  E[eps | x_t] = sigma (x_t - alpha mu) / (alpha^2 s^2 + sigma^2),
  E[x0 | x_t] = mu + alpha s^2 (x_t - alpha mu) / (alpha^2 s^2 + sigma^2).
The probability-flow ODE maps the marginal at one level to the marginal at another; in 1-D that flow is
monotone, so it is the affine map that keeps z = (x - alpha mu) / sqrt(alpha^2 s^2 + sigma^2) fixed. The
deterministic samplers must converge to it at their order; the stochastic ones must produce exactly the
Gaussian law that their own discretisation implies (propagated here in float64 from their tables).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion import samplers
from ldm_jax.diffusion.schedule import PREDICTION_TYPES, make_schedule, prediction_from

SCHEDULE = make_schedule(beta_schedule="linear", linear_start=0.00085, linear_end=0.012)
TRAIN_SIGMAS = jnp.asarray(np.sqrt(1 / np.cumprod(1 - np.asarray(SCHEDULE.betas, np.float64)) - 1), jnp.float32)
MU = np.array([0.5, -0.3, 0.0, 0.8])
S = np.array([0.5, 1.0, 0.2, 0.7])  # the 0.2 channel makes the end of the ODE stiff
NOISE = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))


def _alpha_bar(t):
    """a(t) at integer or fractional timesteps; fractional ones interpolate sigma linearly, as Euler does."""
    sigma = jnp.interp(t.astype(jnp.float32), jnp.arange(1000, dtype=jnp.float32), TRAIN_SIGMAS)
    return 1 / (1 + sigma**2)


def exact_model(prediction_type):
    """The exact eps / x0 / v predictor for the Gaussian data, as a model_fn."""

    def model(x, t, cond=None):
        a = _alpha_bar(t).reshape(-1, 1, 1, 1)
        alpha, sigma = jnp.sqrt(a), jnp.sqrt(1 - a)
        var = alpha**2 * S**2 + sigma**2
        eps = sigma * (x - alpha * MU) / var
        x0 = MU + alpha * S**2 * (x - alpha * MU) / var
        return prediction_from(x0, eps, alpha, sigma, prediction_type).astype(jnp.float32)

    return model


def _run(sampler, noise=NOISE, prediction_type="eps"):
    fn = jax.jit(lambda s, n: samplers.sample(s, exact_model(prediction_type), n, jax.random.key(1)))
    return np.asarray(fn(sampler, noise), np.float64)


def _ode_error(name, steps, **opts):
    """Relative max error of a deterministic sampler against the exact flow between its end levels."""
    sampler = samplers.make_sampler(name, SCHEDULE, steps, **opts)
    out = _run(sampler)
    x_start = np.asarray(sampler.prior(NOISE), np.float64)
    if isinstance(sampler, samplers.EulerSampler):  # k-diffusion coordinates: x = x_t / alpha
        a_start, a_end = (1 / (1 + float(sampler.sigmas[i]) ** 2) for i in (0, -1))
        x_start, out = x_start * np.sqrt(a_start), out * np.sqrt(a_end)
    elif isinstance(sampler, samplers.DPMSolverSampler):  # final_sigmas_type="sigma_min": ends at t = 0
        a_start, a_end = float(sampler.alpha[0]) ** 2, 1 / (1 + float(TRAIN_SIGMAS[0]) ** 2)
    else:
        a_start, a_end = float(sampler.sqrt_alpha[0]) ** 2, float(sampler.alpha_prev[-1])
    var_start, var_end = (a * S**2 + 1 - a for a in (a_start, a_end))
    exact = np.sqrt(a_end) * MU + np.sqrt(var_end / var_start) * (x_start - np.sqrt(a_start) * MU)
    return np.abs(out - exact).max() / np.abs(exact).max()


def _orders(errors):
    errors = np.asarray(errors)
    return np.log2(errors[:-1] / errors[1:])  # step counts double each time


def test_ddim_eta0_converges_at_first_order():
    errors = [_ode_error("ddim", n) for n in (50, 100, 200)]  # CompVis "uniform" spacing
    assert errors[-1] < 0.015, errors
    orders = _orders(errors)  # measured 0.96, 0.99
    assert np.all((orders > 0.85) & (orders < 1.2)), (errors, orders)


def test_dpm_solver_pp_2m_converges_at_second_order():
    # Karras noise levels; ending at sigma_min (a final jump to sigma = 0 returns E[x0 | x], not the flow).
    opts = dict(use_karras_sigmas=True, final_sigmas_type="sigma_min", lower_order_final=False)
    errors = [_ode_error("dpm++", n, **opts) for n in (10, 20, 40)]
    assert errors[-1] < 5e-3, errors
    orders = _orders(errors)  # measured 2.12, 2.24
    assert np.all(orders > 1.8), (errors, orders)


def test_euler_converges_at_first_order():
    errors = [_ode_error("euler", n, use_karras_sigmas=True, final_sigmas_type="sigma_min") for n in (10, 20, 40)]
    orders = _orders(errors)  # measured 1.02, 1.01
    assert np.all((orders > 0.9) & (orders < 1.15)), (errors, orders)


def test_plms_beats_ddim_and_converges_faster_than_first_order():
    errors = [_ode_error("plms", n) for n in (20, 40, 80)]
    orders = _orders(errors)  # measured 1.66, 3.12 (higher order once past the warm-up-dominated regime)
    assert np.all(orders > 1.4), (errors, orders)
    assert errors[1] < 0.5 * _ode_error("ddim", 40), errors


@pytest.mark.parametrize("name", sorted(samplers.SAMPLERS))
def test_prediction_types_agree(name):
    """Exact eps, x0 and v predictors describe the same denoiser: every sampler gives the same answer."""
    runs = {kind: _run(samplers.make_sampler(name, SCHEDULE, 5, prediction_type=kind), prediction_type=kind)
            for kind in PREDICTION_TYPES}
    for kind in ("x0", "v"):
        np.testing.assert_allclose(runs[kind], runs["eps"], rtol=1e-5, atol=1e-5 * np.abs(runs["eps"]).max())


def _affine_step(sampler, k):
    """(A, B, std): one step of `sampler` with the exact denoiser is x' = A x + B + std z, per channel."""
    if isinstance(sampler, samplers.EulerSampler):
        sigma = float(sampler.sigmas[k])
        alpha = 1 / np.sqrt(1 + sigma**2)
        gain = alpha * S**2 / (alpha**2 * S**2 + (sigma * alpha) ** 2)  # x0 = mu + gain (alpha x - alpha mu)
        r = (float(sampler.sigma_down[k]) - sigma) / sigma  # x' = x + r (x - x0) + up z
        return 1 + r - r * gain * alpha, -r * MU * (1 - gain * alpha), float(sampler.sigma_up[k])
    alpha = float(sampler.sqrt_alpha[k])
    var = alpha**2 * S**2 + 1 - alpha**2
    gain, eps_gain = alpha * S**2 / var, np.sqrt(1 - alpha**2) / var  # x0 = gain x + .., eps = eps_gain (x - alpha mu)
    x0_a, x0_b = gain, MU * (1 - gain * alpha)
    if isinstance(sampler, samplers.DDPMSampler):
        c0, cx = float(sampler.coef_x0[k]), float(sampler.coef_xt[k])
        return c0 * x0_a + cx, c0 * x0_b, float(sampler.std[k])
    a_prev = float(sampler.alpha_prev[k])
    std = float(sampler.eta) * np.sqrt(float(sampler.variance[k]))
    d = np.sqrt(1 - a_prev - std**2)
    return np.sqrt(a_prev) * x0_a + d * eps_gain, np.sqrt(a_prev) * x0_b - d * eps_gain * alpha * MU, std


@pytest.mark.parametrize("name, opts", [("ddpm", {}), ("ddim", dict(eta=1.0)), ("euler-a", {})])
def test_stochastic_samplers_produce_their_exact_law(name, opts):
    """Mean and std per channel over 16384 samples match the Gaussian law the discretisation implies, to
    within 5 standard errors; the injected noise must be unit-variance and independent across steps."""
    sampler = samplers.make_sampler(name, SCHEDULE, 20, **opts)
    init = float(sampler.init_sigma) if isinstance(sampler, samplers.EulerSampler) else 1.0
    mean, var = np.zeros(4), np.full(4, init**2)
    for k in range(sampler.num_steps):
        a, b, std = _affine_step(sampler, k)
        mean, var = a * mean + b, a**2 * var + std**2
    out = _run(sampler, jax.random.normal(jax.random.key(5), (64, 16, 16, 4))).reshape(-1, 4)
    n = out.shape[0]
    assert np.all(np.abs(out.mean(0) - mean) < 5 * np.sqrt(var / n)), (out.mean(0), mean)
    assert np.all(np.abs(out.std(0) / np.sqrt(var) - 1) < 5 / np.sqrt(2 * n)), (out.std(0), np.sqrt(var))
    # the law differs clearly from N(mu, s^2) at 20 steps (fixed small variance under-disperses)
    assert np.all(np.sqrt(var) < 0.95 * S)
