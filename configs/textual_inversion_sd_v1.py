"""Textual inversion on Stable Diffusion v1.x (512x512): a new token's embedding, every weight frozen.

configs/sd_v1_finetune.py with what differs: `train.adapter="textual_inversion"`, the token "<my-concept>" (1 vector
of 768 numbers) starting from the embedding of "toy", as diffusers' textual_inversion.py; every image of data.path
(no caption files needed) is captioned "a photo of <my-concept>" (`data.prompt`; empty it to use .txt captions that
name the token). The frozen model is held in bfloat16 (`train.frozen_dtype`); bf16 compute with remat. AdamW 5e-3
(not scaled), no weight decay, no warm-up, batch 4, 3000 steps, EMA off, no caption dropout.

    python train.py --config configs/textual_inversion_sd_v1.py --workdir runs/ti_sd \\
        --config.train.init_from=/models/v1-5-pruned-emaonly.safetensors \\
        --config.train.tokenizer=/models/stable-diffusion-v1-5/tokenizer --config.data.path=/data/my_concept
    ldm-jax sample --checkpoint /models/stable-diffusion-v1-5 --embedding runs/ti_sd/learned_embeds.safetensors \\
        --prompt "a painting of <my-concept>"
Built (shapes only) by: .venv/bin/python -m pytest -q tests/test_train_adapters.py -k configs
"""
import pathlib

import ml_collections

from ldm_jax.config import load_config_file
from ldm_jax.training import adapters


def get_config() -> ml_collections.ConfigDict:
    config = adapters.textual_inversion_recipe(load_config_file(pathlib.Path(__file__).with_name("sd_v1_finetune.py")))
    config.train.image_every = 500
    config.checkpoint.every_steps = 500
    return config
