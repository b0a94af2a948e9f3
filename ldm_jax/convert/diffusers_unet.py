"""diffusers `UNet2DConditionModel` -> `ldm_jax.models.unet.UNetModel`: its config and its weights.

- `unet_config_from_diffusers(config)`: the diffusers config (`model.config` or a loaded config.json) ->
  `UNetConfig`, refusing every option our UNet does not implement, with the option's name and value.
- `convert_diffusers_unet(state_dict, config)`: strict key-by-key conversion via `convert/common.py`
  (our module names are diffusers' with `name_N` for numbered children).
- `load_diffusers_unet(folder)`: a saved diffusers UNet folder (config.json + safetensors) -> (config, params).
"""
from __future__ import annotations

import functools
import json
import pathlib
from collections.abc import Mapping
from typing import Any

import jax

from ldm_jax.convert.checkpoint_io import load_state_dict
from ldm_jax.convert.common import ConversionError, convert_state_dict, expected_shapes
from ldm_jax.models.unet import UNetConfig, UNetModel, init_unet

# Options that must hold these values (the diffusers defaults); anything else is refused.
_REQUIRED = {
    "center_input_sample": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "cross_attention_norm": None,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
}
# Options read below, or that do not change the float32 computation (upcast_attention: our softmax is
# always float32; addition_embed_type_num_heads: unused without addition_embed_type; sample_size: any size).
_HANDLED = {
    "in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
    "only_cross_attention", "mid_block_only_cross_attention", "dropout", "cross_attention_dim",
    "transformer_layers_per_block", "attention_head_dim", "num_attention_heads", "use_linear_projection",
    "class_embed_type", "num_class_embeds", "projection_class_embeddings_input_dim", "resnet_time_scale_shift",
    "flip_sin_to_cos", "freq_shift", "time_embedding_dim", "upcast_attention", "addition_embed_type_num_heads",
    "sample_size",
}


def unet_config_from_diffusers(config: Mapping[str, Any], **overrides: Any) -> UNetConfig:
    """Builds the UNetConfig equivalent to a diffusers UNet2DConditionModel config (a dict-like).

    `overrides` set UNetConfig fields diffusers does not describe (e.g. `position_embedding=(8, 8)`); run-time
    options (attention, remat, dtypes) are not config fields but arguments of `build_unet`.
    Raises ConversionError naming every unsupported option.
    """
    cfg = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    problems = [f"{k}={cfg[k]!r} (supported: {v!r})" for k, v in _REQUIRED.items() if k in cfg and cfg[k] != v]
    problems += [f"unknown option {k}={cfg[k]!r}" for k in sorted(set(cfg) - set(_REQUIRED) - _HANDLED)]
    for key in ("only_cross_attention", "mid_block_only_cross_attention"):
        if any(_per_level(cfg.get(key) or False, 1)):
            problems.append(f"{key}={cfg[key]!r} (supported: False)")
    channels = list(cfg.get("block_out_channels", (320, 640, 1280, 1280)))
    levels = len(channels)
    down = list(cfg.get("down_block_types", ()))
    up = list(cfg.get("up_block_types", ()))
    attn_levels = [t == "CrossAttnDownBlock2D" for t in down]
    if len(down) != levels or any(t not in ("CrossAttnDownBlock2D", "DownBlock2D") for t in down):
        problems.append(f"down_block_types={down} (supported: {levels} of CrossAttnDownBlock2D/DownBlock2D)")
    expected_up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn_levels)]
    if up != expected_up:
        problems.append(f"up_block_types={up} (supported: the mirror of down_block_types, {expected_up})")
    if any(c % channels[0] for c in channels):
        problems.append(f"block_out_channels={channels} (supported: multiples of the first)")
    depth = _single(cfg.get("transformer_layers_per_block", 1), levels, "transformer_layers_per_block", problems)
    layers = _single(cfg.get("layers_per_block", 2), levels, "layers_per_block", problems)
    context_dim = _single(cfg.get("cross_attention_dim", 1280), levels, "cross_attention_dim", problems)
    time_dim = cfg.get("time_embedding_dim")
    if time_dim not in (None, 4 * channels[0]):
        problems.append(f"time_embedding_dim={time_dim} (supported: None or 4 * block_out_channels[0])")
    num_classes, adm = _class_embedding(cfg, problems)
    heads_kw = _heads(cfg, channels, problems)
    if problems:
        raise ConversionError("diffusers UNet config has unsupported options: " + "; ".join(problems))
    fields = dict(
        in_channels=cfg.get("in_channels", 4),
        out_channels=cfg.get("out_channels", 4),
        model_channels=channels[0],
        channel_mult=tuple(c // channels[0] for c in channels),
        num_res_blocks=layers,
        attention_resolutions=tuple(2**level for level, a in reversed(list(enumerate(attn_levels))) if a),  # (4, 2, 1)
        transformer_depth=depth,
        context_dim=context_dim,
        use_linear_in_transformer=bool(cfg.get("use_linear_projection", False)),
        use_scale_shift_norm=cfg.get("resnet_time_scale_shift", "default") == "scale_shift",
        num_classes=num_classes,
        adm_in_channels=adm,
        dropout=float(cfg.get("dropout", 0.0)),
        flip_sin_to_cos=bool(cfg.get("flip_sin_to_cos", True)),
        freq_shift=float(cfg.get("freq_shift", 0)),
        **heads_kw,
    )
    fields.update(overrides)
    return UNetConfig(**fields)


def _per_level(value: Any, levels: int) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


def _single(value: Any, levels: int, name: str, problems: list[str]) -> Any:
    """One value for every level (our UNet has no per-level variation of this option)."""
    values = _per_level(value, levels)
    if len(set(values)) != 1:
        problems.append(f"{name}={value!r} (supported: one value for all levels)")
    return values[0]


def _class_embedding(cfg: Mapping[str, Any], problems: list[str]) -> tuple[Any, Any]:
    kind, n = cfg.get("class_embed_type"), cfg.get("num_class_embeds")
    if kind is None:
        return n, None
    if kind == "projection":
        return "sequential", cfg.get("projection_class_embeddings_input_dim")
    problems.append(f"class_embed_type={kind!r} (supported: None with num_class_embeds, or 'projection')")
    return None, None


def _heads(cfg: Mapping[str, Any], channels: list[int], problems: list[str]) -> dict[str, int]:
    """diffusers' per-level head counts -> num_heads (same count everywhere) or num_head_channels (same dim).

    diffusers' `attention_head_dim` is, for this model, the number of heads (a historical misnomer) unless
    `num_attention_heads` is given.
    """
    heads = _per_level(cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8), len(channels))
    if len(set(heads)) == 1:
        return dict(num_heads=heads[0], num_head_channels=-1)
    dims = {c // h for c, h in zip(channels, heads)}
    if len(dims) == 1 and all(c % h == 0 for c, h in zip(channels, heads)):
        return dict(num_heads=-1, num_head_channels=dims.pop())
    problems.append(f"heads per level {heads} for channels {channels} (supported: equal heads or equal head dim)")
    return {}


def convert_diffusers_unet(state_dict: Mapping[str, Any], config: UNetConfig) -> dict[str, Any]:
    """Converts a diffusers UNet2DConditionModel state dict (torch tensors or arrays) into our params tree.

    Returns the tree to use as `{"params": tree}`; raises ConversionError listing missing, unexpected and
    mis-shaped keys. Shapes are checked against `jax.eval_shape` of our model's init (nothing allocated).
    """
    expected = expected_shapes(functools.partial(init_unet, UNetModel(config)), jax.random.key(0))
    return convert_state_dict(state_dict, expected, source="diffusers UNet2DConditionModel",
                              embeddings=("class_embedding",))


def load_diffusers_unet(folder: str | pathlib.Path, **overrides: Any) -> tuple[UNetConfig, dict[str, Any]]:
    """Reads a diffusers UNet folder (`config.json` + `diffusion_pytorch_model.safetensors`, as written by
    `save_pretrained`) and returns (UNetConfig, params tree). No network access."""
    folder = pathlib.Path(folder)
    config_path, weights_path = folder / "config.json", folder / "diffusion_pytorch_model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist (expected a diffusers UNet folder from save_pretrained)")
    config = unet_config_from_diffusers(json.loads(config_path.read_text()), **overrides)
    return config, convert_diffusers_unet(load_state_dict(weights_path), config)
