"""Tiny KL autoencoder for tests and CPU experiments: f=4, 32x32x3 images <-> 8x8x4 latents.

ch 32, ch_mult (1, 2, 2), 1 resnet per level, attention at the 8x8 level (about 1.0M parameters). The preset
`autoencoder_tiny_kl` (ldm_jax/presets/autoencoders.py).
Built and shape-checked by: .venv/bin/python -m pytest -q tests/test_configs.py -k autoencoder_tiny_kl
"""
import ml_collections

from ldm_jax.presets import get_preset


def get_config() -> ml_collections.ConfigDict:
    return get_preset("autoencoder_tiny_kl")
