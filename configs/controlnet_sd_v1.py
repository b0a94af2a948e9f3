"""ControlNet training for Stable Diffusion v1.x on (image, control image, caption) triples (512x512).

configs/sd_v1_finetune.py with what differs, as diffusers' examples/controlnet/train_controlnet.py runs it: the
ControlNet is the from_unet copy of SD's UNet encoder and mid block (361M parameters), zero convolutions and the
(16, 32, 96, 256) hint encoder (`train.adapter="controlnet"`; `train.controlnet.init_from` continues from a
diffusers ControlNet folder instead); the whole base model is frozen and held in bfloat16 (`train.frozen_dtype`),
bf16 compute with remat. AdamW lr 1e-5 (not scaled; betas 0.9 / 0.999, eps 1e-8, weight decay 1e-2), constant with
no warm-up (diffusers' "constant" scheduler), clipping at 1.0, batch 4 without accumulation, no prompt dropout
(`--proportion_empty_prompts 0`, here diffusion.cond_drop_prob), no EMA, 12,500 steps (one epoch of fill50k at
batch 4), checkpoints every 500 steps. Images are resized and centre-cropped, not flipped.

Data: a folder (or webdataset .tar shards, data.source=tar) holding, for every image, its caption `<stem>.txt`
and its control image `<stem>.conditioning_image.<ext>` of the same size beside it (diffusers' column name;
e.g. 0001.png, 0001.txt, 0001.conditioning_image.png; a missing one is refused naming the file). The export is
WORKDIR/controlnet/, a diffusers ControlNet folder:

    python train.py --config configs/controlnet_sd_v1.py --workdir runs/controlnet_sd \\
        --config.train.init_from=/models/v1-5-pruned-emaonly.safetensors \\
        --config.train.tokenizer=/models/stable-diffusion-v1-5/tokenizer --config.data.path=/data/fill50k
Built (shapes only) by: .venv/bin/python -m pytest -q tests/test_train_controlnet.py -k configs
"""
import pathlib

import ml_collections

from ldm_jax.config import load_config_file
from ldm_jax.training import adapters


def get_config() -> ml_collections.ConfigDict:
    config = adapters.controlnet_recipe(load_config_file(pathlib.Path(__file__).with_name("sd_v1_finetune.py")))
    config.train.update(dict(num_steps=12_500, image_every=100))
    config.data.crop = "center"
    config.optimizer.accumulate_grad_batches = 1
    return config
