"""Tiny VQ autoencoder for tests and CPU experiments: f=4, 32x32x3 images <-> 8x8x4 latents, 256 codes.

configs/autoencoder_tiny_kl.py as a VQ model, codebook beta 0.25 (legacy form). The preset `autoencoder_tiny_vq`.
Built and shape-checked by: .venv/bin/python -m pytest -q tests/test_configs.py -k autoencoder_tiny_vq
"""
import ml_collections

from ldm_jax.presets import get_preset


def get_config() -> ml_collections.ConfigDict:
    return get_preset("autoencoder_tiny_vq")
