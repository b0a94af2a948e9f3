"""KL-regularised autoencoder, f=16, 16 latent channels: LDM model-zoo `kl-f16`.

256x256x3 images <-> 16x16x16 latents; ch 128, ch_mult (1, 1, 2, 2, 4), 2 resnets per level, attention at the
16x16 level. Loss (for the training issue): as kl-f8 (KL weight 1e-6, disc_start 50001, disc_weight 0.5).
Training lands with the training issue; this file overrides configs/autoencoder_kl_f8.py.
Built and shape-checked by: .venv/bin/python -m pytest -q tests/test_configs.py -k autoencoder_kl_f16
"""
import pathlib

import ml_collections

from ldm_jax.config import load_config_file


def get_config() -> ml_collections.ConfigDict:
    config = load_config_file(pathlib.Path(__file__).with_name("autoencoder_kl_f8.py"))
    config.first_stage.ch_mult = (1, 1, 2, 2, 4)
    config.first_stage.attn_resolutions = (16,)
    config.first_stage.z_channels = 16
    config.first_stage.embed_dim = 16
    return config
