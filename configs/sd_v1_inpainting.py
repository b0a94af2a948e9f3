"""Stable Diffusion v1.5 inpainting (v1-inpainting-inference.yaml): SD v1 with a 9-channel UNet input.

conditioning_key "hybrid": the caller concatenates 4 noisy-latent + 1 mask + 4 masked-image-latent channels
into x (in that order) and passes the text context by cross-attention. Everything else is configs/sd_v1.py.
The preset `sd_v1_inpainting` (ldm_jax/presets/stable_diffusion.py).

    python sample.py --ckpt /models/sd-v1-5-inpainting.ckpt --config configs/sd_v1_inpainting.py \\
        --tokenizer /models/stable-diffusion-v1-5/tokenizer --init-image photo.png --mask mask.png --prompt "a cat"
Built by `.venv/bin/python -m pytest -q tests/test_configs.py -k sd_v1_inpainting`.
"""
import ml_collections

from ldm_jax.presets import get_preset


def get_config() -> ml_collections.ConfigDict:
    return get_preset("sd_v1_inpainting")
