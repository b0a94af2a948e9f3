"""Stable Diffusion 2.x 768-v (v2-inference-v.yaml, e.g. v2-1_768-ema-pruned): configs/sd_v2.py with v-prediction
at 768x768 (96x96x4 latents).

The weights of a 768-v file and a 512 eps file have the same shapes, so a file's config inferred from its weights
is sd_v2 (eps); name this config (or the preset `sd_v2_768_v`) for a v-prediction file.

    python sample.py --ckpt /models/v2-1_768-ema-pruned.safetensors --config configs/sd_v2_768_v.py \\
        --tokenizer /models/stable-diffusion-2-1/tokenizer --prompt "a watercolour of a lighthouse"
Built by `.venv/bin/python -m pytest -q tests/test_configs.py -k sd_v2_768_v`.
"""
import ml_collections

from ldm_jax.presets import get_preset


def get_config() -> ml_collections.ConfigDict:
    return get_preset("sd_v2_768_v")
