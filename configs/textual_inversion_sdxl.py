"""Textual inversion on SDXL 1.0 base (1024x1024): a new token learned in both text towers, every weight frozen.

configs/sdxl_finetune.py with what differs: `train.adapter="textual_inversion"`, the token "<my-concept>" with one
vector per tower (768 for CLIP ViT-L, 1280 for OpenCLIP bigG) starting from the embeddings of "toy", as diffusers'
textual_inversion_sdxl.py; every image of data.path is captioned "a photo of <my-concept>" (`data.prompt`). The
frozen model is held in bfloat16 and sharded over the `fsdp` axis; bf16 compute with remat. AdamW 5e-3 (not
scaled), no weight decay, no warm-up, batch 4, 3000 steps, EMA off, no caption dropout. Neither memory nor speed
was measured at full size here. Export: WORKDIR/learned_embeds.safetensors (clip_l / clip_g vectors).

    python train.py --config configs/textual_inversion_sdxl.py --workdir runs/ti_sdxl \\
        --config.train.init_from=/models/stable-diffusion-xl-base-1.0 --config.data.path=/data/my_concept
    ldm-jax sample --checkpoint /models/stable-diffusion-xl-base-1.0 --embedding runs/ti_sdxl/learned_embeds.safetensors \\
        --prompt "a painting of <my-concept>"
Built (shapes only) by: .venv/bin/python -m pytest -q tests/test_train_adapters.py -k configs
"""
import pathlib

import ml_collections

from ldm_jax.config import load_config_file
from ldm_jax.training import adapters


def get_config() -> ml_collections.ConfigDict:
    config = adapters.textual_inversion_recipe(load_config_file(pathlib.Path(__file__).with_name("sdxl_finetune.py")))
    return config
