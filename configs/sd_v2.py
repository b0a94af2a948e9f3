"""Stable Diffusion 2.x at 512x512 (v2-inference.yaml, e.g. v2-1_512-ema-pruned): eps prediction, 64x64x4 latents.

Differs from SD v1 by head dim 64 (num_head_channels=64: 5/10/20 heads), linear proj_in/proj_out in the
spatial transformers, context width 1024 (865,910,724 UNet parameters). cond_stage: OpenCLIP ViT-H/14's text
tower as diffusers ships it, 23 of its 24 blocks then the final LN (= the reference's layer="penultimate"; a
CompVis file's 24th block is dropped on import); prompts are padded with 0. The 768-v model is
configs/sd_v2_768_v.py. The preset `sd_v2` (ldm_jax/presets/stable_diffusion.py).

    python sample.py --ckpt /models/v2-1_512-ema-pruned.safetensors --config configs/sd_v2.py \\
        --tokenizer /models/stable-diffusion-2-1-base/tokenizer --prompt "a watercolour of a lighthouse"
Built by `.venv/bin/python -m pytest -q tests/test_configs.py -k sd_v2`.
"""
import ml_collections

from ldm_jax.presets import get_preset


def get_config() -> ml_collections.ConfigDict:
    return get_preset("sd_v2")
