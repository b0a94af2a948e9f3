"""ControlNet training for Stable Diffusion 2.x on (image, control image, caption) triples: 768x768 v-prediction
(SD 2.1, the default) or, with the argument "512", the 512x512 epsilon model (SD 2.1-base).

configs/controlnet_sd_v1.py (diffusers' train_controlnet.py recipe: lr 1e-5 constant, batch 4, clipping 1.0, no
prompt dropout, no EMA, frozen base in bfloat16, the same data layout) with the SD 2.x model sections of the preset
(`ldm_jax/presets/stable_diffusion.py`: OpenCLIP ViT-H text tower, linear transformer projections, 64-channel
heads): the ControlNet is the from_unet copy of that UNet's encoder and mid block (364M parameters) with the
(16, 32, 96, 256) hint encoder; images at the preset's size.

    python train.py --config configs/controlnet_sd_v2.py --workdir runs/controlnet_sd2 \\
        --config.train.init_from=/models/stable-diffusion-2-1 --config.data.path=/data/fill50k
Built (shapes only) by: .venv/bin/python -m pytest -q tests/test_train_controlnet.py -k configs
"""
import pathlib

import ml_collections

from ldm_jax.config import load_config_file
from ldm_jax.presets import get_preset

VARIANTS = {"768_v": ("sd_v2_768_v", 768), "512": ("sd_v2", 512)}


def get_config(variant: str = "768_v") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"configs/controlnet_sd_v2.py: variant {variant!r}; expected one of {sorted(VARIANTS)}")
    preset, resolution = VARIANTS[variant]
    config = load_config_file(pathlib.Path(__file__).with_name("controlnet_sd_v1.py"))
    cond_drop_prob = config.diffusion.cond_drop_prob
    with config.unlocked():
        config.update(get_preset(preset))
    config.diffusion.cond_drop_prob = cond_drop_prob
    config.data.resolution = resolution
    return config
