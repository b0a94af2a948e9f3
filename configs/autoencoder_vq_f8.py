"""Vector-quantised autoencoder, f=8, 16384 codes of dimension 4: LDM model-zoo `vq-f8`.

256x256x3 images <-> 32x32x4 pre-quantisation latents; ch 128, ch_mult (1, 2, 2, 4), 2 resnets per level,
attention at the 32x32 level; codebook beta 0.25 with the legacy loss form. Reference loss: L1 + LPIPS + a 2-layer
PatchGAN from step 1 with disc_weight 0.6, codebook weight 1.0. The preset `autoencoder_vq_f8`
(ldm_jax/presets/autoencoders.py).
Built and shape-checked by: .venv/bin/python -m pytest -q tests/test_configs.py -k autoencoder_vq_f8
"""
import ml_collections

from ldm_jax.presets import get_preset


def get_config() -> ml_collections.ConfigDict:
    return get_preset("autoencoder_vq_f8")
