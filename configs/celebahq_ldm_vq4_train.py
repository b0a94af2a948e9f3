"""Training LDM-VQ-4 on CelebA-HQ 256 (celebahq-ldm-vq-4.yaml): unconditional, on 64x64x3 VQ-f4 latents.

Model: the preset ldm_celebahq_vq4 (configs/ldm_celebahq_vq4.py: UNet 224 channels, (1, 2, 3, 4), attention at
factors 8, 4, 2; linear 0.0015..0.0195; scale_factor 1). Training sections: configs/ldm_training.py with what
differs, which is already the reference's recipe: AdamW (weight decay 0.01) at base rate 2e-6 per example with
the scale_lr rule (batch 48 -> 9.6e-5), no warm-up, no clipping, EMA 0.9999; fp32 (bf16 and remat are a flag
away: --config.train.dtype=bfloat16 --config.train.remat=true). Sample grids: DDIM 200 steps, no guidance.

The VQ-f4 first stage is an autoencoder directory: train it with the autoencoder stage on the same images
(the `autoencoder_vq_f4` preset's first_stage) or convert one into a model directory (`ldm-jax convert`). Data:
a folder of CelebA-HQ images (no captions):
    python train.py --config configs/celebahq_ldm_vq4_train.py --workdir runs/celebahq_ldm \\
        --config.data.path=/data/celebahq256 --config.train.first_stage=runs/celebahq_vq4/autoencoder
Built (shapes only) by: .venv/bin/python -m pytest -q tests/test_train.py -k configs_build
"""
import pathlib

import ml_collections

from ldm_jax.config import load_config_file
from ldm_jax.presets import get_preset


def get_config() -> ml_collections.ConfigDict:
    config = load_config_file(pathlib.Path(__file__).with_name("ldm_training.py"))
    with config.unlocked():
        config.update(get_preset("ldm_celebahq_vq4"))
    config.data.update(dict(source="folder", name="", data_dir="", caption_key="", resolution=256,
                            random_flip=True, global_batch_size=48, batch_keys=("image",)))
    config.optimizer.learning_rate = 2e-6
    config.train.update(dict(num_steps=400_000, sample_steps=200, guidance_scale=1.0))
    return config
