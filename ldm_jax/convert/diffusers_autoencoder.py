"""diffusers `AutoencoderKL` / `VQModel` -> ldm_jax autoencoder params and configs.

Our module names mirror diffusers' (ldm_jax/models/autoencoder.py), so the key mapping is the shared
`convert_state_dict` plus two explicit extras: the VQ codebook `quantize.embedding.weight` is an embedding
table, and the pre-0.14 attention names (`query`, `key`, `value`, `proj_attn`) found in older saved VAEs
are renamed to `to_q`, `to_k`, `to_v`, `to_out.0`. Loading is strict: any missing, unexpected or mis-shaped
key raises `ConversionError` listing them all.
"""
from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from ldm_jax.convert.checkpoint_io import load_state_dict
from ldm_jax.convert.common import ConversionError, convert_state_dict, expected_shapes
from ldm_jax.models.autoencoder import AutoencoderConfig, build_autoencoder, init_autoencoder

_CLASS_KINDS = {"AutoencoderKL": "kl", "VQModel": "vq"}
_DOWN_TYPES = {"DownEncoderBlock2D": False, "AttnDownEncoderBlock2D": True}
_UP_TYPES = {"UpDecoderBlock2D": False, "AttnUpDecoderBlock2D": True}
# diffusers config entries that do not change the architecture (scaling lives with the diffusion stage).
_NON_ARCHITECTURE = {
    "_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "scaling_factor",
    "shift_factor", "latents_mean", "latents_std", "force_upcast", "lookup_from_codebook",
}
# config entry -> the only value our architecture implements.
_FIXED = {
    "act_fn": "silu", "norm_num_groups": 32, "norm_type": "group", "mid_block_add_attention": True,
    "use_quant_conv": True, "use_post_quant_conv": True,
}
_ARCHITECTURE = {
    "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
    "layers_per_block", "latent_channels", "sample_size", "num_vq_embeddings", "vq_embed_dim",
} | set(_FIXED)
_DEPRECATED_ATTENTION = re.compile(r"^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$")
_ATTENTION_RENAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def config_from_diffusers(diffusers_config: Mapping[str, Any], *, kind: str | None = None) -> AutoencoderConfig:
    """Our AutoencoderConfig from a diffusers AutoencoderKL/VQModel config dict (its config.json).

    kind: "kl" or "vq"; taken from `_class_name` when None. Raises ValueError for unknown entries and for
    features this implementation does not have (other activations, spatial norm, no quant conv, ...).
    """
    cfg = dict(diffusers_config)
    kind = kind or _CLASS_KINDS.get(cfg.get("_class_name"))
    if kind not in ("kl", "vq"):
        raise ValueError(f"diffusers config: cannot tell kl from vq (_class_name={cfg.get('_class_name')!r}); "
                         "pass kind='kl' or kind='vq'")
    unknown = sorted(set(cfg) - _ARCHITECTURE - _NON_ARCHITECTURE)
    if unknown:
        raise ValueError(f"diffusers config: unknown entries {unknown}")
    unsupported = [f"{k}={cfg[k]!r} (supported: {v!r})" for k, v in _FIXED.items() if k in cfg and cfg[k] != v]
    if unsupported:
        raise ValueError(f"diffusers config: unsupported {', '.join(unsupported)}")
    channels = list(cfg.get("block_out_channels", (64,)))
    ch = channels[0]
    if any(c % ch for c in channels):
        raise ValueError(f"diffusers config: block_out_channels {channels} are not multiples of the first")
    resolution = _square(cfg.get("sample_size", 32))
    attn = _attention_levels(cfg.get("down_block_types", ("DownEncoderBlock2D",)),
                             cfg.get("up_block_types", ("UpDecoderBlock2D",)), len(channels))
    latent = cfg.get("latent_channels", 4 if kind == "kl" else 3)
    vq = kind == "vq"
    return AutoencoderConfig(
        kind=kind,
        in_channels=cfg.get("in_channels", 3),
        out_ch=cfg.get("out_channels", 3),
        ch=ch,
        ch_mult=tuple(c // ch for c in channels),
        num_res_blocks=cfg.get("layers_per_block", 1),
        attn_resolutions=tuple(resolution // 2**i for i in attn),
        resolution=resolution,
        z_channels=latent,
        embed_dim=(cfg.get("vq_embed_dim") or latent) if vq else latent,
        double_z=not vq,
        n_embed=cfg.get("num_vq_embeddings", 256) if vq else 0,
    )


def to_diffusers_config(config: AutoencoderConfig) -> dict[str, Any]:
    """The diffusers AutoencoderKL/VQModel constructor kwargs of the same architecture as `config`.

    Raises ValueError when diffusers cannot express it (a KL model with embed_dim != z_channels).
    """
    if config.kind == "kl" and config.embed_dim != config.z_channels:
        raise ValueError(f"diffusers AutoencoderKL needs embed_dim == z_channels; got {config.embed_dim} "
                         f"and {config.z_channels}")
    n = len(config.ch_mult)
    attn = [config.level_has_attention(i) for i in range(n)]
    out = dict(
        in_channels=config.in_channels,
        out_channels=config.out_ch,
        down_block_types=tuple("AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn),
        up_block_types=tuple("AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attn)),
        block_out_channels=tuple(config.ch * m for m in config.ch_mult),
        layers_per_block=config.num_res_blocks,
        act_fn="silu",
        latent_channels=config.z_channels,
        norm_num_groups=32,
        sample_size=config.resolution,
    )
    if config.kind == "vq":
        out.update(num_vq_embeddings=config.n_embed, vq_embed_dim=config.embed_dim)
    return out


def convert_diffusers_autoencoder(
    state_dict: Mapping[str, Any], config: AutoencoderConfig, *, source: str = "diffusers autoencoder",
    dtype: Any = np.float32,
) -> dict[str, Any]:
    """diffusers AutoencoderKL/VQModel state dict (name -> torch tensor or array) -> our params (float32, or
    `dtype` bfloat16).

    Returns the params tree (without the "params" level) of `build_autoencoder(config)`. Raises
    ConversionError listing every missing, unexpected or mis-shaped key when the checkpoint does not
    match `config` (another architecture, a UNet, a VQ checkpoint for a KL model, ...).
    """
    model = build_autoencoder(config)
    expected = expected_shapes(lambda key: init_autoencoder(model, key), jax.random.key(0))
    return convert_state_dict(state_dict, expected, source=source, rename=_rename, embeddings=("embedding",),
                              dtype=dtype)


def load_diffusers_autoencoder(directory: str | pathlib.Path) -> tuple[AutoencoderConfig, dict[str, Any]]:
    """Reads a diffusers autoencoder folder (config.json + diffusion_pytorch_model.safetensors).

    Returns (config, params) for `build_autoencoder(config).apply({"params": params}, ...)`.
    """
    directory = pathlib.Path(directory)
    config_path, weights_path = directory / "config.json", directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"diffusers autoencoder folder {directory} has no {path.name}")
    config = config_from_diffusers(json.loads(config_path.read_text()))
    return config, convert_diffusers_autoencoder(load_state_dict(weights_path), config, source=str(weights_path))


def _rename(key: str) -> str:
    match = _DEPRECATED_ATTENTION.match(key)
    if match:
        prefix, name, leaf = match.groups()
        return f"{prefix}{_ATTENTION_RENAMES[name]}.{leaf}"
    return key


def _square(sample_size: Any) -> int:
    if isinstance(sample_size, (list, tuple)):
        if len(set(sample_size)) != 1:
            raise ValueError(f"diffusers config: non-square sample_size {sample_size} is not supported")
        return int(sample_size[0])
    return int(sample_size)


def _attention_levels(down_types, up_types, n_levels: int) -> list[int]:
    """Encoder levels with attention; the decoder's up blocks must mirror them (our config has one list)."""
    down_types, up_types = list(down_types), list(up_types)
    for name, types, table in (("down_block_types", down_types, _DOWN_TYPES), ("up_block_types", up_types, _UP_TYPES)):
        if len(types) != n_levels or any(t not in table for t in types):
            raise ValueError(f"diffusers config: {name}={types}; expected {n_levels} of {sorted(table)}")
    down = [_DOWN_TYPES[t] for t in down_types]
    up = [_UP_TYPES[t] for t in reversed(up_types)]
    if down != up:
        raise ValueError(f"diffusers config: attention in down_block_types {down_types} is not mirrored by "
                         f"up_block_types {up_types}")
    return [i for i, has in enumerate(down) if has]


__all__ = [
    "ConversionError",
    "config_from_diffusers",
    "convert_diffusers_autoencoder",
    "load_diffusers_autoencoder",
    "to_diffusers_config",
]
