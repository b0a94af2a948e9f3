"""Samplers step for step against the diffusers PyTorch schedulers; the scan driver against a Python loop;
classifier-free guidance, img2img, inpainting; bad input.

Reference set-up: CompVis-compatible betas (diffusers "scaled_linear" 0.00085..0.012, set_alpha_to_one=False,
steps_offset=1 where the scheduler has it). Both sides get the same float32 `alphas_cumprod` (ours, computed in
float64 then cast; test_schedule.py compares it with diffusers' float32 cumprod separately), the same
deterministic model function of (x, t) and the same injected noise. Tolerance: max |ours - reference| /
max |reference| <= 1e-5 after every step (float32 arithmetic in a different order, over up to 25 steps).
"""
import dataclasses

import diffusers
import diffusers.schedulers.scheduling_ddpm as ddpm_module
import diffusers.schedulers.scheduling_euler_ancestral_discrete as euler_a_module
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ldm_jax.diffusion import guidance, samplers
from ldm_jax.diffusion.schedule import make_schedule

SCHEDULE = make_schedule(beta_schedule="linear", linear_start=0.00085, linear_end=0.012)
BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SHAPE = (2, 8, 8, 4)
RTOL = 1e-5
# diffusers calls np.array on torch tensors, which warns under numpy 2; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _model_jax(x, t, cond=None):
    """A fixed nonlinear function of x and t (and, if given, of a per-example conditioning vector)."""
    tt = t.astype(jnp.float32).reshape(-1, 1, 1, 1)
    out = 0.8 * jnp.tanh(0.7 * x + 0.3 * jnp.sin(0.013 * tt)) + 0.1 * x * jnp.cos(0.007 * tt)
    out = out + 0.05 * x.mean(-1, keepdims=True)
    if cond is not None:
        out = out + 0.2 * jnp.tanh(cond).reshape(-1, 1, 1, cond.shape[-1])[..., : x.shape[-1]]
    return out


def _model_torch(x, t):
    """`_model_jax` on NCHW torch tensors with a scalar timestep."""
    tt = torch.as_tensor(t).to(torch.float32)
    out = 0.8 * torch.tanh(0.7 * x + 0.3 * torch.sin(0.013 * tt)) + 0.1 * x * torch.cos(0.007 * tt)
    return out + 0.05 * x.mean(1, keepdim=True)


def _to_torch(a):
    return torch.from_numpy(np.asarray(a, np.float32).transpose(0, 3, 1, 2).copy())


def _to_nhwc(t):
    return t.numpy().transpose(0, 2, 3, 1)


def _rel_err(ours, ref):
    return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


def _use_our_alphas(scheduler):
    """Gives a diffusers scheduler our float32 alphas_cumprod (and what its __init__ derives from it)."""
    ac = torch.tensor(np.asarray(SCHEDULE.alphas_cumprod))
    scheduler.alphas_cumprod = ac
    if hasattr(scheduler, "final_alpha_cumprod"):
        scheduler.final_alpha_cumprod = torch.tensor(1.0) if scheduler.config.set_alpha_to_one else ac[0]
    if hasattr(scheduler, "lambda_t"):
        scheduler.alpha_t, scheduler.sigma_t = ac.sqrt(), (1 - ac).sqrt()
        scheduler.lambda_t = scheduler.alpha_t.log() - scheduler.sigma_t.log()
    return scheduler


def _step_noise(key, step):
    return np.asarray(jax.random.normal(jax.random.fold_in(key, step), SHAPE, jnp.float32))


def _python_loop(sampler, noise, key, model=_model_jax):
    """The sampler's methods in a plain Python loop; returns x after every model evaluation (PLMS's warm-up
    predictor is reported as its predicted x, as diffusers returns it)."""
    state = sampler.init_state(sampler.prior(jnp.asarray(noise)), 0)
    xs = []
    for _ in range(sampler.num_evals):
        x_in, t = sampler.model_input(state)
        prediction = model(x_in, jnp.full((SHAPE[0],), t, t.dtype))
        state = sampler.update(state, prediction, jax.random.fold_in(key, state.step))
        predictor = isinstance(state, samplers.PLMSState) and int(state.count) == 1
        xs.append(np.asarray(state.x_pred if predictor else state.x))
    return xs


def _torch_loop(scheduler, steps, noise, key, monkeypatch, module=None, **step_kwargs):
    """diffusers' sampling loop; step i's noise (DDIM eta, DDPM, Euler-a) is our fold_in(key, i) noise."""
    scheduler.set_timesteps(steps)
    injected = {}
    if module is not None:
        monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: injected["noise"])
    x = _to_torch(noise) * scheduler.init_noise_sigma
    xs = []
    for i, t in enumerate(scheduler.timesteps):
        injected["noise"] = _to_torch(_step_noise(key, i))
        kwargs = dict(step_kwargs)
        if kwargs.get("eta"):
            kwargs["variance_noise"] = injected["noise"]
        out = _model_torch(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x, **kwargs).prev_sample
        xs.append(_to_nhwc(x))
    return np.asarray(scheduler.timesteps), xs


@dataclasses.dataclass(frozen=True)
class Case:
    """One parity run: our sampler (name, options) and the diffusers scheduler configured to match."""

    name: str
    steps: int
    opts: dict
    reference: type
    reference_opts: dict
    step_kwargs: dict = dataclasses.field(default_factory=dict)
    noise_module: object = None  # the diffusers module whose randn_tensor draws the step noise


COMPVIS = dict(set_alpha_to_one=False, steps_offset=1)
DDIM = dict(clip_sample=False, **COMPVIS)
PLMS = dict(skip_prk_steps=True, **COMPVIS)
DPM = dict(algorithm_type="dpmsolver++", solver_order=2)
LEADING = dict(timestep_spacing="leading", steps_offset=1)
CASES = {
    "ddim": Case("ddim", 10, {}, diffusers.DDIMScheduler, DDIM),
    "ddim-25": Case("ddim", 25, {}, diffusers.DDIMScheduler, DDIM),
    "ddim-eta": Case("ddim", 10, dict(eta=0.7), diffusers.DDIMScheduler, DDIM, dict(eta=0.7)),
    "ddim-v": Case("ddim", 10, dict(prediction_type="v"), diffusers.DDIMScheduler,
                   {**DDIM, "prediction_type": "v_prediction"}),
    "ddim-clip": Case("ddim", 10, dict(clip_sample=1.0), diffusers.DDIMScheduler, {**DDIM, "clip_sample": True}),
    "ddim-trailing-alpha-one": Case("ddim", 10, dict(timestep_spacing="trailing", set_alpha_to_one=True),
                                    diffusers.DDIMScheduler,
                                    dict(clip_sample=False, timestep_spacing="trailing", set_alpha_to_one=True)),
    "plms": Case("plms", 10, {}, diffusers.PNDMScheduler, PLMS),
    "plms-25": Case("plms", 25, {}, diffusers.PNDMScheduler, PLMS),
    "dpm++": Case("dpm++", 10, {}, diffusers.DPMSolverMultistepScheduler, DPM),
    "dpm++-20-sigma-min": Case("dpm++", 20, dict(final_sigmas_type="sigma_min"),  # second order to the end
                               diffusers.DPMSolverMultistepScheduler, {**DPM, "final_sigmas_type": "sigma_min"}),
    "dpm++-karras": Case("dpm++", 10, dict(use_karras_sigmas=True), diffusers.DPMSolverMultistepScheduler,
                         {**DPM, "use_karras_sigmas": True}),
    "dpm++-leading-v": Case("dpm++", 10, dict(prediction_type="v", **LEADING), diffusers.DPMSolverMultistepScheduler,
                            {**DPM, **LEADING, "prediction_type": "v_prediction"}),
    "euler": Case("euler", 10, {}, diffusers.EulerDiscreteScheduler, {}),
    "euler-7-leading": Case("euler", 7, LEADING, diffusers.EulerDiscreteScheduler, LEADING),
    "euler-7-v": Case("euler", 7, dict(prediction_type="v"), diffusers.EulerDiscreteScheduler,  # fractional t
                      dict(prediction_type="v_prediction")),
    "euler-karras": Case("euler", 10, dict(use_karras_sigmas=True), diffusers.EulerDiscreteScheduler,
                         dict(use_karras_sigmas=True)),
    "euler-a": Case("euler-a", 10, {}, diffusers.EulerAncestralDiscreteScheduler, {}, {}, euler_a_module),
    "euler-a-leading": Case("euler-a", 10, LEADING, diffusers.EulerAncestralDiscreteScheduler, LEADING, {},
                            euler_a_module),
    "ddpm": Case("ddpm", 10, dict(steps_offset=1), diffusers.DDPMScheduler, dict(clip_sample=False, steps_offset=1),
                 {}, ddpm_module),
    "ddpm-clip-linspace": Case("ddpm", 10, dict(timestep_spacing="linspace", clip_sample=1.0), diffusers.DDPMScheduler,
                               dict(timestep_spacing="linspace", clip_sample=True), {}, ddpm_module),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_sampler_matches_diffusers_step_for_step(case, monkeypatch):
    c = CASES[case]
    noise = np.asarray(jax.random.normal(jax.random.key(0), SHAPE))
    key = jax.random.key(1)
    sampler = samplers.make_sampler(c.name, SCHEDULE, c.steps, **c.opts)
    scheduler = _use_our_alphas(c.reference(**BETAS, **c.reference_opts))
    ref_t, ref_xs = _torch_loop(scheduler, c.steps, noise, key, monkeypatch, c.noise_module, **c.step_kwargs)
    ours = _python_loop(sampler, noise, key)
    if c.name == "plms":  # diffusers lists the repeated warm-up timestep
        np.testing.assert_array_equal(np.asarray(sampler.timesteps), np.concatenate([ref_t[:1], ref_t[2:]]))
    else:
        # Karras timesteps are fractional: diffusers interpolates float32 log-sigmas (about 1e-3 off in t).
        np.testing.assert_allclose(np.asarray(sampler.timesteps), ref_t, rtol=1e-6, atol=2e-3)
    assert len(ours) == len(ref_xs)
    errors = [_rel_err(a, b) for a, b in zip(ours, ref_xs, strict=True)]
    assert max(errors) <= RTOL, f"{case}: relative error per step {np.array(errors)}"


def test_plms_v_equals_plms_of_the_same_eps_model():
    """PLMS with a v model takes the steps it takes with the eps model that v model is equivalent to.

    The v outputs are turned into eps at the point each was evaluated and the eps values are combined, as the
    method is derived. diffusers' PNDMScheduler instead combines the raw v outputs and converts the result at
    the current sample, so it is not the reference for v; on the embedded shapes model (v, cosine) that way
    follows 10 of 32 prompts at 25 steps, this one 22.
    """
    def v_model(x, t):
        ac = SCHEDULE.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        eps = _model_jax(x, t)
        x0 = (x - jnp.sqrt(1 - ac) * eps) / jnp.sqrt(ac)
        return jnp.sqrt(ac) * eps - jnp.sqrt(1 - ac) * x0

    noise = np.asarray(jax.random.normal(jax.random.key(0), SHAPE))
    key = jax.random.key(1)
    eps_run = _python_loop(samplers.make_sampler("plms", SCHEDULE, 10), noise, key)
    v_run = _python_loop(samplers.make_sampler("plms", SCHEDULE, 10, prediction_type="v"), noise, key, v_model)
    for i, (a, b) in enumerate(zip(eps_run, v_run, strict=True)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4, err_msg=f"step {i}")


def _jitted_sample(**kw):
    return jax.jit(lambda s, n, k: samplers.sample(s, _model_jax, n, k, **kw))


@pytest.mark.parametrize("name", sorted(samplers.SAMPLERS))
def test_scan_driver_equals_python_loop(name):
    sampler = samplers.make_sampler(name, SCHEDULE, 6, **({"eta": 0.5} if name == "ddim" else {}))
    noise = jax.random.normal(jax.random.key(2), SHAPE)
    key = jax.random.key(3)
    run = _jitted_sample()
    ours = run(sampler, noise, key)
    np.testing.assert_allclose(ours, _python_loop(sampler, noise, key)[-1], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(ours, run(sampler, noise, key))  # same key, same result


def _img2img_inpaint_loop(sampler, noise, key, init, mask, t_enc):
    """What img2img + blending inpainting must do, written out step by step."""
    n = sampler.num_steps
    start = n - t_enc
    state = sampler.init_state(sampler.noise_to(init, noise, start), start)
    for _ in range(sampler.num_evals - start):
        step_key = jax.random.fold_in(key, state.step)
        known = sampler.noise_to(init, jax.random.normal(jax.random.fold_in(step_key, 1), SHAPE), state.step)
        state = state.replace(x=mask * state.x + (1 - mask) * known)
        x_in, t = sampler.model_input(state)
        state = sampler.update(state, _model_jax(x_in, jnp.full((SHAPE[0],), t, t.dtype)), step_key)
    assert int(state.step) == n
    return mask * state.x + (1 - mask) * init


@pytest.mark.parametrize("name", ["plms", "dpm++", "euler-a"])
def test_img2img_inpainting_equals_written_out_loop(name):
    sampler = samplers.make_sampler(name, SCHEDULE, 10)
    noise = jax.random.normal(jax.random.key(4), SHAPE)
    init = 0.5 * jax.random.normal(jax.random.key(5), SHAPE)
    mask = jnp.zeros(SHAPE[:3] + (1,)).at[:, 2:6, 3:7].set(1.0)
    key = jax.random.key(6)
    out = _jitted_sample(init_latent=init, strength=0.7, mask=mask)(sampler, noise, key)
    np.testing.assert_allclose(out, _img2img_inpaint_loop(sampler, noise, key, init, mask, 7), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out)[np.asarray(mask[..., 0]) == 0],
                                  np.asarray(init)[np.asarray(mask[..., 0]) == 0])


def test_img2img_runs_int_strength_times_steps_evaluations():
    calls = []

    def counting_model(x, t, cond):
        jax.debug.callback(lambda tt: calls.append(int(tt[0])), t)
        return _model_jax(x, t)

    sampler = samplers.make_sampler("ddim", SCHEDULE, 10)
    noise = jax.random.normal(jax.random.key(7), SHAPE)
    init = jax.random.normal(jax.random.key(8), SHAPE)
    run = jax.jit(lambda s, st: samplers.sample(s, counting_model, noise, jax.random.key(0), init_latent=init,
                                                strength=st))
    expected_t = np.asarray(sampler.timesteps)
    for strength, t_enc in [(0.75, 7), (0.7, 7), (0.3, 3), (1.0, 10), (0.0, 0)]:
        calls.clear()
        out = jax.block_until_ready(run(sampler, strength))
        assert sorted(calls, reverse=True) == list(expected_t[10 - t_enc:]), (strength, calls)
        if t_enc == 0:
            np.testing.assert_array_equal(out, init)
    assert run._cache_size() == 1  # strength is traced
    # strength 1 ignores the init latent: the same as txt2img from the same noise
    np.testing.assert_allclose(run(sampler, 1.0), samplers.sample(sampler, _model_jax, noise, jax.random.key(0)),
                               rtol=1e-6, atol=1e-6)


def test_classifier_free_guidance_is_one_batched_call_and_scale_does_not_recompile():
    traces, batches = [], []

    def model(x, t, cond):
        batches.append(x.shape[0])
        return _model_jax(x, t, cond)

    guided = guidance.classifier_free_guidance(model)
    sampler = samplers.make_sampler("ddim", SCHEDULE, 5)
    noise = jax.random.normal(jax.random.key(9), SHAPE)
    cond = jax.random.normal(jax.random.key(10), (2, 4))
    uncond = jnp.zeros((2, 4))

    @jax.jit
    def run(sampler, scale, strength):
        traces.append(1)
        gc = guidance.guided_cond(cond, uncond, scale)
        return samplers.sample(sampler, guided, noise, jax.random.key(0), gc, init_latent=noise * 0.3,
                               strength=strength)

    outs = {s: run(sampler, s, 1.0) for s in (0.0, 1.0, 7.5)}
    run(sampler.replace(eta=jnp.float32(0.5)), 3.0, 0.6)
    assert len(traces) == 1 and batches == [4]  # one trace; the model sees uncond + cond as one batch of 2B
    plain = jax.jit(lambda s, c: samplers.sample(s, _model_jax, noise, jax.random.key(0), c))
    np.testing.assert_allclose(outs[0.0], plain(sampler, uncond), rtol=1e-6, atol=1e-6)  # scale 0: uncond only
    np.testing.assert_allclose(outs[1.0], plain(sampler, cond), rtol=1e-6, atol=1e-6)  # scale 1: cond only
    # one guided evaluation equals uncond + s (cond - uncond) from two separate calls
    t = jnp.full((2,), 500, jnp.int32)
    u, c = _model_jax(noise, t, uncond), _model_jax(noise, t, cond)
    np.testing.assert_allclose(guided(noise, t, guidance.guided_cond(cond, uncond, 7.5)), u + 7.5 * (c - u),
                               rtol=1e-6, atol=1e-6)


def test_nine_channel_inpainting_passes_extra_channels_unscaled():
    mask = jnp.zeros(SHAPE[:3] + (1,)).at[:, :4].set(1.0)
    masked = jax.random.normal(jax.random.key(11), SHAPE) * (1 - mask)
    extra = guidance.inpaint_channels(mask, masked)
    assert extra.shape == SHAPE[:3] + (5,)
    seen = []

    def nine_channel_model(x, t, cond):
        seen.append(x.shape[-1])
        return _model_jax(x[..., :4], t) + 0.1 * x[..., 4:].sum(-1, keepdims=True)

    def reference_model(x, t, cond):
        return _model_jax(x, t) + 0.1 * extra.sum(-1, keepdims=True)

    sampler = samplers.make_sampler("euler", SCHEDULE, 5)  # Euler scales x, never the extra channels
    noise = jax.random.normal(jax.random.key(12), SHAPE)
    out = samplers.sample(sampler, nine_channel_model, noise, jax.random.key(0), extra_channels=extra)
    assert seen == [9]
    np.testing.assert_allclose(out, samplers.sample(sampler, reference_model, noise, jax.random.key(0)), rtol=1e-6)


def test_bad_input_gives_clear_errors():
    noise = jnp.zeros(SHAPE)
    with pytest.raises(ValueError, match="unknown sampler 'heun'"):
        samplers.make_sampler("heun", SCHEDULE, 10)
    for steps in (0, 1001, 2.5):
        with pytest.raises(ValueError, match=r"steps must be an integer in \[1, 1000\]"):
            samplers.make_sampler("ddim", SCHEDULE, steps)
    with pytest.raises(ValueError, match="plms requires eta == 0"):
        samplers.make_sampler("plms", SCHEDULE, 10, eta=0.5)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['eta'\]"):
        samplers.make_sampler("euler", SCHEDULE, 10, eta=0.5)
    with pytest.raises(ValueError, match="unknown timestep_spacing 'even'"):
        samplers.make_sampler("ddim", SCHEDULE, 10, timestep_spacing="even")
    with pytest.raises(ValueError, match="prediction_type='epsilon'"):
        samplers.make_sampler("ddim", SCHEDULE, 10, prediction_type="epsilon")
    with pytest.raises(ValueError, match="outside"):
        samplers.make_sampler("ddpm", SCHEDULE, 1000, steps_offset=1)
    sampler = samplers.make_sampler("ddim", SCHEDULE, 4)
    for strength in (1.5, -0.1):
        with pytest.raises(ValueError, match=r"strength must be in \[0, 1\]"):
            samplers.sample(sampler, _model_jax, noise, jax.random.key(0), init_latent=noise, strength=strength)
    with pytest.raises(Exception, match=r"strength must be in \[0, 1\], got 1.5"):  # traced: raised at run time
        jax.block_until_ready(jax.jit(lambda s: samplers.sample(sampler, _model_jax, noise, jax.random.key(0),
                                                                init_latent=noise, strength=s))(1.5))
    with pytest.raises(ValueError, match="needs init_latent"):
        samplers.sample(sampler, _model_jax, noise, jax.random.key(0), strength=0.5)
    with pytest.raises(ValueError, match=r"mask has shape \(2, 4, 4, 1\); expected \(2, 8, 8, 1\)"):
        samplers.sample(sampler, _model_jax, noise, jax.random.key(0), init_latent=noise, mask=jnp.ones((2, 4, 4, 1)))
    with pytest.raises(ValueError, match="model_fn returned shape"):
        samplers.sample(sampler, lambda x, t, c: x[..., :3], noise, jax.random.key(0))
    with pytest.raises(ValueError, match="same structure and shapes"):
        guidance.guided_cond(jnp.zeros((2, 4)), jnp.zeros((2, 5)), 7.5)


def test_compvis_discretisations():
    ac = np.asarray(SCHEDULE.alphas_cumprod, np.float64)
    s30 = samplers.make_sampler("ddim", SCHEDULE, 30, eta=1.0)  # 1000 // 30 = 33: CompVis runs 31 steps
    np.testing.assert_array_equal(np.asarray(s30.timesteps), np.arange(0, 1000, 33)[::-1] + 1)
    np.testing.assert_allclose(s30.alpha_prev[-1], ac[0], rtol=1e-7)  # first alpha_prev = alphas_cumprod[0]
    quad = samplers.make_sampler("ddim", SCHEDULE, 10, timestep_spacing="quad")
    expected = (np.linspace(0, np.sqrt(800), 10) ** 2).astype(int) + 1
    np.testing.assert_array_equal(np.asarray(quad.timesteps), expected[::-1])
    # all 1000 DDPM steps: the reference's posterior (mean coefficients, clipped log variance)
    full = samplers.make_sampler("ddpm", SCHEDULE, 1000)
    rev = slice(None, None, -1)
    np.testing.assert_allclose(full.coef_x0, np.asarray(SCHEDULE.posterior_mean_coef1)[rev], rtol=1e-6)
    np.testing.assert_allclose(full.coef_xt, np.asarray(SCHEDULE.posterior_mean_coef2)[rev], rtol=1e-6)
    np.testing.assert_allclose(full.std[:-1], np.exp(0.5 * np.asarray(SCHEDULE.posterior_log_variance_clipped))[
        rev][:-1], rtol=1e-6)
    assert dataclasses.is_dataclass(full.config) and full.config.steps == 1000
