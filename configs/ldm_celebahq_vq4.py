"""LDM-VQ-4 on CelebA-HQ 256 (celebahq-ldm-vq-4.yaml): unconditional, 64x64x3 VQ-f4 latents.

UNet: model_channels 224, channel_mult (1, 2, 3, 4), 2 res blocks, plain self-attention blocks (no spatial
transformer, no context) with 32 channels per head at downsampling factors 8, 4, 2.
Schedule: linear 0.0015..0.0195, 1000 steps, eps prediction, scale_factor 1. First stage: autoencoder_vq_f4.

Built by `.venv/bin/python -m pytest -q tests/test_configs.py -k ldm_celebahq_vq4`.
"""
import pathlib

import ml_collections

from ldm_jax.config import load_config_file


def get_config() -> ml_collections.ConfigDict:
    config = load_config_file(pathlib.Path(__file__).with_name("autoencoder_vq_f4.py"))
    with config.unlocked():
        config.unet = ml_collections.ConfigDict(dict(
            in_channels=3,
            out_channels=3,
            model_channels=224,
            channel_mult=(1, 2, 3, 4),
            num_res_blocks=2,
            attention_resolutions=(8, 4, 2),
            num_heads=-1,
            num_head_channels=32,
            use_spatial_transformer=False,
            context_dim=None,
            attention="xla",
            remat=False,
        ))
        config.diffusion = ml_collections.ConfigDict(dict(
            beta_schedule="linear",
            num_timesteps=1000,
            linear_start=0.0015,
            linear_end=0.0195,
        ))
        config.ldm = ml_collections.ConfigDict(dict(
            conditioning_key=None,
            prediction_type="eps",
            scale_factor=1.0,
            image_size=64,
            channels=3,
        ))
    return config
