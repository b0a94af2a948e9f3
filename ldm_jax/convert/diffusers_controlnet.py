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
  (config.json + diffusion_pytorch_model.safetensors, as `save_pretrained` writes and `from_pretrained` reads).

Bad input is one line: a state dict of another layout (a UNet's, another architecture's) names its first key
that matches no parameter of the ControlNet, else the first parameter it lacks, else the first mis-shaped one.
"""
from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from ldm_jax.convert.checkpoint_io import load_state_dict, save_safetensors
from ldm_jax.convert.common import (ConversionError, convert_state_dict, flax_to_torch_leaf, params_to_state_dict,
                                    path_to_diffusers_key, to_numpy_state_dict)
from ldm_jax.convert.diffusers_unet import (EMBEDDINGS, LITERAL_NAMES, encoder_config_from_diffusers,
                                            unet_config_to_diffusers)
from ldm_jax.models.controlnet import ControlNetConfig, controlnet_param_shapes

SOURCE = "diffusers ControlNetModel"
CONFIG_FILE, WEIGHTS_FILE = "config.json", "diffusion_pytorch_model.safetensors"
DIFFUSERS_VERSION = "0.42.1"  # written into exported configs, as convert/diffusers_pipeline.py does
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


def diffusers_shapes(config: ControlNetConfig) -> dict[str, tuple[int, ...]]:
    """{diffusers state-dict key: torch-layout shape} of a ControlNet, in our params' order; nothing allocated."""
    out = {}
    for path, leaf in traverse_util.flatten_dict(controlnet_param_shapes(config)).items():
        torch_path, array = flax_to_torch_leaf(path, np.broadcast_to(np.float32(0), leaf.shape))
        out[path_to_diffusers_key(torch_path, literal=LITERAL_NAMES)] = tuple(array.shape)
    return out


def check_layout(state_dict: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], *, source: str) -> None:
    """One-line ConversionError unless `state_dict` has exactly the keys and shapes of `expected` ({key: shape}):
    names the first key (in the state dict's order) that matches no parameter, else the first parameter missing,
    else the first mis-shaped key, with the counts."""
    unknown = [k for k in state_dict if k not in expected]
    missing = [k for k in expected if k not in state_dict]
    counts = f"{len(unknown)} unknown, {len(missing)} missing of {len(expected)} parameters"
    if unknown:
        guess = "; up_blocks: a UNet's state dict?" if any(k.startswith("up_blocks.") for k in unknown) else ""
        raise ConversionError(f"{source}: state dict key {unknown[0]!r} matches no parameter of this model "
                              f"({counts}{guess})")
    if missing:
        raise ConversionError(f"{source}: parameter {missing[0]!r} is missing from the state dict ({counts})")
    for key, shape in expected.items():
        if tuple(np.shape(state_dict[key])) != tuple(shape):
            raise ConversionError(f"{source}: {key} is {tuple(np.shape(state_dict[key]))} in the state dict but "
                                  f"{tuple(shape)} in the model (a config of another architecture?)")


def convert_diffusers_controlnet(state_dict: Mapping[str, Any], config: ControlNetConfig) -> dict[str, Any]:
    """A diffusers ControlNetModel state dict (torch tensors or arrays, torch layouts) -> our params tree (float32,
    no "params" level). Raises a one-line ConversionError for a state dict of another layout (`check_layout`)."""
    arrays = to_numpy_state_dict(state_dict)
    check_layout(arrays, diffusers_shapes(config), source=SOURCE)
    expected = {path: leaf.shape for path, leaf in traverse_util.flatten_dict(controlnet_param_shapes(config)).items()}
    return convert_state_dict(arrays, expected, source=SOURCE, embeddings=EMBEDDINGS)


def controlnet_state_dict(params: Mapping[str, Any], config: ControlNetConfig) -> dict[str, np.ndarray]:
    """Our params tree -> a diffusers ControlNetModel state dict of float32 numpy arrays (torch layouts); the tree
    must have exactly `config`'s parameters (a one-line ConversionError names the first that does not fit)."""
    state_dict = params_to_state_dict(params, literal=LITERAL_NAMES)
    check_layout(state_dict, diffusers_shapes(config), source="ControlNet params")
    return state_dict


def load_diffusers_controlnet(folder: str | pathlib.Path, **unet_overrides: Any) -> tuple[ControlNetConfig, dict]:
    """Reads a diffusers ControlNet folder (config.json + diffusion_pytorch_model.safetensors) -> (ControlNetConfig,
    params tree). FileNotFoundError names a missing file. No network access."""
    folder = pathlib.Path(folder)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} does not exist (expected a diffusers ControlNet folder from "
                                    "save_pretrained)")
    config = controlnet_config_from_diffusers(json.loads((folder / CONFIG_FILE).read_text()), **unet_overrides)
    return config, convert_diffusers_controlnet(load_state_dict(folder / WEIGHTS_FILE), config)


def save_diffusers_controlnet(folder: str | pathlib.Path, config: ControlNetConfig, params: Mapping[str, Any]) -> None:
    """Writes `params` (our tree, no "params" level) as a diffusers ControlNet folder that
    `ControlNetModel.from_pretrained(folder)` loads with no missing or unexpected keys (float32 safetensors)."""
    folder = pathlib.Path(folder)
    state_dict = controlnet_state_dict(params, config)
    diffusers_config = {"_class_name": "ControlNetModel", "_diffusers_version": DIFFUSERS_VERSION,
                        **controlnet_config_to_diffusers(config)}
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(folder / WEIGHTS_FILE, state_dict, {"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(diffusers_config, indent=2, sort_keys=True) + "\n")
