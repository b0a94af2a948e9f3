"""Tiny text-to-image latent diffusion model for tests and CPU experiments (UNet: 1,055,044 parameters).

UNet: model_channels 32, channel_mult (1, 2), 1 res block per level, spatial transformers (2 heads, context 32)
at factors 1 and 2, on 8x8x4 latents of configs/autoencoder_tiny_kl.py; the context comes from the tiny CLIP of
configs/text_tiny.py (2 layers, width 32). Schedule as SD v1 (linear 0.00085..0.012, 1000 steps, eps).
The preset `tiny` (ldm_jax/presets/tiny.py).

Built by `.venv/bin/python -m pytest -q tests/test_configs.py -k unet_tiny`.
"""
import ml_collections

from ldm_jax.presets import get_preset


def get_config() -> ml_collections.ConfigDict:
    return get_preset("tiny")
