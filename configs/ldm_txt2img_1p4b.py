"""LDM-KL-8-G text-to-image, 1.45B (txt2img-1p4B-eval.yaml): the paper's LAION-400M model.

256x256 images, 32x32x4 KL-f8 latents; the UNet is SD v1's with context width 1280, from a BERT-style
transformer (n_embed 1280, 32 layers, bert-base-uncased tokenizer) trained jointly (the `cond_stage`).
Schedule: linear 0.00085..0.012, 1000 steps; scale_factor 0.18215.

Built by `.venv/bin/python -m pytest -q tests/test_configs.py -k ldm_txt2img_1p4b`.
"""
import pathlib

import ml_collections

from ldm_jax.config import load_config_file


def get_config() -> ml_collections.ConfigDict:
    config = load_config_file(pathlib.Path(__file__).with_name("sd_v1.py"))
    config.unet.context_dim = 1280
    config.ldm.image_size = 32
    with config.unlocked():
        config.cond_stage = ml_collections.ConfigDict(dict(
            kind="bert", vocab_size=30522, max_length=77, n_embed=1280, n_layer=32, pad_token_id=0,
            tokenizer_kind="bert"))
    return config
