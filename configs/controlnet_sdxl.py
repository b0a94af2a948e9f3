"""ControlNet training for SDXL 1.0 base on (image, control image, caption) triples at 1024x1024.

configs/sdxl_finetune.py (the model, both text towers, micro-conditioning from the data, the FSDP rules) with what
differs, as diffusers' examples/controlnet/train_controlnet_sdxl.py runs it: `train.adapter="controlnet"`, the
ControlNet is the from_unet copy of the SDXL UNet's encoder and mid block (with its text_time addition embedding)
and the (16, 32, 96, 256) hint encoder (`train.controlnet.init_from` continues from a diffusers ControlNet
folder instead); the whole base model is frozen and held in bfloat16; bf16 compute with remat. AdamW lr 1e-5 (not
scaled), constant, no warm-up, clipping 1.0, weight decay 1e-2; batch 4 as 4 micro-batches of 1 (the example's
--train_batch_size=1 --gradient_accumulation_steps=4), no prompt dropout, no EMA, 15,000 steps, checkpoints every
500. Data: as configs/controlnet_sd_v1.py (`<stem>.conditioning_image.<ext>` beside each image and its caption).
Neither memory nor speed was measured at full size here (no accelerator); what runs in the tests is the shapes
model and this config's build.

    python train.py --config configs/controlnet_sdxl.py --workdir runs/controlnet_sdxl \\
        --config.train.init_from=/models/stable-diffusion-xl-base-1.0 --config.data.path=/data/fill50k
Built (shapes only) by: .venv/bin/python -m pytest -q tests/test_train_controlnet.py -k configs
"""
import pathlib

import ml_collections

from ldm_jax.config import load_config_file
from ldm_jax.training import adapters


def get_config() -> ml_collections.ConfigDict:
    config = adapters.controlnet_recipe(load_config_file(pathlib.Path(__file__).with_name("sdxl_finetune.py")))
    config.train.update(dict(num_steps=15_000, image_every=500))
    config.data.crop = "random"
    config.optimizer.accumulate_grad_batches = 4
    return config
