"""LDM-VQ-f4 class-conditional ImageNet 256 (cin256-v2.yaml): 64x64x3 VQ-f4 latents, class by cross-attention.

The reference conditions on the class through a learnt ClassEmbedder (1001 classes incl. the unconditional
one, 512-d) whose (B, 1, 512) output is the cross-attention context (conditioning_key "crossattn"); that
embedder is the `cond_stage`. UNet: model_channels 192, channel_mult (1, 2, 3, 5), 2 res blocks, spatial
transformers with 1 head at factors 8, 4, 2, context 512. Schedule: linear 0.0015..0.0195, 1000 steps, eps
prediction, scale_factor 1. The preset `ldm_cin256` (ldm_jax/presets/ldm_zoo.py).

Built by `.venv/bin/python -m pytest -q tests/test_configs.py -k ldm_cin256`.
"""
import ml_collections

from ldm_jax.presets import get_preset


def get_config() -> ml_collections.ConfigDict:
    return get_preset("ldm_cin256")
