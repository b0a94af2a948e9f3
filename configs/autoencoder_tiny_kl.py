"""Tiny KL autoencoder for tests and CPU experiments: f=4, 32x32x3 images <-> 8x8x4 latents.

ch 32, ch_mult (1, 2, 2), 1 resnet per level, attention at the 8x8 level (about 1.0M parameters).
Training lands with the training issue; this file overrides configs/autoencoder_kl_f8.py.
Built and shape-checked by: .venv/bin/python -m pytest -q tests/test_configs.py -k autoencoder_tiny_kl
"""
import pathlib

import ml_collections

from ldm_jax.config import load_config_file


def get_config() -> ml_collections.ConfigDict:
    config = load_config_file(pathlib.Path(__file__).with_name("autoencoder_kl_f8.py"))
    stage = config.first_stage
    stage.ch = 32
    stage.ch_mult = (1, 2, 2)
    stage.num_res_blocks = 1
    stage.attn_resolutions = (8,)
    stage.resolution = 32
    return config
