"""Training the LDM paper's text-to-image model, LDM-KL-8-G 1.45B (txt2img-1p4B), on LAION-style tar shards.

Model: configs/ldm_txt2img_1p4b.py (SD v1's UNet with context width 1280; a 32-layer BERT-style transformer of
width 1280 over the bert-base-uncased tokenizer, trained jointly: train.train_cond_stage). 256x256 images,
32x32x4 KL-f8 latents, scale_factor 0.18215, linear 0.00085..0.012. Optimisation as the reference: AdamW at
base rate 5e-5 (not scaled), EMA 0.9999; with bf16 compute and UNet remat to fit large batches, gradient
clipping at 1.0 and 10% caption dropout for classifier-free guidance; the UNet is sharded over "fsdp".

    python train.py --config configs/txt2img_1p4b_train.py --workdir runs/txt2img_1p4b \\
        --config.data.path='/data/laion/{00000..01000}.tar' --config.train.tokenizer=/models/bert-base-uncased \\
        --config.train.first_stage=runs/kl_f8/autoencoder --config.mesh.fsdp=8
Built (shapes only) by: .venv/bin/python -m pytest -q tests/test_train.py -k configs_build
"""
import pathlib

import ml_collections
from ml_collections import config_dict

from ldm_jax.config import load_config_file

CONFIGS = pathlib.Path(__file__).parent


def get_config() -> ml_collections.ConfigDict:
    config = load_config_file(CONFIGS / "ldm_txt2img_1p4b.py")
    config.unet.remat = True
    with config.unlocked():
        config.ldm.cond_drop_prob = 0.1
        config.stage = "ldm"
        config.data = load_config_file(CONFIGS / "data_captioned_shapes.py").data
        config.data.update(dict(source="tar", name="", data_dir="", path="", caption_key="caption", resolution=256,
                                crop="center", random_flip=False, global_batch_size=256,
                                batch_keys=("image", "tokens")))
        config.optimizer = ml_collections.ConfigDict(dict(
            learning_rate=5e-5, scale_lr=False, warmup_steps=0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01,
            grad_clip_norm=1.0, accumulate_grad_batches=1))
        config.train = ml_collections.ConfigDict(dict(
            num_steps=1_000_000, seed=0, log_every=100, image_every=5000, num_images=16, eval_split="",
            dtype="bfloat16", progress_bar=True, first_stage="", init_from="", tokenizer="",
            train_cond_stage=True, ema_decay=config_dict.placeholder(float), precompute_latents=False,
            sample_posterior=True, sampler="ddim", sample_steps=50, guidance_scale=5.0, check_shapes=False))
        config.train.ema_decay = 0.9999
        config.checkpoint = ml_collections.ConfigDict(dict(every_steps=5000, keep=3, async_save=True))
        config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, param_rules=((".*", "fsdp_auto"),)))
    config.lock()
    return config
