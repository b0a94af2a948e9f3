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

SGM single files (Stability's generative-models `DiffusionEngine`: sd_xl_base_1.0, sd_xl_refiner_1.0) hold the same
`model.diffusion_model.*` UNet (SDXL's text_time MLP as openaimodel's `label_emb.0.0` / `label_emb.0.2`, SGM's
num_classes "sequential" fed the conditioner's vector [pooled bigG embedding, sinusoids of the size / crop /
aesthetic numbers], the vector our UNet builds) and `first_stage_model.*` autoencoder, and the text towers under
`conditioner.embedders.N.` in embedder order: the base's CLIP ViT-L as `conditioner.embedders.0.transformer.
text_model.*` (transformers names; our cond_stage) and OpenCLIP bigG as `conditioner.embedders.1.model.*` (open_clip
names, all 32 blocks, `text_projection` a (width, projection_dim) matrix applied as x @ P, i.e. our Dense kernel as
stored; our cond_stage_2); the refiner's bigG alone as `conditioner.embedders.0.model.*` (our cond_stage). SDXL
configs (`is_sgm`: a second tower or a text_time UNet) read and write this layout, the others the CompVis one;
a file of the other layout is refused in one line. The only schedule buffer is DiscreteDenoiser's
`denoiser.sigmas` (sqrt((1 - alphas_cumprod) / alphas_cumprod), checked like the CompVis buffers).

`compvis_layout(config)` builds the mapping by construction: it walks the UNet levels, the autoencoder levels
and the text encoder's blocks the way the reference builds them and pairs each CompVis module with our
module (`ldm_jax.models.*`, diffusers names), then lists every param leaf as an `Entry` (CompVis key, our
param path(s), layout codec). Import and export both read that one table:
- `convert_compvis_state_dict` / `load_compvis_checkpoint` check every key in torch layout by its CompVis
  name (`common.assemble_params`: missing, unexpected and mis-shaped keys in one `ConversionError`), then
  transpose into our layout (conv OIHW -> HWIO, Linear (out, in) -> (in, out), fused qkv split);
- `export_compvis` / `save_compvis` write our params back under CompVis names (plus the schedule buffers).

`infer_config(state_dict)` reads a file's LDMConfig off its tensor shapes and buffers (any size; what the weights
cannot tell follows the family's convention, see its docstring); `ldm_jax.presets.matching_preset` names the
preset it equals.

Keys that hold no parameter of our model are handled by the explicit rules in `_drop_known_extras` (each with
its reason, logged); schedule buffers, `scale_factor` and a constant `logvar` are compared with the config and
raise `ConversionError` when they differ. Nothing else is skipped.

Known SGM extras, dropped on import with a logged count: transformers' `position_ids` buffer, OpenCLIP's
`logit_scale` (and `attn_mask`); `denoiser.sigmas` after the schedule check. Export writes `denoiser.sigmas` but
neither `logit_scale` (our params do not hold it) nor `position_ids`; diffusers' single-file loader
(`StableDiffusionXLPipeline.from_single_file`) reads the export and gives back the diffusers weights exactly.

SD 2.x: the reference embeds prompts with OpenCLIP's penultimate layer (`layer="penultimate"`). Our SD2
presets (sd_v2, sd_v2_768_v; `ldm_yaml` for that yaml) have 23 blocks and `output_layer="last"`, as diffusers
ships it; a CompVis file's 24th block is then never evaluated and is dropped explicitly. A config with
`num_layers=24, output_layer="penultimate"` loads all 24 blocks instead (same context).
Exported OpenCLIP towers hold the blocks our params have; `logit_scale` and, for towers without a projection
(SD 2.x), `text_projection` (unused for the context) are not written. The original code loads such files with
`strict=False`, as it loads every file.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from flax import traverse_util

from ldm_jax.convert.checkpoint_io import load_state_dict, save_safetensors
from ldm_jax.convert.common import (ConversionError, assemble_params, flax_to_torch_leaf,
                                    path_to_diffusers_key, to_numpy_state_dict, torch_to_flax_leaf)
from ldm_jax.diffusion.schedule import NoiseSchedule, ScheduleConfig, make_betas, make_schedule
from ldm_jax.ldm import DiffusionConfig, LDMConfig, LoadedModel, ldm_config, param_shapes
from ldm_jax.models.autoencoder import AutoencoderConfig
from ldm_jax.models.text import BertEmbedderConfig, ClassEmbedderConfig, ClipTextConfig
from ldm_jax.models.unet import UNetConfig
from ldm_jax.presets import get_preset

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
# SGM (Stability's generative-models, SDXL): GeneralConditioner embedders N hold the text towers, transformers
# CLIP (FrozenCLIPEmbedder) under `conditioner.embedders.N.transformer.text_model.`, OpenCLIP
# (FrozenOpenCLIPEmbedder2) under `conditioner.embedders.N.model.`; DiscreteDenoiser's `sigmas` buffer.
SGM_PREFIX = "conditioner.embedders."
SGM_HF_CLIP = "transformer.text_model."  # after SGM_PREFIX + "N."
SGM_OPENCLIP = "model."
SGM_SIGMAS = "denoiser.sigmas"
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


# OpenCLIP's `text_projection` (width, projection_dim) is applied as x @ P: our Dense kernel as it is stored.
AS_STORED = Codec("as_stored", lambda a: (a,), lambda xs: xs[0], lambda ss: tuple(ss[0]))


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
class TextTower:
    """Where one CLIP text tower is stored: our params tree (`cond_stage` / `cond_stage_2`), its layout ("hf":
    transformers CLIPTextModel names, "openclip": open_clip's) and the key prefix."""

    name: str
    layout: str
    prefix: str


@dataclasses.dataclass(frozen=True)
class Layout:
    """The CompVis or SGM layout of one LDMConfig: every entry, our param shapes, and how the text towers are
    stored (`clip_layout` / `text_prefix`: those of the first CLIP tower, or None)."""

    entries: tuple[Entry, ...]
    shapes: Mapping[Path, Shape]
    clip_layout: str | None
    text_prefix: str | None
    towers: tuple[TextTower, ...] = ()
    sgm: bool = False

    def torch_shapes(self) -> dict[str, Shape]:
        """{CompVis key: torch-layout shape} of every entry."""
        return {e.key: e.torch_shape(self.shapes) for e in self.entries}


class LayoutBuilder:
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


def _unet(b: LayoutBuilder, cfg, root: str) -> None:
    """openaimodel UNetModel, walked as its __init__ builds input_blocks / middle_block / output_blocks."""
    unet_encoder_entries(b, cfg, root, UNET_PREFIX)
    _unet_decoder(b, cfg, root, UNET_PREFIX)


def unet_encoder_entries(b: LayoutBuilder, cfg: UNetConfig, root: str, prefix: str) -> None:
    """The encoder half of openaimodel's UNetModel (time_embed, label_emb, input_blocks, middle_block) under the key
    `prefix` ("model.diffusion_model." for a UNet, "control_model." for a ControlNet's copy) <-> our params under
    `root` ("unet"; "" for a tree whose top level is the encoder's, as a ControlNet's), added to `b`."""
    p = prefix
    at = lambda rel: f"{root}/{rel}" if root else rel  # noqa: E731
    b.module(f"{p}time_embed.0", at("time_embedding/linear_1"))
    b.module(f"{p}time_embed.2", at("time_embedding/linear_2"))
    if cfg.num_classes == "sequential":
        b.module(f"{p}label_emb.0.0", at("class_embedding/linear_1"))
        b.module(f"{p}label_emb.0.2", at("class_embedding/linear_2"))
    elif cfg.num_classes is not None:
        b.module(f"{p}label_emb", at("class_embedding"))
    if cfg.addition_embed_type == "text_time":  # SGM: num_classes "sequential" fed the conditioner's vector
        b.module(f"{p}label_emb.0.0", at("add_embedding/linear_1"))
        b.module(f"{p}label_emb.0.2", at("add_embedding/linear_2"))
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


def _unet_decoder(b: LayoutBuilder, cfg: UNetConfig, root: str, p: str) -> None:
    """The decoder half of openaimodel's UNetModel: output_blocks and out."""
    at = lambda rel: f"{root}/{rel}"  # noqa: E731
    levels, channels = len(cfg.channel_mult), [cfg.model_channels * m for m in cfg.channel_mult]
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


def _unet_resblock(b: LayoutBuilder, key: str, path: str) -> None:
    for torch_name, ours in (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
                             ("out_layers.0", "norm2"), ("out_layers.3", "conv2")):
        b.module(f"{key}.{torch_name}", f"{path}/{ours}")
    b.module(f"{key}.skip_connection", f"{path}/conv_shortcut", optional=True)  # only when channels change


def _unet_attention(b: LayoutBuilder, cfg, channels: int, key: str, path: str) -> None:
    if cfg.use_spatial_transformer:
        b.subtree(key, path)  # SpatialTransformer: diffusers' Transformer2DModel names are CompVis' names
        return
    heads, _ = cfg.heads_at(channels)
    b.module(f"{key}.norm", f"{path}/group_norm")
    b.fused(f"{key}.qkv.", path, ("to_q", "to_k", "to_v"), _legacy_qkv(heads, True), _legacy_qkv(heads, False))
    b.module(f"{key}.proj_out", f"{path}/to_out_0", CONV1D_AS_DENSE)


def _autoencoder(b: LayoutBuilder, cfg, root: str) -> None:
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


def _vae_resblock(b: LayoutBuilder, key: str, path: str) -> None:
    for name in ("norm1", "conv1", "norm2", "conv2"):
        b.module(f"{key}.{name}", f"{path}/{name}")
    b.module(f"{key}.nin_shortcut", f"{path}/conv_shortcut", optional=True)


def _vae_attention(b: LayoutBuilder, key: str, path: str) -> None:
    b.module(f"{key}.norm", f"{path}/group_norm")
    for torch_name, ours in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out_0")):
        b.module(f"{key}.{torch_name}", f"{path}/{ours}", CONV1X1_AS_DENSE)


def _openclip(b: LayoutBuilder, cfg: ClipTextConfig, root: str, p: str) -> None:
    """open_clip text tower (FrozenOpenCLIPEmbedder(2).model without `visual`) under prefix `p` <-> our
    ClipTextTransformer; `text_projection` when the tower has a projection (SDXL's bigG)."""
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
    if cfg.projection_dim is not None:
        b.leaf(f"{p}text_projection", _path(f"{root}/text_projection/kernel"), AS_STORED)


def _cond_stage(b: LayoutBuilder, cfg, tower: TextTower | None, root: str) -> None:
    if isinstance(cfg, ClipTextConfig):
        if tower.layout == "openclip":
            _openclip(b, cfg, root, tower.prefix)
        elif cfg.projection_dim is not None:
            raise ConversionError(f"CompVis / SGM layout: {tower.name} is a transformers-CLIP tower with a projection "
                                  f"(projection_dim={cfg.projection_dim}); those files hold projections only in "
                                  "OpenCLIP towers (hidden_act 'gelu')")
        else:
            b.subtree(tower.prefix.rstrip("."), root)  # transformers CLIPTextModel names (text_model.*)
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


def is_sgm(config: LDMConfig) -> bool:
    """Whether `config` is stored in the SGM layout (SDXL: a second text tower or a text_time UNet)."""
    return config.cond_stage_2 is not None or config.unet.addition_embed_type == "text_time"


def sgm_towers(config: LDMConfig) -> tuple[TextTower, ...]:
    """The text towers of an SGM file, in embedder order: `cond_stage` is embedder 0, `cond_stage_2` embedder 1;
    OpenCLIP (gelu) towers under `conditioner.embedders.N.model.`, transformers CLIP (quick_gelu) ones under
    `conditioner.embedders.N.transformer.text_model.` (SDXL base: CLIP ViT-L then bigG; refiner: bigG alone)."""
    towers = []
    for index, name in enumerate(config.text_towers):
        tower = getattr(config, name)
        if not isinstance(tower, ClipTextConfig):
            raise ConversionError(f"SGM layout: {name} is {type(tower).__name__}; SGM files hold CLIP text towers")
        kind = "openclip" if tower.hidden_act == "gelu" else "hf"
        prefix = f"{SGM_PREFIX}{index}.{SGM_OPENCLIP if kind == 'openclip' else SGM_HF_CLIP}"
        towers.append(TextTower(name, kind, prefix))
    return tuple(towers)


def compvis_layout(config: LDMConfig | Any, *, clip_layout: str | None = None,
                   text_prefix: str = HF_CLIP_PREFIX) -> Layout:
    """The CompVis layout of `config` (an LDMConfig or a config with its sections), or its SGM layout for SDXL
    configs (`is_sgm`: text towers `sgm_towers`, the UNet's text_time MLP as `label_emb.0.0` / `label_emb.0.2`).

    clip_layout: "hf" or "openclip" for CLIP cond stages (default: `default_clip_layout`); text_prefix: the
    key prefix of an "hf" CLIP tower (HF_CLIP_PREFIX, or HF_CLIP_PREFIX_FLAT for files without `text_model`).
    Both are CompVis options: SGM layouts fix every tower's layout and prefix (ValueError when clip_layout is
    given for one).
    """
    config = as_ldm_config(config)
    if is_sgm(config):
        if clip_layout is not None:
            raise ValueError(f"clip_layout={clip_layout!r}: an SDXL (SGM) layout stores each text tower in its fixed "
                             f"layout ({', '.join(f'{t.name}: {t.layout}' for t in sgm_towers(config))})")
        return _layout(config, None, None)
    clip_layout = clip_layout or default_clip_layout(config)
    if clip_layout is not None and clip_layout not in CLIP_LAYOUTS:
        raise ValueError(f"clip_layout={clip_layout!r}; expected one of {CLIP_LAYOUTS}")
    if not isinstance(config.cond_stage, ClipTextConfig):
        clip_layout = None
    return _layout(config, clip_layout, text_prefix if clip_layout == "hf" else None)


@functools.lru_cache(maxsize=8)
def _layout(config: LDMConfig, clip_layout: str | None, text_prefix: str | None) -> Layout:
    shapes = param_shapes(config)
    b = LayoutBuilder(shapes)
    _unet(b, config.unet, "unet")
    _autoencoder(b, config.first_stage, "first_stage")
    sgm = is_sgm(config)
    if sgm:
        towers = sgm_towers(config)
    elif clip_layout is not None:
        towers = (TextTower("cond_stage", clip_layout, OPENCLIP_PREFIX if clip_layout == "openclip" else text_prefix),)
    else:
        towers = ()
    if towers:
        for tower in towers:
            _cond_stage(b, getattr(config, tower.name), tower, tower.name)
        clip_layout, text_prefix = towers[0].layout, (towers[0].prefix if towers[0].layout == "hf" else None)
    elif config.cond_stage is not None:
        _cond_stage(b, config.cond_stage, None, "cond_stage")
    if ("logvar",) in shapes:
        b.leaf("logvar", ("logvar",))
    unclaimed = sorted("/".join(p) for p in shapes if p not in b.claimed)
    if unclaimed:
        raise RuntimeError(f"internal: the CompVis layout does not cover {unclaimed}")
    return Layout(tuple(b.entries), shapes, clip_layout, text_prefix, towers, sgm)


def as_ldm_config(config: LDMConfig | Any) -> LDMConfig:
    """An LDMConfig as is; a ConfigDict/mapping with first_stage, unet, diffusion (, cond_stage, ldm) sections
    through `ldm.ldm_config`."""
    return config if isinstance(config, LDMConfig) else ldm_config(config)


# --------------------------------------------------------------------------------------------------- import


def detect_clip_layout(state_dict: Mapping[str, Any], config: LDMConfig) -> tuple[str | None, str]:
    """(clip_layout, text_prefix) of the CLIP tower in a CompVis state dict (defaults when it has none; SGM
    configs: (None, HF_CLIP_PREFIX), their layout is fixed)."""
    if not isinstance(config.cond_stage, ClipTextConfig) or is_sgm(config):
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
    """A CompVis LatentDiffusion or SGM DiffusionEngine state dict (name -> array or torch tensor) -> LDM params,
    strictly. SDXL configs (`is_sgm`) read the SGM layout, the others the CompVis one.

    Returns {"first_stage", "unet", "cond_stage"?, "cond_stage_2"?, "logvar"?} of float32 numpy arrays
    (`ldm_jax.ldm` layout). use_ema: take the UNet from the EMA copy (`model_ema.*`), which must then be complete.
    Raises ConversionError naming every missing, unexpected and mis-shaped key (shapes in torch layout), and for
    schedule buffers / scale_factor / logvar / denoiser.sigmas that disagree with `config`. A file of the other
    layout (an SGM file given an SD config, or the reverse) or with other text towers than the config's (an SDXL
    refiner given a base config) is a one-line ConversionError naming the file and a key.
    """
    config = as_ldm_config(config)
    sd = to_numpy_state_dict(state_dict)
    clip_layout, text_prefix = detect_clip_layout(sd, config)
    layout = compvis_layout(config, clip_layout=None if is_sgm(config) else clip_layout, text_prefix=text_prefix)
    _check_text_towers(sd, layout, source)
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
        for path, array in zip(entry.paths, entry.codec.to_flax(sd[entry.key]), strict=True):
            converted[path] = (entry.key, array)
    _log_dropped(dropped, source)
    return assemble_params(converted, layout.shapes, source=source)


def load_compvis_checkpoint(path: str | os.PathLike, config: LDMConfig | Any, *,
                            use_ema: bool = False) -> dict[str, Any]:
    """Reads a CompVis `.ckpt` (torch zip/legacy pickle, loaded without running code) or `.safetensors` file
    and converts it strictly (see `convert_compvis_state_dict`). Returns the LDM params (numpy float32)."""
    return convert_compvis_state_dict(load_state_dict(path), config, use_ema=use_ema, source=str(path))


def load_compvis_model(path: str | os.PathLike, config: LDMConfig | Any, *, tokenizer: str | os.PathLike | None = None,
                       tokenizer_2: str | os.PathLike | None = None, use_ema: bool = False) -> LoadedModel:
    """A `LoadedModel` from a CompVis or SGM single file: params, config, and the tokenizer of `tokenizer` (a
    local directory, loaded as `config.tokenizer_kind`) or None; for SDXL base models also `tokenizer_2`, the
    second tower's (both or neither)."""
    return loaded_model_from_state_dict(load_state_dict(path), config, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
                                        use_ema=use_ema, source=str(path))


def loaded_model_from_state_dict(state_dict: Mapping[str, Any], config: LDMConfig | Any, *,
                                 tokenizer: str | os.PathLike | None = None,
                                 tokenizer_2: str | os.PathLike | None = None, use_ema: bool = False,
                                 source: str = "checkpoint") -> LoadedModel:
    """`load_compvis_model` for a state dict already read (e.g. to infer its config first).

    For scale_by_std models the checkpoint's `scale_factor` buffer (the value training settled on) replaces
    the config's, as the reference does when it restores such a model. ValueError for a tokenizer the model has
    no tower for, and for an SDXL base given one of its two tokenizers (checked before any weight is converted).
    """
    config = as_ldm_config(config)
    if tokenizer is not None and config.tokenizer_kind is None:
        raise ValueError(f"tokenizer={tokenizer!s} given, but this model has no text cond stage")
    if tokenizer_2 is not None and config.cond_stage_2 is None:
        raise ValueError(f"tokenizer_2={tokenizer_2!s} given, but this model has no second text tower (cond_stage_2)")
    if config.cond_stage_2 is not None and (tokenizer is None) != (tokenizer_2 is None):
        raise ValueError(f"{source}: an SDXL base has two text towers: give both tokenizer (CLIP ViT-L's) and "
                         f"tokenizer_2 (OpenCLIP bigG's), or neither; got only "
                         f"{'tokenizer' if tokenizer is not None else 'tokenizer_2'}")
    if config.diffusion.scale_by_std and "scale_factor" in state_dict:
        value = _scalar(state_dict["scale_factor"], "scale_factor", source)
        log.info("%s: scale_by_std model, scale_factor %.8g from the checkpoint", source, value)
        config = dataclasses.replace(config, diffusion=dataclasses.replace(config.diffusion, scale_factor=value))
    params = convert_compvis_state_dict(state_dict, config, use_ema=use_ema, source=source)
    tok = tok_2 = None
    if tokenizer is not None:
        from ldm_jax.models.tokenizer import load_tokenizer  # noqa: PLC0415 (transformers: only when needed)

        tok = load_tokenizer(tokenizer, config.tokenizer_kind)
        if tokenizer_2 is not None:
            tok_2 = load_tokenizer(tokenizer_2, config.cond_stage_2.tokenizer_kind)
    return LoadedModel(config=config, params=params, tokenizer=tok, model_id=source, tokenizer_2=tok_2)


# ------------------------------------------------------------------------------------------- config inference

# What the weights cannot tell follows the preset of the model's family (the text tower's layout names the
# family; see `infer_config`): the preset's UNet heads, linear schedule end points and image size in pixels.
FAMILY_PRESETS = {
    "hf_clip": "sd_v1",  # transformers CLIP: SD 1.x
    "openclip": "sd_v2",  # OpenCLIP text tower: SD 2.x (64-wide UNet heads)
    "bert": "ldm_txt2img_1p4b",  # x-transformers BERT embedder: LDM-KL-8-G txt2img-1p4B (SD v1's UNet)
    "class": "ldm_cin256",  # class embedder as the context: LDM cin256-v2 (single-head transformers)
    None: "ldm_celebahq_vq4",  # unconditional (celebahq / ffhq / lsun-ldm-vq-4): plain attention, 32 per head
    "sgm_base": "sdxl_base",  # SGM, CLIP ViT-L + OpenCLIP towers: SDXL base (64-wide heads, 6 time ids)
    "sgm_refiner": "sdxl_refiner",  # SGM, one OpenCLIP tower: SDXL refiner (64-wide heads, 5 time ids)
}
SGM_FAMILIES = {("hf", "openclip"): "sgm_base", ("openclip",): "sgm_refiner"}  # tower layouts -> family
PLAIN_ATTENTION_FAMILY = None  # plain AttentionBlocks (no spatial transformer) take this family's UNet heads
CLIP_HEAD_WIDTH = 64  # CLIP and OpenCLIP text towers: heads = width / 64
BERT_HEAD_WIDTH = 64  # x-transformers' default dim_head
CONVENTIONAL_RESOLUTION = 256  # the first stage's `resolution` (only attn_resolutions are relative to it)
SCALE_FACTORS = {"kl": 0.18215, "vq": 1.0}
INFERABLE_SCHEDULES = ("linear", "sqrt_linear", "cosine")
DDPM_LINEAR_SCHEDULE = (1e-4, 2e-2)  # the reference's default end points, tried after the families' own


@functools.lru_cache(maxsize=None)
def _family_preset(family: str | None) -> LDMConfig:
    """The LDMConfig of the preset FAMILY_PRESETS names for `family`."""
    return ldm_config(get_preset(FAMILY_PRESETS[family]))


def _family_unet_heads(family: str | None) -> dict[str, int]:
    unet = _family_preset(family).unet
    return dict(num_heads=unet.num_heads, num_head_channels=unet.num_head_channels)


def _family_scale_factor(family: str | None, kind: str) -> float:
    """The family preset's latent scale when its first stage is of `kind` (SDXL's 0.13025), else SCALE_FACTORS."""
    preset = _family_preset(family)
    return preset.diffusion.scale_factor if preset.first_stage.kind == kind else SCALE_FACTORS[kind]


def _family_linear_schedule(family: str | None) -> tuple[float, float]:
    schedule = _family_preset(family).diffusion.schedule
    return schedule.linear_start, schedule.linear_end


def infer_config(state_dict: Mapping[str, Any], *, source: str = "CompVis checkpoint") -> LDMConfig:
    """The LDMConfig of a CompVis LatentDiffusion or SGM DiffusionEngine state dict, read off its tensor shapes
    (any size).

    Read from the weights: UNet in/out channels, model_channels, channel_mult, num_res_blocks, attention levels,
    spatial transformer or plain attention, transformer depth (one int, or one per level when levels differ:
    0 at levels without attention, the last level's = the mid block's), linear vs conv proj_in, context width,
    resample convs, scale-shift norm, class embedding (int or "sequential" with adm_in_channels); first stage KL vs VQ
    (a `quantize.embedding`), ch, ch_mult, num_res_blocks, attention levels, z_channels, double_z, embed_dim,
    n_embed, in/out channels; the text tower's layout (transformers CLIP `transformer.text_model.*` or
    `transformer.*`, OpenCLIP `model.*`, x-transformers BERT `transformer.token_emb`, class `embedding`; SGM:
    the `conditioner.embedders.N` towers), width, depth, MLP width, vocabulary, positions and an OpenCLIP
    tower's `text_projection` width (projection_dim). From the buffers when the file has them: the noise
    schedule (`betas`, else `alphas_cumprod`: linear, sqrt_linear or cosine, compared at the precision the file
    stored them in, end points rounded to float32's shortest decimals), scale_factor
    (its buffer exists only for scale_by_std models) and a constant or learned `logvar`; SGM files store no
    schedule buffer but maybe DiscreteDenoiser's `denoiser.sigmas`, read as alphas_cumprod = 1 / (1 + sigma^2).
    conditioning_key: "adm" with a class embedding, else "hybrid"/"crossattn" for spatial transformers and
    "concat"/None without, by whether the UNet takes more input channels than the latents have.

    What the weights cannot tell follows the family's preset (FAMILY_PRESETS), named by the text tower:
    - transformers CLIP (SD 1.x-like): UNet num_heads=8; CLIP heads = width / 64, quick_gelu, the last layer,
      prompts padded with the end-of-text id = vocab_size - 1; images 512 px.
    - OpenCLIP (SD 2.x-like): UNet num_head_channels=64; CLIP heads = width / 64, gelu, the penultimate layer
      (a file's N blocks give num_layers N - 1 with output_layer "last", as the preset sd_v2; the last block is
      dropped on import), prompts padded with 0; images 512 px.
    - BERT (txt2img-1p4B-like): UNet num_heads=8; dim_head 64; bert tokenizer; images 256 px.
    - class embedder (cin256-like): UNet num_heads=1; images 256 px. No cond stage (celebahq-like): images 256 px.
    - SGM (`conditioner.embedders.*`), SDXL base (tower 0 transformers CLIP, tower 1 OpenCLIP) or refiner (tower
      0 OpenCLIP; any other set of towers is a ValueError): both towers keep every block and are read at the
      penultimate block without the final LayerNorm ("penultimate_no_norm"), the OpenCLIP one with its
      `text_projection` (projection_dim from its shape), OpenCLIP padded with 0, CLIP with end-of-text; the UNet's
      `label_emb` is SDXL's text_time MLP (`addition_embed_type="text_time"`, adm_in_channels from its shape, the
      family's number of micro-conditioning numbers: 6 base, 5 refiner, and addition_time_embed_dim = (adm_in_channels
      - projection_dim) / that number, 256 for every SDXL file); UNet num_head_channels=64; scale_factor 0.13025;
      images 1024 px; force_zeros_for_empty_prompt True for the base, False for the refiner (diffusers'). A
      9-channel UNet (SDXL inpainting) gives conditioning_key "hybrid".
    UNet attention without spatial transformers gets 32 channels per head (celebahq's). Without schedule buffers:
    1000 steps of the reference's "linear" schedule, 0.00085..0.012 for text models, 0.0015..0.0195 otherwise.
    Always: eps prediction (v cannot be read from weights: a 768-v SD 2.x file needs the preset sd_v2_768_v),
    scale_factor 0.18215 for KL and 1.0 for VQ first stages (SDXL: 0.13025; unless the file's buffer says), first-stage
    resolution 256, dropout 0, diffusion.image_size = images px / downsampling factor.
    `ldm_jax.presets.matching_preset(config)` names the preset the result equals, if any.

    Raises ValueError naming the missing key when the file is not a latent diffusion checkpoint (no
    `model.diffusion_model.` UNet, no `first_stage_model.` autoencoder), and for layouts outside our configs
    (per-level res-block counts, a text width that is not a multiple of 64, an unknown cond stage).
    """
    keys = _KeyIndex(state_dict, source)
    keys.require(f"{UNET_PREFIX}input_blocks.0.0.weight", "a latent diffusion UNet (model.diffusion_model.*)")
    keys.require(f"{FIRST_STAGE_PREFIX}encoder.conv_in.weight", "a first-stage autoencoder (first_stage_model.*)")
    if keys.any_under(SGM_PREFIX):
        if "edm_mean" in keys:  # diffusers' CHECKPOINT_KEY_NAMES["playground-v2-5"]
            raise ValueError(f"{keys.source}: an EDM-trained SDXL-shaped file (Playground v2.5: 'edm_mean', "
                             f"'edm_std' latent statistics and an EDM schedule), which this converter does not support")
        towers, family = _infer_sgm_towers(keys)
    else:
        cond, family = _infer_cond_stage(keys)
        towers = [] if cond is None else [cond]
    first_stage = _infer_first_stage(keys)
    text_time = None
    if family in SGM_FAMILIES.values():
        text_time = (getattr(towers[-1], "projection_dim", None), _family_preset(family).num_time_ids)
    unet = _infer_unet(keys, _family_unet_heads(family), text_time)
    diffusion = _infer_diffusion(state_dict, keys, first_stage, unet, family)
    return LDMConfig(first_stage=first_stage, unet=unet, diffusion=diffusion,
                     cond_stage=towers[0] if towers else None, cond_stage_2=towers[1] if len(towers) > 1 else None)


class _KeyIndex:
    """Shapes and numbered children of a state dict's keys (no array is read)."""

    def __init__(self, state_dict: Mapping[str, Any], source: str, what: str = "a CompVis latent diffusion checkpoint"):
        self.state_dict, self.source, self.what = state_dict, source, what

    def __contains__(self, key: str) -> bool:
        return key in self.state_dict

    def require(self, key: str, what: str) -> None:
        if key not in self.state_dict:
            raise ValueError(f"{self.source}: not {self.what}: no {key!r} ({what}); "
                             f"it has {len(self.state_dict)} keys, e.g. {sorted(self.state_dict)[:3]}")

    def shape(self, key: str) -> Shape:
        self.require(key, "needed to infer the config")
        return tuple(int(d) for d in np.shape(self.state_dict[key]))

    def children(self, prefix: str) -> list[int]:
        """The sorted numbers N of keys `prefix` + "N." + ..."""
        numbers = set()
        for key in self.state_dict:
            if key.startswith(prefix):
                head = key[len(prefix):].split(".", 1)[0]
                if head.isdigit():
                    numbers.add(int(head))
        return sorted(numbers)

    def any_under(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.state_dict)


def infer_unet_encoder(state_dict: Mapping[str, Any], prefix: str, *, heads: Mapping[str, int] | None = None,
                       source: str = "checkpoint") -> UNetConfig:
    """The UNetConfig of an openaimodel UNet encoder (time_embed, label_emb, input_blocks, middle_block; no
    output_blocks / out, as a ControlNet's copy `control_model.*`) whose keys start with `prefix`. out_channels is
    set to in_channels (the weights have no output conv). `heads` ({"num_heads": n, "num_head_channels": -1} or the
    reverse) as the weights cannot tell them; default the SD family's: 64-channel heads (SD 2.x) when the
    transformers have linear projections or a 1024-wide context, else 8 heads (SD 1.x). `label_emb.0.*` is read as
    num_classes "sequential". ValueError naming the first missing key (see `infer_config`)."""
    keys = _KeyIndex(state_dict, source, what="an openaimodel UNet encoder")
    if heads is None:
        mid = f"{prefix}middle_block.1."
        sd2 = (f"{mid}proj_in.weight" in keys and (len(keys.shape(f"{mid}proj_in.weight")) == 2 or keys.shape(
            f"{mid}transformer_blocks.0.attn2.to_k.weight")[1] == 1024))
        heads = _family_unet_heads("openclip" if sd2 else "hf_clip")
    return _infer_unet(keys, heads, prefix=prefix, decoder=False)


def _infer_unet(keys: _KeyIndex, heads: Mapping[str, int], text_time: tuple[int | None, int] | None = None, *,
                prefix: str = UNET_PREFIX, decoder: bool = True) -> UNetConfig:
    """The UNet's config; text_time: (pooled width, number of time ids) for SGM families, whose `label_emb`
    is the text_time MLP, else None. prefix: the UNet's key prefix; decoder=False: an encoder alone (no `out.2`:
    out_channels = in_channels)."""
    p = prefix
    model_channels, in_channels = keys.shape(f"{p}input_blocks.0.0.weight")[:2]
    blocks = keys.children(f"{p}input_blocks.")
    resblock = lambda i: f"{p}input_blocks.{i}.0.in_layers.0.weight" in keys  # noqa: E731
    levels: list[list[int]] = [[]]
    downsample_convs = []
    for i in range(1, blocks[-1] + 1):
        if resblock(i):
            levels[-1].append(i)
        else:  # a Downsample: a strided conv (`op`), or an average pool without weights (conv_resample=False)
            downsample_convs.append(f"{p}input_blocks.{i}.0.op.weight" in keys)
            levels.append([])
    counts = sorted({len(level) for level in levels})
    if len(counts) != 1 or counts[0] < 1:
        raise ValueError(f"{keys.source}: UNet levels have {[len(level) for level in levels]} res blocks; "
                         f"one num_res_blocks for every level is supported")
    channel_mult = []
    for level in levels:
        width = keys.shape(f"{p}input_blocks.{level[0]}.0.out_layers.3.weight")[0]
        if width % model_channels:
            raise ValueError(f"{keys.source}: UNet level width {width} is not a multiple of model_channels "
                             f"{model_channels}")
        channel_mult.append(width // model_channels)
    attention_levels = [2**n for n, level in enumerate(levels) if keys.any_under(f"{p}input_blocks.{level[0]}.1.")]
    attention_levels.reverse()  # deepest first, as the reference's yamls list them: (4, 2, 1)
    mid = f"{p}middle_block.1."
    spatial = f"{mid}proj_in.weight" in keys
    if not spatial:
        keys.require(f"{mid}qkv.weight", "the UNet's middle attention block")
    out_channels = keys.shape(f"{p}out.2.weight")[0] if decoder else in_channels
    config = dict(in_channels=in_channels, out_channels=out_channels,
                  model_channels=model_channels, channel_mult=tuple(channel_mult), num_res_blocks=counts[0],
                  attention_resolutions=tuple(attention_levels), use_spatial_transformer=spatial,
                  conv_resample=all(downsample_convs) if downsample_convs else True,
                  use_scale_shift_norm=keys.shape(f"{p}input_blocks.1.0.emb_layers.1.weight")[0]
                  == 2 * model_channels * channel_mult[0])
    if spatial:
        config.update(heads, transformer_depth=_infer_depth(keys, levels, p),
                      context_dim=keys.shape(f"{mid}transformer_blocks.0.attn2.to_k.weight")[1],
                      use_linear_in_transformer=len(keys.shape(f"{mid}proj_in.weight")) == 2)
    else:
        config.update(_family_unet_heads(PLAIN_ATTENTION_FAMILY), context_dim=None)
    if f"{p}label_emb.weight" in keys:
        config["num_classes"] = keys.shape(f"{p}label_emb.weight")[0]
    elif f"{p}label_emb.0.0.weight" in keys and text_time is not None:
        config.update(_infer_text_time(keys, keys.shape(f"{p}label_emb.0.0.weight")[1], *text_time))
    elif f"{p}label_emb.0.0.weight" in keys:
        config.update(num_classes="sequential", adm_in_channels=keys.shape(f"{p}label_emb.0.0.weight")[1])
    return UNetConfig(**config)


def _infer_depth(keys: _KeyIndex, levels: list[list[int]], p: str = UNET_PREFIX) -> int | tuple[int, ...]:
    """transformer_depth: one int when every attending level and the mid block have the same depth, else one
    per level (0 where a level does not attend; the last level's is the mid block's, as in SGM's UNetModel)."""
    last = len(levels) - 1
    mid = len(keys.children(f"{p}middle_block.1.transformer_blocks."))
    at_level = {n: len(keys.children(f"{p}input_blocks.{level[0]}.1.transformer_blocks."))
                for n, level in enumerate(levels) if keys.any_under(f"{p}input_blocks.{level[0]}.1.")}
    if set(at_level.values()) <= {mid}:
        return mid
    if at_level.get(last, mid) != mid:
        raise ValueError(f"{keys.source}: the UNet's last level has transformer depth {at_level[last]} but its mid "
                         f"block {mid}; our UNet gives the mid block the last level's depth")
    return tuple(at_level.get(n, mid if n == last else 0) for n in range(len(levels)))


def _infer_text_time(keys: _KeyIndex, adm_in_channels: int, pooled: int | None, num_time_ids: int) -> dict[str, Any]:
    """SDXL's text_time embedding (SGM's label_emb fed [pooled text embedding, sinusoids of the time ids])."""
    if pooled is None:
        raise ValueError(f"{keys.source}: the UNet has SDXL's label_emb (text_time embedding) but the last text tower "
                         f"has no text_projection for the pooled prompt embedding")
    rest = adm_in_channels - pooled
    if rest < num_time_ids or rest % num_time_ids:
        raise ValueError(f"{keys.source}: label_emb takes {adm_in_channels} inputs; with the pooled width {pooled} "
                         f"the other {rest} are not {num_time_ids} micro-conditioning numbers' features of one width")
    return dict(addition_embed_type="text_time", addition_time_embed_dim=rest // num_time_ids,
                adm_in_channels=adm_in_channels)


def _infer_first_stage(keys: _KeyIndex) -> AutoencoderConfig:
    p = FIRST_STAGE_PREFIX
    ch, in_channels = keys.shape(f"{p}encoder.conv_in.weight")[:2]
    levels = keys.children(f"{p}encoder.down.")
    num_res_blocks = len(keys.children(f"{p}encoder.down.0.block."))
    ch_mult = []
    for level in levels:
        width = keys.shape(f"{p}encoder.down.{level}.block.0.conv2.weight")[0]
        if width % ch:
            raise ValueError(f"{keys.source}: first-stage level width {width} is not a multiple of ch {ch}")
        ch_mult.append(width // ch)
    attn = tuple(CONVENTIONAL_RESOLUTION // 2**level for level in levels
                 if f"{p}encoder.down.{level}.attn.0.norm.weight" in keys)
    z_channels = keys.shape(f"{p}decoder.conv_in.weight")[1]
    vq = f"{p}quantize.embedding.weight" in keys
    config = dict(kind="vq" if vq else "kl", in_channels=in_channels,
                  out_ch=keys.shape(f"{p}decoder.conv_out.weight")[0], ch=ch, ch_mult=tuple(ch_mult),
                  num_res_blocks=num_res_blocks, attn_resolutions=attn,
                  resolution=CONVENTIONAL_RESOLUTION, z_channels=z_channels,
                  double_z=keys.shape(f"{p}encoder.conv_out.weight")[0] == 2 * z_channels,
                  embed_dim=keys.shape(f"{p}post_quant_conv.weight")[1])
    if vq:
        config["n_embed"] = keys.shape(f"{p}quantize.embedding.weight")[0]
    return AutoencoderConfig(**config)


def _heads(width: int, head_width: int, what: str, source: str) -> int:
    if width % head_width:
        raise ValueError(f"{source}: the {what} has width {width}, not a multiple of {head_width}: its head count "
                         f"cannot be inferred; give a config")
    return width // head_width


def _infer_cond_stage(keys: _KeyIndex) -> tuple[Any, str | None]:
    """(the cond stage config or None, the family: a key of FAMILY_PRESETS)."""
    hf = [prefix for prefix in (HF_CLIP_PREFIX, HF_CLIP_PREFIX_FLAT)
          if f"{prefix}embeddings.token_embedding.weight" in keys]
    if f"{OPENCLIP_PREFIX}token_embedding.weight" in keys:
        return _infer_openclip(keys, OPENCLIP_PREFIX, sgm=False), "openclip"
    if hf:
        return _infer_hf_clip(keys, hf[0], output_layer="last"), "hf_clip"
    p = f"{COND_PREFIX}transformer."
    if f"{p}token_emb.weight" in keys:
        vocab, width = keys.shape(f"{p}token_emb.weight")
        inner = keys.shape(f"{p}attn_layers.layers.0.1.to_q.weight")[0]
        hidden = keys.shape(f"{p}attn_layers.layers.1.1.net.0.0.weight")[0]
        if hidden % width:
            raise ValueError(f"{keys.source}: BERT feed-forward width {hidden} is not a multiple of {width}")
        return BertEmbedderConfig(
            vocab_size=vocab, max_length=keys.shape(f"{p}pos_emb.emb.weight")[0], n_embed=width,
            n_layer=len(keys.children(f"{p}attn_layers.layers.")) // 2,
            heads=_heads(inner, BERT_HEAD_WIDTH, "BERT attention", keys.source), dim_head=BERT_HEAD_WIDTH,
            ff_mult=hidden // width), "bert"
    if f"{COND_PREFIX}embedding.weight" in keys:
        n_classes, width = keys.shape(f"{COND_PREFIX}embedding.weight")
        return ClassEmbedderConfig(n_classes=n_classes, embed_dim=width), "class"
    other = sorted(k for k in keys.state_dict if k.startswith(COND_PREFIX))
    if other:
        raise ValueError(f"{keys.source}: a cond stage this converter does not know ({len(other)} keys, e.g. "
                         f"{other[0]!r}); give a config")
    return None, None


def _infer_openclip(keys: _KeyIndex, p: str, *, sgm: bool) -> ClipTextConfig:
    """An OpenCLIP text tower under prefix `p`: SD 2.x's (the penultimate layer as N - 1 blocks read at the last,
    no projection) or, `sgm`, SDXL's (all N blocks read at the penultimate without the final LayerNorm, with the
    `text_projection` when the file has it). gelu, prompts padded with 0, end-of-text = the last id."""
    vocab, width = keys.shape(f"{p}token_embedding.weight")
    blocks = len(keys.children(f"{p}transformer.resblocks."))
    if blocks < 2:
        raise ValueError(f"{keys.source}: an OpenCLIP text tower ({p}*) of {blocks} block(s); SD 2.x and SDXL read "
                         f"it at the penultimate layer, which needs 2 or more")
    projection = keys.shape(f"{p}text_projection")[1] if sgm and f"{p}text_projection" in keys else None
    return ClipTextConfig(
        vocab_size=vocab, hidden_size=width, max_length=keys.shape(f"{p}positional_embedding")[0],
        intermediate_size=keys.shape(f"{p}transformer.resblocks.0.mlp.c_fc.weight")[0],
        num_layers=blocks if sgm else blocks - 1,
        num_heads=_heads(width, CLIP_HEAD_WIDTH, "OpenCLIP text tower", keys.source), hidden_act="gelu",
        eos_token_id=vocab - 1, pooling="argmax", output_layer="penultimate_no_norm" if sgm else "last",
        pad_token_id=0, tokenizer_kind="clip", projection_dim=projection)


def _infer_hf_clip(keys: _KeyIndex, p: str, *, output_layer: str) -> ClipTextConfig:
    """A transformers CLIP text tower under prefix `p` (OpenAI CLIP: quick_gelu, prompts padded with the
    end-of-text id = the last id), read at `output_layer`."""
    vocab, width = keys.shape(f"{p}embeddings.token_embedding.weight")
    return ClipTextConfig(
        vocab_size=vocab, hidden_size=width, max_length=keys.shape(f"{p}embeddings.position_embedding.weight")[0],
        intermediate_size=keys.shape(f"{p}encoder.layers.0.mlp.fc1.weight")[0],
        num_layers=len(keys.children(f"{p}encoder.layers.")),
        num_heads=_heads(width, CLIP_HEAD_WIDTH, "CLIP text tower", keys.source), hidden_act="quick_gelu",
        eos_token_id=vocab - 1, pooling="argmax", output_layer=output_layer, pad_token_id=vocab - 1,
        tokenizer_kind="clip")


def _infer_sgm_towers(keys: _KeyIndex) -> tuple[list[ClipTextConfig], str]:
    """The text towers of an SGM file (embedder order) and its family (SGM_FAMILIES)."""
    embedders = _sgm_embedders(list(keys.state_dict))
    kinds = tuple("hf" if e.endswith(SGM_HF_CLIP) else "openclip" if e.endswith(SGM_OPENCLIP) else "?"
                  for e in embedders)
    expected = [f"{SGM_PREFIX}{i}." for i in range(len(embedders))]
    family = SGM_FAMILIES.get(kinds)
    if family is None or any(not e.startswith(x) for e, x in zip(embedders, expected)):
        raise ValueError(f"{keys.source}: SGM conditioner embedders {[e + '*' for e in embedders]} are neither "
                         f"SDXL base's ({SGM_PREFIX}0.{SGM_HF_CLIP}*, {SGM_PREFIX}1.{SGM_OPENCLIP}*) nor the "
                         f"refiner's ({SGM_PREFIX}0.{SGM_OPENCLIP}*); give a config")
    towers = [_infer_hf_clip(keys, e, output_layer="penultimate_no_norm") if kind == "hf"
              else _infer_openclip(keys, e, sgm=True) for e, kind in zip(embedders, kinds)]
    return towers, family


def _infer_diffusion(state_dict: Mapping[str, Any], keys: _KeyIndex, first_stage: AutoencoderConfig,
                     unet: UNetConfig, family: str | None) -> DiffusionConfig:
    preset = _family_preset(family)
    latent = first_stage.embed_dim
    if unet.num_classes is not None:
        conditioning_key = "adm"
    elif unet.use_spatial_transformer:
        conditioning_key = "hybrid" if unet.in_channels > latent else "crossattn"
    else:
        conditioning_key = "concat" if unet.in_channels > latent else None
    buffers = to_numpy_state_dict({k: state_dict[k] for k in ("betas", "alphas_cumprod", "scale_factor", "logvar",
                                                               SGM_SIGMAS) if k in keys})
    rtol = None
    if SGM_SIGMAS in buffers and "alphas_cumprod" not in buffers:  # sigma^2 = (1 - alphas_cumprod) / alphas_cumprod
        sigmas = np.asarray(buffers[SGM_SIGMAS], np.float64).reshape(-1)
        buffers["alphas_cumprod"] = 1.0 / (1.0 + sigmas**2)
        rtol = 2 * buffer_rtol(sigmas)  # |d log alphas_cumprod| <= 2 |d log sigma|
    known = [name for name in ("betas", "alphas_cumprod") if name in buffers]
    schedule = (_schedule_from_buffer(known[0], buffers[known[0]], keys.source, family, rtol) if known
                else preset.diffusion.schedule)
    pixels = preset.diffusion.image_size * preset.first_stage.downsample_factor  # the family's image size
    values = dict(schedule=schedule, prediction_type="eps", conditioning_key=conditioning_key,
                  scale_factor=_family_scale_factor(family, first_stage.kind),
                  image_size=pixels // first_stage.downsample_factor, channels=latent,
                  force_zeros_for_empty_prompt=preset.diffusion.force_zeros_for_empty_prompt)
    if "scale_factor" in buffers:  # registered as a buffer only by scale_by_std models
        values.update(scale_by_std=True, scale_factor=_scalar(buffers["scale_factor"], "scale_factor", keys.source))
    if "logvar" in buffers:
        logvar = np.asarray(buffers["logvar"], np.float32).reshape(-1)
        constant = bool(np.all(logvar == logvar[0]))
        values.update(learn_logvar=not constant, logvar_init=float(logvar[0]) if constant else 0.0)
    return DiffusionConfig(**values)


def _schedule_from_buffer(name: str, values: np.ndarray, source: str, family: str | None,
                          rtol: float | None = None) -> ScheduleConfig:
    """The ScheduleConfig whose `name` buffer ("betas" or "alphas_cumprod") equals the file's: the family's
    linear end points, the other families', DDPM_LINEAR_SCHEDULE, then linear / sqrt_linear with the file's end
    points (rounded to float32's shortest decimals), then cosine; compared at the precision the buffer was stored
    in (`buffer_rtol`, or `rtol` for values derived from another buffer)."""
    values = np.asarray(values, np.float64).reshape(-1)
    n, rtol = len(values), buffer_rtol(values) if rtol is None else rtol
    betas = values if name == "betas" else 1.0 - values / np.concatenate([[1.0], values[:-1]])
    start, end = (float(str(np.float32(b))) for b in (betas[0], betas[-1]))
    pairs = dict.fromkeys([_family_linear_schedule(family)] + [_family_linear_schedule(f) for f in FAMILY_PRESETS]
                          + [DDPM_LINEAR_SCHEDULE])
    candidates = [ScheduleConfig(beta_schedule="linear", num_timesteps=n, linear_start=a, linear_end=b)
                  for a, b in pairs]
    candidates += [ScheduleConfig(beta_schedule=kind, num_timesteps=n, linear_start=start, linear_end=end)
                   for kind in ("linear", "sqrt_linear")]
    candidates.append(ScheduleConfig(beta_schedule="cosine", num_timesteps=n))
    for candidate in candidates:
        ours = np.asarray(getattr(make_schedule(candidate), name), np.float64)
        if np.allclose(ours, values, rtol=rtol, atol=SCHEDULE_ATOL):
            return candidate
    raise ValueError(f"{source}: the `{name}` buffer ({n} steps, betas {betas[0]:.6g}..{betas[-1]:.6g}) fits none "
                     f"of the schedules {INFERABLE_SCHEDULES}; give a config")


def buffer_rtol(values: np.ndarray) -> float:
    """The relative tolerance to compare a schedule buffer with: SCHEDULE_RTOL for float32 values, the rounding
    of float16 / bfloat16 when every value is exactly one of those (a half-precision file: the loader upcasts,
    and 1000 betas that all fall on the half-precision grid were stored in it)."""
    values = np.asarray(values, np.float32)
    if np.array_equal(values.astype(np.float16).astype(np.float32), values):
        return 2.0**-10  # float16: 10 mantissa bits
    as_bits = values.view(np.uint32)
    if np.all(as_bits & 0xFFFF == 0):
        return 2.0**-7  # bfloat16: 7 mantissa bits
    return SCHEDULE_RTOL


def _scalar(value: Any, key: str, source: str) -> float:
    """The one-element buffer `key` (shape () or (1,): files store scalars either way) as a Python float."""
    array = to_numpy_state_dict({key: value})[key]
    if array.size != 1:
        raise ConversionError(f"{source}: {key!r} is shape {array.shape}; expected a scalar buffer (shape () or (1,))")
    return float(array.reshape(-1)[0])


def _sgm_embedders(keys: Sequence[str]) -> list[str]:
    """The key prefix of every SGM conditioner embedder that holds weights, in order: its text tower's prefix
    (`conditioner.embedders.N.transformer.text_model.` or `conditioner.embedders.N.model.`), or
    `conditioner.embedders.N.` for an embedder that is neither."""
    found: dict[int, str] = {}
    for key in keys:
        if key.startswith(SGM_PREFIX):
            head, _, rest = key[len(SGM_PREFIX):].partition(".")
            if head.isdigit():
                index = int(head)
                kind = next((sub for sub in (SGM_HF_CLIP, SGM_OPENCLIP) if rest.startswith(sub)), "")
                if not found.get(index, "").endswith(("transformer.text_model.", "model.")):
                    found[index] = f"{SGM_PREFIX}{index}.{kind}"
    return [found[i] for i in sorted(found)]


def _check_text_towers(sd: Mapping[str, Any], layout: Layout, source: str) -> None:
    """One-line ConversionErrors for a file of the other family (SGM vs CompVis) or with other SGM text towers
    than the config's, before the key-by-key comparison (which would list every key of every tower)."""
    keys = list(sd)
    sgm_keys = [k for k in keys if k.startswith(SGM_PREFIX)]
    compvis_keys = [k for k in keys if k.startswith(COND_PREFIX)]
    towers = ", ".join(f"{t.name} at {t.prefix}*" for t in layout.towers)
    if layout.sgm and compvis_keys and not sgm_keys:
        raise ConversionError(
            f"{source}: a CompVis (SD 1.x / 2.x) file (text encoder under {COND_PREFIX}*, e.g. {compvis_keys[0]!r}), "
            f"but the config is an SDXL model whose text towers an SGM file holds under {SGM_PREFIX}* ({towers}); "
            f"give the file's own config, or none to infer it from the weights")
    if not layout.sgm and sgm_keys:
        raise ConversionError(
            f"{source}: an SGM (SDXL) file (text towers under {SGM_PREFIX}*, e.g. {sgm_keys[0]!r}), but the config "
            f"is a CompVis (SD 1.x / 2.x-style) model; give an SDXL config (presets sdxl_base, sdxl_refiner), or "
            f"none to infer it from the weights")
    if not layout.sgm:
        return
    found = _sgm_embedders(sgm_keys)
    missing = [f"{t.prefix}* ({t.name})" for t in layout.towers if t.prefix not in found]
    extra = [f"{prefix}*" for prefix in found if prefix not in {t.prefix for t in layout.towers}]
    if missing or extra:
        what = "; ".join(([f"it has no {', '.join(missing)} keys"] if missing else [])
                         + ([f"it has {', '.join(extra)} keys, which the config has no tower for"] if extra else []))
        raise ConversionError(
            f"{source}: the file's text towers ({', '.join(p + '*' for p in found) or 'none'}) are not the config's "
            f"({towers or 'none'}): {what}; an SDXL refiner file has one OpenCLIP tower at "
            f"{SGM_PREFIX}0.{SGM_OPENCLIP}*, a base file CLIP ViT-L at {SGM_PREFIX}0.{SGM_HF_CLIP}* and bigG at "
            f"{SGM_PREFIX}1.{SGM_OPENCLIP}* (presets sdxl_refiner, sdxl_base)")


def sgm_sigmas(schedule: ScheduleConfig) -> np.ndarray:
    """SGM DiscreteDenoiser's `sigmas` buffer for our schedule: sqrt((1 - alphas_cumprod) / alphas_cumprod),
    ascending in t (LegacyDDPMDiscretization flipped twice), computed in float64 and stored as float32."""
    ac = np.cumprod(1.0 - make_betas(schedule.beta_schedule, schedule.num_timesteps, linear_start=schedule.linear_start,
                                     linear_end=schedule.linear_end, cosine_s=schedule.cosine_s))
    return np.sqrt((1.0 - ac) / ac).astype(np.float32)


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
            elif not np.allclose(got, want, rtol=buffer_rtol(got), atol=SCHEDULE_ATOL):
                problems.append(f"{name}: max |difference| {np.max(np.abs(got - want)):.3g}")
            checked[name] = "noise-schedule buffer, equal to the config's schedule"
    if SGM_SIGMAS in sd:
        got, want = np.asarray(sd[SGM_SIGMAS], np.float64).reshape(-1), sgm_sigmas(d.schedule).astype(np.float64)
        if got.shape != want.shape:
            problems.append(f"{SGM_SIGMAS}: checkpoint shape {got.shape} vs {want.shape} (num_timesteps)")
        elif not np.allclose(got, want, rtol=buffer_rtol(got), atol=SCHEDULE_ATOL):
            problems.append(f"{SGM_SIGMAS}: max relative difference {np.max(np.abs(got / want - 1)):.3g}")
        checked[SGM_SIGMAS] = "SGM DiscreteDenoiser sigmas, equal to the config's schedule"
    if "scale_factor" in sd:
        got = _scalar(sd["scale_factor"], "scale_factor", source)
        if not np.isclose(got, d.scale_factor, rtol=1e-6, atol=0.0):
            problems.append(f"scale_factor: checkpoint {got:.8g} vs config {d.scale_factor:.8g} (set "
                            f"--config.diffusion.scale_factor={got:.8g})")
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
    for tower in layout.towers:
        rules += _tower_extras(sd, tower, getattr(config, tower.name))
    if isinstance(cond, BertEmbedderConfig):
        rules.append((lambda k: k.startswith(f"{COND_PREFIX}transformer.to_logits."),
                      "x-transformers language-model head, unused: BERTEmbedder returns embeddings"))
    for key in list(sd):
        for matches, reason in rules:
            if matches(key):
                dropped[key] = reason
                del sd[key]
                break


def _tower_extras(sd: Mapping[str, Any], tower: TextTower, cfg: ClipTextConfig
                  ) -> list[tuple[Callable[[str], bool], str]]:
    """The keys of one CLIP tower's prefix that are no parameter of ours, with the reason for each."""
    p = tower.prefix
    if tower.layout == "hf":
        return [(lambda k: k == f"{p}embeddings.position_ids",
                 "transformers CLIP buffer (position indices), rebuilt by the model")]
    rules: list[tuple[Callable[[str], bool], str]] = [
        (lambda k: k == f"{p}logit_scale", "OpenCLIP logit scale (image-text contrastive loss), unused"),
        (lambda k: k == f"{p}attn_mask", "OpenCLIP causal-mask buffer, rebuilt by the model")]
    if cfg.projection_dim is None:
        rules.append((lambda k: k == f"{p}text_projection", "OpenCLIP pooled-embedding projection, unused for the "
                                                            "cross-attention context (the config has no projection)"))
    extra = f"{p}transformer.resblocks.{cfg.num_layers}."
    beyond = f"{p}transformer.resblocks.{cfg.num_layers + 1}."
    if cfg.output_layer == "last" and any(k.startswith(extra) for k in sd) and not any(
            k.startswith(beyond) for k in sd):
        rules.append((lambda k: k.startswith(extra), f"OpenCLIP block {cfg.num_layers}, never evaluated: SD 2.x "
                                                     f"embeds prompts with the penultimate layer"))
    return rules


def _log_dropped(dropped: Mapping[str, str], source: str) -> None:
    by_reason: dict[str, list[str]] = {}
    for key, reason in dropped.items():
        by_reason.setdefault(reason, []).append(key)
    for reason, keys in by_reason.items():
        log.info("%s: dropped %d key(s) (%s), e.g. %s", source, len(keys), reason, keys[0])


# --------------------------------------------------------------------------------------------------- export


def export_compvis(params: Mapping[str, Any], config: LDMConfig | Any, *, clip_layout: str | None = None,
                   include_schedule: bool = True, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """LDM params -> a CompVis LatentDiffusion state dict {key: numpy array in torch layout}; for SDXL configs
    (`is_sgm`) an SGM DiffusionEngine state dict (what sd_xl_base_1.0.safetensors holds, and diffusers'
    `StableDiffusionXLPipeline.from_single_file` reads).

    params: {"first_stage", "unet", "cond_stage"?, "cond_stage_2"?, "logvar"?} matching `config` exactly (checked).
    clip_layout: "hf" (cond_stage_model.transformer.text_model.*) or "openclip" (cond_stage_model.model.*);
      default `default_clip_layout(config)`. CompVis only: SGM towers have fixed layouts (`sgm_towers`).
    include_schedule: also write the schedule buffers (betas, alphas_cumprod, ...) and, for scale_by_std
      models, `scale_factor`, as the reference's state dict has them (float32); SGM: DiscreteDenoiser's
      `denoiser.sigmas` (the only schedule buffer of SGM's DiffusionEngine).
    dtype: the dtype of the exported weights (float32 by default; e.g. np.float16 for half-size files).
    OpenCLIP's `logit_scale` (and, for SD 2.x towers without a projection, `text_projection`) is not written:
    our params do not hold it.
    """
    config = as_ldm_config(config)
    layout = compvis_layout(config, clip_layout=clip_layout)
    flat = {path: np.asarray(value) for path, value in traverse_util.flatten_dict(dict(params)).items()}
    assemble_params({p: ("/".join(p), a) for p, a in flat.items()}, layout.shapes, source="params to export")
    out = {e.key: np.ascontiguousarray(e.codec.to_torch([flat[p] for p in e.paths]), dtype=dtype)
           for e in layout.entries}
    if include_schedule and layout.sgm:
        out[SGM_SIGMAS] = sgm_sigmas(config.diffusion.schedule)
    elif include_schedule:
        schedule = make_schedule(config.diffusion.schedule)
        out.update({name: np.asarray(getattr(schedule, name), np.float32) for name in SCHEDULE_BUFFERS})
        if config.diffusion.scale_by_std:
            out["scale_factor"] = np.asarray(config.diffusion.scale_factor, np.float32)
    return out


def save_compvis(path: str | os.PathLike, params: Mapping[str, Any], config: LDMConfig | Any, **kwargs: Any) -> None:
    """Writes `export_compvis(params, config, **kwargs)` to a `.safetensors` file (atomically)."""
    save_safetensors(path, export_compvis(params, config, **kwargs), metadata={"format": "pt"})


__all__ = [
    "CLIP_LAYOUTS", "ConversionError", "Entry", "Layout", "LayoutBuilder", "SCHEDULE_BUFFERS", "SGM_PREFIX", "SGM_SIGMAS",
    "TextTower", "as_ldm_config", "compvis_layout", "convert_compvis_state_dict", "default_clip_layout",
    "detect_clip_layout", "ema_key", "export_compvis", "infer_config", "infer_unet_encoder", "is_sgm",
    "load_compvis_checkpoint", "load_compvis_model", "loaded_model_from_state_dict", "save_compvis", "sgm_sigmas",
    "sgm_towers", "unet_encoder_entries",
]
