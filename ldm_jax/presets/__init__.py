"""Model presets shipped inside the package: `get_preset(name)` -> a locked ConfigDict of model sections.

Model presets (whole latent diffusion models; `ldm.ldm_config(get_preset(name))` builds their LDMConfig) have the
sections first_stage, cond_stage (absent for unconditional models), cond_stage_2 (a second text tower: SDXL
base), unet and diffusion:
  sd_v1, sd_v1_inpainting, sd_v2 (2.x at 512, eps), sd_v2_768_v (2.x 768-v, v-prediction)   stable_diffusion.py
  sdxl_base, sdxl_refiner, sdxl_inpainting (SDXL 1.0; also section cond_stage_2)            sdxl.py
  ldm_celebahq_vq4, ldm_cin256, ldm_txt2img_1p4b (the CompVis LDM zoo)                        ldm_zoo.py
  tiny (a 1M-parameter text-to-image model for tests and CPU runs)                            tiny.py
First-stage presets (section first_stage only; `models.autoencoder.AutoencoderConfig`):
  autoencoder_kl_f4, autoencoder_kl_f8, autoencoder_kl_f16, autoencoder_vq_f4, autoencoder_vq_f8,
  autoencoder_tiny_kl, autoencoder_tiny_vq                                                    autoencoders.py

One module per family rather than one per preset: presets derive from each other within a family (sd_v2 is
sd_v1 with what differs, the zoo's cin256 is celebahq's), so a family reads as one base and its variants.
The configs/ files of these models import them (`get_preset`) and add only training sections. Presets hold only
what describes the weights; run-time choices (attention implementation, remat, dtypes) are `ldm.RunOptions`.

`matching_preset(config)` names the model preset an LDMConfig equals (e.g. one `convert.compvis.infer_config`
read off a checkpoint's weights), or None.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import ml_collections

from ldm_jax.presets import autoencoders, ldm_zoo, sdxl, stable_diffusion, tiny

_MODELS: dict[str, Callable[[], ml_collections.ConfigDict]] = {
    "sd_v1": stable_diffusion.sd_v1,
    "sd_v1_inpainting": stable_diffusion.sd_v1_inpainting,
    "sd_v2": stable_diffusion.sd_v2,
    "sd_v2_768_v": stable_diffusion.sd_v2_768_v,
    "sdxl_base": sdxl.sdxl_base,
    "sdxl_refiner": sdxl.sdxl_refiner,
    "sdxl_inpainting": sdxl.sdxl_inpainting,
    "ldm_celebahq_vq4": ldm_zoo.celebahq_vq4,
    "ldm_cin256": ldm_zoo.cin256,
    "ldm_txt2img_1p4b": ldm_zoo.txt2img_1p4b,
    "tiny": tiny.tiny,
}
_FIRST_STAGES: dict[str, Callable[[], ml_collections.ConfigDict]] = {
    "autoencoder_kl_f4": autoencoders.kl_f4,
    "autoencoder_kl_f8": autoencoders.kl_f8,
    "autoencoder_kl_f16": autoencoders.kl_f16,
    "autoencoder_vq_f4": autoencoders.vq_f4,
    "autoencoder_vq_f8": autoencoders.vq_f8,
    "autoencoder_tiny_kl": autoencoders.tiny_kl,
    "autoencoder_tiny_vq": autoencoders.tiny_vq,
}
MODEL_PRESET_NAMES: tuple[str, ...] = tuple(_MODELS)
FIRST_STAGE_PRESET_NAMES: tuple[str, ...] = tuple(_FIRST_STAGES)
PRESET_NAMES: tuple[str, ...] = MODEL_PRESET_NAMES + FIRST_STAGE_PRESET_NAMES


def get_preset(name: str) -> ml_collections.ConfigDict:
    """The preset `name` (one of PRESET_NAMES) as a fresh locked ConfigDict (safe to unlock and change).

    Model presets have the sections first_stage, cond_stage (absent when unconditional), cond_stage_2 (SDXL base),
    unet, diffusion;
    first-stage presets only first_stage. An unknown name is a ValueError listing the names.
    """
    builder = _MODELS.get(name) or _FIRST_STAGES.get(name)
    if builder is None:
        raise ValueError(f"unknown preset {name!r}; the presets are: {', '.join(PRESET_NAMES)}")
    config = builder()
    config.lock()
    return config


def matching_preset(config: Any) -> str | None:
    """The name of the model preset whose LDMConfig equals `config` (an `ldm.LDMConfig`), or None.

    sd_v2 and sd_v2_768_v differ only in prediction type and default image size; a config equals at most one.
    """
    for name, preset in _model_configs().items():
        if preset == config:
            return name
    return None


@functools.lru_cache(maxsize=1)
def _model_configs() -> dict[str, Any]:
    from ldm_jax.ldm import ldm_config  # noqa: PLC0415 (ldm imports the models; presets alone need none)

    return {name: ldm_config(get_preset(name)) for name in MODEL_PRESET_NAMES}


__all__ = ["FIRST_STAGE_PRESET_NAMES", "MODEL_PRESET_NAMES", "PRESET_NAMES", "get_preset", "matching_preset"]
