"""diffusers `UNet2DConditionModel` -> `ldm_jax.models.unet.UNetModel`: its config and its weights.

- `unet_config_from_diffusers(config)`: the diffusers config (`model.config` or a loaded config.json) ->
  `UNetConfig`, refusing every option our UNet does not implement, with the option's name and value.
  SD 1/2 and SDXL (per-level `transformer_layers_per_block`, `addition_embed_type="text_time"`).
- `unet_config_to_diffusers(config)`: the inverse, a config `UNet2DConditionModel(**config)` accepts.
- `convert_diffusers_unet(state_dict, config)`: strict key-by-key conversion via `convert/common.py`
  (our module names are diffusers' with `name_N` for numbered children; `time_embedding` and SDXL's
  `add_embedding` keep diffusers' literal `linear_1` / `linear_2`, which export must not split: pass
  `LITERAL_NAMES` to `common.params_to_state_dict`).
- `load_diffusers_unet(folder)`: a saved diffusers UNet folder (config.json + safetensors) -> (config, params).

Depths: diffusers writes one `transformer_layers_per_block` entry for every level, attending or not (SDXL base
[1, 2, 10]); SGM writes 0 where a level has no attention ([0, 2, 10]). Import keeps an int as it is and turns a
list into our per-level tuple with 0 at levels without attention (the last level excepted: its depth is the mid
block's), so both sources give the same UNetConfig; export writes 1 for those 0s.
"""
from __future__ import annotations

import functools
import json
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

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
# always float32; addition_embed_type_num_heads: used by the "text" addition embedding only; sample_size: any size).
_HANDLED = {
    "in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
    "only_cross_attention", "mid_block_only_cross_attention", "dropout", "cross_attention_dim",
    "transformer_layers_per_block", "attention_head_dim", "num_attention_heads", "use_linear_projection",
    "class_embed_type", "num_class_embeds", "projection_class_embeddings_input_dim", "resnet_time_scale_shift",
    "flip_sin_to_cos", "freq_shift", "time_embedding_dim", "upcast_attention", "addition_embed_type_num_heads",
    "sample_size", "addition_embed_type", "addition_time_embed_dim",
}
# diffusers TimestepEmbedding attributes (time_embedding, add_embedding), not numbered children `linear.1`.
LITERAL_NAMES = ("linear_1", "linear_2")
# Modules whose 2-D `weight` is an embedding table (class labels), not a Linear weight.
EMBEDDINGS = ("class_embedding",)


def unet_config_from_diffusers(config: Mapping[str, Any], **overrides: Any) -> UNetConfig:
    """Builds the UNetConfig equivalent to a diffusers UNet2DConditionModel config (a dict-like).

    `overrides` set UNetConfig fields diffusers does not describe (e.g. `position_embedding=(8, 8)`); run-time
    options (attention, remat, dtypes) are not config fields but arguments of `build_unet`.
    Raises ConversionError naming every unsupported option.
    """
    return encoder_config_from_diffusers(config, decoder=True, source="diffusers UNet", **overrides)


def encoder_config_from_diffusers(config: Mapping[str, Any], *, decoder: bool, source: str,
                                  **overrides: Any) -> UNetConfig:
    """`unet_config_from_diffusers` for a UNet (`decoder=True`) or for a model that copies only its encoder and
    mid block (`decoder=False`: diffusers' ControlNetModel, whose config has no up_block_types, out_channels and
    dropout; the caller removes its own options first). `source` names the model in the ConversionError."""
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
    if decoder and up != expected_up:
        problems.append(f"up_block_types={up} (supported: the mirror of down_block_types, {expected_up})")
    if any(c % channels[0] for c in channels):
        problems.append(f"block_out_channels={channels} (supported: multiples of the first)")
    depth = _depths(cfg.get("transformer_layers_per_block", 1), attn_levels, problems)
    layers = _single(cfg.get("layers_per_block", 2), levels, "layers_per_block", problems)
    context_dim = _single(cfg.get("cross_attention_dim", 1280), levels, "cross_attention_dim", problems)
    time_dim = cfg.get("time_embedding_dim")
    if time_dim not in (None, 4 * channels[0]):
        problems.append(f"time_embedding_dim={time_dim} (supported: None or 4 * block_out_channels[0])")
    num_classes, adm = _class_embedding(cfg, problems)
    addition = _addition_embedding(cfg, num_classes, problems)
    if addition:
        adm = cfg.get("projection_class_embeddings_input_dim")
    heads_kw = _heads(cfg, channels, attn_levels, problems)
    if problems:
        raise ConversionError(f"{source} config has unsupported options: " + "; ".join(problems))
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
        **addition,
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


def _depths(value: Any, attn_levels: list[bool], problems: list[str]) -> int | tuple[int, ...]:
    """transformer_layers_per_block -> transformer_depth: an int stays; a list (one int per level) becomes a tuple
    with 0 at levels without attention but the last (whose depth is the mid block's). Nested lists (per-block
    depths, which need reverse_transformer_layers_per_block) are refused."""
    levels = len(attn_levels)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    values = list(value) if isinstance(value, (list, tuple)) else None
    if (values is None or len(values) != levels
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in values)):
        problems.append(f"transformer_layers_per_block={value!r} (supported: an int, or one int per level "
                        f"({levels} levels))")
        return 1
    return tuple(v if attends or level == levels - 1 else 0
                 for level, (v, attends) in enumerate(zip(values, attn_levels)))


def _addition_embedding(cfg: Mapping[str, Any], num_classes: Any, problems: list[str]) -> dict[str, Any]:
    """addition_embed_type None or "text_time" (SDXL) -> UNetConfig fields ({} for None)."""
    kind = cfg.get("addition_embed_type")
    if kind is None:
        if cfg.get("addition_time_embed_dim") is not None:
            problems.append(f"addition_time_embed_dim={cfg['addition_time_embed_dim']!r} without "
                            "addition_embed_type='text_time'")
        return {}
    if kind != "text_time":
        problems.append(f"addition_embed_type={kind!r} (supported: None or 'text_time')")
        return {}
    dim, width = cfg.get("addition_time_embed_dim"), cfg.get("projection_class_embeddings_input_dim")
    if dim is None or width is None:
        problems.append(f"addition_embed_type='text_time' needs addition_time_embed_dim and "
                        f"projection_class_embeddings_input_dim (got {dim!r}, {width!r})")
        return {}
    if num_classes is not None:
        problems.append(f"addition_embed_type='text_time' with a class embedding (class_embed_type="
                        f"{cfg.get('class_embed_type')!r}, num_class_embeds={cfg.get('num_class_embeds')!r}; "
                        "supported: text_time alone)")
        return {}
    return dict(addition_embed_type="text_time", addition_time_embed_dim=dim)


def _class_embedding(cfg: Mapping[str, Any], problems: list[str]) -> tuple[Any, Any]:
    kind, n = cfg.get("class_embed_type"), cfg.get("num_class_embeds")
    if kind is None:
        return n, None
    if kind == "projection":
        return "sequential", cfg.get("projection_class_embeddings_input_dim")
    problems.append(f"class_embed_type={kind!r} (supported: None with num_class_embeds, or 'projection')")
    return None, None


def _heads(cfg: Mapping[str, Any], channels: list[int], attn_levels: list[bool],
           problems: list[str]) -> dict[str, int]:
    """diffusers' per-level head counts -> num_heads (same count everywhere) or num_head_channels (same dim).

    diffusers' `attention_head_dim` is, for this model, the number of heads (a historical misnomer) unless
    `num_attention_heads` is given (SDXL base: [5, 10, 20] heads of 64 channels). Only levels that attend and
    the last (the mid block's) count: diffusers ignores the entries of DownBlock2D levels.
    """
    heads = _per_level(cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8), len(channels))
    if len(heads) == len(channels):
        used = sorted({level for level, attends in enumerate(attn_levels) if attends} | {len(channels) - 1})
        channels, heads = [channels[level] for level in used], [heads[level] for level in used]
    if not all(isinstance(h, int) and h > 0 for h in heads):
        problems.append(f"attention heads {heads} (supported: positive ints)")
        return {}
    if len(set(heads)) == 1:
        return dict(num_heads=heads[0], num_head_channels=-1)
    dims = {c // h for c, h in zip(channels, heads)}
    if len(dims) == 1 and all(c % h == 0 for c, h in zip(channels, heads)):
        return dict(num_heads=-1, num_head_channels=dims.pop())
    problems.append(f"heads {heads} for the attending levels' channels {channels} (supported: equal heads or "
                    "equal head dim)")
    return {}


def convert_diffusers_unet(state_dict: Mapping[str, Any], config: UNetConfig, *, dtype: Any = np.float32
                           ) -> dict[str, Any]:
    """Converts a diffusers UNet2DConditionModel state dict (torch tensors or arrays) into our params tree
    (float32, or `dtype` bfloat16).

    Returns the tree to use as `{"params": tree}`; raises ConversionError listing missing, unexpected and
    mis-shaped keys. Shapes are checked against `jax.eval_shape` of our model's init (nothing allocated).
    """
    # num_time_ids=0: the params of a text_time UNet depend on adm_in_channels only, and every width allows 0.
    expected = expected_shapes(functools.partial(init_unet, UNetModel(config), num_time_ids=0), jax.random.key(0))
    return convert_state_dict(state_dict, expected, source="diffusers UNet2DConditionModel",
                              embeddings=EMBEDDINGS, dtype=dtype)


def unet_config_to_diffusers(config: UNetConfig, sample_size: int = 64) -> dict[str, Any]:
    """The diffusers UNet2DConditionModel config (JSON-ready: lists, no tuples) of the same architecture; the
    inverse of `unet_config_from_diffusers` (which maps it back to `config` when per-level depths are 0 at the
    levels without attention, as that import writes them).

    Heads are written as diffusers' per-level `attention_head_dim` head counts (num_head_channels 64 at 320
    channels -> 5); a per-level depth of 0 (a level without attention) is written as 1, as diffusers' SDXL config
    has it. Raises ValueError for UNets diffusers' UNet2DConditionModel cannot express: plain self-attention
    blocks without cross-attention, avg-pool downsampling, a learned position embedding.
    """
    if not config.use_spatial_transformer or not config.conv_resample or config.position_embedding is not None:
        raise ValueError("diffusers UNet2DConditionModel needs spatial transformers (use_spatial_transformer=True) "
                         "and conv resampling (conv_resample=True), and has no learned position embedding "
                         f"(position_embedding={config.position_embedding})")
    channels = [config.model_channels * m for m in config.channel_mult]
    attn = [2**level in config.attention_resolutions for level in range(len(channels))]
    heads: Any = config.num_heads
    if config.num_head_channels > 0:  # levels without attention: any positive count (diffusers ignores it)
        heads = [max(1, c // config.num_head_channels) for c in channels]
    depth: Any = config.transformer_depth
    if not isinstance(depth, int):
        depth = [max(1, d) for d in depth]
    out: dict[str, Any] = dict(
        sample_size=sample_size, in_channels=config.in_channels, out_channels=config.out_channels,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        mid_block_type="UNetMidBlock2DCrossAttn", block_out_channels=channels,
        layers_per_block=config.num_res_blocks, cross_attention_dim=config.context_dim,
        attention_head_dim=heads, transformer_layers_per_block=depth,
        use_linear_projection=config.use_linear_in_transformer,
        resnet_time_scale_shift="scale_shift" if config.use_scale_shift_norm else "default",
        flip_sin_to_cos=config.flip_sin_to_cos, dropout=config.dropout,
        freq_shift=int(config.freq_shift) if float(config.freq_shift).is_integer() else config.freq_shift,
        act_fn="silu", norm_num_groups=32, norm_eps=1e-5, downsample_padding=1, center_input_sample=False,
    )
    if config.num_classes == "sequential":
        out.update(class_embed_type="projection", projection_class_embeddings_input_dim=config.adm_in_channels)
    elif config.num_classes is not None:
        out.update(num_class_embeds=config.num_classes)
    if config.addition_embed_type == "text_time":
        out.update(addition_embed_type="text_time", addition_time_embed_dim=config.addition_time_embed_dim,
                   projection_class_embeddings_input_dim=config.adm_in_channels)
    return out


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
