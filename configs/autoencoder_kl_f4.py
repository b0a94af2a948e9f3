"""KL-regularised autoencoder, f=4, 3 latent channels: LDM model-zoo `kl-f4`.

256x256x3 images <-> 64x64x3 latents; ch 128, ch_mult (1, 2, 4), 2 resnets per level, no attention outside the
mid blocks. The preset `autoencoder_kl_f4` (kl-f8 with what differs; ldm_jax/presets/autoencoders.py).
Built and shape-checked by: .venv/bin/python -m pytest -q tests/test_configs.py -k autoencoder_kl_f4
"""
import ml_collections

from ldm_jax.presets import get_preset


def get_config() -> ml_collections.ConfigDict:
    return get_preset("autoencoder_kl_f4")
