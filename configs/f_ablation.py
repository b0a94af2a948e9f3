"""The first stage's downsampling factor f, ablated on the varied captioned-shapes world (issue 19, item 4;
docs/reproduction.md; the driver is bench/f_ablation.py).

    --config configs/f_ablation.py:autoencoderF    F in 2, 4, 8: the first stage of LDM-F
    --config configs/f_ablation.py:ldmF            F in 1, 2, 4, 8: the LDM on it (F = 1: pixel space)

Every point is the embedded model's recipe on captioned_shapes/res32_varied with only the first stage changed:
- autoencoderF is configs/shapes_autoencoder.py:varied (KL, ch 32, one resnet per level, L1 + KL 1e-6, 5000 steps
  of batch 16) with ch_mult (1, 2) for f = 2, (1, 1, 2) for f = 4 (the embedded model's own: autoencoder4 IS
  shapes_autoencoder.py:varied), (1, 1, 2, 2) for f = 8; 4 latent channels at every f, so a 32x32x3 image becomes
  16x16x4 (3x fewer numbers), 8x8x4 (12x) or 4x4x4 (48x). The paper grows the channels with f (its Tab. 8); a
  fixed 4 makes the compression, and so the detail the first stage loses, grow with f as in its Fig. 6 and 7.
  f = 16 needs 64-pixel images (a 2x2 latent of a 3x3 grid of cells cannot place objects) and is not run.
- ldmF is configs/shapes_ldm.py:varied (the same UNet: model_channels 32, channel_mult (1, 2, 4), attention at
  every level, a learned position table the size of the latent; the same text tower, v prediction, cosine
  schedule, AdamW 1e-3 after 500 warm-up steps, constant after, batch 64, EMA 0.999) on the (32/F)x(32/F)
  latents of autoencoderF; ldm1 has the identity first stage (`first_stage.kind="identity"`: the UNet denoises
  the 32x32x3 images themselves). ldm4 IS shapes_ldm.py:varied. Give the first stage with
  --config.train.first_stage=WORKDIR (not for ldm1).
By hand (bench/f_ablation.py runs these, then evaluates every export):
    python -m ldm_jax train --config configs/f_ablation.py:autoencoder2 --workdir runs/f_ablation/f2/autoencoder \
        --config.data.data_dir=runs/tfds
    python -m ldm_jax train --config configs/f_ablation.py:ldm2 --workdir runs/f_ablation/f2/ldm \
        --config.data.data_dir=runs/tfds --config.train.first_stage=runs/f_ablation/f2/autoencoder \
        --config.train.max_train_seconds=600
The budget: --config.train.max_train_seconds=S (cumulative step time, `loop.TrainTime`; rerun the same workdir with
a larger S to continue). bench/f_ablation.py also lifts num_steps (6000: LDM-8 reaches it in 1669 s) to 1,000,000
so that the budget alone ends a run (the learning rate is constant after warm-up: num_steps changes nothing else).
"""
import pathlib
import re

import ml_collections

from ldm_jax.config import load_config_file

CONFIGS = pathlib.Path(__file__).parent
RESOLUTION = 32
CH_MULT = {2: (1, 2), 4: (1, 1, 2), 8: (1, 1, 2, 2)}  # f = 2 ** (len(ch_mult) - 1)
LDM_FACTORS = (1, *CH_MULT)
IDENTITY = dict(kind="identity", ch_mult=(1,), double_z=False, z_channels=3, embed_dim=3, attn_resolutions=(),
                in_channels=3, out_ch=3)


def get_config(point: str = "ldm4") -> ml_collections.ConfigDict:
    match = re.fullmatch(r"(autoencoder|ldm)(\d+)", point)
    factors = CH_MULT if match and match[1] == "autoencoder" else LDM_FACTORS
    if not match or int(match[2]) not in factors:
        raise ValueError(f"configs/f_ablation.py: point {point!r}; expected autoencoderF with F in "
                         f"{sorted(CH_MULT)} or ldmF with F in {sorted(LDM_FACTORS)}")
    stage, factor = match[1], int(match[2])
    return autoencoder_config(factor) if stage == "autoencoder" else ldm_config(factor)


def first_stage(factor: int) -> ml_collections.ConfigDict:
    """The first-stage section of LDM-`factor`."""
    if factor == 1:
        return ml_collections.ConfigDict(IDENTITY)
    section = load_config_file(CONFIGS / "shapes_autoencoder.py:varied").first_stage
    with section.unlocked():
        section.ch_mult = CH_MULT[factor]
    return section


def autoencoder_config(factor: int) -> ml_collections.ConfigDict:
    config = load_config_file(CONFIGS / "shapes_autoencoder.py:varied")
    with config.unlocked():
        config.first_stage = first_stage(factor)
    return config


def ldm_config(factor: int) -> ml_collections.ConfigDict:
    config = load_config_file(CONFIGS / "shapes_ldm.py:varied")
    latent = RESOLUTION // factor
    channels = first_stage(factor).embed_dim
    with config.unlocked():
        config.first_stage = first_stage(factor)
        config.unet.update(dict(in_channels=channels, out_channels=channels, position_embedding=(latent, latent)))
        config.diffusion.update(dict(image_size=latent, channels=channels))
    return config
