"""SDXL 1.0 base (Podell et al. 2023; sd_xl_base_1.0.safetensors, stabilityai/stable-diffusion-xl-base-1.0).

A UNet config plus a second text tower, no new classes: 3 levels (320, 640, 1280), no attention at the first,
transformer depths (0, 2, 10), heads of width 64, linear proj_in/proj_out, context 2048 = CLIP ViT-L's (768) and
OpenCLIP bigG's (1280) penultimate hidden states side by side; addition_embed_type "text_time": bigG's projected
pooled output (1280) and six micro-conditioning numbers (original size, crop, target size; 256 sinusoidal
features each) added to the timestep embedding (2,567,463,684 UNet parameters). VAE scale factor 0.13025;
without a negative prompt the unconditional branch is zero text conditioning (force_zeros_for_empty_prompt).
The preset `sdxl_base` (ldm_jax/presets/sdxl.py).

    ldm-jax sample --checkpoint /models/sd_xl_base_1.0.safetensors --config configs/sdxl_base.py \
        --tokenizer /models/stable-diffusion-xl-base-1.0 --prompt "a watercolour of a lighthouse" \
        --height 1024 --width 1024 --sampler euler --steps 30 --guidance 5
(--tokenizer: a folder holding tokenizer/ and tokenizer_2/, e.g. a snapshot of the diffusers repository.)
Built by `.venv/bin/python -m pytest -q tests/test_configs.py -k sdxl`.
"""
import ml_collections

from ldm_jax.presets import get_preset


def get_config() -> ml_collections.ConfigDict:
    return get_preset("sdxl_base")
