"""Tiny latent-diffusion UNet for tests and CPU experiments (1,055,044 parameters).

model_channels 32, channel_mult (1, 2), 1 res block per level, spatial transformers (2 heads, context 32, the
width of configs/text_tiny.py's encoder) at factors 1 and 2; 8x8x4 latents of configs/autoencoder_tiny_kl.py.
Schedule as SD v1 (linear 0.00085..0.012, 1000 steps, eps).

Built by `.venv/bin/python -m pytest -q tests/test_configs.py -k unet_tiny`.
"""
import pathlib

import ml_collections

from ldm_jax.config import load_config_file


def get_config() -> ml_collections.ConfigDict:
    config = load_config_file(pathlib.Path(__file__).with_name("sd_v1.py"))
    tiny_ae = load_config_file(pathlib.Path(__file__).with_name("autoencoder_tiny_kl.py"))
    config.first_stage = tiny_ae.first_stage
    unet = config.unet
    unet.model_channels = 32
    unet.channel_mult = (1, 2)
    unet.num_res_blocks = 1
    unet.attention_resolutions = (1, 2)
    unet.num_heads = 2
    unet.context_dim = 32
    unet.remat = False
    config.ldm.image_size = 8
    return config
