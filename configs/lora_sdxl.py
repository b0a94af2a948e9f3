"""LoRA fine-tuning of SDXL 1.0 (base, or the refiner with the argument "refiner") on captioned images at 1024x1024.

configs/sdxl_finetune.py with what differs: `train.adapter="lora"`, rank 4 (alpha = rank) on the UNet's attention
projections (5,806,080 numbers), as diffusers' train_text_to_image_lora_sdxl.py (`train.lora.sections` may add
"cond_stage" and "cond_stage_2" for both text encoders). The whole base model (UNet, both towers, VAE) is frozen, held in bfloat16
(`train.frozen_dtype`) and sharded over the `fsdp` mesh axis by the base config's rules; bf16 compute with remat.
AdamW 1e-4 (not scaled), no warm-up, clipping at 1.0, batch 8, 5000 steps, EMA off. Neither memory nor speed was
measured at full size here (no accelerator). Export: WORKDIR/lora.safetensors (diffusers / PEFT format).

    python train.py --config configs/lora_sdxl.py --workdir runs/lora_sdxl \\
        --config.train.init_from=/models/stable-diffusion-xl-base-1.0 --config.data.path=/data/my_images
    ldm-jax sample --checkpoint /models/stable-diffusion-xl-base-1.0 --lora runs/lora_sdxl/lora.safetensors --prompt "..."
Built (shapes only) by: .venv/bin/python -m pytest -q tests/test_train_adapters.py -k configs
"""
import importlib.util
import pathlib

import ml_collections

from ldm_jax.training import adapters


def get_config(variant: str = "base") -> ml_collections.ConfigDict:
    config = _sdxl_finetune(variant)
    with config.unlocked():
        config.train.update(adapters.train_fields())
    config.train.update(dict(adapter="lora", frozen_dtype="bfloat16", num_steps=5000, ema_decay=None))
    config.train.lora.update(dict(rank=4, targets=("attention",), sections=("unet",)))
    config.data.global_batch_size = 8
    config.optimizer.update(dict(learning_rate=1e-4, warmup_steps=0, accumulate_grad_batches=1))
    return config


def _sdxl_finetune(variant: str) -> ml_collections.ConfigDict:
    """configs/sdxl_finetune.py's get_config(variant) (`load_config_file` passes no argument)."""
    path = pathlib.Path(__file__).with_name("sdxl_finetune.py")
    spec = importlib.util.spec_from_file_location("sdxl_finetune_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)
