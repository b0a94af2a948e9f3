"""Vector-quantised autoencoder, f=8, 16384 codes of dimension 4: LDM model-zoo `vq-f8`.

256x256x3 images <-> 32x32x4 pre-quantisation latents; ch 128, ch_mult (1, 2, 2, 4), 2 resnets per level,
attention at the 32x32 level; codebook beta 0.25 with the legacy loss form. Loss (for the training issue):
L1 + LPIPS + a 2-layer PatchGAN from step 1 with disc_weight 0.6, codebook weight 1.0.
Training lands with the training issue; this file overrides configs/autoencoder_vq_f4.py.
Built and shape-checked by: .venv/bin/python -m pytest -q tests/test_configs.py -k autoencoder_vq_f8
"""
import pathlib

import ml_collections

from ldm_jax.config import load_config_file


def get_config() -> ml_collections.ConfigDict:
    config = load_config_file(pathlib.Path(__file__).with_name("autoencoder_vq_f4.py"))
    stage = config.first_stage
    stage.ch_mult = (1, 2, 2, 4)
    stage.attn_resolutions = (32,)
    stage.z_channels = 4
    stage.embed_dim = 4
    stage.n_embed = 16384
    return config
