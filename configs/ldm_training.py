"""The training sections every LDM training config starts from: stage "ldm", data, optimizer, train, checkpoint,
mesh; no model. A training config adds a preset's model sections and changes only what differs:

    config = load_config_file(CONFIGS / "ldm_training.py")
    with config.unlocked():
        config.update(get_preset("sd_v1"))          # first_stage, cond_stage, unet, diffusion
    config.optimizer.learning_rate = 1e-5          # ... what differs

The values: the captioned-shapes data section (configs/data_captioned_shapes.py); the reference's AdamW (0.9,
0.999, eps 1e-8, weight decay 0.01) at base rate 1e-4 per example scaled by the batch (latent-diffusion's
`--scale_lr`), no warm-up, no clipping, no accumulation; EMA 0.9999; a frozen cond stage (the reference's
cond_stage_trainable=False); float32 compute, "xla" attention, no remat; DDIM 50-step sample grids of 16 images
at guidance 5 every 5000 steps; checkpoints every 5000 steps, 3 kept; data parallel over every device with
parameters sharded over "fsdp" where it has more than one device; no wall-clock budget (train.max_train_seconds 0).
A budget stops a run where its cumulative training time (the steps' own time: not the first step's compilation,
the sample grids or the checkpoint saves; `ldm_jax.training.loop.TrainTime`) reaches it, with a checkpoint and the
export, and a rerun of the same workdir with a larger budget continues: a training-time ablation evaluates the
export after each of
    python train.py --config configs/shapes_ldm.py --workdir runs/f4 --config.train.max_train_seconds=300 ...
    python train.py --config configs/shapes_ldm.py --workdir runs/f4 --config.train.max_train_seconds=600 ...
(with num_steps large enough never to stop first).
The configs built on it: sd_v1_finetune.py, txt2img_1p4b_train.py, celebahq_ldm_vq4_train.py, shapes_ldm.py.
Built by: .venv/bin/python -m pytest -q tests/test_configs.py -k ldm_training
"""
import pathlib

import ml_collections
from ml_collections import config_dict

from ldm_jax.config import load_config_file


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.stage = "ldm"
    config.data = load_config_file(pathlib.Path(__file__).with_name("data_captioned_shapes.py")).data
    config.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=1e-4, scale_lr=True, warmup_steps=0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01,
        grad_clip_norm=0.0, accumulate_grad_batches=1))
    config.train = ml_collections.ConfigDict(dict(
        num_steps=100_000, seed=0, log_every=100, image_every=5000, num_images=16, eval_split="",
        dtype="float32", attention="xla", remat=False, progress_bar=True, compile_cache=True, first_stage="",
        init_from="", tokenizer="", train_cond_stage=False, ema_decay=config_dict.placeholder(float), precompute_latents=False,
        sample_posterior=True, sampler="ddim", sample_steps=50, guidance_scale=5.0, check_shapes=False,
        max_train_seconds=0.0))
    config.train.ema_decay = 0.9999  # None turns EMA off
    config.checkpoint = ml_collections.ConfigDict(dict(every_steps=5000, keep=3, async_save=True))
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, param_rules=((".*", "fsdp_auto"),)))
    config.lock()
    return config
