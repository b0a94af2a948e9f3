"""LDM-VQ-4 on CelebA-HQ 256 (celebahq-ldm-vq-4.yaml): unconditional, 64x64x3 VQ-f4 latents.

UNet: model_channels 224, channel_mult (1, 2, 3, 4), 2 res blocks, plain self-attention blocks (no spatial
transformer, no context) with 32 channels per head at downsampling factors 8, 4, 2.
Schedule: linear 0.0015..0.0195, 1000 steps, eps prediction, scale_factor 1. First stage: autoencoder_vq_f4.
The preset `ldm_celebahq_vq4` (ldm_jax/presets/ldm_zoo.py); trained by configs/celebahq_ldm_vq4_train.py.

    python sample.py --ckpt /models/celebahq-ldm-vq-4.ckpt --config configs/ldm_celebahq_vq4.py --n 4 --steps 200
Built by `.venv/bin/python -m pytest -q tests/test_configs.py -k ldm_celebahq_vq4`.
"""
import ml_collections

from ldm_jax.presets import get_preset


def get_config() -> ml_collections.ConfigDict:
    return get_preset("ldm_celebahq_vq4")
