"""Stable Diffusion 2.x, 768-v (v2-inference-v.yaml): 768x768 images, 96x96x4 latents, OpenCLIP ViT-H/14 context.

Differs from SD v1 by head dim 64 (num_head_channels=64: 5/10/20 heads), linear proj_in/proj_out in the
spatial transformers, context width 1024 and v-prediction (865,910,724 UNet parameters). For 2.x-base
(512x512, eps prediction) override `--config.ldm.prediction_type=eps --config.ldm.image_size=64`.
cond_stage: OpenCLIP ViT-H/14's text tower as diffusers ships it, 23 of its 24 blocks then the final LN
(= the reference's layer="penultimate"; a 24-block CompVis checkpoint needs `--config.cond_stage.num_layers=24
--config.cond_stage.output_layer=penultimate`); prompts are padded with 0.

Built by `.venv/bin/python -m pytest -q tests/test_configs.py -k sd_v2`.
"""
import pathlib

import ml_collections

from ldm_jax.config import load_config_file


def get_config() -> ml_collections.ConfigDict:
    config = load_config_file(pathlib.Path(__file__).with_name("sd_v1.py"))
    config.unet.num_heads = -1
    config.unet.num_head_channels = 64
    config.unet.use_linear_in_transformer = True
    config.unet.context_dim = 1024
    cond = config.cond_stage
    cond.hidden_size = 1024
    cond.intermediate_size = 4096
    cond.num_layers = 23
    cond.num_heads = 16
    cond.hidden_act = "gelu"
    cond.pad_token_id = 0
    config.ldm.prediction_type = "v"
    config.ldm.image_size = 96
    return config
