"""LoRA on the embedded captioned-shapes model: teach it a new word from a handful of images, base weights frozen.

Model and training sections: configs/shapes_ldm.py with what differs. Every param starts from the shipped model
(`train.init_from="shapes"`, its tokenizer and its latent scale_factor; scale_by_std off: the scale belongs to the
trained model) and stays frozen; what trains is rank-8 LoRA factors (alpha = rank) on the UNet's attention
projections (`train.lora`: targets attention; add "feed_forward" / "conv" or sections "cond_stage" for more),
156,160 numbers, with AdamW 1e-3 (not scaled), no warm-up, EMA 0.99 of the factors, 400 steps of batch 16. Grids
every 100 steps of the first 16 captions of the folder (DDIM 50, guidance 5).

Data: a folder of 32x32 images with .txt captions in the captioned-shapes language that use the new word (e.g.
"a large red star at the top left": the word-level tokenizer reads an unknown word as <|unk|>, which then comes to
mean the new shape). The export is WORKDIR/lora.safetensors (diffusers / PEFT format):

    python train.py --config configs/lora_shapes.py --workdir runs/lora_shapes --config.data.path=runs/new_shape
    ldm-jax sample --lora runs/lora_shapes/lora.safetensors:1.0 --prompt "a large red star at the top left"
(--config.train.export_merged=true also writes the merged model directory runs/lora_shapes/model/.)
Built (shapes only) by: .venv/bin/python -m pytest -q tests/test_train_adapters.py -k configs
"""
import pathlib

import ml_collections

from ldm_jax import store
from ldm_jax.config import load_config_file
from ldm_jax.training import adapters

CONFIGS = pathlib.Path(__file__).parent


def shapes_adaptation(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """configs/shapes_ldm.py made a recipe on the shipped model: its scale_factor, its tokenizer, the adapter
    fields, the text tower frozen, a folder of images (data.path) instead of the TFDS set, no precomputed latents,
    no shapes checker (new words do not parse)."""
    with config.unlocked():
        config.train.update(adapters.train_fields())
        config.data.prompt = ""  # one caption for every image instead of the .txt files
    shipped = store.resolve_config(store.SHIPPED_MODELS["shapes"])
    config.diffusion.update(dict(scale_by_std=False, scale_factor=shipped.diffusion.scale_factor))
    config.data.update(dict(source="folder", name="", data_dir="", path="", global_batch_size=16))
    config.train.update(dict(init_from="shapes", tokenizer="", train_cond_stage=False, precompute_latents=False,
                             check_shapes=False, eval_split="", num_steps=400, image_every=100, num_images=16,
                             ema_decay=0.99))
    config.optimizer.update(dict(learning_rate=1e-3, scale_lr=False, warmup_steps=0))
    config.checkpoint.update(dict(every_steps=100, keep=2))
    return config


def get_config() -> ml_collections.ConfigDict:
    config = shapes_adaptation(load_config_file(CONFIGS / "shapes_ldm.py"))
    config.train.adapter = "lora"
    config.train.lora.update(dict(rank=8, targets=("attention",), sections=("unet",)))
    return config
