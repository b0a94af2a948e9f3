"""The denoiser UNet eps_theta(x_t, t, context, y) of latent diffusion and Stable Diffusion.

Semantics of CompVis `ldm/modules/diffusionmodules/openaimodel.py: UNetModel`; submodule names of diffusers'
`UNet2DConditionModel`, so that a diffusers state dict converts key by key (`ldm_jax.convert.diffusers_unet`):

    conv_in, time_embedding/{linear_1, linear_2}, class_embedding, add_embedding/{linear_1, linear_2},
    down_blocks_i/{resnets_j, attentions_j, downsamplers_0/conv},
    mid_block/{resnets_0, attentions_0, resnets_1},
    up_blocks_i/{resnets_j, attentions_j, upsamplers_0/conv}, conv_norm_out, conv_out.

The encoder half (`embed_time`, `embed_input`, `encode`: conv_in, the embeddings, down_blocks_i, mid_block) is
shared with `ldm_jax.models.controlnet.ControlNetModel`, whose residuals `UNetModel` takes as `down_residuals` /
`mid_residual`.

Level l of `channel_mult` works at downsampling factor 2**l; it has transformer (or attention) blocks when
2**l is in `attention_resolutions`; its transformers have `transformer_depth` blocks (one int, or one per level
as SDXL's (0, 2, 10); the mid block takes the last level's). up_blocks_0 is the deepest level, as in diffusers.

Conditioning, by the reference's `conditioning_key`:
- "crossattn": `context` (B, L, context_dim) is attended to by every SpatialTransformer.
- "concat":    the caller concatenates the conditioning channels onto x before the call (SD inpainting:
               4 latent + 1 mask + 4 masked-image channels = 9 `in_channels`); the UNet only sees x.
- "hybrid":    both of the above.
- "adm"/class: `y` is added to the timestep embedding, as class labels (B,) int when `num_classes` is an int,
               or as a vector (B, adm_in_channels) when `num_classes="sequential"`.
- "text_time" (SDXL, `addition_embed_type`): `y` (B, P) is the pooled text embedding and `time_ids` (B, N) the
               micro-conditioning numbers (base: original height, width, crop top, left, target height, width;
               refiner: original height, width, crop top, left, aesthetic score). Each number gets sinusoidal
               features of width `addition_time_embed_dim`; [y, features] (B, P + N * dim = adm_in_channels)
               goes through the MLP `add_embedding` and is added to the timestep embedding (diffusers'
               add_time_proj + add_embedding; SGM's vector conditioner + label_emb).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.config import build_dataclass, drop_runtime_keys
from ldm_jax.models.attention import AttentionBlock, SpatialTransformer, check_attention
from ldm_jax.models.layers import (Downsample, GroupNorm32, ResnetBlock, Upsample, check_remat, conv, maybe_remat,
                                   timestep_embedding)

Dtype = Any
NORM_EPS = 1e-5  # the UNet's GroupNorms (ResBlocks, output norm) use torch's default epsilon
POSITION_EMBEDDING_INIT_STD = 0.5  # of the learned position table (`UNetConfig.position_embedding`)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of the UNet, named as in the CompVis `UNetModel` config (defaults: Stable Diffusion v1).

    Attention heads: set exactly one of `num_heads` (fixed head count; head_dim = channels // heads) and
    `num_head_channels` (fixed head_dim; heads = channels // head_dim); -1 means unset, as in the reference.
    `attention_resolutions` are downsampling factors (1, 2, 4, ...), not pixel sizes.
    `num_classes`: None, an int (class labels y of shape (B,)), or "sequential" (y of shape
    (B, adm_in_channels) through a 2-layer MLP).
    `transformer_depth`: blocks per SpatialTransformer: one int for every level and the mid block, or one int
    per level (diffusers' `transformer_layers_per_block`, SGM's list; up blocks use their level's, the mid
    block the last level's). A level without attention may say 0 (SGM's SDXL: (0, 2, 10)); see `depth_at`.
    `addition_embed_type`: None, or "text_time" (SDXL: pooled text embedding y (B, P) and time_ids (B, N) whose
    sinusoidal features of width `addition_time_embed_dim` (SDXL 256) are concatenated to y; `adm_in_channels`
    is then P + N * addition_time_embed_dim, diffusers' projection_class_embeddings_input_dim: SDXL base 2816 =
    1280 + 6 * 256, refiner 2560 = 1280 + 5 * 256). Needs num_classes=None.
    `flip_sin_to_cos`/`freq_shift`: timestep-feature convention (CompVis: [cos, sin], shift 0).
    `dropout` applies inside the ResnetBlocks only (as in the reference; its transformers use none).
    `position_embedding`: None (CompVis / SD), or the latent (height, width): a learned (height, width,
    model_channels) embedding is added after conv_in, giving the network absolute positions (param
    `position_embedding`, normal with std 0.5 at init). Not in the reference; the captioned-shapes model
    uses it to place objects where the prompt says. Inputs must then be exactly that size.
    Run-time options are not here (a config describes the weights only): the attention implementation, remat,
    compute and parameter dtypes are attributes of the `UNetModel` module (`build_unet`).
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_heads: int = 8
    num_head_channels: int = -1
    use_spatial_transformer: bool = True
    transformer_depth: int | tuple[int, ...] = 1
    context_dim: int | None = 768
    use_linear_in_transformer: bool = False
    conv_resample: bool = True
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    num_classes: int | str | None = None
    adm_in_channels: int | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    dropout: float = 0.0
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    position_embedding: tuple[int, int] | None = None

    def __post_init__(self):
        if (self.num_heads > 0) == (self.num_head_channels > 0):
            raise ValueError(
                f"UNetConfig: set exactly one of num_heads ({self.num_heads}) and num_head_channels "
                f"({self.num_head_channels}); the other must be -1"
            )
        if self.use_spatial_transformer and not self.context_dim:
            raise ValueError("UNetConfig: use_spatial_transformer=True needs context_dim (the width of `context`)")
        if self.num_classes == "sequential" and not self.adm_in_channels:
            raise ValueError("UNetConfig: num_classes='sequential' needs adm_in_channels (the width of y)")
        if self.num_classes is not None and not isinstance(self.num_classes, int) and self.num_classes != "sequential":
            raise ValueError(f"UNetConfig: num_classes must be None, an int or 'sequential'; got {self.num_classes!r}")
        if self.resblock_updown:
            raise ValueError(
                "UNetConfig: resblock_updown=True (ResBlocks that resample) is not implemented; "
                "Stable Diffusion and the LDM configs use conv/avg-pool resampling (resblock_updown=False)"
            )
        if self.model_channels < 1 or not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"UNetConfig: model_channels={self.model_channels} and channel_mult={self.channel_mult} "
                             "must be >= 1 (channel_mult non-empty)")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"UNetConfig: dropout={self.dropout} must be in [0, 1)")
        depth = self.transformer_depth
        if self.num_res_blocks < 1 or (_is_int(depth) and depth < 1):
            raise ValueError(f"UNetConfig: num_res_blocks={self.num_res_blocks} and transformer_depth="
                             f"{depth} must be >= 1")
        bad = sorted(set(self.attention_resolutions) - {2**level for level in range(len(self.channel_mult))})
        if bad:
            raise ValueError(
                f"UNetConfig: attention_resolutions {bad} are not downsampling factors of any level "
                f"(levels have factors {[2**level for level in range(len(self.channel_mult))]})"
            )
        self._check_depths()
        self._check_addition_embedding()
        for level, mult in enumerate(self.channel_mult):
            channels, split = self.model_channels * mult, max(self.num_head_channels, self.num_heads)
            attends = 2**level in self.attention_resolutions or level == len(self.channel_mult) - 1  # + mid block
            if attends and channels % split:
                what = "num_head_channels" if self.num_head_channels > 0 else "num_heads"
                raise ValueError(f"UNetConfig: {what}={split} does not divide the {channels} channels of level "
                                 f"{level} (model_channels {self.model_channels} x channel_mult {mult})")

    def _check_depths(self) -> None:
        depth, levels = self.transformer_depth, len(self.channel_mult)
        if _is_int(depth):
            return
        if (not isinstance(depth, tuple) or len(depth) != levels
                or not all(_is_int(d) and d >= 0 for d in depth)):
            raise ValueError(f"UNetConfig: transformer_depth={depth!r} must be an int >= 1 or one int >= 0 per "
                             f"level ({levels} levels, channel_mult {self.channel_mult})")
        # Levels whose blocks attend, and the last level, whose depth is the mid block's.
        shallow = [level for level in range(levels) if depth[level] < 1
                   and (2**level in self.attention_resolutions or level == levels - 1)]
        if shallow:
            raise ValueError(
                f"UNetConfig: transformer_depth={depth} is 0 at level(s) {shallow}, which attend (attention_resolutions "
                f"{self.attention_resolutions}; the last level's depth is the mid block's); they need >= 1")

    def _check_addition_embedding(self) -> None:
        kind, dim = self.addition_embed_type, self.addition_time_embed_dim
        if kind not in (None, "text_time"):
            raise ValueError(f"UNetConfig: addition_embed_type must be None or 'text_time'; got {kind!r}")
        if kind is None:
            if dim is not None:
                raise ValueError(f"UNetConfig: addition_time_embed_dim={dim} needs addition_embed_type='text_time'")
            return
        if not _is_int(dim) or dim < 1:
            raise ValueError(f"UNetConfig: addition_embed_type='text_time' needs addition_time_embed_dim >= 1 (the "
                             f"width of each time id's features; SDXL 256); got {dim!r}")
        if not _is_int(self.adm_in_channels) or self.adm_in_channels < 1:
            raise ValueError(f"UNetConfig: addition_embed_type='text_time' needs adm_in_channels >= 1 (pooled text "
                             f"width + number of time ids x addition_time_embed_dim); got {self.adm_in_channels!r}")
        if self.num_classes is not None:
            raise ValueError(f"UNetConfig: addition_embed_type='text_time' takes y as the pooled text embedding; "
                             f"num_classes must be None (got {self.num_classes!r})")

    def depth_at(self, level: int) -> int:
        """Transformer blocks per SpatialTransformer of level `level` (its down and up blocks)."""
        depth = self.transformer_depth
        return depth if _is_int(depth) else depth[level]

    @property
    def mid_depth(self) -> int:
        """Transformer blocks of the mid block's SpatialTransformer: the last level's depth."""
        return self.depth_at(len(self.channel_mult) - 1)

    def heads_at(self, channels: int) -> tuple[int, int]:
        """(heads, head_dim) of the attention blocks at a level with `channels` channels."""
        if self.num_head_channels > 0:
            return channels // self.num_head_channels, self.num_head_channels
        return self.num_heads, channels // self.num_heads

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class TimestepEmbedding(nn.Module):
    """Two-layer MLP linear_1 -> SiLU -> linear_2: (B, C_in) -> (B, features)."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        return nn.Dense(self.features, name="linear_2", **kw)(nn.silu(nn.Dense(self.features, name="linear_1", **kw)(x)))


class _ResnetBlock(ResnetBlock):
    """ResnetBlock with `deterministic` positional, so that `nn.remat` can mark it static."""

    def __call__(self, x, temb, deterministic):  # pylint: disable=arguments-differ
        return super().__call__(x, temb, deterministic=deterministic)


def _maybe_remat(cls: type[nn.Module], remat: bool | str) -> type[nn.Module]:
    """`cls` itself, or its `nn.remat` version (call signature (x, temb_or_context, deterministic))."""
    return maybe_remat(cls, remat, static_argnums=(3,))  # self, x, temb/context, deterministic


class _Blocks(nn.Module):
    """Shared constructors of the blocks of one UNet level (run-time options as in `UNetModel`)."""

    config: UNetConfig
    channels: int
    has_attention: bool
    depth: int = 1  # transformer blocks per SpatialTransformer (`UNetConfig.depth_at`)
    attention: str = "xla"
    remat: bool | str = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def resnet(self, name: str) -> nn.Module:
        cfg = self.config
        return _maybe_remat(_ResnetBlock, self.remat)(
            self.channels,
            dropout=cfg.dropout,
            time_embedding_norm="scale_shift" if cfg.use_scale_shift_norm else "default",
            epsilon=NORM_EPS,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    def attn_block(self, name: str) -> nn.Module:
        cfg = self.config
        heads, head_dim = cfg.heads_at(self.channels)
        kw = dict(attention=self.attention, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        if not cfg.use_spatial_transformer:
            return _maybe_remat(AttentionBlock, self.remat)(heads, epsilon=NORM_EPS, **kw)
        # The reference passes `dropout` to the ResBlocks only; its transformers run without dropout.
        return _maybe_remat(SpatialTransformer, self.remat)(
            heads, head_dim, self.depth, cfg.use_linear_in_transformer, **kw
        )


class DownBlock(_Blocks):
    """One encoder level: num_res_blocks x (ResnetBlock [+ attention]) [+ downsampler].

    Input (B, H, W, C_in). Returns the output (B, H', W', channels) and the skip activations it adds.
    """

    add_downsample: bool = True

    @nn.compact
    def __call__(self, h, temb, context, deterministic=True):
        skips = []
        for j in range(self.config.num_res_blocks):
            h = self.resnet(f"resnets_{j}")(h, temb, deterministic)
            if self.has_attention:
                h = self.attn_block(f"attentions_{j}")(h, context, deterministic)
            skips.append(h)
        if self.add_downsample:
            h = Downsample(
                with_conv=self.config.conv_resample, asymmetric_padding=False, dtype=self.dtype,
                param_dtype=self.param_dtype, name="downsamplers_0",
            )(h)
            skips.append(h)
        return h, skips


class MidBlock(_Blocks):
    """The bottleneck: ResnetBlock, attention, ResnetBlock. (B, H, W, C) -> (B, H, W, C)."""

    @nn.compact
    def __call__(self, h, temb, context, deterministic=True):
        h = self.resnet("resnets_0")(h, temb, deterministic)
        h = self.attn_block("attentions_0")(h, context, deterministic)
        return self.resnet("resnets_1")(h, temb, deterministic)


class UpBlock(_Blocks):
    """One decoder level: (num_res_blocks + 1) x (concat skip, ResnetBlock [+ attention]) [+ upsampler].

    `skips` are consumed last-first. Input (B, H, W, C); output (B, H'', W'', channels).
    """

    add_upsample: bool = True

    @nn.compact
    def __call__(self, h, skips, temb, context, deterministic=True, upsample_size=None):
        for j, skip in enumerate(reversed(skips)):
            h = jnp.concatenate([h, skip], axis=-1)
            h = self.resnet(f"resnets_{j}")(h, temb, deterministic)
            if self.has_attention:
                h = self.attn_block(f"attentions_{j}")(h, context, deterministic)
        if self.add_upsample:
            h = Upsample(
                with_conv=self.config.conv_resample, dtype=self.dtype, param_dtype=self.param_dtype,
                name="upsamplers_0",
            )(h, upsample_size)
        return h


def check_inputs(cfg: UNetConfig, x, timesteps, context, y, time_ids, *, where: str = "UNet") -> jax.Array:
    """Validates the inputs of a UNet (or of a ControlNet's copy of its encoder, `where="ControlNet"`) against
    `cfg` (ValueError naming the shapes; see `UNetModel`); returns timesteps broadcast to (B,)."""
    if x.ndim != 4 or x.shape[-1] != cfg.in_channels or min(x.shape[1:3]) < 1:
        raise ValueError(f"{where}: x must be (B, H, W, in_channels={cfg.in_channels}); got {x.shape}")
    batch = x.shape[0]
    timesteps = jnp.asarray(timesteps)
    if timesteps.ndim > 1 or (timesteps.ndim == 1 and timesteps.shape[0] not in (1, batch)):
        raise ValueError(f"{where}: timesteps must be a scalar or (B={batch},); got {timesteps.shape}")
    timesteps = jnp.broadcast_to(timesteps.reshape(-1), (batch,))
    if cfg.use_spatial_transformer:
        if context is None or context.ndim != 3 or context.shape[0] != batch or context.shape[2] != cfg.context_dim:
            got = None if context is None else context.shape
            raise ValueError(f"{where}: context must be (B={batch}, L, context_dim={cfg.context_dim}); got {got}")
    elif context is not None:
        raise ValueError(f"{where}: this config has no cross-attention (use_spatial_transformer=False), "
                         f"but context {context.shape} was given")
    if cfg.addition_embed_type == "text_time":
        _check_text_time(cfg, batch, y, time_ids, where)
    elif time_ids is not None:
        raise ValueError(f"{where}: time_ids {jnp.shape(time_ids)} given but the config has no text_time "
                         "embedding (addition_embed_type=None)")
    elif cfg.num_classes is None:
        if y is not None:
            raise ValueError(f"{where}: y {jnp.shape(y)} given but the config has num_classes=None")
    elif y is None:
        raise ValueError(f"{where}: num_classes={cfg.num_classes!r} needs y; got y=None")
    elif cfg.num_classes == "sequential" and jnp.shape(y) != (batch, cfg.adm_in_channels):
        raise ValueError(f"{where}: y must be (B={batch}, adm_in_channels={cfg.adm_in_channels}); got {jnp.shape(y)}")
    elif cfg.num_classes != "sequential" and jnp.shape(y) != (batch,):
        raise ValueError(f"{where}: y must be (B={batch},) class labels; got {jnp.shape(y)}")
    return timesteps


def _check_text_time(cfg: UNetConfig, batch: int, y, time_ids, where: str) -> None:
    """y (B, P) and time_ids (B, N) with P + N * addition_time_embed_dim == adm_in_channels."""
    dim, width = cfg.addition_time_embed_dim, cfg.adm_in_channels
    y_shape = None if y is None else jnp.shape(y)
    ids_shape = None if time_ids is None else jnp.shape(time_ids)
    if y_shape is None or len(y_shape) != 2 or y_shape[0] != batch:
        raise ValueError(f"{where}: addition_embed_type='text_time' needs y, the pooled text embedding (B={batch}, "
                         f"P); got {y_shape}")
    if ids_shape is None or len(ids_shape) != 2 or ids_shape[0] != batch:
        raise ValueError(f"{where}: addition_embed_type='text_time' needs time_ids (B={batch}, N) (SDXL base N=6, "
                         f"refiner N=5); got {ids_shape}")
    if y_shape[1] + ids_shape[1] * dim != width:
        raise ValueError(f"{where}: y {y_shape} and time_ids {ids_shape} give {y_shape[1]} + {ids_shape[1]} x "
                         f"{dim} = {y_shape[1] + ids_shape[1] * dim} features; adm_in_channels is {width}")


# The encoder half shared by UNetModel and ControlNetModel (ldm_jax/models/controlnet.py). Each function creates
# its submodules, under diffusers' names, in the module whose @nn.compact method calls it.


def embed_time(cfg: UNetConfig, timesteps, y=None, time_ids=None, *, dtype: Dtype, param_dtype: Dtype) -> jax.Array:
    """The timestep (+ class or text_time) embedding (B, 4 * model_channels): `time_embedding`, and
    `class_embedding` or `add_embedding` per the config. timesteps (B,); y, time_ids as `UNetModel`'s."""
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    t = timestep_embedding(timesteps, cfg.model_channels, flip_sin_to_cos=cfg.flip_sin_to_cos,
                           downscale_freq_shift=cfg.freq_shift)
    temb = TimestepEmbedding(cfg.time_embed_dim, name="time_embedding", **kw)(t.astype(dtype))
    if cfg.num_classes == "sequential":
        temb = temb + TimestepEmbedding(cfg.time_embed_dim, name="class_embedding", **kw)(y.astype(dtype))
    elif cfg.num_classes is not None:
        temb = temb + nn.Embed(cfg.num_classes, cfg.time_embed_dim, name="class_embedding", **kw)(y)
    if cfg.addition_embed_type == "text_time":
        time_ids = jnp.asarray(time_ids, jnp.float32)
        batch, num_ids = time_ids.shape
        features = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim,
                                      flip_sin_to_cos=cfg.flip_sin_to_cos, downscale_freq_shift=cfg.freq_shift)
        features = features.reshape(batch, num_ids * cfg.addition_time_embed_dim)  # (B*N, dim) -> (B, N*dim)
        added = jnp.concatenate([jnp.asarray(y, jnp.float32), features], axis=-1)  # (B, adm_in_channels)
        temb = temb + TimestepEmbedding(cfg.time_embed_dim, name="add_embedding", **kw)(added.astype(dtype))
    return temb


def embed_input(module: nn.Module, cfg: UNetConfig, x, *, dtype: Dtype, param_dtype: Dtype,
                where: str = "UNet") -> jax.Array:
    """`conv_in` (+ the learned `position_embedding` param of `module`, the calling module): x (B, H, W,
    in_channels) -> (B, H, W, model_channels). `where` names the model in errors."""
    h = conv(cfg.model_channels, 3, name="conv_in", dtype=dtype, param_dtype=param_dtype)(x.astype(dtype))
    if cfg.position_embedding is None:
        return h
    size = tuple(cfg.position_embedding)
    if x.shape[1:3] != size:
        raise ValueError(f"{where}: inputs are {x.shape[1]}x{x.shape[2]} latents but the learned "
                         f"position embedding is {size[0]}x{size[1]} (unet.position_embedding); sample at that size")
    # Random (not zero) at init: cross-attention queries must differ by location from the first step,
    # or "left" / "right" never get a gradient that tells them apart (a zero start is a saddle).
    table = module.param("position_embedding", nn.initializers.normal(POSITION_EMBEDDING_INIT_STD),
                         (*size, cfg.model_channels), param_dtype)
    return h + table.astype(dtype)


def encode(cfg: UNetConfig, h, temb, context, deterministic: bool, **block_kw) -> tuple[jax.Array, list[jax.Array]]:
    """`down_blocks_i` then `mid_block`: h (B, H, W, model_channels) from `embed_input` -> (the mid block's output
    (B, H', W', C_last), the skips [h, then every down block output]: `skip_channels(cfg)` channels, sides
    halved (rounding up) after each downsampler). `block_kw`: attention, remat, dtype, param_dtype."""
    levels = len(cfg.channel_mult)
    channels = [cfg.model_channels * m for m in cfg.channel_mult]
    skips = [h]
    for level in range(levels):
        h, level_skips = DownBlock(
            cfg, channels[level], 2**level in cfg.attention_resolutions, cfg.depth_at(level),
            add_downsample=level < levels - 1, name=f"down_blocks_{level}", **block_kw,
        )(h, temb, context, deterministic)
        skips += level_skips
    h = MidBlock(cfg, channels[-1], True, cfg.mid_depth, name="mid_block", **block_kw)(h, temb, context,
                                                                                      deterministic)
    return h, skips


def skip_channels(cfg: UNetConfig) -> list[int]:
    """Channels of the encoder's skips in order (what `encode` returns and a ControlNet's down residuals have):
    model_channels, then per level num_res_blocks x its channels (+ once more where it downsamples)."""
    channels = [cfg.model_channels]
    for level, mult in enumerate(cfg.channel_mult):
        channels += [cfg.model_channels * mult] * (cfg.num_res_blocks + (level < len(cfg.channel_mult) - 1))
    return channels


def add_residuals(skips: list[jax.Array], h: jax.Array, down_residuals, mid_residual):
    """Adds a ControlNet's residuals where diffusers' UNet2DConditionModel adds `down_block_additional_residuals`
    (to every skip) and `mid_block_additional_residual` (to the mid block's output). Each residual has its skip's
    (B, H, W, C), or (B, 1, 1, C) (global_pool_conditions). Returns (skips, h)."""
    if (down_residuals is None) != (mid_residual is None):
        raise ValueError("UNet: down_residuals and mid_residual come together (a ControlNet's two outputs); got "
                         f"only {'down_residuals' if mid_residual is None else 'mid_residual'}")
    if down_residuals is None:
        return skips, h
    if len(down_residuals) != len(skips):
        raise ValueError(f"UNet: {len(down_residuals)} down_residuals for {len(skips)} skips (channels "
                         f"{[s.shape[-1] for s in skips]}); is the ControlNet for another base UNet?")
    for name, residual, target in [*((f"down_residuals[{i}]", r, s) for i, (r, s) in
                                     enumerate(zip(down_residuals, skips))), ("mid_residual", mid_residual, h)]:
        shape, want = jnp.shape(residual), target.shape
        if len(shape) != 4 or shape[-1] != want[-1] or shape[0] != want[0] or shape[1:3] not in (want[1:3], (1, 1)):
            raise ValueError(f"UNet: {name} is {shape} but its skip is {want} (or (B, 1, 1, C) pooled); is the "
                             "ControlNet for another base UNet?")
    skips = [s + r.astype(s.dtype) for s, r in zip(skips, down_residuals)]
    return skips, h + mid_residual.astype(h.dtype)


class UNetModel(nn.Module):
    """eps_theta(x, t, context, y, time_ids): the time- and condition-dependent UNet.

    Call: `apply(params, x, timesteps, context=None, y=None, time_ids=None, deterministic=True,
    down_residuals=None, mid_residual=None)`.
      x: (B, H, W, in_channels) noisy latents (with any concat conditioning already appended on the channel
         axis by the caller); any H and W: a halving of an odd side rounds up and the decoder upsamples to
         the skip's size, as diffusers' UNet2DConditionModel does (its `upsample_size`).
      timesteps: (B,) or scalar, integer or float diffusion steps in [0, num_timesteps).
      context: (B, L, context_dim) cross-attention conditioning; required iff the config has a spatial
         transformer.
      y: (B,) int class labels or (B, adm_in_channels) vectors; required iff `num_classes` is set. With
         `addition_embed_type="text_time"`: the pooled text embedding (B, P), required.
      time_ids: (B, N) float micro-conditioning (SDXL base N=6, refiner N=5); required iff "text_time", with
         P + N * addition_time_embed_dim == adm_in_channels.
      deterministic: False enables dropout (needs a "dropout" rng).
      down_residuals, mid_residual: a ControlNet's outputs (`ldm_jax.models.controlnet`), both or neither:
         one residual per skip (`skip_channels(config)`, each (B, H_i, W_i, C_i) or pooled (B, 1, 1, C_i)) and
         one for the mid block's output, added where diffusers adds down_block_additional_residuals /
         mid_block_additional_residual. Several ControlNets: pass their sums. None leaves the UNet unchanged.
    Returns (B, H, W, out_channels) float32 (the final norm and conv run in float32).

    Run-time options (attributes, not config): `attention` ("xla", "jax_nn" or "chunked", see
    `ldm_jax.models.attention`); `remat`: False, True (recompute every ResnetBlock / transformer block in
    the backward pass) or the name of a `jax.checkpoint_policies` policy applied to each such block;
    `dtype` (compute) and `param_dtype` (storage).
    """

    config: UNetConfig
    attention: str = "xla"
    remat: bool | str = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, timesteps, context=None, y=None, time_ids=None, *, deterministic: bool = True,
                 down_residuals=None, mid_residual=None):
        cfg = self.config
        timesteps = check_inputs(cfg, x, timesteps, context, y, time_ids)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block_kw = dict(attention=self.attention, remat=self.remat, **kw)
        levels = len(cfg.channel_mult)
        channels = [cfg.model_channels * m for m in cfg.channel_mult]

        # 1. Timestep (+ class or text_time) embedding, (B, 4 * model_channels).
        temb = embed_time(cfg, timesteps, y, time_ids, **kw)

        # 2. Encoder and bottleneck; every block output is kept as a skip connection. A ControlNet's residuals
        # are added to the skips and to the bottleneck's output.
        h = embed_input(self, cfg, x, **kw)
        h, skips = encode(cfg, h, temb, context, deterministic, **block_kw)
        skips, h = add_residuals(skips, h, down_residuals, mid_residual)

        # 3. Decoder; up_blocks_i is level levels-1-i and takes num_res_blocks + 1 skips.
        for i, level in enumerate(reversed(range(levels))):
            n = cfg.num_res_blocks + 1
            level_skips, skips = skips[-n:], skips[:-n]
            upsample_size = skips[-1].shape[1:3] if level > 0 else None  # the next skip's (odd sides)
            h = UpBlock(
                cfg, channels[level], 2**level in cfg.attention_resolutions, cfg.depth_at(level),
                add_upsample=level > 0, name=f"up_blocks_{i}", **block_kw,
            )(h, level_skips, temb, context, deterministic, upsample_size)

        # 4. Output head in float32.
        h = nn.silu(GroupNorm32(epsilon=NORM_EPS, dtype=jnp.float32, param_dtype=self.param_dtype,
                                name="conv_norm_out")(h))
        return conv(cfg.out_channels, 3, dtype=jnp.float32, param_dtype=self.param_dtype,
                    kernel_init=nn.initializers.zeros_init(), name="conv_out")(h)


def unet_config(section: Any) -> UNetConfig:
    """UNetConfig from a `unet` section (ConfigDict or mapping); unknown fields are a ValueError. Run-time keys
    that old saved configs hold (attention, remat; `config.RUNTIME_KEYS`) are dropped."""
    return build_dataclass(UNetConfig, drop_runtime_keys(section, where="unet"), where="unet")


def build_unet(section_or_config: UNetConfig | Any, *, attention: str = "xla", remat: bool | str = False,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32) -> UNetModel:
    """Builds a UNetModel from a UNetConfig, or a dict / `unet` ConfigDict section (`unet_config`).

    Run-time options: `attention` ("xla", "jax_nn", "chunked"), `remat` (False, True or a policy name),
    `dtype` the compute dtype (e.g. bfloat16), `param_dtype` the storage dtype of the parameters. A bad
    attention or remat value is a ValueError naming it and the choices.
    """
    cfg = section_or_config if isinstance(section_or_config, UNetConfig) else unet_config(section_or_config)
    return UNetModel(cfg, attention=check_attention(attention, "build_unet"), remat=check_remat(remat, "build_unet"),
                     dtype=dtype, param_dtype=param_dtype)


def init_unet(model: UNetModel, key: jax.Array, *, batch: int = 1, size: int | None = None, context_len: int = 1,
              num_time_ids: int = 6):
    """Initialises `model`'s params (a {"params": ...} dict) from dummy inputs of the right shapes (`dummy_inputs`).
    Works under `jax.eval_shape`."""
    return model.init(key, *dummy_inputs(model.config, batch=batch, size=size, context_len=context_len,
                                         num_time_ids=num_time_ids))


def dummy_inputs(cfg: UNetConfig, *, batch: int = 1, size: int | None = None, context_len: int = 1,
                 num_time_ids: int = 6, where: str = "init_unet") -> tuple[Any, ...]:
    """Zero inputs (x, timesteps, context, y, time_ids) of the shapes `cfg` takes, for initialising a UNet (or a
    ControlNet copying its encoder).

    `size` defaults to the smallest spatial size the config accepts (the position embedding's size when the
    config has one). `num_time_ids` (text_time configs only; SDXL base 6, refiner 5) splits adm_in_channels into
    the dummy y (B, adm_in_channels - num_time_ids * addition_time_embed_dim) and time_ids (B, num_time_ids); the
    params do not depend on the split, so any split the width allows gives the same tree.
    """
    height, width = cfg.position_embedding or (size or 2 ** (len(cfg.channel_mult) - 1),) * 2
    x = jnp.zeros((batch, height, width, cfg.in_channels), jnp.float32)
    context = jnp.zeros((batch, context_len, cfg.context_dim), jnp.float32) if cfg.use_spatial_transformer else None
    y = None
    if cfg.num_classes == "sequential":
        y = jnp.zeros((batch, cfg.adm_in_channels), jnp.float32)
    elif cfg.num_classes is not None:
        y = jnp.zeros((batch,), jnp.int32)
    time_ids = None
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.adm_in_channels - num_time_ids * cfg.addition_time_embed_dim
        if num_time_ids < 0 or pooled < 0:
            raise ValueError(f"{where}: num_time_ids={num_time_ids} x addition_time_embed_dim "
                             f"{cfg.addition_time_embed_dim} does not fit adm_in_channels {cfg.adm_in_channels}")
        y, time_ids = jnp.zeros((batch, pooled), jnp.float32), jnp.zeros((batch, num_time_ids), jnp.float32)
    return x, jnp.zeros((batch,), jnp.int32), context, y, time_ids
