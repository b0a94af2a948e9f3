"""LatentDiffusion (ldm_jax/ldm.py): configs, first-stage scaling, conditioning, and the training loss
checked piece by piece against direct computations (float64 numpy schedule, the models applied by hand).

Run: .venv/bin/python -m pytest -q tests/test_ldm.py
"""
import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import ldm, presets
from ldm_jax.config import load_config_file
from ldm_jax.diffusion.schedule import ScheduleConfig, make_betas
from ldm_jax.models.autoencoder import AutoencoderConfig
from ldm_jax.models.text import ClassEmbedderConfig, ClipTextConfig
from ldm_jax.models.unet import UNetConfig

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
RTOL = 1e-5  # float32 with "highest" matmul precision: the same ops in the same order, up to XLA fusion


def tiny_config(kind="kl", conditioning_key="crossattn", cond="clip", in_channels=4, **diffusion) -> ldm.LDMConfig:
    """f=2 first stage (16x16x3 <-> 8x8x4), one-level UNet, 2-layer CLIP of length 8 (or class/none)."""
    fs = AutoencoderConfig(kind=kind, ch=32, ch_mult=(1, 1), num_res_blocks=1, resolution=16,
                           double_z=kind == "kl", n_embed=16 if kind == "vq" else 0)
    cross = conditioning_key in ("crossattn", "hybrid")
    unet = UNetConfig(in_channels=in_channels, model_channels=32, channel_mult=(1,), num_res_blocks=1,
                      attention_resolutions=(1,) if cross else (), num_heads=2, use_spatial_transformer=cross,
                      context_dim=32 if cross else None,
                      num_classes=5 if conditioning_key == "adm" else None)
    cond_stage = None
    if cond == "clip" and cross:
        cond_stage = ClipTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                                    max_length=8, eos_token_id=99, pad_token_id=99)
    elif cond == "class" and cross:
        cond_stage = ClassEmbedderConfig(n_classes=5, embed_dim=32)
    d = ldm.DiffusionConfig(schedule=ScheduleConfig(beta_schedule="linear", num_timesteps=100, linear_start=0.00085,
                                                    linear_end=0.012), image_size=8, channels=4,
                          conditioning_key=conditioning_key, **diffusion)
    return ldm.LDMConfig(first_stage=fs, unet=unet, diffusion=d, cond_stage=cond_stage)


def randomize_zero_kernels(params, key):
    """The UNet's output conv and attention output projections start at zero (so context and input would
    not reach the output); give every all-zero kernel small random values."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(key, len(leaves))
    out = [0.05 * jax.random.normal(k, x.shape) if path[-1].key == "kernel" and not jnp.any(x) else x
           for (path, x), k in zip(leaves, keys, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, out)


def _params(config, seed=0):
    return randomize_zero_kernels(ldm.init_params(config, jax.random.key(seed)), jax.random.key(seed + 1))


def _images(b=2, seed=0):
    return jax.random.uniform(jax.random.key(100 + seed), (b, 16, 16, 3), minval=-1, maxval=1)


def _tokens(b=2, seed=0):
    return jax.random.randint(jax.random.key(200 + seed), (b, 8), 0, 100)


# ----------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name", ["sd_v1", "sd_v1_inpainting", "sd_v2", "sd_v2_768_v", "ldm_cin256",
                                  "ldm_celebahq_vq4", "ldm_txt2img_1p4b"])
def test_ldm_config_from_config_files(name):
    config = ldm.ldm_config(load_config_file(CONFIGS / f"{name}.py"))
    section = load_config_file(CONFIGS / f"{name}.py")
    assert config.diffusion.schedule.linear_start == section.diffusion.linear_start
    assert config.diffusion.scale_factor == section.diffusion.scale_factor
    assert config.diffusion.conditioning_key == section.diffusion.conditioning_key
    assert config.concat_channels == (5 if name == "sd_v1_inpainting" else 0)
    if name.startswith("sd_v1"):
        assert (config.tokenizer_kind, config.max_length, config.pad_token_id) == ("clip", 77, 49407)


def test_config_errors_name_the_problem():
    base = tiny_config()
    with pytest.raises(ValueError, match="in_channels=9 != 4 latent channels.*hybrid"):
        dataclasses.replace(base, unet=dataclasses.replace(base.unet, in_channels=9))
    with pytest.raises(ValueError, match="context width 32 != unet.context_dim 16"):
        dataclasses.replace(base, unet=dataclasses.replace(base.unet, context_dim=16))
    with pytest.raises(ValueError, match="needs a cond_stage"):
        dataclasses.replace(base, cond_stage=None)
    with pytest.raises(ValueError, match="prediction_type='eps2'"):
        ldm.DiffusionConfig(prediction_type="eps2")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['scale_factr'\]"):
        ldm.diffusion_config({"beta_schedule": "linear"}, {"scale_factr": 1.0})
    with pytest.raises(ValueError, match="set in two sections"):
        ldm.diffusion_config({"prediction_type": "eps"}, {"prediction_type": "v"})


def test_legacy_ldm_section_is_merged_into_diffusion():
    """Model configs saved before the one `diffusion` section (e.g. the config.json of a model directory written
    then) split the DiffusionConfig fields over `diffusion` (the schedule) and `ldm` (the rest): they load the
    same as the one-section config."""
    one_section = presets.get_preset("tiny").to_dict()
    schedule = ("beta_schedule", "num_timesteps", "linear_start", "linear_end")
    saved = {**one_section, "diffusion": {k: one_section["diffusion"][k] for k in schedule},
             "ldm": {k: v for k, v in one_section["diffusion"].items() if k not in schedule}}
    saved = json.loads(json.dumps(saved))  # as read from a file: lists, not tuples
    assert ldm.ldm_config(saved) == ldm.ldm_config(one_section)
    twice = {**saved, "ldm": {**saved["ldm"], "beta_schedule": "cosine"}}
    with pytest.raises(ValueError, match=r"\['beta_schedule'\] are set in two sections"):
        ldm.ldm_config(twice)


# ------------------------------------------------------------------------------------------ first stage


def test_encode_decode_scaling_kl():
    config = tiny_config(scale_factor=0.5)
    params = _params(config)
    model = ldm.modules(config).first_stage
    x = _images()
    posterior = model.apply({"params": params["first_stage"]}, x, method=model.encode)
    mode = ldm.encode_first_stage(config, params, x)
    np.testing.assert_allclose(mode, 0.5 * posterior.mode(), rtol=RTOL, atol=1e-6)
    key = jax.random.key(7)
    sample = ldm.encode_first_stage(config, params, x, key)
    np.testing.assert_allclose(sample, 0.5 * posterior.sample(key), rtol=RTOL, atol=1e-6)
    assert not np.allclose(sample, mode)
    decoded = ldm.decode_first_stage(config, params, mode)
    direct = model.apply({"params": params["first_stage"]}, posterior.mode(), method=model.decode)
    np.testing.assert_allclose(decoded, direct, rtol=RTOL, atol=1e-5)
    assert decoded.shape == x.shape


def test_encode_decode_vq_unquantised_latents():
    config = tiny_config(kind="vq", scale_factor=1.0)
    params = _params(config)
    model = ldm.modules(config).first_stage
    x = _images()
    h = ldm.encode_first_stage(config, params, x, jax.random.key(1))  # key unused by VQ
    np.testing.assert_array_equal(h, model.apply({"params": params["first_stage"]}, x, method=model.encode))
    decoded = ldm.decode_first_stage(config, params, h)
    quantised = model.apply({"params": params["first_stage"]}, h, method=model.decode)
    np.testing.assert_allclose(decoded, quantised, rtol=RTOL, atol=1e-6)
    unquantised = model.apply({"params": params["first_stage"]}, h, True, method=model.decode)
    assert not np.allclose(decoded, unquantised, atol=1e-4)


# ------------------------------------------------------------------------------------------ conditioning


def test_drop_conditioning_rate_and_values():
    tokens = jnp.tile(jnp.arange(8, dtype=jnp.int32)[None], (20000, 1))
    null = jnp.full((20000, 8), 99, jnp.int32)
    out, dropped = ldm.drop_conditioning(tokens, null, 0.1, jax.random.key(0))
    rate = float(jnp.mean(dropped))
    assert abs(rate - 0.1) < 4 * np.sqrt(0.1 * 0.9 / 20000), rate  # 4 sigma
    np.testing.assert_array_equal(out[dropped], null[dropped])
    np.testing.assert_array_equal(out[~dropped], tokens[~dropped])


def test_null_inputs_per_kind():
    clip = tiny_config()
    with pytest.raises(ValueError, match="empty_prompt_ids"):
        ldm.null_inputs(clip, 2)
    empty = np.array([[98, 99, 99, 99, 99, 99, 99, 99]])
    np.testing.assert_array_equal(ldm.null_inputs(clip, 3, empty), np.repeat(empty, 3, 0))
    with pytest.raises(ValueError, match="max_length 8"):
        ldm.null_inputs(clip, 2, empty[:, :5])
    np.testing.assert_array_equal(ldm.null_inputs(tiny_config(cond="class"), 2), [4, 4])
    np.testing.assert_array_equal(ldm.null_inputs(tiny_config(conditioning_key="adm", cond=None), 2), [4, 4])


# ------------------------------------------------------------------------------------------------ loss


def _direct_loss(config, params, batch, key, *, context=None, y=None, concat=None):
    """The loss recomputed from its definition: float64 numpy schedule, the models applied by hand."""
    d = config.diffusion
    k_post, k_t, k_noise, _, _ = jax.random.split(key, 5)
    fs = ldm.modules(config).first_stage
    z = np.asarray(fs.apply({"params": params["first_stage"]}, batch["image"], method=fs.encode).sample(k_post),
                   np.float64) * d.scale_factor
    t = np.asarray(jax.random.randint(k_t, (z.shape[0],), 0, d.schedule.num_timesteps))
    noise = np.asarray(jax.random.normal(k_noise, z.shape), np.float64)
    ac = np.cumprod(1 - make_betas("linear", d.schedule.num_timesteps, linear_start=d.schedule.linear_start,
                                   linear_end=d.schedule.linear_end))[t][:, None, None, None]
    x_t = np.sqrt(ac) * z + np.sqrt(1 - ac) * noise
    target = {"eps": noise, "x0": z, "v": np.sqrt(ac) * noise - np.sqrt(1 - ac) * z}[d.prediction_type]
    x_in = x_t if concat is None else np.concatenate([x_t, concat], -1)
    unet = ldm.modules(config).unet
    pred = np.asarray(unet.apply({"params": params["unet"]}, jnp.asarray(x_in, jnp.float32), jnp.asarray(t),
                                 context, y), np.float64)
    per_example = np.mean((pred - target) ** 2, axis=(1, 2, 3))
    snr = ac[:, 0, 0, 0] / (1 - ac[:, 0, 0, 0])
    if d.loss_weighting == "min_snr":
        per_example = per_example * {"eps": np.minimum(snr, d.min_snr_gamma) / snr,
                                     "v": np.minimum(snr, d.min_snr_gamma) / (snr + 1)}[d.prediction_type]
    logvar = np.asarray(params["logvar"], np.float64)[t] if d.learn_logvar else d.logvar_init
    return np.mean(per_example / np.exp(logvar) + logvar)


@pytest.mark.parametrize("options", [
    dict(prediction_type="eps"),
    dict(prediction_type="v", loss_weighting="min_snr", min_snr_gamma=2.0),
    dict(prediction_type="x0"),
    dict(prediction_type="eps", loss_weighting="min_snr", learn_logvar=True),
], ids=["eps", "v_min_snr", "x0", "eps_min_snr_logvar"])
def test_loss_matches_direct_computation(options):
    config = tiny_config(**options)
    params = _params(config)
    if config.diffusion.learn_logvar:
        # Positive log-variances: the loss' terms then do not cancel, so rtol applies to the sum.
        params["logvar"] = jax.random.uniform(jax.random.key(9), params["logvar"].shape, minval=0.2, maxval=1.0)
    batch = {"image": _images(2), "tokens": _tokens(2)}
    key = jax.random.key(11)
    loss, metrics = ldm.training_loss(config, params, batch, key)
    cs = ldm.modules(config).cond_stage
    context = cs.apply({"params": params["cond_stage"]}, batch["tokens"])
    expected = _direct_loss(config, params, batch, key, context=context)
    np.testing.assert_allclose(float(loss), expected, rtol=RTOL)
    assert set(metrics) >= {"loss", "loss_simple", "loss_unweighted"}
    assert ("logvar" in metrics) == config.diffusion.learn_logvar


def test_full_dropout_equals_empty_prompt_and_gradients():
    config = tiny_config(cond_drop_prob=1.0)
    params = _params(config)
    empty = np.array([[98, 99, 99, 99, 99, 99, 99, 99]], np.int32)
    batch = {"image": _images(2), "tokens": _tokens(2)}
    key = jax.random.key(5)
    loss_fn = ldm.make_loss_fn(config, empty_prompt=empty)
    (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, batch, key)
    assert float(metrics["cond_dropped"]) == 1.0
    cs = ldm.modules(config).cond_stage
    context = cs.apply({"params": params["cond_stage"]}, jnp.asarray(np.repeat(empty, 2, 0)))
    np.testing.assert_allclose(float(loss), _direct_loss(config, params, batch, key, context=context), rtol=RTOL)
    # The first stage gets no gradient (its latents are stop_gradient), the UNet does.
    assert all(float(jnp.max(jnp.abs(g))) == 0 for g in jax.tree.leaves(grads["first_stage"]))
    assert float(jnp.max(jnp.abs(grads["unet"]["conv_out"]["kernel"]))) > 0
    with pytest.raises(ValueError, match="needs empty_prompt"):
        ldm.make_loss_fn(config)


def test_loss_class_adm_and_inpainting_conditioning():
    key = jax.random.key(2)
    images = _images(2)
    # Class cond stage (cin256 style): labels -> (B, 1, D) context.
    config = tiny_config(cond="class")
    params = _params(config)
    labels = jnp.array([1, 3])
    loss, _ = ldm.training_loss(config, params, {"image": images, "label": labels}, key)
    context = ldm.encode_conditioning(config, params, labels)["context"]
    assert context.shape == (2, 1, 32)
    np.testing.assert_allclose(float(loss), _direct_loss(config, params, {"image": images}, key, context=context),
                               rtol=RTOL)
    # "adm": labels straight into the UNet's class embedding.
    config = tiny_config(conditioning_key="adm", cond=None)
    params = _params(config)
    loss, _ = ldm.training_loss(config, params, {"image": images, "label": labels}, key)
    np.testing.assert_allclose(float(loss), _direct_loss(config, params, {"image": images}, key, y=labels), rtol=RTOL)
    with pytest.raises(KeyError, match="'label'"):
        ldm.training_loss(config, params, {"image": images}, key)
    # "hybrid" inpainting: [mask, masked-image latent] appended to x.
    config = tiny_config(conditioning_key="hybrid", in_channels=9)
    params = _params(config)
    mask = (jnp.arange(16)[None, :, None, None] >= 8).astype(jnp.float32) * jnp.ones((2, 16, 16, 1))
    batch = {"image": images, "tokens": _tokens(2), "mask": mask}
    loss, _ = ldm.training_loss(config, params, batch, key)
    concat = ldm.inpaint_conditioning(config, params, images, mask)
    fs = ldm.modules(config).first_stage
    masked = fs.apply({"params": params["first_stage"]}, images * (1 - mask), method=fs.encode).mode()
    np.testing.assert_allclose(concat[..., 1:], masked * config.diffusion.scale_factor, rtol=RTOL, atol=1e-6)
    np.testing.assert_array_equal(concat[..., :1], mask[:, ::2, ::2])
    context = ldm.encode_conditioning(config, params, batch["tokens"])["context"]
    expected = _direct_loss(config, params, batch, key, context=context, concat=np.asarray(concat))
    np.testing.assert_allclose(float(loss), expected, rtol=RTOL)
    with pytest.raises(KeyError, match="batch\\['concat'\\].*batch\\['mask'\\]"):
        ldm.training_loss(config, params, {"image": images, "tokens": _tokens(2)}, key)


def test_image_and_mask_checks():
    config = tiny_config()
    with pytest.raises(ValueError, match="not a multiple of 2"):
        ldm.check_image_and_mask(config, np.zeros((1, 15, 16, 3)))
    with pytest.raises(ValueError, match="single-channel"):
        ldm.check_image_and_mask(config, np.zeros((1, 16, 16, 3)), np.zeros((1, 16, 16, 3)))
    with pytest.raises(ValueError, match="does not match"):
        ldm.check_image_and_mask(config, np.zeros((1, 16, 16, 3)), np.zeros((1, 8, 8, 1)))
