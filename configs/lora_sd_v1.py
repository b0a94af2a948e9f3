"""LoRA fine-tuning of Stable Diffusion v1.x on captioned images (512x512): only low-rank factors train.

configs/sd_v1_finetune.py with what differs: `train.adapter="lora"`, rank 4 (alpha = rank) on the UNet's attention
projections (to_q, to_k, to_v, to_out.0 of every attn1 / attn2: 797,184 numbers; `train.lora.sections` may add
"cond_stage" for the text encoder, `train.lora.targets` "feed_forward" / "conv"), as diffusers'
train_text_to_image_lora.py. The whole base model is frozen and held in bfloat16 on the devices
(`train.frozen_dtype`); bf16 compute with remat. AdamW 1e-4 (not scaled), constant after no warm-up, clipping at
1.0, batch 8, 5000 steps, EMA off. Export: WORKDIR/lora.safetensors (diffusers / PEFT) and, with
--config.train.lora.kohya=true, WORKDIR/lora_kohya.safetensors (kohya / A1111).

    python train.py --config configs/lora_sd_v1.py --workdir runs/lora_sd \\
        --config.train.init_from=/models/v1-5-pruned-emaonly.safetensors \\
        --config.train.tokenizer=/models/stable-diffusion-v1-5/tokenizer --config.data.path=/data/my_images
    ldm-jax sample --checkpoint /models/stable-diffusion-v1-5 --lora runs/lora_sd/lora.safetensors:0.8 --prompt "..."
Built (shapes only) by: .venv/bin/python -m pytest -q tests/test_train_adapters.py -k configs
"""
import pathlib

import ml_collections

from ldm_jax.config import load_config_file
from ldm_jax.training import adapters


def get_config() -> ml_collections.ConfigDict:
    config = load_config_file(pathlib.Path(__file__).with_name("sd_v1_finetune.py"))
    with config.unlocked():
        config.train.update(adapters.train_fields())
    config.train.update(dict(adapter="lora", frozen_dtype="bfloat16", num_steps=5000, image_every=500,
                             ema_decay=None))
    config.train.lora.update(dict(rank=4, targets=("attention",), sections=("unet",)))
    config.data.global_batch_size = 8
    config.optimizer.update(dict(learning_rate=1e-4, warmup_steps=0, accumulate_grad_batches=1))
    config.checkpoint.every_steps = 500
    return config
