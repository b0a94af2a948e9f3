"""SDXL 1.0 refiner (sd_xl_refiner_1.0.safetensors, stabilityai/stable-diffusion-xl-refiner-1.0).

Four levels (384, 768, 1536, 1536), attention at the middle two with depth 4, context 1280 (OpenCLIP bigG
alone, penultimate hidden states), text_time with five numbers (original size, crop, aesthetic score):
2,259,526,660 UNet parameters. It finishes an SDXL base's latents (an ensemble of expert denoisers) or refines
an image (img2img). The preset `sdxl_refiner` (ldm_jax/presets/sdxl.py).

    ldm-jax sample --checkpoint /models/sd_xl_base_1.0.safetensors --tokenizer /models/stable-diffusion-xl-base-1.0 \
        --refiner /models/stable-diffusion-xl-refiner-1.0 --denoising-end 0.8 --prompt "a lighthouse at dusk" \
        --height 1024 --width 1024 --sampler euler --steps 40 --guidance 5
Built by `.venv/bin/python -m pytest -q tests/test_configs.py -k sdxl`.
"""
import ml_collections

from ldm_jax.presets import get_preset


def get_config() -> ml_collections.ConfigDict:
    return get_preset("sdxl_refiner")
