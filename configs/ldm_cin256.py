"""LDM-VQ-f4 class-conditional ImageNet 256 (cin256-v2.yaml): 64x64x3 VQ-f4 latents, class by cross-attention.

The reference conditions on the class through a learnt ClassEmbedder (1001 classes incl. the unconditional
one, 512-d) whose (B, 1, 512) output is the cross-attention context (conditioning_key "crossattn"); that
embedder is the `cond_stage`. UNet: model_channels 192,
channel_mult (1, 2, 3, 5), 2 res blocks, spatial transformers with 1 head at factors 8, 4, 2, context 512.
Schedule: linear 0.0015..0.0195, 1000 steps, eps prediction, scale_factor 1.

Built by `.venv/bin/python -m pytest -q tests/test_configs.py -k ldm_cin256`.
"""
import pathlib

import ml_collections

from ldm_jax.config import load_config_file


def get_config() -> ml_collections.ConfigDict:
    config = load_config_file(pathlib.Path(__file__).with_name("ldm_celebahq_vq4.py"))
    unet = config.unet
    unet.model_channels = 192
    unet.channel_mult = (1, 2, 3, 5)
    unet.num_heads = 1
    unet.num_head_channels = -1
    unet.use_spatial_transformer = True
    unet.context_dim = 512
    config.ldm.conditioning_key = "crossattn"
    with config.unlocked():
        config.cond_stage = ml_collections.ConfigDict(dict(kind="class", n_classes=1001, embed_dim=512))
    return config
