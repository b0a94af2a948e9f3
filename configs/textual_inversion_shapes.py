"""Textual inversion on the embedded captioned-shapes model: learn one new token's embedding from a few images.

configs/lora_shapes.py (the shipped model, frozen; a folder of images) with what differs: `train.adapter` is
"textual_inversion": a new token "<new-shape>" (1 vector, 64 numbers) starts from the embedding of "circle"; every
other weight is frozen. AdamW 5e-3 (not scaled), no weight decay, 500 steps of batch 16, EMA off.

Data: a folder of 32x32 images with .txt captions that use the token ("a large red <new-shape> at the top left").
The export is WORKDIR/learned_embeds.safetensors (diffusers' textual-inversion file):

    python train.py --config configs/textual_inversion_shapes.py --workdir runs/ti_shapes \\
        --config.data.path=runs/new_shape_ti
    ldm-jax sample --embedding runs/ti_shapes/learned_embeds.safetensors \\
        --prompt "a large red <new-shape> at the top left"
Built (shapes only) by: .venv/bin/python -m pytest -q tests/test_train_adapters.py -k configs
"""
import pathlib

import ml_collections

from ldm_jax.config import load_config_file


def get_config() -> ml_collections.ConfigDict:
    config = load_config_file(pathlib.Path(__file__).with_name("lora_shapes.py"))
    config.train.adapter = "textual_inversion"
    config.train.textual_inversion.update(dict(token="<new-shape>", init_word="circle", num_vectors=1))
    config.train.update(dict(num_steps=500, ema_decay=None))
    config.optimizer.update(dict(learning_rate=5e-3, weight_decay=0.0))
    return config
