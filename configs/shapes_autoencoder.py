"""Captioned-shapes autoencoder: KL, f=4, 32x32x3 images <-> 8x8x4 latents (the embedded model's first stage).

ch 32, ch_mult (1, 1, 2), 1 resnet per level, attention only in the mid blocks (0.73M parameters): the
preset autoencoder_tiny_kl with what differs.
Loss: L1 + KL (weight 1e-6); no LPIPS unless --config.loss.lpips_vgg_path is given (then weight 1.0); the
PatchGAN is off (disc_factor 0): flat-coloured shapes need no adversarial sharpening, and it would cost time.
Adam (0.5, 0.9), base rate 6e-5 per example (x the global batch 16 = 9.6e-4), scaled as the reference scales it;
5000 steps of batch 16 (1.6 epochs of the 50k training scenes).

Measured on the 2-core CPU (quiet): 7 steps/s (115 images/s), 5000 steps in 12 minutes; reconstruction PSNR
on the 16 validation images of the grids rises from 17.7 dB (step 250) through 31.2 dB (step 3000) to 38.7 dB
(step 5000); a 1.6e-4 rate reached only 15.9 dB after 1000 steps. eval.jsonl holds the curve.
The varied world (`configs/shapes_autoencoder.py:varied`: the same recipe on captioned_shapes/res32_varied, prepared
with --varied): 3.5-3.9 steps/s on 2026-12-07 (the machine quiet; 1281 s of step time, 22 minutes of wall time in
all); PSNR 19.7 dB at step 250, 29.7 dB at 3000, 31.4 dB at 5000 (its per-pixel noise, sigma 3, alone caps PSNR
near 38.6 dB). The exact-world speed above is from an earlier day: an A/B on res32_varied of the loop with and
without its per-step wait gave 3.86 / 3.87 against 3.55 / 3.68 steps/s (300 steps each), so the wait is not the
difference.
No wall-clock budget (train.max_train_seconds 0; `ldm_jax.training.loop.TrainTime`).
Prepare the data once, then train:
    python -m ldm_jax.data.captioned_shapes --data_dir ~/tensorflow_datasets --resolution 32
    python train.py --config configs/shapes_autoencoder.py --workdir runs/shapes_autoencoder
The result, runs/shapes_autoencoder/autoencoder/, is what configs/shapes_ldm.py trains on.
"""
import pathlib

import ml_collections

from ldm_jax.config import load_config_file
from ldm_jax.presets import get_preset

CONFIGS = pathlib.Path(__file__).parent


WORLDS = {"exact": "captioned_shapes/res32", "varied": "captioned_shapes/res32_varied"}


def get_config(world: str = "exact") -> ml_collections.ConfigDict:
    if world not in WORLDS:
        raise ValueError(f"configs/shapes_autoencoder.py: world {world!r}; expected one of {sorted(WORLDS)}")
    config = get_preset("autoencoder_tiny_kl")
    config.first_stage.update(dict(ch_mult=(1, 1, 2), attn_resolutions=()))
    data = load_config_file(CONFIGS / "data_captioned_shapes.py").data
    with config.unlocked():
        config.stage = "autoencoder"
        config.data = data
        config.data.name = WORLDS[world]
        config.data.global_batch_size = 16
        config.data.batch_keys = ("image",)
        config.loss = ml_collections.ConfigDict(dict(
            disc_start=50001, kl_weight=1e-6, disc_weight=0.5, disc_factor=0.0, perceptual_weight=1.0,
            pixel_loss="l1", disc_num_layers=2, disc_ndf=32, lpips_vgg_path=""))
        config.optimizer = ml_collections.ConfigDict(dict(learning_rate=6e-5, scale_lr=True,
                                                          disc_learning_rate=None))
        config.optimizer.disc_learning_rate = ml_collections.config_dict.placeholder(float)
        config.train = ml_collections.ConfigDict(dict(
            num_steps=5000, seed=0, log_every=100, image_every=250, num_images=16, eval_split="validation",
            dtype="float32", attention="xla", remat=False, progress_bar=True, compile_cache=True,
            max_train_seconds=0.0))
        config.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=2, async_save=True))
        config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, param_rules=((".*", "fsdp_auto"),)))
    config.lock()
    return config
