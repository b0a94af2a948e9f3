"""Fine-tuning Stable Diffusion v1.x from a converted checkpoint on captioned images (512x512).

Model: the preset sd_v1 (configs/sd_v1.py); training sections: configs/ldm_training.py with what differs. Every
param starts from --config.train.init_from: a CompVis .ckpt/.safetensors (e.g. v1-5-pruned-emaonly.safetensors),
a diffusers folder or a model directory; the VAE and the CLIP text encoder stay frozen, the UNet trains (remat
on, as the reference's use_checkpoint=True; bf16 compute, params and AdamW state float32). AdamW 1e-5 (not
scaled) with 1000 warm-up steps, gradient clipping at 1.0, 4 micro-batches of 8 per update (batch 32), 10%
caption dropout for classifier-free guidance, EMA 0.9999.

    python train.py --config configs/sd_v1_finetune.py --workdir runs/sd_finetune \\
        --config.train.init_from=/models/v1-5-pruned-emaonly.safetensors \\
        --config.train.tokenizer=/models/stable-diffusion-v1-5/tokenizer --config.data.path=/data/my_images
(a folder of images with .txt captions; use data.source=tar for webdataset shards.)
Built (shapes only) by: .venv/bin/python -m pytest -q tests/test_train.py -k configs_build
"""
import pathlib

import ml_collections

from ldm_jax.config import load_config_file
from ldm_jax.presets import get_preset


def get_config() -> ml_collections.ConfigDict:
    config = load_config_file(pathlib.Path(__file__).with_name("ldm_training.py"))
    with config.unlocked():
        config.update(get_preset("sd_v1"))
    config.diffusion.cond_drop_prob = 0.1
    config.data.update(dict(source="folder", name="", data_dir="", resolution=512, crop="random",
                            global_batch_size=32, batch_keys=("image", "tokens")))
    config.optimizer.update(dict(learning_rate=1e-5, scale_lr=False, warmup_steps=1000, grad_clip_norm=1.0,
                                 accumulate_grad_batches=4))
    config.train.update(dict(num_steps=20_000, log_every=50, image_every=1000, num_images=8, dtype="bfloat16",
                             remat=True, guidance_scale=7.5))
    config.checkpoint.update(dict(every_steps=1000, keep=2))
    return config
