"""Vector-quantised autoencoder, f=4, 8192 codes of dimension 3: LDM model-zoo `vq-f4`.

256x256x3 images <-> 64x64x3 pre-quantisation latents; ch 128, ch_mult (1, 2, 4), 2 resnets per level, no
attention outside the mid blocks; codebook beta 0.25 with the legacy loss form. Reference loss: L1 + LPIPS +
PatchGAN from step 0 with disc_weight 0.75, codebook weight 1.0. The preset `autoencoder_vq_f4`
(ldm_jax/presets/autoencoders.py); the first stage of configs/ldm_celebahq_vq4.py and configs/ldm_cin256.py.
Built and shape-checked by: .venv/bin/python -m pytest -q tests/test_configs.py -k autoencoder_vq_f4
"""
import ml_collections

from ldm_jax.presets import get_preset


def get_config() -> ml_collections.ConfigDict:
    return get_preset("autoencoder_vq_f4")
