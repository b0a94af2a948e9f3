"""Fine-tuning Stable Diffusion v1.x from a converted checkpoint on captioned images (512x512).

Model: configs/sd_v1.py. Every param starts from --config.train.init_from: a CompVis .ckpt/.safetensors (e.g.
v1-5-pruned-emaonly.safetensors), a diffusers folder or a model directory; the VAE and the CLIP text encoder
stay frozen, the UNet trains (remat on, bf16 compute, params and AdamW state float32). AdamW 1e-5 (not scaled)
with 1000 warm-up steps, gradient clipping at 1.0, 4 micro-batches of 8 per update (batch 32), 10% caption
dropout for classifier-free guidance, EMA 0.9999.

    python train.py --config configs/sd_v1_finetune.py --workdir runs/sd_finetune \\
        --config.train.init_from=/models/v1-5-pruned-emaonly.safetensors \\
        --config.train.tokenizer=/models/stable-diffusion-v1-5/tokenizer --config.data.path=/data/my_images
(a folder of images with .txt captions; use data.source=tar for webdataset shards.)
Built (shapes only) by: .venv/bin/python -m pytest -q tests/test_train.py -k configs_build
"""
import pathlib

import ml_collections
from ml_collections import config_dict

from ldm_jax.config import load_config_file

CONFIGS = pathlib.Path(__file__).parent


def get_config() -> ml_collections.ConfigDict:
    config = load_config_file(CONFIGS / "sd_v1.py")
    config.unet.remat = True
    with config.unlocked():
        config.ldm.cond_drop_prob = 0.1
        config.stage = "ldm"
        config.data = load_config_file(CONFIGS / "data_captioned_shapes.py").data
        config.data.update(dict(source="folder", name="", data_dir="", path="", caption_key="caption",
                                resolution=512, crop="random", random_flip=False, global_batch_size=32,
                                batch_keys=("image", "tokens")))
        config.optimizer = ml_collections.ConfigDict(dict(
            learning_rate=1e-5, scale_lr=False, warmup_steps=1000, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01,
            grad_clip_norm=1.0, accumulate_grad_batches=4))
        config.train = ml_collections.ConfigDict(dict(
            num_steps=20_000, seed=0, log_every=50, image_every=1000, num_images=8, eval_split="",
            dtype="bfloat16", progress_bar=True, first_stage="", init_from="", tokenizer="",
            train_cond_stage=False, ema_decay=config_dict.placeholder(float), precompute_latents=False,
            sample_posterior=True, sampler="ddim", sample_steps=50, guidance_scale=7.5, check_shapes=False))
        config.train.ema_decay = 0.9999
        config.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=2, async_save=True))
        config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, param_rules=((".*", "fsdp_auto"),)))
    config.lock()
    return config
