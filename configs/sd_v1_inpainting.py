"""Stable Diffusion v1.5 inpainting (v1-inpainting-inference.yaml): SD v1 with a 9-channel UNet input.

conditioning_key "hybrid": the caller concatenates 4 noisy-latent + 1 mask + 4 masked-image-latent channels
into x (in that order) and passes the text context by cross-attention. Everything else is configs/sd_v1.py.

Built by `.venv/bin/python -m pytest -q tests/test_configs.py -k sd_v1_inpainting`.
"""
import pathlib

import ml_collections

from ldm_jax.config import load_config_file


def get_config() -> ml_collections.ConfigDict:
    config = load_config_file(pathlib.Path(__file__).with_name("sd_v1.py"))
    config.unet.in_channels = 9
    config.ldm.conditioning_key = "hybrid"
    return config
