"""Helpers the preset modules build their sections with (complete sections, so every field is overridable).

A preset section lists every field of its dataclass that describes the weights, so that a locked config still
accepts `--config.diffusion.cond_drop_prob=0.1` or `config.unet.num_classes = 10` without unlocking. Run-time
choices (attention implementation, remat, dtypes: `ldm_jax.ldm.RunOptions`) are not architecture and are in no
preset.
"""
from __future__ import annotations

from typing import Any

import ml_collections

# Every DiffusionConfig field (the ScheduleConfig fields flat, as config files write them), with the reference's
# LatentDiffusion defaults where a preset does not say otherwise.
DIFFUSION_FIELDS: dict[str, Any] = dict(
    beta_schedule="linear",
    num_timesteps=1000,
    linear_start=1e-4,
    linear_end=2e-2,
    cosine_s=8e-3,
    v_posterior=0.0,
    prediction_type="eps",
    scale_factor=1.0,
    scale_by_std=False,
    conditioning_key=None,
    cond_drop_prob=0.0,
    loss_type="l2",
    loss_weighting="uniform",
    min_snr_gamma=5.0,
    learn_logvar=False,
    logvar_init=0.0,
    image_size=64,
    channels=4,
)


def section(values: dict[str, Any], **changes: Any) -> ml_collections.ConfigDict:
    """A ConfigDict of `values` with `changes` applied; a change to a field `values` lacks is a KeyError."""
    unknown = sorted(set(changes) - set(values))
    if unknown:
        raise KeyError(f"preset section: unknown field(s) {unknown}; it has {sorted(values)}")
    return ml_collections.ConfigDict({**values, **changes})


def diffusion(**changes: Any) -> ml_collections.ConfigDict:
    """A complete `diffusion` section: DIFFUSION_FIELDS with `changes`."""
    return section(DIFFUSION_FIELDS, **changes)


def model(first_stage: ml_collections.ConfigDict, unet: ml_collections.ConfigDict,
          diffusion_section: ml_collections.ConfigDict,
          cond_stage: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """An unlocked model config with the sections first_stage, cond_stage (when given), unet, diffusion."""
    config = ml_collections.ConfigDict()
    config.first_stage = first_stage
    if cond_stage is not None:
        config.cond_stage = cond_stage
    config.unet = unet
    config.diffusion = diffusion_section
    return config
