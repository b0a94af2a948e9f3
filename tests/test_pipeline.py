"""Sampling pipelines (ldm_jax/pipeline.py): the same images on 1 and 8 (fake CPU) devices, per-example
randomness independent of the batch, no recompilation when traced settings change, img2img / inpainting
limits that are known exactly, and clear errors for bad inputs.

Run: .venv/bin/python -m pytest -q tests/test_pipeline.py
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import ldm, pipeline
from ldm_jax.diffusion.schedule import ScheduleConfig
from ldm_jax.models.autoencoder import AutoencoderConfig
from ldm_jax.models.text import ClassEmbedderConfig, ClipTextConfig
from ldm_jax.models.unet import UNetConfig
from ldm_jax.parallel import make_mesh
from test_ldm import randomize_zero_kernels

B, SIZE, STEPS = 8, 16, 4


def _config(in_channels=4) -> ldm.LDMConfig:
    """f=2 KL first stage (16x16x3 <-> 8x8x4), one-level UNet with cross-attention, 2-layer CLIP of length 8."""
    return ldm.LDMConfig(
        first_stage=AutoencoderConfig(ch=32, ch_mult=(1, 1), num_res_blocks=1, resolution=SIZE),
        unet=UNetConfig(in_channels=in_channels, model_channels=32, channel_mult=(1,), num_res_blocks=1,
                        attention_resolutions=(1,), num_heads=2, context_dim=32),
        cond_stage=ClipTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                                  max_length=8, eos_token_id=99, pad_token_id=99),
        diffusion=ldm.DiffusionConfig(schedule=ScheduleConfig(num_timesteps=100, linear_start=0.00085,
                                                              linear_end=0.012),
                                      image_size=SIZE // 2, channels=4,
                                      conditioning_key="hybrid" if in_channels > 4 else "crossattn"),
    )


@pytest.fixture(scope="module")
def model():
    config = _config()
    params = randomize_zero_kernels(ldm.init_params(config, jax.random.key(0)), jax.random.key(1))
    params = pipeline.place_params(params)
    tokens = np.asarray(jax.random.randint(jax.random.key(2), (B, 8), 0, 100), np.int32)
    empty = np.tile(np.array([[98] + [99] * 7], np.int32), (B, 1))
    return config, params, tokens, empty


def _txt2img(model, mesh=None, *, eta=0.5, steps=STEPS, tokens=None, **kwargs):
    """txt2img of the fixture's prompts; the default mesh (8 devices) and settings share one compilation."""
    config, params, default_tokens, empty = model
    sampler = pipeline.make_model_sampler(config, "ddim", steps, eta=eta)
    kwargs.setdefault("guidance_scale", 3.0)
    tokens = default_tokens if tokens is None else tokens
    return np.asarray(pipeline.txt2img(config, params, sampler, tokens, empty, seed=7, mesh=mesh or make_mesh(),
                                       **kwargs))


def test_one_and_eight_devices_give_identical_images(model):
    assert jax.device_count() == 8
    on_eight = _txt2img(model, make_mesh())  # one example per device
    one_device = make_mesh(devices=jax.devices()[:1])
    on_one = _txt2img(model, one_device, chunk_size=1)  # all 8 on one device, one at a time
    assert on_eight.shape == (B, SIZE, SIZE, 3) and np.abs(on_eight).max() > 0.01
    np.testing.assert_array_equal(on_eight, on_one)
    # All 8 at once on one device: XLA picks other kernels for the larger batch; float32 rounding only.
    np.testing.assert_allclose(_txt2img(model, one_device), on_eight, rtol=0, atol=5e-6)
    # Image i depends on (seed, i, its prompt) only: examples 4..11 start with the same four images.
    _, _, tokens, _ = model
    shifted = _txt2img(model, tokens=np.roll(tokens, -4, axis=0), first_index=4)
    np.testing.assert_array_equal(shifted[:4], on_eight[4:])
    # Different examples get different noise.
    assert not np.allclose(on_eight[0], on_eight[1], atol=1e-3)


def test_traced_settings_do_not_recompile(model):
    first = _txt2img(model, guidance_scale=3.0, eta=0.0)
    traces = pipeline.trace_count("txt2img")
    second = _txt2img(model, guidance_scale=5.0, eta=0.7)
    per_example = _txt2img(model, guidance_scale=np.linspace(1, 8, B), eta=0.0)
    assert pipeline.trace_count("txt2img") == traces
    assert not np.allclose(first, second) and not np.allclose(first, per_example)
    _txt2img(model, steps=STEPS + 1)  # a new step count is a new program
    assert pipeline.trace_count("txt2img") == traces + 1


def test_run_options_are_static_and_reach_the_models(model):
    """Another attention implementation is another program (the jit cache keys on the RunOptions) and gives the
    same images to float32 rounding; an options object of the wrong type is refused."""
    default = _txt2img(model, eta=0.0)
    traces = pipeline.trace_count("txt2img")
    chunked = _txt2img(model, eta=0.0, options=ldm.RunOptions(attention="chunked"))
    assert pipeline.trace_count("txt2img") == traces + 1
    np.testing.assert_allclose(chunked, default, rtol=0, atol=1e-4)
    _txt2img(model, eta=0.0, options=ldm.RunOptions(attention="chunked"))
    assert pipeline.trace_count("txt2img") == traces + 1
    with pytest.raises(TypeError, match="txt2img: options must be an ldm.RunOptions, got"):
        _txt2img(model, eta=0.0, options=jnp.bfloat16)


def test_img2img_strength_limits(model):
    config, params, tokens, empty = model
    mesh = make_mesh()
    images = np.asarray(jax.random.uniform(jax.random.key(3), (B, SIZE, SIZE, 3), minval=-1, maxval=1))
    sampler = pipeline.make_model_sampler(config, "ddim", STEPS)

    def run(strength):
        return np.asarray(pipeline.img2img(config, params, sampler, tokens, empty, images, strength=strength,
                                           guidance_scale=3.0, seed=7, mesh=mesh))

    traces = pipeline.trace_count("img2img")
    # strength 0: no step runs, the image comes back through the autoencoder.
    roundtrip = jnp.clip(ldm.decode_first_stage(config, params, ldm.encode_first_stage(config, params, images)), -1, 1)
    np.testing.assert_allclose(run(0.0), roundtrip, atol=1e-5)
    # strength 1: every step from pure noise, as txt2img with the same seed.
    np.testing.assert_allclose(run(1.0), _txt2img(model, eta=0.0), atol=1e-5)
    run(0.5)
    assert pipeline.trace_count("img2img") == traces + 1


def test_inpaint_mask_blending_limits(model):
    config, params, tokens, empty = model
    mesh = make_mesh()
    images = np.asarray(jax.random.uniform(jax.random.key(4), (B, SIZE, SIZE, 3), minval=-1, maxval=1))
    sampler = pipeline.make_model_sampler(config, "ddim", STEPS)

    def run(mask):
        return np.asarray(pipeline.inpaint(config, params, sampler, tokens, empty, images, mask, guidance_scale=3.0,
                                           seed=7, mesh=mesh))

    ones = np.ones((B, SIZE, SIZE, 1), np.float32)
    roundtrip = jnp.clip(ldm.decode_first_stage(config, params, ldm.encode_first_stage(config, params, images)), -1, 1)
    np.testing.assert_allclose(run(0 * ones), roundtrip, atol=1e-5)  # nothing to repaint
    np.testing.assert_allclose(run(ones), _txt2img(model, eta=0.0), atol=1e-5)  # repaint all


@pytest.mark.parametrize("cond", ["class", None])
def test_vq_class_conditional_and_unconditional(cond):
    """VQ first stage (decode quantises); class labels with the null class as uncond, or no conditioning."""
    base = _config()
    cross = cond == "class"
    config = ldm.LDMConfig(
        first_stage=dataclasses.replace(base.first_stage, kind="vq", double_z=False, n_embed=16),
        unet=dataclasses.replace(base.unet, use_spatial_transformer=cross, attention_resolutions=(1,) if cross else (),
                                 context_dim=32 if cross else None),
        cond_stage=ClassEmbedderConfig(n_classes=5, embed_dim=32) if cross else None,
        diffusion=dataclasses.replace(base.diffusion, scale_factor=1.0, conditioning_key="crossattn" if cross else None))
    params = randomize_zero_kernels(ldm.init_params(config, jax.random.key(0)), jax.random.key(1))
    sampler = pipeline.make_model_sampler(config, "ddim", 2)
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3], np.int32) if cross else None
    run = functools.partial(pipeline.txt2img, config, params, sampler, labels, mesh=make_mesh(), guidance_scale=2.0)
    if not cross:
        with pytest.raises(ValueError, match="needs batch_size"):
            run(seed=0)
        run = functools.partial(run, batch_size=B)
    images = np.asarray(run(seed=0))
    assert images.shape == (B, SIZE, SIZE, 3) and np.isfinite(images).all()
    np.testing.assert_array_equal(np.asarray(run(seed=0)), images)
    assert not np.allclose(np.asarray(run(seed=1)), images)


def test_bad_inputs(model):
    config, params, tokens, empty = model
    mesh = make_mesh(devices=jax.devices()[:2])
    sampler = pipeline.make_model_sampler(config, "ddim", STEPS)
    images = np.zeros((B, SIZE, SIZE, 3), np.float32)
    mask = np.zeros((B, SIZE, SIZE, 1), np.float32)
    common = dict(mesh=mesh, seed=0)
    with pytest.raises(ValueError, match="not a multiple of 2"):
        pipeline.txt2img(config, params, sampler, tokens, empty, height=15, width=16, **common)
    with pytest.raises(ValueError, match="not a multiple of 2"):
        pipeline.img2img(config, params, sampler, tokens, empty, images[:, :15], **common)
    with pytest.raises(ValueError, match="single-channel"):
        pipeline.inpaint(config, params, sampler, tokens, empty, images, images, **common)
    with pytest.raises(ValueError, match="does not match the image"):
        pipeline.inpaint(config, params, sampler, tokens, empty, images, mask[:, :8], **common)
    with pytest.raises(ValueError, match="strength must be in"):
        pipeline.img2img(config, params, sampler, tokens, empty, images, strength=1.5, **common)
    with pytest.raises(ValueError, match="not divisible by the 2 devices"):
        pipeline.txt2img(config, params, sampler, tokens[:3], empty[:3], **common)
    with pytest.raises(ValueError, match=r"cond must be \(B, 8\) token ids"):
        pipeline.txt2img(config, params, sampler, tokens[:, :5], empty[:, :5], **common)
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*32\)"):
        pipeline.txt2img(config, params, sampler, tokens, empty, mesh=mesh, seed=-1)
    with pytest.raises(ValueError, match="uncond has shape"):
        pipeline.txt2img(config, params, sampler, tokens, empty[:4], **common)
    # 9-channel weights under a 4-channel config, and a 9-channel model outside inpaint().
    with pytest.raises(ValueError, match="in_channels=9 != 4 latent channels.*hybrid"):
        dataclasses.replace(config, unet=dataclasses.replace(config.unet, in_channels=9))
    inpaint_config = _config(in_channels=9)
    with pytest.raises(ValueError, match="use inpaint"):
        pipeline.txt2img(inpaint_config, params, sampler, tokens, empty, **common)


def test_to_uint8():
    np.testing.assert_array_equal(pipeline.to_uint8(np.array([-1.5, -1.0, 0.0, 0.999, 1.0])), [0, 0, 128, 255, 255])
