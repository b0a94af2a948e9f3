"""diffusers `ControlNetModel` <-> `ldm_jax.models.controlnet.ControlNetModel`: config and weights, both ways.

- `controlnet_config_from_diffusers(config)`: a diffusers ControlNetModel config -> ControlNetConfig. Its UNet part
  goes through `diffusers_unet.encoder_config_from_diffusers` (the UNet's own reader, without the decoder options);
  the hint options (conditioning_channels, conditioning_embedding_out_channels, global_pool_conditions,
  controlnet_conditioning_channel_order) become the ControlNetConfig's fields.
- `controlnet_config_to_diffusers(config)`: the inverse, a config `ControlNetModel(**config)` takes as it is.
- `convert_diffusers_controlnet(state_dict, config)` / `controlnet_state_dict(params, config)`: weights, by the
  key mapping every diffusers converter here uses (`convert/common.py`: `down_blocks.0.resnets.1.conv1.weight` <->
  `down_blocks_0/resnets_1/conv1/kernel`; `controlnet_down_blocks.3` <-> `controlnet_down_blocks_3`;
  `controlnet_cond_embedding.blocks.2` <-> `controlnet_cond_embedding/blocks_2`) with the UNet's LITERAL_NAMES
  and EMBEDDINGS.
- `load_diffusers_controlnet(folder)` / `save_diffusers_controlnet(folder, config, params)`: a diffusers folder
  (config.json + diffusion_pytorch_model.safetensors as `save_pretrained` writes it; on reading also .bin, their
  .fp16 variants and shards: `diffusers_pipeline.read_weights`, the one reader of diffusers weights). It is the
  reader `store.load_controlnet` uses.

Bad input: weights are checked strictly by `common.convert_state_dict` (its error's first line names the first
mis-shaped, else missing, else unexpected key, with the counts); a UNet's state dict (up_blocks.* keys) given as a
ControlNet's is one line saying so.
"""
from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from ldm_jax.convert.checkpoint_io import save_safetensors
from ldm_jax.convert.common import ConversionError, check_shapes, convert_state_dict, params_to_state_dict
from ldm_jax.convert.diffusers_pipeline import CONFIG_FILE, DIFFUSERS_VERSION, DIFFUSERS_WEIGHTS, read_weights
from ldm_jax.convert.diffusers_unet import (EMBEDDINGS, LITERAL_NAMES, encoder_config_from_diffusers,
                                            unet_config_to_diffusers)
from ldm_jax.models.controlnet import ControlNetConfig, controlnet_param_shapes

SOURCE = "diffusers ControlNetModel"
CONTROLNET_CLASS = "ControlNetModel"  # `_class_name` of a diffusers ControlNet folder's config.json
WEIGHTS_FILE = DIFFUSERS_WEIGHTS[0]  # what save_diffusers_controlnet writes
# ControlNetModel options that are ControlNetConfig fields, not UNet ones.
HINT_FIELDS = ("conditioning_channels", "conditioning_embedding_out_channels", "global_pool_conditions",
               "controlnet_conditioning_channel_order")
# UNet2DConditionModel options that ControlNetModel does not take (it has no decoder, no dropout).
_UNET_ONLY = ("sample_size", "out_channels", "up_block_types", "center_input_sample", "dropout")


def controlnet_config_from_diffusers(config: Mapping[str, Any], **unet_overrides: Any) -> ControlNetConfig:
    """The ControlNetConfig of a diffusers ControlNetModel config (`model.config` or a loaded config.json).

    `unet_overrides` set UNetConfig fields diffusers does not describe (e.g. `position_embedding=(8, 8)`).
    Raises ConversionError naming every unsupported option (and a UNet2DConditionModel config for what it is);
    ValueError for out-of-range hint options.
    """
    cfg = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    decoder_keys = [k for k in ("up_block_types", "out_channels") if k in cfg]
    if decoder_keys:
        raise ConversionError(f"{SOURCE} config has {', '.join(decoder_keys)}: a UNet2DConditionModel config, not a "
                              "ControlNetModel's (class name "
                              f"{dict(config).get('_class_name', 'not given')!r})")
    hint = {k: cfg.pop(k) for k in HINT_FIELDS if k in cfg}
    if isinstance(hint.get("conditioning_embedding_out_channels"), list):
        hint["conditioning_embedding_out_channels"] = tuple(hint["conditioning_embedding_out_channels"])
    unet = encoder_config_from_diffusers(cfg, decoder=False, source="diffusers ControlNet", **unet_overrides)
    return ControlNetConfig(unet=unet, **hint)


def controlnet_config_to_diffusers(config: ControlNetConfig) -> dict[str, Any]:
    """The diffusers ControlNetModel config (JSON-ready) of the same architecture; `controlnet_config_from_diffusers`
    maps it back to `config` (up to `unet.out_channels` and `unet.dropout`, which a ControlNet does not have: the
    former is unused, the latter a training option that changes no weight). Raises ValueError for UNet encoders
    diffusers cannot express (see `unet_config_to_diffusers`)."""
    out = {k: v for k, v in unet_config_to_diffusers(config.unet).items() if k not in _UNET_ONLY}
    out.update(conditioning_channels=config.conditioning_channels,
               conditioning_embedding_out_channels=list(config.conditioning_embedding_out_channels),
               global_pool_conditions=config.global_pool_conditions,
               controlnet_conditioning_channel_order=config.controlnet_conditioning_channel_order)
    return out


def _shapes(config: ControlNetConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{our param path: shape} of a ControlNet of `config`; nothing allocated."""
    return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(controlnet_param_shapes(config)).items()}


def convert_diffusers_controlnet(state_dict: Mapping[str, Any], config: ControlNetConfig, *,
                                 dtype: Any = np.float32) -> dict[str, Any]:
    """A diffusers ControlNetModel state dict (torch tensors or arrays, torch layouts) -> our params tree (of `dtype`,
    float32 or bfloat16; no "params" level). Strict (`common.convert_state_dict`): a ConversionError lists every
    missing, unexpected and mis-shaped key; a UNet's state dict is one line saying so."""
    unet_key = next((k for k in state_dict if k.startswith("up_blocks.")), None)
    if unet_key is not None:
        raise ConversionError(f"{SOURCE}: the state dict has decoder keys ({unet_key!r}): a UNet's state dict, not a "
                              "ControlNet's")
    return convert_state_dict(state_dict, _shapes(config), source=SOURCE, embeddings=EMBEDDINGS, dtype=dtype)


def controlnet_state_dict(params: Mapping[str, Any], config: ControlNetConfig, *,
                          dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """Our params tree -> a diffusers ControlNetModel state dict of numpy arrays of `dtype` (torch layouts); the tree
    must have exactly `config`'s parameters (checked as on import: a ConversionError lists what does not fit)."""
    check_shapes({path: ("/".join(path), v) for path, v in traverse_util.flatten_dict(dict(params)).items()},
                 _shapes(config), source="ControlNet params")
    state_dict = params_to_state_dict(params, literal=LITERAL_NAMES)
    return state_dict if np.dtype(dtype) == np.float32 else {k: v.astype(dtype) for k, v in state_dict.items()}


def load_diffusers_controlnet(folder: str | pathlib.Path, *, dtype: Any = np.float32,
                              **unet_overrides: Any) -> tuple[ControlNetConfig, dict]:
    """Reads a diffusers ControlNet folder (config.json + its weights: diffusion_pytorch_model.safetensors or .bin,
    their .fp16 variants or shards, `diffusers_pipeline.read_weights`) -> (ControlNetConfig, params tree of `dtype`,
    float32 or bfloat16, each tensor converted as it is read). FileNotFoundError names a missing file. No network."""
    folder = pathlib.Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{folder / CONFIG_FILE} does not exist (expected a diffusers ControlNet folder from "
                                "save_pretrained)")
    config = controlnet_config_from_diffusers(json.loads((folder / CONFIG_FILE).read_text()), **unet_overrides)
    return config, convert_diffusers_controlnet(read_weights(folder, DIFFUSERS_WEIGHTS, dtype=dtype), config,
                                                dtype=dtype)


def save_diffusers_controlnet(folder: str | pathlib.Path, config: ControlNetConfig, params: Mapping[str, Any], *,
                              dtype: Any = np.float32) -> None:
    """Writes `params` (our tree, no "params" level) as a diffusers ControlNet folder that
    `ControlNetModel.from_pretrained(folder)` loads with no missing or unexpected keys (safetensors of `dtype`:
    float32 by default, float16 as the hub's fp16 ControlNets, or bfloat16)."""
    folder = pathlib.Path(folder)
    state_dict = controlnet_state_dict(params, config, dtype=dtype)
    diffusers_config = {"_class_name": CONTROLNET_CLASS, "_diffusers_version": DIFFUSERS_VERSION,
                        **controlnet_config_to_diffusers(config)}
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(folder / WEIGHTS_FILE, state_dict, {"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(diffusers_config, indent=2, sort_keys=True) + "\n")
