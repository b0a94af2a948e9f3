"""diffusers Stable Diffusion folders: load tiny random pipelines saved by diffusers, sample with DDIM + CFG
from the same initial latents as diffusers (PyTorch), compare images; export back and reload in diffusers.

Run: .venv/bin/python -m pytest -q tests/test_diffusers_pipeline.py
"""
import json
import shutil

import jax
import numpy as np
import pytest
import torch

from ldm_jax import pipeline
from ldm_jax.convert.common import ConversionError
from ldm_jax.convert.diffusers_pipeline import (load_diffusers_pipeline, read_scheduler_config, sampler_options,
                                                save_diffusers_pipeline)
from ldm_jax.convert.diffusers_unet import unet_config_from_diffusers, unet_config_to_diffusers
from ldm_jax.parallel import make_mesh
from conftest import TINY_SD_SIZE, assert_same_sd_weights

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

STEPS, GUIDANCE = 5, 7.5
SIZE = TINY_SD_SIZE  # 16x16 images, f=2 VAE -> 8x8x4 latents
PROMPTS = ["a red circle on the left", "a blue square"]
# Images are in [-1, 1]. Both sides run float32; they differ by op order (conv/matmul blocking, softmax,
# GroupNorm reductions): ~1e-6 per model call, grown through 5 DDIM steps x CFG 7.5 (which multiplies the
# cond - uncond difference by 7.5) and the VAE decoder. Measured max |diff| 3.5e-6 (txt2img and inpaint,
# images spanning [-1, 1], 99% of values unclipped); bound 2e-5.
ATOL = 2e-5


def _noise(seed=0):
    return np.random.default_rng(seed).standard_normal((len(PROMPTS), SIZE // 2, SIZE // 2, 4)).astype(np.float32)


def _diffusers_images(pipe, noise, **kwargs) -> np.ndarray:
    """diffusers' output (B, H, W, 3) in [0, 1] -> [-1, 1]."""
    latents = torch.from_numpy(noise.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        out = pipe(prompt=PROMPTS, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                   latents=latents, output_type="np", **kwargs).images
    return out * 2.0 - 1.0


def _ours(model, kind, noise, **kwargs) -> np.ndarray:
    cond, uncond = pipeline.encode_prompts(model, PROMPTS)
    options = sampler_options(read_scheduler_config(model.model_id), "ddim")
    sampler = pipeline.make_model_sampler(model.config, "ddim", STEPS, **options)
    fn = getattr(pipeline, kind)
    out = fn(model.config, model.params, sampler, cond, uncond, guidance_scale=GUIDANCE, noise=noise,
             mesh=make_mesh(devices=jax.devices()[:2]), **kwargs)
    return np.asarray(out)


def test_txt2img_matches_diffusers(sd):
    pipe, folder = sd
    model = load_diffusers_pipeline(folder)
    assert model.config.diffusion.conditioning_key == "crossattn"
    assert model.config.diffusion.scale_factor == pipe.vae.config.scaling_factor
    noise = _noise()
    ours = _ours(model, "txt2img", noise, height=SIZE, width=SIZE)
    theirs = _diffusers_images(pipe, noise)
    assert ours.shape == theirs.shape == (2, SIZE, SIZE, 3)
    assert np.abs(theirs).max() > 0.05  # a non-trivial image
    np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=0)


def test_inpaint_9_channel_matches_diffusers(sd_inpaint):
    pipe, folder = sd_inpaint
    model = load_diffusers_pipeline(folder)
    assert model.config.diffusion.conditioning_key == "hybrid" and model.config.concat_channels == 5
    rng = np.random.default_rng(1)
    image = rng.uniform(-1, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
    mask = np.zeros((2, SIZE, SIZE, 1), np.float32)
    mask[:, 4:12, 2:10] = 1.0
    noise = _noise(2)
    ours = _ours(model, "inpaint", noise, images=image, mask=mask)
    theirs = _diffusers_images(pipe, noise, image=(image + 1) / 2, mask_image=mask, strength=1.0)
    np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=0)


def test_export_round_trip(sd, tmp_path):
    pipe, folder = sd
    model = load_diffusers_pipeline(folder)
    out = save_diffusers_pipeline(model, tmp_path / "exported")
    # Our importer gives back exactly the same params.
    again = load_diffusers_pipeline(out)
    assert again.config == model.config
    jax.tree.map(np.testing.assert_array_equal, again.params, model.params)
    # diffusers loads the export (strictly: every key present) and generates the same images.
    exported = diffusers.StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert_same_sd_weights(exported, pipe)
    exported.scheduler = pipe.scheduler  # exported with SD's PNDM config; compare under the same DDIM
    noise = _noise(3)
    np.testing.assert_array_equal(_diffusers_images(exported, noise), _diffusers_images(pipe, noise))


def test_unet_config_round_trip(sd):
    config = unet_config_from_diffusers(dict(sd[0].unet.config))
    assert unet_config_from_diffusers(unet_config_to_diffusers(config)) == config


def test_bad_folders(sd, tmp_path):
    _, folder = sd
    broken = shutil.copytree(folder, tmp_path / "no_vae")
    shutil.rmtree(broken / "vae")
    with pytest.raises(FileNotFoundError, match="no vae/ subfolder"):
        load_diffusers_pipeline(broken)
    broken = shutil.copytree(folder, tmp_path / "no_weights")
    (broken / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="text_encoder has no weights file.*model.safetensors"):
        load_diffusers_pipeline(broken)
    with pytest.raises(FileNotFoundError, match="model_index.json does not exist"):
        load_diffusers_pipeline(tmp_path / "nowhere")
    # 9-channel weights under a config that says 4 channels.
    mismatched = shutil.copytree(folder, tmp_path / "mismatch")
    cfg = json.loads((mismatched / "unet" / "config.json").read_text())
    cfg["in_channels"] = 9
    (mismatched / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match=r"conv_in.weight: checkpoint \(3, 3, 4, 32\) vs model \(3, 3, 9, 32\)"):
        load_diffusers_pipeline(mismatched)
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    bad = shutil.copytree(folder, tmp_path / "bad_scheduler")
    (bad / "scheduler" / "scheduler_config.json").write_text(json.dumps({**scheduler, "beta_schedule": "sigmoid"}))
    with pytest.raises(ConversionError, match="beta_schedule='sigmoid'"):
        load_diffusers_pipeline(bad)
