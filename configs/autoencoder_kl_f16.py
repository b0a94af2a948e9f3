"""KL-regularised autoencoder, f=16, 16 latent channels: LDM model-zoo `kl-f16`.

256x256x3 images <-> 16x16x16 latents; ch 128, ch_mult (1, 1, 2, 2, 4), 2 resnets per level, attention at the
16x16 level. The preset `autoencoder_kl_f16` (kl-f8 with what differs; ldm_jax/presets/autoencoders.py).
Built and shape-checked by: .venv/bin/python -m pytest -q tests/test_configs.py -k autoencoder_kl_f16
"""
import ml_collections

from ldm_jax.presets import get_preset


def get_config() -> ml_collections.ConfigDict:
    return get_preset("autoencoder_kl_f16")
