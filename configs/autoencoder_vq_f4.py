"""Vector-quantised autoencoder, f=4, 8192 codes of dimension 3: LDM model-zoo `vq-f4`.

256x256x3 images <-> 64x64x3 pre-quantisation latents; ch 128, ch_mult (1, 2, 4), 2 resnets per level, no
attention outside the mid blocks; codebook beta 0.25 with the legacy loss form. Loss (for the training issue):
L1 + LPIPS + PatchGAN from step 0 with disc_weight 0.75, codebook weight 1.0.
Training lands with the training issue; this file overrides configs/autoencoder_kl_f8.py.
Built and shape-checked by: .venv/bin/python -m pytest -q tests/test_configs.py -k autoencoder_vq_f4
"""
import pathlib

import ml_collections

from ldm_jax.config import load_config_file


def get_config() -> ml_collections.ConfigDict:
    config = load_config_file(pathlib.Path(__file__).with_name("autoencoder_kl_f8.py"))
    stage = config.first_stage
    stage.kind = "vq"
    stage.double_z = False
    stage.ch_mult = (1, 2, 4)
    stage.z_channels = 3
    stage.embed_dim = 3
    stage.n_embed = 8192
    return config
