"""Training LDM-VQ-4 on CelebA-HQ 256 (celebahq-ldm-vq-4.yaml): unconditional, on 64x64x3 VQ-f4 latents.

Model: configs/ldm_celebahq_vq4.py (UNet 224 channels, (1, 2, 3, 4), attention at factors 8, 4, 2; linear
0.0015..0.0195; scale_factor 1). Training as the reference: AdamW (weight decay 0.01) at base rate 2e-6 per
example with the scale_lr rule (batch 48 -> 9.6e-5), no warm-up, no clipping, EMA 0.9999; fp32 (bf16 and remat
are a flag away: --config.train.dtype=bfloat16 --config.unet.remat=true).

The VQ-f4 first stage is an autoencoder directory: train it with the autoencoder stage on the same images
(`configs/autoencoder_vq_f4.py` sections) or export a converted one with `ldm_jax.model_dir`. Data: a folder
of CelebA-HQ images (no captions):
    python train.py --config configs/celebahq_ldm_vq4_train.py --workdir runs/celebahq_ldm \\
        --config.data.path=/data/celebahq256 --config.train.first_stage=runs/celebahq_vq4/autoencoder
Built (shapes only) by: .venv/bin/python -m pytest -q tests/test_train.py -k configs_build
"""
import pathlib

import ml_collections
from ml_collections import config_dict

from ldm_jax.config import load_config_file

CONFIGS = pathlib.Path(__file__).parent


def get_config() -> ml_collections.ConfigDict:
    config = load_config_file(CONFIGS / "ldm_celebahq_vq4.py")
    with config.unlocked():
        config.stage = "ldm"
        config.data = load_config_file(CONFIGS / "data_captioned_shapes.py").data
        config.data.update(dict(source="folder", name="", data_dir="", path="", caption_key="", resolution=256,
                                crop="center", random_flip=True, global_batch_size=48, batch_keys=("image",)))
        config.optimizer = ml_collections.ConfigDict(dict(
            learning_rate=2e-6, scale_lr=True, warmup_steps=0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01,
            grad_clip_norm=0.0, accumulate_grad_batches=1))
        config.train = ml_collections.ConfigDict(dict(
            num_steps=400_000, seed=0, log_every=100, image_every=5000, num_images=16, eval_split="",
            dtype="float32", progress_bar=True, first_stage="", init_from="", tokenizer="",
            train_cond_stage=False, ema_decay=config_dict.placeholder(float), precompute_latents=False,
            sample_posterior=True, sampler="ddim", sample_steps=200, guidance_scale=1.0, check_shapes=False))
        config.train.ema_decay = 0.9999
        config.checkpoint = ml_collections.ConfigDict(dict(every_steps=5000, keep=3, async_save=True))
        config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, param_rules=((".*", "fsdp_auto"),)))
    config.lock()
    return config
