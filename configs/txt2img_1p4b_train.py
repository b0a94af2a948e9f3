"""Training the LDM paper's text-to-image model, LDM-KL-8-G 1.45B (txt2img-1p4B), on LAION-style tar shards.

Model: the preset ldm_txt2img_1p4b (configs/ldm_txt2img_1p4b.py: SD v1's UNet with context width 1280; a
32-layer BERT-style transformer of width 1280 over the bert-base-uncased tokenizer, trained jointly:
train.train_cond_stage). 256x256 images, 32x32x4 KL-f8 latents, scale_factor 0.18215, linear 0.00085..0.012.
Training sections: configs/ldm_training.py with what differs. Optimisation as the reference: AdamW at base rate
5e-5 (not scaled), EMA 0.9999; with bf16 compute and remat to fit large batches, gradient clipping at 1.0 and
10% caption dropout for classifier-free guidance; the UNet is sharded over "fsdp".

    python train.py --config configs/txt2img_1p4b_train.py --workdir runs/txt2img_1p4b \\
        --config.data.path='/data/laion/{00000..01000}.tar' --config.train.tokenizer=/models/bert-base-uncased \\
        --config.train.first_stage=runs/kl_f8/autoencoder --config.mesh.fsdp=8
Built (shapes only) by: .venv/bin/python -m pytest -q tests/test_train.py -k configs_build
"""
import pathlib

import ml_collections

from ldm_jax.config import load_config_file
from ldm_jax.presets import get_preset


def get_config() -> ml_collections.ConfigDict:
    config = load_config_file(pathlib.Path(__file__).with_name("ldm_training.py"))
    with config.unlocked():
        config.update(get_preset("ldm_txt2img_1p4b"))
    config.diffusion.cond_drop_prob = 0.1
    config.data.update(dict(source="tar", name="", data_dir="", resolution=256, global_batch_size=256,
                            batch_keys=("image", "tokens")))
    config.optimizer.update(dict(learning_rate=5e-5, scale_lr=False, grad_clip_norm=1.0))
    config.train.update(dict(num_steps=1_000_000, dtype="bfloat16", remat=True, train_cond_stage=True))
    return config
