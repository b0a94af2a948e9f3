"""Tiny VQ autoencoder for tests and CPU experiments: f=4, 32x32x3 images <-> 8x8x4 latents, 256 codes.

ch 32, ch_mult (1, 2, 2), 1 resnet per level, attention at the 8x8 level, codebook beta 0.25 (legacy form).
Training lands with the training issue; this file overrides configs/autoencoder_tiny_kl.py.
Built and shape-checked by: .venv/bin/python -m pytest -q tests/test_configs.py -k autoencoder_tiny_vq
"""
import pathlib

import ml_collections

from ldm_jax.config import load_config_file


def get_config() -> ml_collections.ConfigDict:
    config = load_config_file(pathlib.Path(__file__).with_name("autoencoder_tiny_kl.py"))
    stage = config.first_stage
    stage.kind = "vq"
    stage.double_z = False
    stage.n_embed = 256
    return config
