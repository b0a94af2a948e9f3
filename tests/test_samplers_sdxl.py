"""What SDXL pipelines need from the samplers, against diffusers' schedulers and SDXL pipelines' step logic.

SDXL's schedule is "scaled_linear" 0.00085..0.012 over 1000 steps (our "linear" with linear_start/linear_end, the
schedule of tests/test_samplers.py, whose helpers this file reuses). Covered here:
- few-step distilled models: Euler (SDXL-Lightning) and Euler-ancestral (SDXL-Turbo) with "trailing" spacing at
  1, 2, 4, 8 steps; DDIM with leading / trailing / linspace spacing; DPM++ 2M Karras at 25 steps (the 10-step
  case is in test_samplers.py). Checked per step: each step starts both sides from diffusers' x, so every
  comparison is of one step (timestep, sigmas, scale_model_input, output), not of an accumulated trajectory.
- an ensemble of expert denoisers (base with denoising_end, refiner with denoising_start) and img2img, against
  the SDXL pipelines' own `get_timesteps` and their denoising_end filter, with a model function and noise fed to
  both sides;
- the step bounds are traced: one trace for any denoising fraction or img2img strength;
- the one known difference: diffusers' DDIM stride rule (issue #12633) for "linspace" and non-dividing "trailing".
Tolerances (float32 rounding): per step max |ours - diffusers| <= 1e-6 max(|x|, |x_next|) (measured <= 4.3e-7);
whole base / refiner / img2img runs max |ours - diffusers| <= 5e-6 max |diffusers| (measured <= 1e-6; a hand-over
one step off is 3e-3..1e-1 off, a DPM-Solver++ refiner that kept the base's history 4e-3).
"""
import types

import diffusers
import diffusers.schedulers.scheduling_euler_ancestral_discrete as euler_a_module
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import StableDiffusionXLImg2ImgPipeline
from test_samplers import (BETAS, SCHEDULE, SHAPE, _model_jax, _model_torch, _rel_err, _to_nhwc, _to_torch,
                           _use_our_alphas)

from ldm_jax.diffusion import samplers

T = 1000
STEP_RTOL = 1e-6
RUN_RTOL = 5e-6
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _refiner_jax(x, t, cond=None):
    """A second model (the refiner): different from `_model_jax` so that a wrong hand-over shows."""
    return 0.9 * _model_jax(1.1 * x, t) - 0.02 * x


def _refiner_torch(x, t):
    return 0.9 * _model_torch(1.1 * x, t) - 0.02 * x


_model_input = jax.jit(lambda sampler, state: sampler.model_input(state))
_update = jax.jit(lambda sampler, state, prediction, key: sampler.update(state, prediction, key))


def _close(ours, ref, rtol=1e-6):
    """max |ours - ref| <= rtol max |ref|: float32 rounding at the scale of the values (x reaches ~30)."""
    assert _rel_err(ours, np.asarray(ref)) <= rtol, _rel_err(ours, np.asarray(ref))


def _scheduler(cls, **opts):
    return _use_our_alphas(cls(**BETAS, **opts))


def _per_step_errors(sampler, scheduler, steps, noise, key, monkeypatch, module=None):
    """Runs diffusers' loop; before every step our state takes diffusers' x, then both get the same model
    output (and, for ancestral steps, the same noise: our fold_in(key, k) draw). Returns the relative errors
    of the model inputs and of the step outputs (relative to max(|x|, |x_next|)), per step."""
    scheduler.set_timesteps(steps)
    ref_t = scheduler.timesteps.numpy()
    np.testing.assert_array_equal(np.asarray(sampler.timesteps, np.float32), ref_t.astype(np.float32))
    injected = {}
    if module is not None:
        monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: injected["noise"])
    x = _to_torch(noise) * scheduler.init_noise_sigma
    assert _rel_err(sampler.prior(jnp.asarray(noise)), _to_nhwc(x)) <= STEP_RTOL
    state = sampler.init_state(sampler.prior(jnp.asarray(noise)), 0)
    in_errors, out_errors = [], []
    for k, t in enumerate(scheduler.timesteps):
        step_key = jax.random.fold_in(key, k)
        injected["noise"] = _to_torch(jax.random.normal(step_key, SHAPE, jnp.float32))
        state = state.replace(x=jnp.asarray(_to_nhwc(x)))
        x_in, t_ours = _model_input(sampler, state)
        assert float(t_ours) == float(t)
        ref_in = scheduler.scale_model_input(x, t)
        in_errors.append(_rel_err(x_in, _to_nhwc(ref_in)))
        out = _model_torch(ref_in, t)
        state = _update(sampler, state, jnp.asarray(_to_nhwc(out)), step_key)
        x_next = scheduler.step(out, t, x).prev_sample
        # relative to the larger of x and x_next: a last step to sigma 0 cancels sigma-sized terms
        scale = max(float(x.abs().max()), float(x_next.abs().max()))
        out_errors.append(float(np.abs(np.asarray(state.x) - _to_nhwc(x_next)).max()) / scale)
        x = x_next
    return np.array(in_errors), np.array(out_errors)


NOISE = np.asarray(jax.random.normal(jax.random.key(0), SHAPE))
KEY = jax.random.key(1)
TRAILING = dict(timestep_spacing="trailing")
SDXL_BASE = dict(timestep_spacing="leading", steps_offset=1)  # the SDXL 1.0 base / refiner scheduler configs

# ours (name, opts) -> diffusers (class, opts), checked per step
PER_STEP = {
    # SDXL-Lightning: EulerDiscreteScheduler, trailing (its 1-step model predicts x0: prediction_type="sample")
    **{f"euler-trailing-{n}": (n, "euler", TRAILING, diffusers.EulerDiscreteScheduler, TRAILING, None)
       for n in (1, 2, 4, 8)},
    "euler-trailing-1-x0": (1, "euler", dict(prediction_type="x0", **TRAILING), diffusers.EulerDiscreteScheduler,
                            dict(prediction_type="sample", **TRAILING), None),
    # SDXL-Turbo: EulerAncestralDiscreteScheduler, trailing
    **{f"euler-a-trailing-{n}": (n, "euler-a", TRAILING, diffusers.EulerAncestralDiscreteScheduler, TRAILING,
                                 euler_a_module) for n in (1, 2, 4, 8)},
    "euler-sdxl-base-25": (25, "euler", SDXL_BASE, diffusers.EulerDiscreteScheduler, SDXL_BASE, None),
    "dpm++-karras-25": (25, "dpm++", dict(use_karras_sigmas=True), diffusers.DPMSolverMultistepScheduler,
                        dict(use_karras_sigmas=True), None),
    # DDIM: leading at a step count that does not divide T, trailing where it does
    "ddim-leading-7": (7, "ddim", dict(timestep_spacing="leading", steps_offset=1), diffusers.DDIMScheduler,
                       dict(clip_sample=False, set_alpha_to_one=False, timestep_spacing="leading", steps_offset=1),
                       None),
    **{f"ddim-trailing-{n}": (n, "ddim", dict(set_alpha_to_one=True, **TRAILING), diffusers.DDIMScheduler,
                              dict(clip_sample=False, set_alpha_to_one=True, **TRAILING), None) for n in (1, 4, 8)},
}


@pytest.mark.parametrize("case", sorted(PER_STEP))
def test_sampler_matches_diffusers_per_step(case, monkeypatch):
    steps, name, opts, cls, ref_opts, module = PER_STEP[case]
    sampler = samplers.make_sampler(name, SCHEDULE, steps, **opts)
    scheduler = _scheduler(cls, **ref_opts)
    in_err, out_err = _per_step_errors(sampler, scheduler, steps, NOISE, KEY, monkeypatch, module)
    if hasattr(sampler, "sigmas"):  # diffusers takes sqrt((1 - a) / a) of float32 a: ~1e-6 off near t = 0
        np.testing.assert_allclose(np.asarray(sampler.sigmas), scheduler.sigmas.numpy(), rtol=1e-5)
    assert in_err.max() <= STEP_RTOL and out_err.max() <= STEP_RTOL, (in_err, out_err)


@pytest.mark.parametrize("spacing,steps", [("linspace", 10), ("trailing", 7)])
def test_ddim_differs_from_diffusers_only_by_its_stride_rule(spacing, steps, monkeypatch):
    """diffusers' DDIMScheduler steps from t to t - T // N (issue #12633), which is not the next timestep for
    "linspace", nor for "trailing" when N does not divide T; ours steps to the next timestep. Given diffusers'
    target levels, ours is diffusers to rounding; as it is, the first step already differs."""
    sampler = samplers.make_sampler("ddim", SCHEDULE, steps, timestep_spacing=spacing, set_alpha_to_one=True)
    ref = dict(clip_sample=False, set_alpha_to_one=True, timestep_spacing=spacing)
    _, out_err = _per_step_errors(sampler, _scheduler(diffusers.DDIMScheduler, **ref), steps, NOISE, KEY,
                                  monkeypatch)
    assert out_err[0] > 1e-3
    ts = np.asarray(sampler.timesteps)
    target = ts - T // steps
    assert (target != np.append(ts[1:], -1)).any()
    ac = np.asarray(SCHEDULE.alphas_cumprod)
    diffusers_levels = sampler.replace(alpha_prev=jnp.asarray(np.where(target >= 0, ac[np.maximum(target, 0)], 1.0)))
    _, out_err = _per_step_errors(diffusers_levels, _scheduler(diffusers.DDIMScheduler, **ref), steps, NOISE, KEY,
                                  monkeypatch)
    assert out_err.max() <= STEP_RTOL, out_err


# ------------------------------------------------------------------------------- denoising_start / _end bounds

BOUND_KINDS = {
    "euler-sdxl": ("euler", SDXL_BASE, diffusers.EulerDiscreteScheduler, SDXL_BASE),
    "euler-linspace": ("euler", {}, diffusers.EulerDiscreteScheduler, {}),  # fractional timesteps
    "euler-karras": ("euler", dict(use_karras_sigmas=True), diffusers.EulerDiscreteScheduler,
                     dict(use_karras_sigmas=True)),
    "euler-a-trailing": ("euler-a", TRAILING, diffusers.EulerAncestralDiscreteScheduler, TRAILING),
    "dpm++-karras": ("dpm++", dict(use_karras_sigmas=True), diffusers.DPMSolverMultistepScheduler,
                     dict(use_karras_sigmas=True)),
    "ddim-leading": ("ddim", dict(timestep_spacing="leading", steps_offset=1), diffusers.DDIMScheduler,
                     dict(timestep_spacing="leading", steps_offset=1)),
}
FRACTIONS = [k / 100 for k in range(1, 100)]


def _diffusers_base_steps(timesteps, denoising_end):
    """StableDiffusionXLPipeline.__call__, step 8.1 (denoising_end), on the scheduler's timesteps."""
    cutoff = int(round(T - (denoising_end * T)))
    return len(list(filter(lambda ts: ts >= cutoff, timesteps)))


def _diffusers_refiner_start(scheduler, steps, denoising_start):
    """StableDiffusionXLImg2ImgPipeline.get_timesteps (diffusers' own code) with denoising_start: t_start."""
    timesteps, n = StableDiffusionXLImg2ImgPipeline.get_timesteps(
        types.SimpleNamespace(scheduler=scheduler), steps, 0.3, "cpu", denoising_start=denoising_start)
    assert len(timesteps) == n
    return len(scheduler.timesteps) - n


@pytest.mark.parametrize("kind", sorted(BOUND_KINDS))
def test_denoising_bounds_equal_diffusers_cutoffs(kind):
    name, opts, cls, ref_opts = BOUND_KINDS[kind]
    mismatches = []
    for steps in (1, 2, 3, 4, 7, 8, 10, 13, 20, 25, 30, 40, 50):
        sampler = samplers.make_sampler(name, SCHEDULE, steps, **opts)
        scheduler = _scheduler(cls, **ref_opts)
        scheduler.set_timesteps(steps)
        ref_ts = scheduler.timesteps.numpy().tolist()
        for d in FRACTIONS:
            ours = (samplers.denoising_bounds(sampler, T, denoising_start=d)[0],
                    samplers.denoising_bounds(sampler, T, denoising_end=d)[1])
            ref = (_diffusers_refiner_start(scheduler, steps, d), _diffusers_base_steps(ref_ts, d))
            if ours != ref:
                mismatches.append((steps, d, ours, ref))
            assert ours[0] == ours[1]  # the base stops where the refiner starts
    assert not mismatches, mismatches[:10]


def test_denoising_bounds_and_strength_helpers():
    sampler = samplers.make_sampler("euler", SCHEDULE, 10, **SDXL_BASE)  # timesteps 901, 801, ..., 1
    assert samplers.denoising_cutoff(0.8, T) == 200
    assert samplers.denoising_bounds(sampler, T) == (0, 10)
    assert samplers.denoising_bounds(sampler, T, denoising_end=0.8) == (0, 8)  # 901..201 are >= 200
    assert samplers.denoising_bounds(sampler, T, denoising_start=0.8) == (8, 10)
    assert samplers.denoising_bounds(sampler, T, denoising_start=0.3, denoising_end=0.8) == (3, 8)
    for bad in (0.0, 1.0, 1.5, -0.2, True, "0.8"):
        with pytest.raises(ValueError, match=r"denoising fraction must be a number in \(0, 1\)"):
            samplers.denoising_bounds(sampler, T, denoising_end=bad)
    with pytest.raises(ValueError, match="must be smaller than denoising_end"):
        samplers.denoising_bounds(sampler, T, denoising_start=0.8, denoising_end=0.8)
    with pytest.raises(ValueError, match="outside jax.jit"):
        jax.jit(lambda s: samplers.denoising_bounds(s, T, denoising_end=0.5)[1])(sampler)
    # diffusers' img2img count, int(steps * strength) in float64, for every steps <= 50 and strength k / 100
    scheduler = _scheduler(diffusers.EulerDiscreteScheduler, **SDXL_BASE)
    for steps in range(1, 51):
        scheduler.set_timesteps(steps)
        for k in range(101):
            timesteps, n = StableDiffusionXLImg2ImgPipeline.get_timesteps(
                types.SimpleNamespace(scheduler=scheduler), steps, k / 100, "cpu")
            assert samplers.strength_first_step(k / 100, steps) == steps - n == len(scheduler.timesteps) - len(
                timesteps), (steps, k)
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\]"):
        samplers.strength_first_step(1.1, 10)


# ------------------------------------------------------------------------------------ expert ensemble runs


def _diffusers_ensemble(cls, ref_opts, steps, d, noise, key, monkeypatch, module):
    """SDXL base (denoising_end=d, output_type="latent") then refiner (denoising_start=d, add_noise=False), each
    pipeline with its own fresh scheduler, as the two pipelines run them. Step i's noise is our fold_in(key, i)."""
    injected = {}
    if module is not None:
        monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: injected["noise"])

    def run(scheduler, timesteps, first, x, model):
        for i, t in enumerate(timesteps):
            injected["noise"] = _to_torch(jax.random.normal(jax.random.fold_in(key, first + i), SHAPE))
            x = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x).prev_sample
        return x

    base = _scheduler(cls, **ref_opts)
    base.set_timesteps(steps)
    m = _diffusers_base_steps(base.timesteps, d)
    if hasattr(base, "set_begin_index"):
        base.set_begin_index(0)
    latent = run(base, base.timesteps[:m], 0, _to_torch(noise) * base.init_noise_sigma, _model_torch)
    refiner = _scheduler(cls, **ref_opts)
    refiner.set_timesteps(steps)
    t_start = _diffusers_refiner_start(refiner, steps, d)  # also calls refiner.set_begin_index(t_start)
    final = run(refiner, refiner.timesteps[t_start:], t_start, latent, _refiner_torch)
    return (m, t_start), _to_nhwc(latent), _to_nhwc(final)


ENSEMBLE = {
    "euler-sdxl": (25, 0.8, "euler", SDXL_BASE, diffusers.EulerDiscreteScheduler, SDXL_BASE, None),
    "euler-karras": (20, 0.7, "euler", dict(use_karras_sigmas=True), diffusers.EulerDiscreteScheduler,
                     dict(use_karras_sigmas=True), None),
    "euler-a-trailing": (8, 0.6, "euler-a", TRAILING, diffusers.EulerAncestralDiscreteScheduler, TRAILING,
                         euler_a_module),
    # the refiner's first DPM-Solver++ step is first order (a fresh scheduler: lower_order_nums = 0)
    "dpm++-karras": (20, 0.75, "dpm++", dict(use_karras_sigmas=True), diffusers.DPMSolverMultistepScheduler,
                     dict(use_karras_sigmas=True), None),
    "ddim-leading": (10, 0.8, "ddim", dict(timestep_spacing="leading", steps_offset=1), diffusers.DDIMScheduler,
                     dict(clip_sample=False, set_alpha_to_one=False, timestep_spacing="leading", steps_offset=1),
                     None),
}
_split = jax.jit(lambda s, model, n, k, **kw: samplers.sample(s, model, n, k, **kw), static_argnums=1)


@pytest.mark.parametrize("case", sorted(ENSEMBLE))
def test_base_then_refiner_matches_diffusers(case, monkeypatch):
    steps, d, name, opts, cls, ref_opts, module = ENSEMBLE[case]
    sampler = samplers.make_sampler(name, SCHEDULE, steps, **opts)
    (m, t_start), ref_latent, ref_final = _diffusers_ensemble(cls, ref_opts, steps, d, NOISE, KEY, monkeypatch,
                                                              module)
    _, stop = samplers.denoising_bounds(sampler, T, denoising_end=d)
    first, _ = samplers.denoising_bounds(sampler, T, denoising_start=d)
    assert (stop, first) == (m, t_start) and 0 < m < steps
    latent = _split(sampler, _model_jax, jnp.asarray(NOISE), KEY, stop_step=stop)
    final = _split(sampler, _refiner_jax, None, KEY, start_latent=latent, first_step=first)
    assert _rel_err(latent, ref_latent) <= RUN_RTOL
    assert _rel_err(final, ref_final) <= RUN_RTOL


def _loop(sampler, model, x, first, stop, key):
    """The sampler's methods in a plain loop from a fresh state at `first` until the state reaches `stop`."""
    state = sampler.init_state(x, first)
    while int(state.step) < stop:
        x_in, t = _model_input(sampler, state)
        state = _update(sampler, state, model(x_in, jnp.full((SHAPE[0],), t, t.dtype)),
                        jax.random.fold_in(key, state.step))
    return state.x


@pytest.mark.parametrize("name", sorted(samplers.SAMPLERS))
def test_split_runs_equal_the_written_out_loop(name):
    """Every sampler (PLMS too): the base is the first `stop` steps of a full run; the refiner is a fresh state
    at `stop`. Single-step samplers given one model and one key make the same split and unsplit runs."""
    sampler = samplers.make_sampler(name, SCHEDULE, 8, **({"eta": 0.5} if name == "ddim" else {}))
    noise = jnp.asarray(NOISE)
    prior = sampler.prior(noise)
    for stop in (1, 5):
        latent = _split(sampler, _model_jax, noise, KEY, stop_step=stop)
        _close(latent, _loop(sampler, _model_jax, prior, 0, stop, KEY))
        final = _split(sampler, _refiner_jax, None, KEY, start_latent=latent, first_step=stop)
        _close(final, _loop(sampler, _refiner_jax, latent, stop, 8, KEY))
        if name not in ("plms", "dpm++"):  # multistep samplers restart their history in the second run
            whole = _split(sampler, _model_jax, noise, KEY)
            split = _split(sampler, _model_jax, None, KEY, start_latent=latent, first_step=stop)
            _close(split, whole)
    # empty ranges return their start: stop 0, and a start at N
    np.testing.assert_array_equal(_split(sampler, _model_jax, noise, KEY, stop_step=0), prior)
    np.testing.assert_array_equal(_split(sampler, _model_jax, None, KEY, start_latent=noise, first_step=8), noise)


# --------------------------------------------------------------------------------------------------- img2img


@pytest.mark.parametrize("strength", [0.3, 0.55, 1.0])
def test_euler_img2img_matches_diffusers_sdxl_img2img(strength):
    """StableDiffusionXLImg2ImgPipeline (denoising_start=None) with an Euler scheduler: t_start from
    get_timesteps, set_begin_index(t_start), init + sigma[t_start] noise (add_noise), then the loop."""
    steps = 10
    init = 0.5 * np.asarray(jax.random.normal(jax.random.key(5), SHAPE))
    scheduler = _scheduler(diffusers.EulerDiscreteScheduler, **SDXL_BASE)
    scheduler.set_timesteps(steps)
    timesteps, _ = StableDiffusionXLImg2ImgPipeline.get_timesteps(
        types.SimpleNamespace(scheduler=scheduler), steps, strength, "cpu")
    x = scheduler.add_noise(_to_torch(init), _to_torch(NOISE), timesteps[:1].repeat(SHAPE[0]))
    for t in timesteps:
        x = scheduler.step(_model_torch(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    sampler = samplers.make_sampler("euler", SCHEDULE, steps, **SDXL_BASE)
    first = samplers.strength_first_step(strength, steps)
    ours = _split(sampler, _model_jax, jnp.asarray(NOISE), KEY, init_latent=jnp.asarray(init), first_step=first)
    assert _rel_err(ours, _to_nhwc(x)) <= RUN_RTOL
    if strength < 1:  # CompVis' count agrees here; `strength` differs from diffusers only at 1 (pure noise)
        compvis = _split(sampler, _model_jax, jnp.asarray(NOISE), KEY, init_latent=jnp.asarray(init),
                         strength=strength)
        _close(compvis, ours)


# ---------------------------------------------------------------------------------------------- no retrace


def test_changing_the_split_or_strength_does_not_retrace():
    traces = []

    @jax.jit
    def ensemble(sampler, noise, key, first, stop):
        traces.append("ensemble")
        latent = samplers.sample(sampler, _model_jax, noise, key, stop_step=stop)
        return latent, samplers.sample(sampler, _refiner_jax, None, key, start_latent=latent, first_step=first)

    @jax.jit
    def img2img(sampler, noise, key, init, first):
        traces.append("img2img")
        return samplers.sample(sampler, _model_jax, noise, key, init_latent=init, first_step=first)

    sampler = samplers.make_sampler("euler", SCHEDULE, 10, **SDXL_BASE)
    noise = jnp.asarray(NOISE)
    seen = set()
    for d in (0.5, 0.7, 0.8, 0.9):
        first = samplers.denoising_bounds(sampler, T, denoising_start=d)[0]
        stop = samplers.denoising_bounds(sampler, T, denoising_end=d)[1]
        seen.add(stop)
        ensemble(sampler, noise, KEY, first, stop)
    for strength in (0.3, 0.5, 1.0):
        img2img(sampler, noise, KEY, 0.5 * noise, samplers.strength_first_step(strength, 10))
    assert len(seen) == 4 and traces == ["ensemble", "img2img"]
    assert ensemble._cache_size() == 1 and img2img._cache_size() == 1


def test_bad_step_bounds_give_clear_errors():
    sampler = samplers.make_sampler("euler", SCHEDULE, 4)
    noise = jnp.asarray(NOISE)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="either strength or first_step"):
        samplers.sample(sampler, _model_jax, noise, key, init_latent=noise, strength=0.5, first_step=1)
    with pytest.raises(ValueError, match="first_step needs start_latent"):
        samplers.sample(sampler, _model_jax, noise, key, first_step=1)
    with pytest.raises(ValueError, match="needs noise"):
        samplers.sample(sampler, _model_jax, None, key)
    with pytest.raises(ValueError, match=r"0 <= first_step <= stop_step <= 4.*first_step=3, stop_step=2"):
        samplers.sample(sampler, _model_jax, None, key, start_latent=noise, first_step=3, stop_step=2)
    with pytest.raises(ValueError, match=r"stop_step=5"):
        samplers.sample(sampler, _model_jax, noise, key, stop_step=5)
    with pytest.raises(Exception, match=r"first_step=5, stop_step=4"):  # traced: raised when it runs
        jax.block_until_ready(jax.jit(lambda f: samplers.sample(sampler, _model_jax, None, key, start_latent=noise,
                                                                first_step=f))(5))
    with pytest.raises(ValueError, match="start_latent has shape"):
        samplers.sample(sampler, _model_jax, noise, key, start_latent=noise[:1], first_step=1)
