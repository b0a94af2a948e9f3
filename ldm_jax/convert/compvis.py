"""CompVis single-file checkpoints (latent-diffusion / stable-diffusion `.ckpt` and `.safetensors`) <-> LDM params.

A CompVis `LatentDiffusion` state dict holds, under fixed prefixes:
- `model.diffusion_model.*`: the openaimodel `UNetModel` (time_embed, label_emb, input_blocks.N.M, middle_block,
  output_blocks.N.M, out; ResBlocks in_layers/emb_layers/out_layers/skip_connection, SpatialTransformers named
  as in diffusers, plain AttentionBlocks with a fused `qkv` conv1d in the legacy head-interleaved order);
- `first_stage_model.*`: the autoencoder (encoder/decoder `down.N.block.M`, `down.N.attn.M` with 1x1-conv
  q/k/v/proj_out, `mid.block_1/attn_1/block_2`, `nin_shortcut`, `norm_out`, quant_conv, post_quant_conv; VQ:
  `quantize.embedding`);
- `cond_stage_model.*`: SD v1's CLIP (`transformer.text_model.*`, or `transformer.*` in files saved without the
  `text_model` level), SD 2.x's OpenCLIP text tower (`model.transformer.resblocks.N` with a fused
  `attn.in_proj_weight`, `ln_1`, `mlp.c_fc`, `positional_embedding`, `token_embedding`, `ln_final`), LDM's BERT
  embedder (`transformer.*`, x-transformers names) or the class embedder (`embedding`);
- buffers: the noise schedule (`betas`, `alphas_cumprod`, ...), `scale_factor` (scale_by_std models), `logvar`,
  and the EMA copy of the UNet (`model_ema.<name without dots>`, `model_ema.decay`, `model_ema.num_updates`).

`compvis_layout(config)` builds the mapping by construction: it walks the UNet levels, the autoencoder levels
and the text encoder's blocks the way the reference builds them and pairs each CompVis module with our
module (`ldm_jax.models.*`, diffusers names), then lists every param leaf as an `Entry` (CompVis key, our
param path(s), layout codec). Import and export both read that one table:
- `convert_compvis_state_dict` / `load_compvis_checkpoint` check every key in torch layout by its CompVis
  name (`common.assemble_params`: missing, unexpected and mis-shaped keys in one `ConversionError`), then
  transpose into our layout (conv OIHW -> HWIO, Linear (out, in) -> (in, out), fused qkv split);
- `export_compvis` / `save_compvis` write our params back under CompVis names (plus the schedule buffers).

Keys that hold no parameter of our model are handled by the explicit rules in `_drop_known_extras` (each with
its reason, logged); schedule buffers, `scale_factor` and a constant `logvar` are compared with the config and
raise `ConversionError` when they differ. Nothing else is skipped.

SD 2.x: the reference embeds prompts with OpenCLIP's penultimate layer (`layer="penultimate"`). Our SD2
config (configs/sd_v2.py, and `ldm_yaml` for that yaml) has 23 blocks and `output_layer="last"`, as diffusers
ships it; a CompVis file's 24th block is then never evaluated and is dropped explicitly. A config with
`num_layers=24, output_layer="penultimate"` loads all 24 blocks instead (same context).
Exported OpenCLIP towers hold the blocks our params have; `text_projection` and `logit_scale` (unused for the
context) are not written. The original code loads such files with `strict=False`, as it loads every file.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import traverse_util

from ldm_jax.convert.checkpoint_io import load_state_dict, save_safetensors
from ldm_jax.convert.common import (ConversionError, assemble_params, expected_shapes, flax_to_torch_leaf,
                                    path_to_diffusers_key, to_numpy_state_dict, torch_to_flax_leaf)
from ldm_jax.diffusion.schedule import NoiseSchedule, make_schedule
from ldm_jax.ldm import LDMConfig, LoadedModel, init_params, ldm_config
from ldm_jax.models.text import BertEmbedderConfig, ClassEmbedderConfig, ClipTextConfig

log = logging.getLogger(__name__)

Path = tuple[str, ...]
Shape = tuple[int, ...]

UNET_PREFIX = "model.diffusion_model."
FIRST_STAGE_PREFIX = "first_stage_model."
COND_PREFIX = "cond_stage_model."
EMA_PREFIX = "model_ema."
HF_CLIP_PREFIX = "cond_stage_model.transformer.text_model."
HF_CLIP_PREFIX_FLAT = "cond_stage_model.transformer."  # CLIP saved without the `text_model` level
OPENCLIP_PREFIX = "cond_stage_model.model."
CLIP_LAYOUTS = ("hf", "openclip")
# DDPM.register_schedule buffers: exactly the arrays of our NoiseSchedule, under the same names.
SCHEDULE_BUFFERS = tuple(f.name for f in dataclasses.fields(NoiseSchedule))
SCHEDULE_RTOL, SCHEDULE_ATOL = 1e-5, 1e-8  # both sides are float64 computations rounded to float32


# --------------------------------------------------------------------------------------------------- codecs


class Codec(NamedTuple):
    """How one CompVis tensor and our param leaf (or leaves) relate.

    to_flax: torch-layout array -> our leaves (a tuple, one per path of the entry);
    to_torch: our leaves -> the torch-layout array; torch_shape: our leaf shapes -> the torch shape.
    """

    name: str
    to_flax: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_torch: Callable[[Sequence[np.ndarray]], np.ndarray]
    torch_shape: Callable[[Sequence[Shape]], Shape]


# 1x1 convs (VAE attention q/k/v/proj_out) and conv1d (UNet AttentionBlock proj_out) stored as Dense kernels.
CONV1X1_AS_DENSE = Codec("conv1x1", lambda a: (a[:, :, 0, 0].T,), lambda xs: xs[0].T[:, :, None, None],
                         lambda ss: (ss[0][1], ss[0][0], 1, 1))
CONV1D_AS_DENSE = Codec("conv1d", lambda a: (a[:, :, 0].T,), lambda xs: xs[0].T[:, :, None],
                        lambda ss: (ss[0][1], ss[0][0], 1))


def _legacy_qkv(heads: int, weight: bool) -> Codec:
    """openaimodel AttentionBlock `qkv` (conv1d, QKVAttentionLegacy order: per head [q_h, k_h, v_h]) <->
    to_q/to_k/to_v. Weight (3C, C, 1) <-> three Dense kernels (C, C); bias (3C,) <-> three (C,)."""

    def to_flax(a):
        if weight:
            w = a[:, :, 0].reshape(heads, 3, -1, a.shape[1])  # (heads, q/k/v, head_dim, C_in)
            return tuple(w[:, s].reshape(-1, a.shape[1]).T for s in range(3))
        b = a.reshape(heads, 3, -1)
        return tuple(b[:, s].reshape(-1) for s in range(3))

    def to_torch(xs):
        if weight:
            c_in = xs[0].shape[0]
            w = np.stack([x.T.reshape(heads, -1, c_in) for x in xs], axis=1)  # (heads, 3, head_dim, C_in)
            return w.reshape(-1, c_in)[:, :, None]
        return np.stack([x.reshape(heads, -1) for x in xs], axis=1).reshape(-1)

    def shape(ss):
        return (3 * ss[0][1], ss[0][0], 1) if weight else (3 * ss[0][0],)

    return Codec(f"qkv_legacy[{heads}]", to_flax, to_torch, shape)


def _in_proj(weight: bool) -> Codec:
    """torch MultiheadAttention `in_proj_weight` (3D, D) = [W_q; W_k; W_v] (bias (3D,)) <-> q/k/v_proj."""

    def to_flax(a):
        parts = np.split(a, 3, axis=0)
        return tuple(p.T for p in parts) if weight else tuple(parts)

    def to_torch(xs):
        return np.concatenate([x.T for x in xs] if weight else list(xs), axis=0)

    def shape(ss):
        return (3 * ss[0][1], ss[0][0]) if weight else (3 * ss[0][0],)

    return Codec("in_proj", to_flax, to_torch, shape)


def _leaf_codec(path: Path) -> Codec:
    """The shared layout rules of `common` (conv OIHW <-> HWIO, Linear transposed, norms / embeddings / biases
    as stored) for our param leaf `path`."""
    kind = "embedding" if path[-1] == "embedding" else "param"
    torch_path = _torch_leaf_path(path)
    return Codec("leaf", lambda a: (torch_to_flax_leaf(torch_path, a, kind)[1],),
                 lambda xs: flax_to_torch_leaf(path, xs[0])[1],
                 lambda ss: flax_to_torch_leaf(path, _abstract(ss[0]))[1].shape)


def _torch_leaf_path(path: Path) -> Path:
    """Our leaf path with the torch leaf name: kernel / scale / embedding -> weight, bias -> bias."""
    return (*path[:-1], "bias" if path[-1] == "bias" else "weight")


def _abstract(shape: Shape) -> np.ndarray:
    return np.broadcast_to(np.float32(0), shape)  # a shape to transpose, without memory


# --------------------------------------------------------------------------------------------------- layout


@dataclasses.dataclass(frozen=True)
class Entry:
    """One CompVis tensor: its key, the param path(s) it holds (inside the LDM params) and the codec."""

    key: str
    paths: tuple[Path, ...]
    codec: Codec

    def torch_shape(self, shapes: Mapping[Path, Shape]) -> Shape:
        """The tensor's torch-layout shape, given {param path: shape} of our params."""
        return tuple(self.codec.torch_shape([shapes[p] for p in self.paths]))


@dataclasses.dataclass(frozen=True)
class Layout:
    """The CompVis layout of one LDMConfig: every entry, our param shapes, and how the text tower is stored."""

    entries: tuple[Entry, ...]
    shapes: Mapping[Path, Shape]
    clip_layout: str | None
    text_prefix: str | None

    def torch_shapes(self) -> dict[str, Shape]:
        """{CompVis key: torch-layout shape} of every entry."""
        return {e.key: e.torch_shape(self.shapes) for e in self.entries}


class _Builder:
    """Collects the entries of a layout; every param leaf of the model must be claimed exactly once."""

    def __init__(self, shapes: Mapping[Path, Shape]):
        self.shapes = shapes
        self.entries: list[Entry] = []
        self.claimed: set[Path] = set()
        self.under: dict[Path, list[Path]] = {}  # module path -> every leaf below it, in order
        for leaf in sorted(shapes):
            for depth in range(1, len(leaf)):
                self.under.setdefault(leaf[:depth], []).append(leaf)

    def leaf(self, key: str, path: Path, codec: Codec | None = None) -> None:
        if path not in self.shapes:
            raise RuntimeError(f"internal: CompVis layout names {'/'.join(path)}, which the model lacks")
        if path in self.claimed:
            raise RuntimeError(f"internal: {'/'.join(path)} is mapped twice (second time to {key})")
        self.claimed.add(path)
        self.entries.append(Entry(key, (path,), codec or _leaf_codec(path)))

    def module(self, key: str, path: str | Path, codec: Codec | None = None, *, optional: bool = False) -> None:
        """Every leaf directly under our module `path` <-> `key`.weight / `key`.bias."""
        path = _path(path)
        leaves = [p for p in self.under.get(path, ()) if len(p) == len(path) + 1]
        if not leaves and not optional:
            raise RuntimeError(f"internal: CompVis module {key} has no counterpart {'/'.join(path)} in the model")
        for p in leaves:
            self.leaf(f"{key}.{_torch_leaf_path(p)[-1]}", p, codec if p[-1] == "kernel" else None)  # biases: as stored

    def subtree(self, key: str, path: str | Path) -> None:
        """A subtree named as the torch module is (numbered children `name_N` <-> `name.N`, see
        `common.path_to_diffusers_key`)."""
        path = _path(path)
        leaves = self.under.get(path, [])
        if not leaves:
            raise RuntimeError(f"internal: CompVis module {key} has no counterpart {'/'.join(path)} in the model")
        for p in leaves:
            self.leaf(f"{key}.{path_to_diffusers_key(_torch_leaf_path(p)[len(path):])}", p)

    def fused(self, key: str, parent: str | Path, children: Sequence[str], weight: Codec, bias: Codec,
              weight_name: str = "weight", bias_name: str = "bias") -> None:
        """One CompVis tensor (fused q/k/v) <-> the kernels (and biases) of several of our Dense layers."""
        parent = _path(parent)
        for leaf, codec, name in (("kernel", weight, weight_name), ("bias", bias, bias_name)):
            paths = tuple((*parent, c, leaf) for c in children)
            for p in paths:
                if p not in self.shapes or p in self.claimed:
                    raise RuntimeError(f"internal: fused {key} cannot claim {'/'.join(p)}")
                self.claimed.add(p)
            self.entries.append(Entry(f"{key}{name}", paths, codec))


def _path(path: str | Path) -> Path:
    return tuple(path.split("/")) if isinstance(path, str) else tuple(path)


def _unet(b: _Builder, cfg, root: str) -> None:
    """openaimodel UNetModel, walked as its __init__ builds input_blocks / middle_block / output_blocks."""
    p = UNET_PREFIX
    at = lambda rel: f"{root}/{rel}"  # noqa: E731
    b.module(f"{p}time_embed.0", at("time_embedding/linear_1"))
    b.module(f"{p}time_embed.2", at("time_embedding/linear_2"))
    if cfg.num_classes == "sequential":
        b.module(f"{p}label_emb.0.0", at("class_embedding/linear_1"))
        b.module(f"{p}label_emb.0.2", at("class_embedding/linear_2"))
    elif cfg.num_classes is not None:
        b.module(f"{p}label_emb", at("class_embedding"))
    b.module(f"{p}input_blocks.0.0", at("conv_in"))
    levels, k = len(cfg.channel_mult), 1
    channels = [cfg.model_channels * m for m in cfg.channel_mult]
    for level in range(levels):
        attn = 2**level in cfg.attention_resolutions
        for j in range(cfg.num_res_blocks):
            _unet_resblock(b, f"{p}input_blocks.{k}.0", at(f"down_blocks_{level}/resnets_{j}"))
            if attn:
                _unet_attention(b, cfg, channels[level], f"{p}input_blocks.{k}.1",
                                at(f"down_blocks_{level}/attentions_{j}"))
            k += 1
        if level < levels - 1:
            if cfg.conv_resample:
                b.module(f"{p}input_blocks.{k}.0.op", at(f"down_blocks_{level}/downsamplers_0/conv"))
            k += 1
    _unet_resblock(b, f"{p}middle_block.0", at("mid_block/resnets_0"))
    _unet_attention(b, cfg, channels[-1], f"{p}middle_block.1", at("mid_block/attentions_0"))
    _unet_resblock(b, f"{p}middle_block.2", at("mid_block/resnets_1"))
    k = 0
    for i, level in enumerate(reversed(range(levels))):
        attn = 2**level in cfg.attention_resolutions
        for j in range(cfg.num_res_blocks + 1):
            _unet_resblock(b, f"{p}output_blocks.{k}.0", at(f"up_blocks_{i}/resnets_{j}"))
            if attn:
                _unet_attention(b, cfg, channels[level], f"{p}output_blocks.{k}.1", at(f"up_blocks_{i}/attentions_{j}"))
            if level > 0 and j == cfg.num_res_blocks and cfg.conv_resample:
                b.module(f"{p}output_blocks.{k}.{2 if attn else 1}.conv", at(f"up_blocks_{i}/upsamplers_0/conv"))
            k += 1
    b.module(f"{p}out.0", at("conv_norm_out"))
    b.module(f"{p}out.2", at("conv_out"))


def _unet_resblock(b: _Builder, key: str, path: str) -> None:
    for torch_name, ours in (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
                             ("out_layers.0", "norm2"), ("out_layers.3", "conv2")):
        b.module(f"{key}.{torch_name}", f"{path}/{ours}")
    b.module(f"{key}.skip_connection", f"{path}/conv_shortcut", optional=True)  # only when channels change


def _unet_attention(b: _Builder, cfg, channels: int, key: str, path: str) -> None:
    if cfg.use_spatial_transformer:
        b.subtree(key, path)  # SpatialTransformer: diffusers' Transformer2DModel names are CompVis' names
        return
    heads, _ = cfg.heads_at(channels)
    b.module(f"{key}.norm", f"{path}/group_norm")
    b.fused(f"{key}.qkv.", path, ("to_q", "to_k", "to_v"), _legacy_qkv(heads, True), _legacy_qkv(heads, False))
    b.module(f"{key}.proj_out", f"{path}/to_out_0", CONV1D_AS_DENSE)


def _autoencoder(b: _Builder, cfg, root: str) -> None:
    """ldm.modules.diffusionmodules.model Encoder/Decoder + quant convs (+ VQ codebook)."""
    p, n = FIRST_STAGE_PREFIX, len(cfg.ch_mult)
    for part in ("encoder", "decoder"):
        b.module(f"{p}{part}.conv_in", f"{root}/{part}/conv_in")
        for i, ours in ((1, "resnets_0"), (2, "resnets_1")):
            _vae_resblock(b, f"{p}{part}.mid.block_{i}", f"{root}/{part}/mid_block/{ours}")
        _vae_attention(b, f"{p}{part}.mid.attn_1", f"{root}/{part}/mid_block/attentions_0")
        b.module(f"{p}{part}.norm_out", f"{root}/{part}/conv_norm_out")
        b.module(f"{p}{part}.conv_out", f"{root}/{part}/conv_out")
    for level in range(n):
        ours = f"{root}/encoder/down_blocks_{level}"
        for j in range(cfg.num_res_blocks):
            _vae_resblock(b, f"{p}encoder.down.{level}.block.{j}", f"{ours}/resnets_{j}")
            if cfg.level_has_attention(level):
                _vae_attention(b, f"{p}encoder.down.{level}.attn.{j}", f"{ours}/attentions_{j}")
        if level != n - 1:
            b.module(f"{p}encoder.down.{level}.downsample.conv", f"{ours}/downsamplers_0/conv")
        ours = f"{root}/decoder/up_blocks_{n - 1 - level}"  # decoder.up is indexed by level, ours deepest-first
        for j in range(cfg.num_res_blocks + 1):
            _vae_resblock(b, f"{p}decoder.up.{level}.block.{j}", f"{ours}/resnets_{j}")
            if cfg.level_has_attention(level):
                _vae_attention(b, f"{p}decoder.up.{level}.attn.{j}", f"{ours}/attentions_{j}")
        if level != 0:
            b.module(f"{p}decoder.up.{level}.upsample.conv", f"{ours}/upsamplers_0/conv")
    b.module(f"{p}quant_conv", f"{root}/quant_conv")
    b.module(f"{p}post_quant_conv", f"{root}/post_quant_conv")
    if cfg.kind == "vq":
        b.module(f"{p}quantize.embedding", f"{root}/quantize/embedding")


def _vae_resblock(b: _Builder, key: str, path: str) -> None:
    for name in ("norm1", "conv1", "norm2", "conv2"):
        b.module(f"{key}.{name}", f"{path}/{name}")
    b.module(f"{key}.nin_shortcut", f"{path}/conv_shortcut", optional=True)


def _vae_attention(b: _Builder, key: str, path: str) -> None:
    b.module(f"{key}.norm", f"{path}/group_norm")
    for torch_name, ours in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out_0")):
        b.module(f"{key}.{torch_name}", f"{path}/{ours}", CONV1X1_AS_DENSE)


def _openclip(b: _Builder, cfg: ClipTextConfig, root: str) -> None:
    """open_clip text tower (FrozenOpenCLIPEmbedder.model without `visual`) <-> our ClipTextTransformer."""
    p = OPENCLIP_PREFIX
    b.leaf(f"{p}token_embedding.weight", _path(f"{root}/embeddings/token_embedding/embedding"))
    b.leaf(f"{p}positional_embedding", _path(f"{root}/embeddings/position_embedding/embedding"))
    for i in range(cfg.num_layers):
        key, ours = f"{p}transformer.resblocks.{i}", f"{root}/encoder/layers_{i}"
        b.module(f"{key}.ln_1", f"{ours}/layer_norm1")
        b.fused(f"{key}.attn.", f"{ours}/self_attn", ("q_proj", "k_proj", "v_proj"), _in_proj(True), _in_proj(False),
                "in_proj_weight", "in_proj_bias")
        b.module(f"{key}.attn.out_proj", f"{ours}/self_attn/out_proj")
        b.module(f"{key}.ln_2", f"{ours}/layer_norm2")
        b.module(f"{key}.mlp.c_fc", f"{ours}/mlp/fc1")
        b.module(f"{key}.mlp.c_proj", f"{ours}/mlp/fc2")
    b.module(f"{p}ln_final", f"{root}/final_layer_norm")


def _cond_stage(b: _Builder, cfg, clip_layout: str | None, text_prefix: str | None, root: str) -> None:
    if isinstance(cfg, ClipTextConfig):
        if clip_layout == "openclip":
            _openclip(b, cfg, root)
        else:
            b.subtree(text_prefix.rstrip("."), root)  # transformers CLIPTextModel names (text_model.*)
    elif isinstance(cfg, BertEmbedderConfig):
        b.subtree(f"{COND_PREFIX}transformer", root)  # x-transformers TransformerWrapper names
    elif isinstance(cfg, ClassEmbedderConfig):
        b.module(f"{COND_PREFIX}embedding", f"{root}/embedding")
    else:
        raise ConversionError(f"CompVis layout: unsupported cond stage {type(cfg).__name__}")


def default_clip_layout(config: LDMConfig) -> str | None:
    """How a CLIP cond stage is written when not told: "openclip" for GELU towers (OpenCLIP ViT-H/14, SD 2.x),
    "hf" (transformers CLIPTextModel, SD v1) for quick_gelu towers (OpenAI CLIP); None without CLIP."""
    cond = config.cond_stage
    if not isinstance(cond, ClipTextConfig):
        return None
    return "openclip" if cond.hidden_act == "gelu" else "hf"


def model_shapes(config: LDMConfig) -> dict[Path, Shape]:
    """{param path: shape} of the LDM params of `config` (abstract: nothing is allocated)."""
    return dict(_model_shapes(config))


@functools.lru_cache(maxsize=8)
def _model_shapes(config: LDMConfig) -> Mapping[Path, Shape]:
    return types.MappingProxyType(expected_shapes(functools.partial(init_params, config), jax.random.key(0)))


def compvis_layout(config: LDMConfig | Any, *, clip_layout: str | None = None,
                   text_prefix: str = HF_CLIP_PREFIX) -> Layout:
    """The CompVis layout of `config` (an LDMConfig or a config with its sections).

    clip_layout: "hf" or "openclip" for CLIP cond stages (default: `default_clip_layout`); text_prefix: the
    key prefix of an "hf" CLIP tower (HF_CLIP_PREFIX, or HF_CLIP_PREFIX_FLAT for files without `text_model`).
    """
    config = as_ldm_config(config)
    clip_layout = clip_layout or default_clip_layout(config)
    if clip_layout is not None and clip_layout not in CLIP_LAYOUTS:
        raise ValueError(f"clip_layout={clip_layout!r}; expected one of {CLIP_LAYOUTS}")
    if not isinstance(config.cond_stage, ClipTextConfig):
        clip_layout = None
    return _layout(config, clip_layout, text_prefix if clip_layout == "hf" else None)


@functools.lru_cache(maxsize=8)
def _layout(config: LDMConfig, clip_layout: str | None, text_prefix: str | None) -> Layout:
    shapes = _model_shapes(config)
    b = _Builder(shapes)
    _unet(b, config.unet, "unet")
    _autoencoder(b, config.first_stage, "first_stage")
    if config.cond_stage is not None:
        _cond_stage(b, config.cond_stage, clip_layout, text_prefix, "cond_stage")
    if ("logvar",) in shapes:
        b.leaf("logvar", ("logvar",))
    unclaimed = sorted("/".join(p) for p in shapes if p not in b.claimed)
    if unclaimed:
        raise RuntimeError(f"internal: the CompVis layout does not cover {unclaimed}")
    return Layout(tuple(b.entries), shapes, clip_layout, text_prefix)


def as_ldm_config(config: LDMConfig | Any) -> LDMConfig:
    """An LDMConfig as is; a ConfigDict/mapping with first_stage, unet, diffusion (, cond_stage, ldm) sections
    through `ldm.ldm_config`."""
    return config if isinstance(config, LDMConfig) else ldm_config(config)


# --------------------------------------------------------------------------------------------------- import


def detect_clip_layout(state_dict: Mapping[str, Any], config: LDMConfig) -> tuple[str | None, str]:
    """(clip_layout, text_prefix) of the CLIP tower in a CompVis state dict (defaults when it has none)."""
    if not isinstance(config.cond_stage, ClipTextConfig):
        return None, HF_CLIP_PREFIX
    keys = list(state_dict)
    if any(k.startswith(OPENCLIP_PREFIX) for k in keys):
        return "openclip", HF_CLIP_PREFIX
    if any(k.startswith(HF_CLIP_PREFIX) for k in keys):
        return "hf", HF_CLIP_PREFIX
    if any(k.startswith(HF_CLIP_PREFIX_FLAT) for k in keys):
        return "hf", HF_CLIP_PREFIX_FLAT
    return default_clip_layout(config), HF_CLIP_PREFIX


def convert_compvis_state_dict(state_dict: Mapping[str, Any], config: LDMConfig | Any, *, use_ema: bool = False,
                               source: str = "CompVis checkpoint") -> dict[str, Any]:
    """A CompVis LatentDiffusion state dict (name -> array or torch tensor) -> LDM params, strictly.

    Returns {"first_stage", "unet", "cond_stage"?, "logvar"?} of float32 numpy arrays (`ldm_jax.ldm` layout).
    use_ema: take the UNet from the EMA copy (`model_ema.*`), which must then be complete.
    Raises ConversionError naming every missing, unexpected and mis-shaped CompVis key (shapes in torch
    layout), and for schedule buffers / scale_factor / logvar that disagree with `config`.
    """
    config = as_ldm_config(config)
    sd = to_numpy_state_dict(state_dict)
    clip_layout, text_prefix = detect_clip_layout(sd, config)
    layout = compvis_layout(config, clip_layout=clip_layout, text_prefix=text_prefix)
    dropped: dict[str, str] = {}
    _select_unet(sd, layout, use_ema, dropped, source)
    _check_buffers(sd, config, dropped, source)
    _drop_known_extras(sd, layout, config, dropped)
    torch_shapes = layout.torch_shapes()
    # 1. Every key by its CompVis name, shapes in torch layout.
    assemble_params({(k,): (k, v) for k, v in sd.items()}, {(k,): s for k, s in torch_shapes.items()}, source=source)
    # 2. Into our layout; assemble_params checks the result once more and nests it.
    converted: dict[Path, tuple[str, np.ndarray]] = {}
    for entry in layout.entries:
        for path, array in zip(entry.paths, entry.codec.to_flax(sd[entry.key])):
            converted[path] = (entry.key, array)
    _log_dropped(dropped, source)
    return assemble_params(converted, layout.shapes, source=source)


def load_compvis_checkpoint(path: str | os.PathLike, config: LDMConfig | Any, *,
                            use_ema: bool = False) -> dict[str, Any]:
    """Reads a CompVis `.ckpt` (torch zip/legacy pickle, loaded without running code) or `.safetensors` file
    and converts it strictly (see `convert_compvis_state_dict`). Returns the LDM params (numpy float32)."""
    return convert_compvis_state_dict(load_state_dict(path), config, use_ema=use_ema, source=str(path))


def load_compvis_model(path: str | os.PathLike, config: LDMConfig | Any, *, tokenizer: str | os.PathLike | None = None,
                       use_ema: bool = False) -> LoadedModel:
    """A `LoadedModel` from a CompVis single file: params, config, and the tokenizer of `tokenizer` (a local
    directory, loaded as `config.tokenizer_kind`) or None."""
    return loaded_model_from_state_dict(load_state_dict(path), config, tokenizer=tokenizer, use_ema=use_ema,
                                        source=str(path))


def loaded_model_from_state_dict(state_dict: Mapping[str, Any], config: LDMConfig | Any, *,
                                 tokenizer: str | os.PathLike | None = None, use_ema: bool = False,
                                 source: str = "checkpoint") -> LoadedModel:
    """`load_compvis_model` for a state dict already read (e.g. to infer its config first).

    For scale_by_std models the checkpoint's `scale_factor` buffer (the value training settled on) replaces
    the config's, as the reference does when it restores such a model.
    """
    config = as_ldm_config(config)
    if config.diffusion.scale_by_std and "scale_factor" in state_dict:
        value = float(np.asarray(state_dict["scale_factor"]))
        log.info("%s: scale_by_std model, scale_factor %.8g from the checkpoint", source, value)
        config = dataclasses.replace(config, diffusion=dataclasses.replace(config.diffusion, scale_factor=value))
    params = convert_compvis_state_dict(state_dict, config, use_ema=use_ema, source=source)
    tok = None
    if tokenizer is not None:
        if config.tokenizer_kind is None:
            raise ValueError(f"tokenizer={tokenizer!s} given, but this model has no text cond stage")
        from ldm_jax.models.tokenizer import load_tokenizer  # transformers is imported only when needed

        tok = load_tokenizer(tokenizer, config.tokenizer_kind)
    return LoadedModel(config=config, params=params, tokenizer=tok, model_id=source)


def infer_stable_diffusion_config(state_dict: Mapping[str, Any]) -> str:
    """Which Stable Diffusion config a CompVis state dict fits, by its keys and shapes: "sd_v1",
    "sd_v1_inpainting" (9 input channels) or "sd_v2" (OpenCLIP text tower). The name of a configs/ file.

    Raises ValueError when the file is not a Stable Diffusion checkpoint (no `model.diffusion_model.` UNet).
    """
    conv_in = "model.diffusion_model.input_blocks.0.0.weight"
    if conv_in not in state_dict:
        raise ValueError(f"not a Stable Diffusion CompVis checkpoint: no {conv_in!r} (give --config for other "
                         f"LDM models)")
    if any(k.startswith("cond_stage_model.model.transformer.") for k in state_dict):
        return "sd_v2"
    return "sd_v1_inpainting" if np.shape(state_dict[conv_in])[1] == 9 else "sd_v1"


def ema_key(key: str) -> str:
    """LitEma's buffer name for a UNet param: `model.diffusion_model.a.0.b` -> `model_ema.diffusion_modela0b`."""
    return EMA_PREFIX + key[len("model."):].replace(".", "")


def _select_unet(sd: dict[str, np.ndarray], layout: Layout, use_ema: bool, dropped: dict[str, str],
                 source: str) -> None:
    """With use_ema, moves the EMA weights onto the UNet keys; every other model_ema.* key is dropped."""
    if use_ema:
        unet_keys = [e.key for e in layout.entries if e.key.startswith(UNET_PREFIX)]
        names = {k: ema_key(k) for k in unet_keys}
        if len(set(names.values())) != len(names):
            raise ConversionError(f"{source}: LitEma names of this UNet collide; cannot pick the EMA weights")
        missing = [names[k] for k in unet_keys if names[k] not in sd]
        if missing:
            have = sum(k.startswith(EMA_PREFIX) for k in sd)
            raise ConversionError(f"{source}: use_ema=True but {len(missing)} of {len(unet_keys)} EMA weights are "
                                  f"missing (e.g. {missing[:3]}); the file has {have} {EMA_PREFIX}* keys")
        for key in unet_keys:
            if key in sd:
                dropped[key] = "non-EMA UNet weight (use_ema=True loads the EMA copy)"
            sd[key] = sd.pop(names[key])
    for key in [k for k in sd if k.startswith(EMA_PREFIX)]:
        dropped[key] = ("EMA bookkeeping" if key in (f"{EMA_PREFIX}decay", f"{EMA_PREFIX}num_updates")
                        else "EMA copy of the UNet (load it with use_ema=True)")
        del sd[key]


def _check_buffers(sd: dict[str, np.ndarray], config: LDMConfig, dropped: dict[str, str], source: str) -> None:
    """Schedule buffers, scale_factor and a non-learned logvar must agree with the config; then dropped."""
    d = config.diffusion
    problems, checked = [], {}
    present = [name for name in SCHEDULE_BUFFERS if name in sd]
    if present:
        ours = make_schedule(d.schedule)
        for name in present:
            got, want = np.asarray(sd[name], np.float64), np.asarray(getattr(ours, name), np.float64)
            if got.shape != want.shape:
                problems.append(f"{name}: checkpoint shape {got.shape} vs {want.shape} (num_timesteps)")
            elif not np.allclose(got, want, rtol=SCHEDULE_RTOL, atol=SCHEDULE_ATOL):
                problems.append(f"{name}: max |difference| {np.max(np.abs(got - want)):.3g}")
            checked[name] = "noise-schedule buffer, equal to the config's schedule"
    if "scale_factor" in sd:
        got = float(np.asarray(sd["scale_factor"]))
        if not np.isclose(got, d.scale_factor, rtol=1e-6, atol=0.0):
            problems.append(f"scale_factor: checkpoint {got:.8g} vs config {d.scale_factor:.8g} (set "
                            f"--config.ldm.scale_factor={got:.8g})")
        checked["scale_factor"] = "latent scale buffer, equal to the config's scale_factor"
    if "logvar" in sd and not d.learn_logvar:
        got = np.asarray(sd["logvar"])
        if got.shape != (d.schedule.num_timesteps,) or not np.all(got == np.float32(d.logvar_init)):
            problems.append(f"logvar: checkpoint {got.shape} not the constant logvar_init={d.logvar_init} "
                            f"(a learned logvar needs learn_logvar=True)")
        checked["logvar"] = "constant logvar buffer, equal to logvar_init"
    if problems:
        s = d.schedule
        raise ConversionError(
            f"{source}: the checkpoint's diffusion buffers differ from the config (beta_schedule={s.beta_schedule}, "
            f"num_timesteps={s.num_timesteps}, linear_start={s.linear_start}, linear_end={s.linear_end}): "
            + "; ".join(problems))
    for name in checked:
        del sd[name]
    dropped.update(checked)


def _drop_known_extras(sd: dict[str, np.ndarray], layout: Layout, config: LDMConfig, dropped: dict[str, str]) -> None:
    """The explicit list of keys that are no parameter of our model, with the reason for each."""
    rules: list[tuple[Callable[[str], bool], str]] = []
    cond = config.cond_stage
    if layout.clip_layout == "hf":
        position_ids = f"{layout.text_prefix}embeddings.position_ids"
        rules.append((lambda k: k == position_ids, "transformers CLIP buffer (position indices), rebuilt by the model"))
    if layout.clip_layout == "openclip":
        unused = {f"{OPENCLIP_PREFIX}text_projection", f"{OPENCLIP_PREFIX}logit_scale"}
        rules.append((lambda k: k in unused, "OpenCLIP pooled-embedding projection / logit scale, unused for the "
                                             "cross-attention context"))
        rules.append((lambda k: k == f"{OPENCLIP_PREFIX}attn_mask",
                      "OpenCLIP causal-mask buffer, rebuilt by the model"))
        extra = f"{OPENCLIP_PREFIX}transformer.resblocks.{cond.num_layers}."
        beyond = f"{OPENCLIP_PREFIX}transformer.resblocks.{cond.num_layers + 1}."
        if cond.output_layer == "last" and any(k.startswith(extra) for k in sd) and not any(
                k.startswith(beyond) for k in sd):
            rules.append((lambda k: k.startswith(extra), f"OpenCLIP block {cond.num_layers}, never evaluated: SD 2.x "
                                                         f"embeds prompts with the penultimate layer"))
    if isinstance(cond, BertEmbedderConfig):
        rules.append((lambda k: k.startswith(f"{COND_PREFIX}transformer.to_logits."),
                      "x-transformers language-model head, unused: BERTEmbedder returns embeddings"))
    for key in list(sd):
        for matches, reason in rules:
            if matches(key):
                dropped[key] = reason
                del sd[key]
                break


def _log_dropped(dropped: Mapping[str, str], source: str) -> None:
    by_reason: dict[str, list[str]] = {}
    for key, reason in dropped.items():
        by_reason.setdefault(reason, []).append(key)
    for reason, keys in by_reason.items():
        log.info("%s: dropped %d key(s) (%s), e.g. %s", source, len(keys), reason, keys[0])


# --------------------------------------------------------------------------------------------------- export


def export_compvis(params: Mapping[str, Any], config: LDMConfig | Any, *, clip_layout: str | None = None,
                   include_schedule: bool = True, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """LDM params -> a CompVis LatentDiffusion state dict {key: numpy array in torch layout}.

    params: {"first_stage", "unet", "cond_stage"?, "logvar"?} matching `config` exactly (checked).
    clip_layout: "hf" (cond_stage_model.transformer.text_model.*) or "openclip" (cond_stage_model.model.*);
      default `default_clip_layout(config)`.
    include_schedule: also write the schedule buffers (betas, alphas_cumprod, ...) and, for scale_by_std
      models, `scale_factor`, as the reference's state dict has them (float32).
    dtype: the dtype of the exported weights (float32 by default; e.g. np.float16 for half-size files).
    """
    config = as_ldm_config(config)
    layout = compvis_layout(config, clip_layout=clip_layout)
    flat = {path: np.asarray(value) for path, value in traverse_util.flatten_dict(dict(params)).items()}
    assemble_params({p: ("/".join(p), a) for p, a in flat.items()}, layout.shapes, source="params to export")
    out = {e.key: np.ascontiguousarray(e.codec.to_torch([flat[p] for p in e.paths]), dtype=dtype)
           for e in layout.entries}
    if include_schedule:
        schedule = make_schedule(config.diffusion.schedule)
        out.update({name: np.asarray(getattr(schedule, name), np.float32) for name in SCHEDULE_BUFFERS})
        if config.diffusion.scale_by_std:
            out["scale_factor"] = np.asarray(config.diffusion.scale_factor, np.float32)
    return out


def save_compvis(path: str | os.PathLike, params: Mapping[str, Any], config: LDMConfig | Any, **kwargs: Any) -> None:
    """Writes `export_compvis(params, config, **kwargs)` to a `.safetensors` file (atomically)."""
    save_safetensors(path, export_compvis(params, config, **kwargs), metadata={"format": "pt"})


__all__ = [
    "CLIP_LAYOUTS", "ConversionError", "Entry", "Layout", "SCHEDULE_BUFFERS", "as_ldm_config", "compvis_layout",
    "convert_compvis_state_dict", "default_clip_layout", "detect_clip_layout", "ema_key", "export_compvis",
    "load_compvis_checkpoint", "load_compvis_model", "model_shapes", "save_compvis",
]
