"""SDXL inpainting (diffusers/stable-diffusion-xl-1.0-inpainting-0.1): the SDXL base with a 9-channel UNet input
(latent + mask + masked-image latent, conditioning_key "hybrid"). The preset `sdxl_inpainting`
(ldm_jax/presets/sdxl.py).

    ldm-jax sample --checkpoint /models/stable-diffusion-xl-1.0-inpainting-0.1 --prompt "a red door" \
        --init-image house.png --mask door_mask.png --sampler euler --steps 30 --guidance 8
Built by `.venv/bin/python -m pytest -q tests/test_configs.py -k sdxl`.
"""
import ml_collections

from ldm_jax.presets import get_preset


def get_config() -> ml_collections.ConfigDict:
    return get_preset("sdxl_inpainting")
