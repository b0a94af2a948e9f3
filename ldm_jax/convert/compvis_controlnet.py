"""The original ControlNet single files (lllyasviel's ControlNet 1.0 `control_sd15_*.pth`, 1.1
`control_v11*_sd15_*.pth` / `.safetensors`, the SD 2.x ones) <-> (ControlNetConfig, our ControlNet params).

The reference `cldm.ControlNet` is openaimodel's UNet encoder plus the hint encoder and zero convolutions; its
state dict, under `control_model.` (files that hold only the ControlNet may lack that prefix):

    time_embed.{0,2}, label_emb.*, input_blocks.*, middle_block.{0,1,2}      the UNet encoder's keys (CompVis names)
    input_hint_block.0                                                        hint conv_in (conditioning_channels -> w0)
    input_hint_block.{2, 4, ..., 4n - 4}   (SiLUs at the odd indices)         hint blocks_0 ... blocks_{2n-3}
    input_hint_block.{4n - 2}              (14 for the default n = 4 widths)  hint conv_out (zero-initialised)
    zero_convs.{j}.0                                                          controlnet_down_blocks_j (1x1)
    middle_block_out.0                                                        controlnet_mid_block (1x1)

The encoder part is mapped by `compvis.unet_encoder_entries`, the one CompVis UNet key map (no second copy here); the
hint and zero-conv keys by the table above (diffusers' `single_file_utils.convert_controlnet_checkpoint` maps the
same keys, with conv_out fixed at index 14). Layout codecs are compvis.py's (conv OIHW <-> HWIO, Linear transposed).

ControlNet 1.0 files are whole-model checkpoints: beside `control_model.*` they hold the base SD model
(`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`, the schedule buffers). Those keys are
dropped on import with a logged count (load the base with `store.load_model`); any other key is an error.

Config (`controlnet_config_from_state_dict`): the UNet encoder is read off the weights (`compvis.infer_unet_encoder`:
channels, levels, res blocks, attention levels, depth, context width, linear or conv projections); the heads, which
weights cannot tell, come from a given base UNet config, else the SD family's (8 heads for SD 1.x; 64-channel heads for
SD 2.x: linear projections or a 1024-wide context). conditioning_channels and the hint widths are read from
`input_hint_block`. ControlNet 1.1 shuffle's `global_average_pooling` and a BGR channel order are yaml options no
weight shows: pass them as `hint_overrides`.

`export_original_controlnet` / `save_original_controlnet` write the `control_model.`-prefixed layout that the
reference code and diffusers' `ControlNetModel.from_single_file` read. Files are read with
`checkpoint_io.load_state_dict` (no pickle code runs).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from ldm_jax.convert.checkpoint_io import load_state_dict, save_safetensors
from ldm_jax.convert.common import ConversionError, assemble_params, check_shapes, to_numpy_state_dict
from ldm_jax.convert.compvis import (COND_PREFIX, EMA_PREFIX, FIRST_STAGE_PREFIX, SCHEDULE_BUFFERS, UNET_PREFIX,
                                     Entry, LayoutBuilder, infer_unet_encoder, unet_encoder_entries)
from ldm_jax.models.controlnet import ControlNetConfig, controlnet_param_shapes
from ldm_jax.models.unet import UNetConfig

log = logging.getLogger(__name__)

PREFIX = "control_model."
HINT, ZERO_CONVS, MID_OUT = "input_hint_block.", "zero_convs.", "middle_block_out.0"
# Keys of a whole-model (ControlNet 1.0) checkpoint that belong to the base SD model, not to the ControlNet.
BASE_MODEL_PREFIXES = (UNET_PREFIX, FIRST_STAGE_PREFIX, COND_PREFIX, EMA_PREFIX)
BASE_MODEL_KEYS = (*SCHEDULE_BUFFERS, "scale_factor", "logvar")
DIFFUSERS_MARKER = "controlnet_cond_embedding.conv_in.weight"  # a diffusers-layout ControlNet state dict


def hint_keys(n: int) -> list[tuple[str, str]]:
    """[(original hint module index, our module under controlnet_cond_embedding)] for n hint widths: conv_in at 0,
    blocks_k at 2k + 2 (k < 2n - 2), conv_out at 4n - 2 (the odd indices are SiLUs)."""
    return [("0", "conv_in"), *((str(2 * k + 2), f"blocks_{k}") for k in range(2 * n - 2)), (str(4 * n - 2), "conv_out")]


def controlnet_layout(config: ControlNetConfig, prefix: str = PREFIX) -> tuple[tuple[Entry, ...], dict]:
    """(entries, {our param path: shape}) of the original layout of `config`: every key (`prefix` + name, torch
    layout) paired with our param path and its codec. ValueError for configs the original layout cannot hold (a
    learned position embedding)."""
    if config.unet.position_embedding is not None:
        raise ValueError("the original ControlNet layout has no place for unet.position_embedding (a learned "
                         "position table of ours, which cldm's ControlNet does not have)")
    shapes = {path: tuple(leaf.shape) for path, leaf in
              traverse_util.flatten_dict(controlnet_param_shapes(config)).items()}
    b = LayoutBuilder(shapes)
    unet_encoder_entries(b, config.unet, "", prefix)
    for index, ours in hint_keys(len(config.conditioning_embedding_out_channels)):
        b.module(f"{prefix}{HINT}{index}", f"controlnet_cond_embedding/{ours}")
    for j in range(len(config.residual_channels)):
        b.module(f"{prefix}{ZERO_CONVS}{j}.0", f"controlnet_down_blocks_{j}")
    b.module(f"{prefix}{MID_OUT}", "controlnet_mid_block")
    unclaimed = sorted("/".join(p) for p in shapes if p not in b.claimed)
    if unclaimed:
        raise RuntimeError(f"internal: the original ControlNet layout does not cover {unclaimed}")
    return tuple(b.entries), shapes


def controlnet_prefix(state_dict: Mapping[str, Any]) -> str | None:
    """The one test of "does this file hold a ControlNet?": the key prefix of the ControlNet in an original file's
    state dict, "control_model." (1.0 / 1.1 files, alone or beside a whole base model) or "" (a file of the
    ControlNet alone with bare keys: its hint encoder `input_hint_block.0` and time embedding), None when it holds
    none (a UNet / whole SD model, a diffusers-layout state dict, anything else)."""
    if any(k.startswith(PREFIX) for k in state_dict):
        return PREFIX
    if f"{HINT}0.weight" in state_dict and "time_embed.0.weight" in state_dict:
        return ""
    return None


def find_prefix(state_dict: Mapping[str, Any], source: str) -> str:
    """`controlnet_prefix`, or a one-line ConversionError for a file that holds no ControlNet, saying what it holds
    instead: a UNet / whole SD model, a diffusers-layout state dict."""
    prefix = controlnet_prefix(state_dict)
    if prefix is not None:
        return prefix
    keys = list(state_dict)
    if DIFFUSERS_MARKER in state_dict:
        raise ConversionError(f"{source}: a diffusers-layout ControlNet state dict ({DIFFUSERS_MARKER!r}), not an "
                              "original file; put it in a folder with its config.json (a diffusers ControlNet folder)")
    unet = next((k for k in keys if k.startswith(UNET_PREFIX) or k.startswith("output_blocks.")), None)
    what = f"a UNet / Stable Diffusion file (e.g. {unet!r})" if unet else f"{len(keys)} keys, e.g. {keys[:2]}"
    raise ConversionError(f"{source}: not a ControlNet: no {PREFIX}* keys and no {HINT}0.weight ({what})")


def controlnet_state_dict_of(state_dict: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The ControlNet's keys of an original file, under the `control_model.` prefix whether or not the file has it;
    a whole-model file's base-model keys (BASE_MODEL_PREFIXES, BASE_MODEL_KEYS) dropped with a logged count.
    ConversionError naming the first key that is neither."""
    prefix = find_prefix(state_dict, source)
    if prefix == "":
        return {PREFIX + k: v for k, v in state_dict.items()}
    out, dropped = {}, []
    for key, value in state_dict.items():
        if key.startswith(PREFIX):
            out[key] = value
        elif key.startswith(BASE_MODEL_PREFIXES) or key in BASE_MODEL_KEYS:
            dropped.append(key)
        else:
            raise ConversionError(f"{source}: key {key!r} is neither the ControlNet's ({PREFIX}*) nor a base-model "
                                  f"key of a whole-model checkpoint ({', '.join(p + '*' for p in BASE_MODEL_PREFIXES)})")
    if dropped:
        log.info("%s: dropped %d base-model key(s) of a whole-model ControlNet checkpoint (load the base with "
                 "store.load_model), e.g. %s", source, len(dropped), dropped[0])
    return out


def hint_widths(state_dict: Mapping[str, Any], source: str) -> tuple[int, tuple[int, ...]]:
    """(conditioning_channels, conditioning_embedding_out_channels) from `control_model.input_hint_block.*`: conv_in's
    in/out channels, then the out channels of every stride-2 conv (indices 4, 8, ..., 4n - 4). The modules are those
    with a `.weight` (a stray bias is left to the strict key check). One-line ConversionError for a key whose module
    index is not a number, a conv weight that is not 4-D, or an index set that is not 0, 2, ..., 4n - 2 with n >= 1."""
    stem = PREFIX + HINT
    weights = {}
    for key in state_dict:
        if key.startswith(stem):
            index, _, leaf = key[len(stem):].partition(".")
            if not index.isdigit():
                raise ConversionError(f"{source}: key {key!r} is not a hint-encoder conv's ({stem}N.weight / .bias, "
                                      "N the module's index)")
            if leaf == "weight":
                weights[int(index)] = key
    indices = sorted(weights)
    n = len(indices) // 2  # 2n convs: conv_in, 2n - 2 blocks, conv_out
    if n < 1 or indices != list(range(0, 4 * n - 1, 2)):
        raise ConversionError(f"{source}: {stem}*.weight has modules {indices}; expected 0, 2, ..., 4n - 2 (conv_in, "
                              "2n - 2 hint convs, conv_out; 0 ... 14 for the usual four widths)")

    def shape(index: int) -> tuple[int, ...]:
        out = tuple(np.shape(state_dict[weights[index]]))
        if len(out) != 4:
            raise ConversionError(f"{source}: {weights[index]} is {out}; a hint-encoder conv weight is 4-D")
        return out

    channels = shape(0)[1]
    widths = (shape(0)[0], *(shape(4 * k)[0] for k in range(1, n)))
    return channels, widths


def controlnet_config_from_state_dict(state_dict: Mapping[str, Any], *, unet: UNetConfig | None = None,
                                      source: str = "ControlNet file", **hint_overrides: Any) -> ControlNetConfig:
    """The ControlNetConfig of an original ControlNet state dict (`control_model.`-prefixed keys, as
    `controlnet_state_dict_of` returns): the UNet encoder read off the weights (`compvis.infer_unet_encoder`), with the
    heads of `unet` (a base UNetConfig) when given, else the SD family's; the hint fields from the weights, then
    `hint_overrides` (e.g. global_pool_conditions=True for ControlNet 1.1 shuffle)."""
    heads = None if unet is None else dict(num_heads=unet.num_heads, num_head_channels=unet.num_head_channels)
    inferred = infer_unet_encoder(state_dict, PREFIX, heads=heads, source=source)
    if unet is not None:  # what the weights cannot tell: the base's timestep-feature convention
        inferred = dataclasses.replace(inferred, flip_sin_to_cos=unet.flip_sin_to_cos, freq_shift=unet.freq_shift)
    channels, widths = hint_widths(state_dict, source)
    fields = dict(conditioning_channels=channels, conditioning_embedding_out_channels=widths, **hint_overrides)
    return ControlNetConfig(unet=inferred, **fields)


def convert_original_controlnet(state_dict: Mapping[str, Any], config: ControlNetConfig | None = None, *,
                                unet: UNetConfig | None = None, source: str = "ControlNet file", dtype: Any = np.float32,
                                **hint_overrides: Any) -> tuple[ControlNetConfig, dict[str, Any]]:
    """An original ControlNet state dict (with or without `control_model.`, or a whole-model 1.0 checkpoint; arrays
    or torch tensors, torch layouts) -> (config, our params tree of `dtype` numpy arrays, float32 or bfloat16; no
    "params" level). config: the architecture; else inferred (`controlnet_config_from_state_dict`: heads from `unet`
    when given, `hint_overrides` applied), and giving `unet` or `hint_overrides` with a config is a ValueError.
    Strict: missing, unexpected and mis-shaped keys raise ConversionError (`common.check_shapes`), named by the
    file's keys and torch-layout shapes, before any array is converted."""
    if config is not None and (unet is not None or hint_overrides):
        given = sorted([*hint_overrides, *(["unet"] if unet is not None else [])])
        raise ValueError(f"{source}: {', '.join(given)} apply to a config inferred from the weights; "
                         "with config given, set them in it")
    sd = to_numpy_state_dict(controlnet_state_dict_of(state_dict, source))
    if config is None:
        config = controlnet_config_from_state_dict(sd, unet=unet, source=source, **hint_overrides)
    entries, shapes = controlnet_layout(config)
    check_shapes({(k,): (k, v) for k, v in sd.items()}, {(e.key,): e.torch_shape(shapes) for e in entries},
                 source=source)
    converted = {}
    for entry in entries:
        for path, array in zip(entry.paths, entry.codec.to_flax(sd[entry.key]), strict=True):
            converted[path] = (entry.key, array)
    return config, assemble_params(converted, shapes, source=source, dtype=dtype)


def load_original_controlnet(path: str | os.PathLike, config: ControlNetConfig | None = None, *,
                             unet: UNetConfig | None = None, dtype: Any = np.float32, **hint_overrides: Any
                             ) -> tuple[ControlNetConfig, dict[str, Any]]:
    """Reads an original ControlNet file (.safetensors, or .pth / .ckpt without running pickle code) -> (config,
    params of `dtype`, each tensor converted as it is read) by `convert_original_controlnet` (its arguments)."""
    return convert_original_controlnet(load_state_dict(path, dtype=dtype), config, unet=unet, source=str(path),
                                       dtype=dtype, **hint_overrides)


def export_original_controlnet(params: Mapping[str, Any], config: ControlNetConfig, *, prefix: str = PREFIX,
                               dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """Our ControlNet params (no "params" level, exactly `config`'s: checked) -> the original state dict {key: numpy
    array in torch layout, `dtype`}, keys under `prefix` ("control_model." by default, "" for bare keys)."""
    entries, shapes = controlnet_layout(config, prefix)
    flat = {path: np.asarray(value) for path, value in traverse_util.flatten_dict(dict(params)).items()}
    check_shapes({p: ("/".join(p), a) for p, a in flat.items()}, shapes, source="ControlNet params to export")
    return {e.key: np.ascontiguousarray(e.codec.to_torch([flat[p] for p in e.paths]), dtype=dtype) for e in entries}


def save_original_controlnet(path: str | os.PathLike, config: ControlNetConfig, params: Mapping[str, Any], *,
                             dtype: Any = np.float32) -> None:
    """Writes `export_original_controlnet(params, config)` as one `.safetensors` file (atomically)."""
    save_safetensors(path, export_original_controlnet(params, config, dtype=dtype), metadata={"format": "pt"})


__all__ = ["PREFIX", "controlnet_config_from_state_dict", "controlnet_layout", "controlnet_prefix",
           "controlnet_state_dict_of", "convert_original_controlnet", "export_original_controlnet", "find_prefix",
           "hint_keys", "hint_widths", "load_original_controlnet", "save_original_controlnet"]
