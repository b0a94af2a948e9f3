"""Pixel-space diffusion (the paper's LDM-1): the identity first stage, `first_stage.kind="identity"`.

- The identity first stage: no params, encode and decode return their input, through `ldm`'s first-stage functions
  too (times / over scale_factor); its config checks.
- The training loss of a pixel-space LDM equals a hand computation that noises the image itself.
- A tiny pixel-space (unconditional) LDM trains 2 steps end to end (`main.train_and_evaluate`: no train.first_stage,
  precomputed "latents", scale_by_std) and exports a model directory whose config.json holds the identity first
  stage and whose params hold none of it; `store.load_model` reads it and samples (32, 32, 3) images in [-1, 1].
- `ldm-jax sample --checkpoint DIR` (text models only) samples a saved random-weight pixel-space text model.
"""
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from ldm_jax import ldm, pipeline, sampling, store
from ldm_jax.config import load_config_file
from ldm_jax.data.captioned_shapes import prepare_captioned_shapes
from ldm_jax.data.train_tokenizer import train_tokenizer
from ldm_jax.models.autoencoder import AutoencoderConfig, build_autoencoder, init_autoencoder
from ldm_jax.models.tokenizer import load_tokenizer
from ldm_jax.presets import get_preset
from ldm_jax.training import main

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
IDENTITY = dict(kind="identity", ch_mult=(1,), double_z=False, z_channels=3, embed_dim=3, attn_resolutions=())

pytestmark = pytest.mark.usefixtures("compilation_cache")  # conftest: repeats hit XLA's cache


def _unconditional(scale_factor=0.5, prediction_type="eps"):
    """A tiny unconditional pixel-space LDM on 8x8x3 images."""
    config = get_preset("tiny")
    with config.unlocked():
        del config["cond_stage"]
        config.first_stage = ml_collections.ConfigDict(IDENTITY)
        config.unet.update(dict(in_channels=3, out_channels=3, channel_mult=(1,), attention_resolutions=(),
                                use_spatial_transformer=False, context_dim=None))
        config.diffusion.update(dict(conditioning_key=None, image_size=8, channels=3, scale_factor=scale_factor,
                                     prediction_type=prediction_type))
    return ldm.ldm_config(config)


def test_identity_first_stage_is_the_identity():
    config = AutoencoderConfig(**IDENTITY)
    assert config.downsample_factor == 1 and not config.has_params
    module = build_autoencoder(config)
    assert init_autoencoder(module, jax.random.key(0)) == {}
    x = jax.random.uniform(jax.random.key(1), (2, 6, 10, 3), minval=-1.0, maxval=1.0)
    np.testing.assert_array_equal(module.apply({}, x, method=module.encode), x)
    np.testing.assert_array_equal(module.apply({}, x, method=module.decode), x)

    model = _unconditional(scale_factor=0.5)
    assert model.downsample_factor == 1 and model.latent_channels == 3
    assert not any(path[0] == "first_stage" for path in ldm.param_shapes(model))  # (init_params: no entry)
    params = {}  # (what the first-stage functions read of an identity model's params: nothing)
    np.testing.assert_array_equal(ldm.encode_first_stage(model, params, x, jax.random.key(3)), 0.5 * x)
    np.testing.assert_array_equal(ldm.decode_first_stage(model, {}, 0.5 * x), x)
    moments = ldm.first_stage_moments(model, params, x)
    np.testing.assert_array_equal(moments, x)
    np.testing.assert_array_equal(ldm.latents_from_moments(model, moments, jax.random.key(4)), 0.5 * x)

    with pytest.raises(ValueError, match=r"kind='identity' needs ch_mult=\(1,\) \(f = 1\)"):
        AutoencoderConfig(**{**IDENTITY, "ch_mult": (1, 2)})
    with pytest.raises(ValueError, match=r"in_channels == out_ch == z_channels == embed_dim .*\(3, 3, 4, 4\)"):
        AutoencoderConfig(**{**IDENTITY, "z_channels": 4, "embed_dim": 4})
    with pytest.raises(ValueError, match="kind='identity' needs double_z=False"):
        AutoencoderConfig(**{**IDENTITY, "double_z": True})


def test_training_loss_noises_the_image_itself():
    model = _unconditional(scale_factor=0.5)
    params = jax.jit(lambda k: ldm.init_params(model, k))(jax.random.key(0))
    assert "first_stage" not in params
    images = jax.random.uniform(jax.random.key(1), (4, 8, 8, 3), minval=-1.0, maxval=1.0)
    key = jax.random.key(2)
    loss, metrics = jax.jit(lambda p, b, k: ldm.training_loss(model, p, b, k))(params, {"image": images}, key)

    # By hand: the keys as training_loss splits them; the linear schedule's cumulative alphas in float64.
    _, k_t, k_noise, _, _ = jax.random.split(key, 5)
    sched = model.diffusion.schedule
    t = jax.random.randint(k_t, (4,), 0, sched.num_timesteps)
    noise = jax.random.normal(k_noise, images.shape, jnp.float32)
    betas = np.linspace(sched.linear_start ** 0.5, sched.linear_end ** 0.5, sched.num_timesteps) ** 2
    abar = np.cumprod(1.0 - betas)[np.asarray(t)].reshape(4, 1, 1, 1)
    x_t = np.sqrt(abar) * 0.5 * np.asarray(images) + np.sqrt(1.0 - abar) * np.asarray(noise)
    pred = jax.jit(lambda p, x, t: ldm.apply_unet(model, p, x, t, None))(params, jnp.asarray(x_t, jnp.float32), t)
    expected = np.mean((np.asarray(pred, np.float64) - np.asarray(noise, np.float64)) ** 2)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss_unweighted"]), expected, rtol=1e-5)


def _pixel_ldm_config(data_dir, name, **overrides):
    """configs/shapes_ldm.py made pixel-space and unconditional: the identity first stage, a one-level UNet without
    attention on 32x32x3 images (the text tower and cross-attention have nothing to do with the first stage, and
    compiling them would double the test's time)."""
    tiny = {"unet.model_channels": 32, "unet.channel_mult": "(1,)", "unet.num_res_blocks": 1,
            "unet.attention_resolutions": "()", "unet.use_spatial_transformer": False, "unet.in_channels": 3,
            "unet.out_channels": 3, "diffusion.image_size": 32, "diffusion.channels": 3,
            "diffusion.cond_drop_prob": 0.0, "data.batch_keys": "image", "train.tokenizer": "",
            "train.check_shapes": False, "data.data_dir": str(data_dir), "data.name": name,
            "data.global_batch_size": 8, "train.num_steps": 2, "train.log_every": 1, "train.image_every": 100,
            "train.progress_bar": False, "mesh.data": 1, "checkpoint.every_steps": 100, **overrides}
    config = main.load_config(CONFIGS / "shapes_ldm.py", [f"--config.{k}={v}" for k, v in tiny.items()])
    with config.unlocked():
        config.first_stage = ml_collections.ConfigDict(IDENTITY)
        config.unet.position_embedding = None
        config.unet.context_dim = None
        config.diffusion.conditioning_key = None
        del config["cond_stage"]
    config.lock()
    return config


def test_pixel_space_ldm_trains_exports_and_samples(tmp_path):
    name = prepare_captioned_shapes(tmp_path / "tfds", resolution=32, num_train=16, num_validation=8,
                                    num_heldout=8)
    with pytest.raises(main.ConfigError, match=r"train.first_stage=.* but first_stage.kind='identity' has no params"):
        main.train_and_evaluate(_pixel_ldm_config(tmp_path / "tfds", name, **{"train.first_stage": str(tmp_path)}),
                                tmp_path / "refused")

    workdir = tmp_path / "ldm"
    result = main.train_and_evaluate(_pixel_ldm_config(tmp_path / "tfds", name), workdir)
    assert int(result.state.step) == 2 and not (workdir / "frozen_params.safetensors").exists()
    moments = np.load(workdir / "latents" / "train.npz")["moments"]  # the precomputed "latents": the images
    assert moments.shape == (16, 32, 32, 3) and moments.min() >= -1.0 and moments.max() <= 1.0
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)

    export = result.export_dir
    sections = json.loads((export / "config.json").read_text())
    assert sections["first_stage"]["kind"] == "identity" and sections["first_stage"]["ch_mult"] == [1]
    scale = sections["diffusion"]["scale_factor"]  # scale_by_std: 1 / std of the first batch's images
    assert scale != get_preset("sd_v1").diffusion.scale_factor and 0.5 < scale < 20
    model = store.load_model(export)
    assert model.config.first_stage.kind == "identity" and "first_stage" not in model.params
    assert model.config.downsample_factor == 1 and model.config.diffusion.scale_factor == scale
    assert ldm.ldm_config(sections) == model.config
    with pytest.raises(store.StoreError, match="no identity first stage"):
        store.save_model(model, tmp_path / "pixel.safetensors", format="compvis")

    images = pipeline.txt2img(model.config, model.params, pipeline.make_model_sampler(model.config, "ddim", 2), None,
                              batch_size=8, seed=0)  # one image per device
    images = np.asarray(images)
    assert images.shape == (8, 32, 32, 3) and np.isfinite(images).all()
    assert images.min() >= -1.0 and images.max() <= 1.0


def test_sample_command_reads_a_pixel_space_model_directory(tmp_path):
    """`ldm-jax sample --checkpoint DIR` (sample.py) on a random-weight pixel-space text model saved by the store."""
    config = load_config_file(CONFIGS / "shapes_ldm.py")
    with config.unlocked():
        config.first_stage = ml_collections.ConfigDict(IDENTITY)
        config.unet.update(dict(model_channels=32, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(1,),
                                context_dim=32, in_channels=3, out_channels=3, position_embedding=None))
        config.cond_stage.update(dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2))
        config.diffusion.update(dict(scale_by_std=False, scale_factor=1.0, image_size=16, channels=3))
    model_config = ldm.ldm_config(config)
    tokenizer = load_tokenizer(train_tokenizer(tmp_path / "tokenizer"), model_config.tokenizer_kind)
    params = jax.jit(lambda k: ldm.init_params(model_config, k))(jax.random.key(0))
    model = ldm.LoadedModel(config=model_config, params=params, tokenizer=tokenizer)
    directory = store.save_model(model, tmp_path / "model")
    assert json.loads((directory / "config.json").read_text())["first_stage"]["kind"] == "identity"
    out = tmp_path / "samples"
    assert sampling.main(["--checkpoint", str(directory), "--prompt", "a small red circle at the top left", "--n", "2",
                          "--steps", "2", "--seed", "0", "--outdir", str(out)]) == 0
    images = [np.asarray(Image.open(p)) for p in sorted(out.glob("0*.png"))]
    assert len(images) == 2 and all(image.shape == (16, 16, 3) and image.dtype == np.uint8 for image in images)
