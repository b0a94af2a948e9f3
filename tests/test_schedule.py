"""Noise schedules against diffusers and the reference's float64 formulas; q_sample, conversions, targets,
loss weights and the learned log-variance.

Tolerances: betas and derived arrays are float64 cast to float32, so they match float64 formulas to float32
rounding (rtol 1e-6). diffusers accumulates alphas_cumprod in float32 (measured 9.3e-7 relative off the
float64 cumprod at t = 999), hence rtol 2e-6 against diffusers' alphas_cumprod.
"""
import diffusers
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from ldm_jax.config import build_dataclass
from ldm_jax.diffusion import schedule as S

SD = dict(linear_start=0.00085, linear_end=0.012)
# diffusers calls np.array on torch tensors, which warns under numpy 2; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.mark.parametrize("ours, theirs", [("linear", "scaled_linear"), ("sqrt_linear", "linear"),
                                          ("cosine", "squaredcos_cap_v2")])
def test_betas_and_alphas_cumprod_match_diffusers(ours, theirs):
    sched = S.make_schedule(beta_schedule=ours, **SD)
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=SD["linear_start"],
                                  beta_end=SD["linear_end"], beta_schedule=theirs)
    np.testing.assert_allclose(sched.betas, ref.betas.numpy(), rtol=1e-6)
    # the last cosine entry multiplies by 1 - 0.999, which float32 (diffusers) rounds by 1.3e-5 relative
    np.testing.assert_allclose(sched.alphas_cumprod[:-1], ref.alphas_cumprod.numpy()[:-1], rtol=2e-6)
    np.testing.assert_allclose(sched.alphas_cumprod[-1], ref.alphas_cumprod.numpy()[-1], rtol=2e-5)
    assert sched.betas.dtype == jnp.float32 and sched.num_timesteps == 1000


def test_schedule_formulas_in_float64():
    betas = np.linspace(1e-4, 2e-2, 1000) ** 0.5  # "sqrt"
    np.testing.assert_allclose(S.make_betas("sqrt", 1000), betas, rtol=1e-15)
    cosine = S.make_betas("cosine", 1000)
    assert cosine.dtype == np.float64 and cosine.max() == 0.999  # clipped at the end
    sched = S.make_schedule(**SD)
    b = S.make_betas("linear", 1000, **SD)
    ac = np.cumprod(1 - b)
    ac_prev = np.append(1.0, ac[:-1])
    post = b * (1 - ac_prev) / (1 - ac)
    expected = dict(alphas_cumprod=ac, alphas_cumprod_prev=ac_prev, sqrt_alphas_cumprod=np.sqrt(ac),
                    sqrt_one_minus_alphas_cumprod=np.sqrt(1 - ac), log_one_minus_alphas_cumprod=np.log(1 - ac),
                    sqrt_recip_alphas_cumprod=np.sqrt(1 / ac), sqrt_recipm1_alphas_cumprod=np.sqrt(1 / ac - 1),
                    posterior_variance=post, posterior_log_variance_clipped=np.log(np.maximum(post, 1e-20)),
                    posterior_mean_coef1=b * np.sqrt(ac_prev) / (1 - ac),
                    posterior_mean_coef2=(1 - ac_prev) * np.sqrt(1 - b) / (1 - ac))
    for name, value in expected.items():
        np.testing.assert_allclose(getattr(sched, name), value, rtol=1e-6, err_msg=name)
    assert float(sched.posterior_variance[0]) == 0.0 and np.isfinite(sched.posterior_log_variance_clipped).all()
    # diffusers' DDPM fixed_small variance at full steps is the same posterior variance
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear")
    for t in (1, 10, 500, 999):
        np.testing.assert_allclose(sched.posterior_variance[t], ref._get_variance(t).item(), rtol=2e-5)


def test_q_sample_targets_and_conversions():
    sched = S.make_schedule(**SD)
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x0 = jax.random.normal(k1, (3, 4, 4, 2))
    noise = jax.random.normal(k2, x0.shape)
    t = jnp.array([0, 417, 999])
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear")
    ref.alphas_cumprod = torch.tensor(np.asarray(sched.alphas_cumprod))
    x_t = S.q_sample(sched, x0, t, noise)
    torch_x0, torch_noise, torch_t = (torch.tensor(np.asarray(a)) for a in (x0, noise, t))
    np.testing.assert_allclose(x_t, ref.add_noise(torch_x0, torch_noise, torch_t).numpy(), rtol=1e-6, atol=1e-6)
    v = S.training_target(sched, x0, noise, t, "v")
    np.testing.assert_allclose(v, ref.get_velocity(torch_x0, torch_noise, torch_t).numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(S.training_target(sched, x0, noise, t, "eps"), noise)
    np.testing.assert_array_equal(S.training_target(sched, x0, noise, t, "x0"), x0)
    for kind in S.PREDICTION_TYPES:  # a perfect prediction gives back x0 and the noise
        target = S.training_target(sched, x0, noise, t, kind)
        rec_x0, rec_eps = S.predict_x0_eps(sched, target, x_t, t, kind)
        np.testing.assert_allclose(rec_eps, noise, rtol=1e-4, atol=1e-4, err_msg=kind)
        np.testing.assert_allclose(rec_x0[1:], x0[1:], rtol=1e-4, atol=1e-4, err_msg=kind)
    # at t = 999 (alpha = 0.068) eps -> x0 divides by alpha: loose only there
    np.testing.assert_allclose(S.predict_x0_eps(sched, noise, x_t, t, "eps")[0], x0, atol=2e-5 / 0.068)


def test_loss_weights():
    sched = S.make_schedule(**SD)
    t = jnp.array([0, 100, 500, 999])
    np.testing.assert_array_equal(S.loss_weights(sched, t, "eps"), np.ones(4))
    snr = np.asarray(sched.alphas_cumprod)[np.asarray(t)] / (1 - np.asarray(sched.alphas_cumprod)[np.asarray(t)])
    clipped = np.minimum(snr, 5.0)
    np.testing.assert_allclose(S.loss_weights(sched, t, "eps", "min_snr", 5.0), clipped / snr, rtol=1e-5)
    np.testing.assert_allclose(S.loss_weights(sched, t, "v", "min_snr", 5.0), clipped / (snr + 1), rtol=1e-5)
    np.testing.assert_allclose(S.loss_weights(sched, t, "x0", "min_snr", 5.0), clipped, rtol=1e-5)
    assert float(S.loss_weights(sched, t, "eps", "min_snr")[-1]) == 1.0  # low SNR: not down-weighted
    lvlb = S.lvlb_weights(sched, "eps")
    b, ac, pv = (np.asarray(a, np.float64) for a in (sched.betas, sched.alphas_cumprod, sched.posterior_variance))
    b, ac, pv = b[1:], ac[1:], pv[1:]  # posterior variance is 0 at t = 0
    np.testing.assert_allclose(lvlb[1:], b**2 / (2 * pv * (1 - b) * (1 - ac)), rtol=1e-6)
    assert lvlb[0] == lvlb[1] and np.all(S.lvlb_weights(sched, "v") == 1)


def test_timestep_logvar():
    t = jnp.array([0, 5, 9])
    learned = S.TimestepLogVar(num_timesteps=10, logvar_init=-0.5, learn=True)
    params = learned.init(jax.random.key(0), t)
    assert params["params"]["logvar"].shape == (10,)
    np.testing.assert_array_equal(learned.apply(params, t), [-0.5] * 3)
    fixed = S.TimestepLogVar(num_timesteps=10, logvar_init=0.0)
    assert fixed.init(jax.random.key(0), t) == {}
    np.testing.assert_array_equal(fixed.apply({}, t), np.zeros(3))
    loss = jnp.array([0.2, 1.0, 3.0])

    def total(p):
        return S.logvar_weighted_loss(loss, learned.apply(p, t)).sum()

    np.testing.assert_allclose(total(params), float((loss / np.exp(-0.5) - 0.5).sum()), rtol=1e-6)
    grad = jax.grad(total)(params)["params"]["logvar"]
    np.testing.assert_allclose(grad[np.asarray(t)], 1 - loss / np.exp(-0.5), rtol=1e-6)  # d/dl (L e^-l + l)
    assert isinstance(learned, nn.Module)


def test_bad_input():
    with pytest.raises(ValueError, match="unknown beta_schedule 'quadratic'"):
        S.make_betas("quadratic", 1000)
    with pytest.raises(ValueError, match="unknown prediction_type 'epsilon'"):
        S.training_target(S.make_schedule(), jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.zeros((1,), int), "epsilon")
    with pytest.raises(ValueError, match="unknown loss weighting 'snr'"):
        S.loss_weights(S.make_schedule(), jnp.zeros((1,), int), "eps", "snr")
    with pytest.raises(ValueError, match=r"values in \(0, 1\]"):
        S.NoiseSchedule.from_betas(np.array([0.1, 0.0]))
    with pytest.raises(ValueError, match=r"timesteps must have shape \(B,\)"):
        S.q_sample(S.make_schedule(), jnp.zeros((1, 2)), jnp.zeros((1, 1), int), jnp.zeros((1, 2)))
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['linear_stat'\]"):
        build_dataclass(S.ScheduleConfig, ml_collections.ConfigDict(dict(linear_stat=0.1)))


@pytest.mark.parametrize("fields, message", [
    (dict(num_timesteps=0), r"diffusion\.num_timesteps=0; expected >= 1"),
    (dict(beta_schedule="cosin"), r"diffusion\.beta_schedule='cosin'; expected one of"),
    (dict(linear_start=-1.0), r"diffusion\.linear_start=-1\.0, linear_end=0\.02; expected 0 < linear_start"),
    (dict(linear_start=0.5, linear_end=0.1), r"expected 0 < linear_start <= linear_end < 1"),
    (dict(beta_schedule="cosine", cosine_s=0.0), r"diffusion\.cosine_s=0\.0; expected > 0"),
    (dict(v_posterior=2.0), r"diffusion\.v_posterior=2\.0; expected in \[0, 1\]"),
])
def test_schedule_config_refuses_bad_values(fields, message):
    with pytest.raises(ValueError, match=message):
        S.ScheduleConfig(**fields)
