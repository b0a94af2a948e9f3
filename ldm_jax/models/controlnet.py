"""ControlNet (Zhang et al. 2023): a trainable copy of a UNet's encoder that reads a control image (edges, depth,
pose, ...) and returns residuals for the frozen UNet's skips and bottleneck.

One more module over the UNet's own blocks (`ldm_jax.models.unet`: `embed_time`, `embed_input`, `encode`), so any
UNetConfig the UNet runs (SD 1.x / 2.x, SDXL's text_time embedding, class / vector conditioning, a learned position
embedding) has its ControlNet. Submodule names are diffusers' `ControlNetModel`'s, so a diffusers state dict
converts key by key (`ldm_jax.convert.diffusers_controlnet`):

    conv_in, time_embedding/{linear_1, linear_2}, class_embedding, add_embedding/{linear_1, linear_2},
    controlnet_cond_embedding/{conv_in, blocks_k, conv_out}, down_blocks_i/..., mid_block/...,
    controlnet_down_blocks_j (one zero-initialised 1x1 conv per skip), controlnet_mid_block.

Computation (diffusers' `ControlNetModel.forward`):
1. temb from the timesteps (+ y, time_ids) as in the UNet;
2. h = conv_in(x) [+ position embedding] + controlnet_cond_embedding(control image) (the hint encoder: conv_in,
   SiLU, then per stage a 3x3 conv and a 3x3 stride-2 conv each followed by SiLU, then the zero-initialised
   conv_out to model_channels; the image is 2**(stages - 1) = 8 times the latent's size by default);
3. the UNet's down blocks and mid block on h; each skip j goes through controlnet_down_blocks_j, the mid output
   through controlnet_mid_block;
4. every residual times conditioning_scale; in guess mode (without global pooling) times 10**(-1 + k / n) instead,
   k = 0..n over the n skips and the mid block (0.1 for the first skip up to 1.0 for the mid block), as diffusers'
   logspace; with global_pool_conditions each residual is averaged over H and W to (B, 1, 1, C).
The UNet adds them: `UNetModel.apply(..., down_residuals=down, mid_residual=mid)`; several ControlNets' residuals
are summed first.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ldm_jax.config import build_dataclass
from ldm_jax.models.attention import check_attention
from ldm_jax.models.layers import check_remat, conv
from ldm_jax.models.unet import (UNetConfig, check_inputs, dummy_inputs, embed_input, embed_time, encode,
                                 skip_channels)

Dtype = Any
CHANNEL_ORDERS = ("rgb", "bgr")
# Top-level params a ControlNet copies from its UNet (diffusers' ControlNetModel.from_unet), when present.
SHARED_WITH_UNET = ("conv_in", "time_embedding", "class_embedding", "add_embedding", "position_embedding",
                    "mid_block")  # + every down_blocks_i


@dataclasses.dataclass(frozen=True)
class ControlNetConfig:
    """A ControlNet: the UNet config whose encoder it copies, and its control-image (hint) encoder.

    `unet`: the base UNet's config (SD v1 by default). Only its encoder half matters (conv_in, embeddings, down
    blocks, mid block); `in_channels` is the latent's channels the ControlNet reads (4 for an SD ControlNet, also
    beside a 9-channel inpainting UNet), `out_channels` is unused.
    `conditioning_channels`: channels of the control image (3).
    `conditioning_embedding_out_channels`: the hint encoder's stage widths (diffusers' default (16, 32, 96, 256));
    n stages downsample the control image by 2**(n - 1): a control image is (B, f*h, f*w, conditioning_channels)
    for (B, h, w, C) latents, f = `hint_factor` (8 by default, the VAE's factor).
    `global_pool_conditions`: residuals averaged over H and W to (B, 1, 1, C) (ControlNet 1.1 shuffle); guess
    mode then has no effect, as in diffusers.
    `controlnet_conditioning_channel_order`: "rgb", or "bgr" (the model was trained on BGR images: the control
    image's channels are reversed before the hint encoder).
    Run-time options (attention, remat, dtypes) are `ControlNetModel` attributes (`build_controlnet`).
    """

    unet: UNetConfig = UNetConfig()
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    global_pool_conditions: bool = False
    controlnet_conditioning_channel_order: str = "rgb"

    def __post_init__(self):
        widths = self.conditioning_embedding_out_channels
        if not isinstance(self.unet, UNetConfig):
            raise ValueError(f"ControlNetConfig: unet must be a UNetConfig; got {type(self.unet).__name__}")
        if not isinstance(self.conditioning_channels, int) or self.conditioning_channels < 1:
            raise ValueError(f"ControlNetConfig: conditioning_channels={self.conditioning_channels!r} must be >= 1")
        if (not isinstance(widths, tuple) or not widths
                or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths)):
            raise ValueError(f"ControlNetConfig: conditioning_embedding_out_channels={widths!r} must be a non-empty "
                             "tuple of ints >= 1")
        if self.controlnet_conditioning_channel_order not in CHANNEL_ORDERS:
            raise ValueError(f"ControlNetConfig: controlnet_conditioning_channel_order="
                             f"{self.controlnet_conditioning_channel_order!r} must be one of {CHANNEL_ORDERS}")

    @property
    def hint_factor(self) -> int:
        """How many times larger than the latents the control image is (each side)."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    @property
    def residual_channels(self) -> list[int]:
        """Channels of the down residuals in order (one per UNet skip); the mid residual has the last level's."""
        return skip_channels(self.unet)


def check_controlnet_fits(net: ControlNetConfig, unet: UNetConfig, source: str, *, latent_channels: int | None = None,
                          downsample_factor: int | None = None) -> None:
    """The one rule of whether ControlNet `net` can steer a base model whose UNet is `unet`: a one-line ValueError
    "{source}: a ControlNet for another base architecture: {what} {net's}, the base UNet's {base's}" unless its
    residual channels are the UNet's skip channels (one per skip, the mid block's the last) and its context width,
    class embedding (num_classes, adm_in_channels) and addition embedding are the UNet's. With the base model's
    first stage known (the store knows only the UNet), also its latent channels (`latent_channels`: the latents the
    ControlNet reads, 4 beside a 9-channel inpainting UNet) and its control image factor (`downsample_factor`: the
    control image has the generated / training image's size; "the base model's" then). `source` names the
    ControlNet: its file, the pipeline's nets[k], a config field. Used by `store.load_controlnet`,
    `control.control_inputs`, the sampling CLI and ControlNet training."""
    copy = net.unet
    checks = {"residual channels": (net.residual_channels, skip_channels(unet), "UNet"),
              "context width": (copy.context_dim, unet.context_dim, "UNet"),
              "num_classes": (copy.num_classes, unet.num_classes, "UNet"),
              "adm_in_channels": (copy.adm_in_channels, unet.adm_in_channels, "UNet"),
              "addition_embed_type": (copy.addition_embed_type, unet.addition_embed_type, "UNet")}
    if latent_channels is not None:
        checks["latent channels"] = (copy.in_channels, latent_channels, "model")
    if downsample_factor is not None:
        checks["control image factor"] = (net.hint_factor, downsample_factor, "model")
    for what, (got, want, base) in checks.items():
        if got != want:
            raise ValueError(f"{source}: a ControlNet for another base architecture: {what} {got}, the base {base}'s "
                             f"{want}")


def controlnet_config(section: Any) -> ControlNetConfig:
    """ControlNetConfig from a mapping / ConfigDict ({"unet": {...}, "conditioning_channels": ..., ...}); unknown
    fields are a ValueError naming them."""
    return build_dataclass(ControlNetConfig, section, where="controlnet")


def _torch_conv_init(fan_in: int) -> dict[str, Any]:
    """torch.nn.Conv2d's default init (kaiming_uniform(a=sqrt(5)) kernel and uniform bias, both within
    +-1/sqrt(fan_in)), as diffusers' hint encoder starts."""
    bound = 1.0 / math.sqrt(fan_in)

    def bias_init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return dict(kernel_init=nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"), bias_init=bias_init)


class ControlNetConditioningEmbedding(nn.Module):
    """diffusers' hint encoder: (B, f*h, f*w, C_cond) -> (B, h, w, features), f = 2**(len(block_out_channels) - 1).

    conv_in (3x3, block_out_channels[0]), SiLU, then for each next width: blocks_{2k} (3x3, same width), SiLU,
    blocks_{2k+1} (3x3 stride 2 with padding 1, the next width), SiLU; conv_out (3x3, zero-initialised, no
    activation). A side halves rounding up at each stride-2 conv.
    """

    features: int
    block_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hint: jax.Array) -> jax.Array:
        widths = self.block_out_channels

        def layer(features, in_channels, name, stride=1, zero=False):
            init = (dict(kernel_init=nn.initializers.zeros_init(), bias_init=nn.initializers.zeros_init()) if zero
                    else _torch_conv_init(9 * in_channels))
            return nn.Conv(features, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)), dtype=self.dtype,
                           param_dtype=self.param_dtype, name=name, **init)

        h = nn.silu(layer(widths[0], hint.shape[-1], "conv_in")(hint.astype(self.dtype)))
        for k, (width, next_width) in enumerate(zip(widths[:-1], widths[1:])):
            h = nn.silu(layer(width, width, f"blocks_{2 * k}")(h))
            h = nn.silu(layer(next_width, width, f"blocks_{2 * k + 1}", stride=2)(h))
        return layer(self.features, widths[-1], "conv_out", zero=True)(h)


class ControlNetModel(nn.Module):
    """The ControlNet: (latents, timesteps, context, control image, scale, ...) -> residuals for the UNet.

    Call: `apply(params, x, timesteps, context, controlnet_cond, conditioning_scale=1.0, y=None, time_ids=None,
    guess_mode=False, deterministic=True)`:
      x, timesteps, context, y, time_ids: as `UNetModel`'s (the same latents the UNet denoises, except that
         concat-conditioned UNets get their extra channels, the ControlNet only `config.unet.in_channels`).
      controlnet_cond: (B, f*H, f*W, conditioning_channels) control image, f = `config.hint_factor` (8 by
         default), float in [0, 1] (diffusers' pipelines feed it unnormalised, [0, 1], RGB; a "bgr" model
         reverses the channels itself).
      conditioning_scale: a scalar or (B,) float, traced (changing it does not recompile); 0 gives zero residuals.
      guess_mode: a Python or traced bool: scales 0.1 ... 1.0 over the skips and mid block (diffusers' logspace),
         times conditioning_scale; no effect with global_pool_conditions.
      deterministic: False enables dropout (needs a "dropout" rng).
    Returns (down_residuals, mid_residual): a list with one (B, H_j, W_j, C_j) residual per UNet skip
    (`config.residual_channels`; the UNet's skip sides) and the (B, H', W', C_last) mid residual; (B, 1, 1, C)
    each with global_pool_conditions. In the compute dtype.

    Run-time options as `UNetModel`'s: `attention`, `remat`, `dtype`, `param_dtype`.
    """

    config: ControlNetConfig
    attention: str = "xla"
    remat: bool | str = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, timesteps, context=None, controlnet_cond=None, conditioning_scale=1.0, y=None,
                 time_ids=None, *, guess_mode=False, deterministic: bool = True):
        cfg, unet = self.config, self.config.unet
        timesteps = check_inputs(unet, x, timesteps, context, y, time_ids, where="ControlNet")
        hint = self._check_hint(x, controlnet_cond)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        # 1-2. Embeddings; the control image's features are added to conv_in's output.
        temb = embed_time(unet, timesteps, y, time_ids, **kw)
        h = embed_input(self, unet, x, where="ControlNet", **kw)
        if cfg.controlnet_conditioning_channel_order == "bgr":
            hint = hint[..., ::-1]
        h = h + ControlNetConditioningEmbedding(unet.model_channels, cfg.conditioning_embedding_out_channels,
                                                name="controlnet_cond_embedding", **kw)(hint)

        # 3. The UNet's encoder and mid block; a zero 1x1 conv on every skip and on the mid block's output.
        h, skips = encode(unet, h, temb, context, deterministic, attention=self.attention, remat=self.remat, **kw)
        zero = nn.initializers.zeros_init()
        down = [conv(s.shape[-1], 1, kernel_init=zero, name=f"controlnet_down_blocks_{j}", **kw)(s)
                for j, s in enumerate(skips)]
        mid = conv(h.shape[-1], 1, kernel_init=zero, name="controlnet_mid_block", **kw)(h)

        # 4. Scales (and global pooling).
        return scale_residuals(down, mid, conditioning_scale, guess_mode, cfg.global_pool_conditions)

    def _check_hint(self, x, hint) -> jax.Array:
        """The control image must be (B, f*H, f*W, conditioning_channels) for latents x (B, H, W, C)."""
        cfg = self.config
        f, (batch, height, width) = cfg.hint_factor, x.shape[:3]
        want = (batch, f * height, f * width, cfg.conditioning_channels)
        if hint is None or jnp.shape(hint) != want:
            got = None if hint is None else jnp.shape(hint)
            raise ValueError(f"ControlNet: the control image must be {want} (B, {f}x the latents' {height}x{width}, "
                             f"conditioning_channels) for latents {tuple(x.shape)}; got {got}")
        return jnp.asarray(hint)


def scale_residuals(down: list[jax.Array], mid: jax.Array, conditioning_scale, guess_mode,
                    global_pool: bool) -> tuple[list[jax.Array], jax.Array]:
    """diffusers' step 6: residuals times conditioning_scale (scalar or (B,), traced), in guess mode (a Python or
    traced bool; ignored when `global_pool`) times 10**linspace(-1, 0, n + 1) instead over the n down residuals
    and the mid one; with `global_pool` each is then averaged over H and W to (B, 1, 1, C). dtypes kept."""
    scale = jnp.asarray(conditioning_scale, jnp.float32)
    if scale.ndim > 1 or (scale.ndim == 1 and scale.shape[0] not in (1, mid.shape[0])):
        raise ValueError(f"ControlNet: conditioning_scale must be a scalar or (B={mid.shape[0]},); got {scale.shape}")
    scale = scale.reshape(-1, 1, 1, 1) if scale.ndim else scale
    ramp = jnp.logspace(-1.0, 0.0, len(down) + 1, dtype=jnp.float32)  # 0.1 ... 1.0
    weights = jnp.ones_like(ramp) if global_pool else jnp.where(jnp.asarray(guess_mode), ramp, 1.0)
    out = [(r * (weights[k] * scale)).astype(r.dtype) for k, r in enumerate([*down, mid])]
    if global_pool:
        out = [jnp.mean(r, axis=(1, 2), keepdims=True) for r in out]
    return out[:-1], out[-1]


def build_controlnet(config: ControlNetConfig | Any, *, attention: str = "xla", remat: bool | str = False,
                     dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32) -> ControlNetModel:
    """A ControlNetModel from a ControlNetConfig or a mapping (`controlnet_config`), with run-time options as
    `ldm_jax.models.unet.build_unet`'s (a bad attention or remat value is a ValueError naming the choices)."""
    cfg = config if isinstance(config, ControlNetConfig) else controlnet_config(config)
    return ControlNetModel(cfg, attention=check_attention(attention, "build_controlnet"),
                           remat=check_remat(remat, "build_controlnet"), dtype=dtype, param_dtype=param_dtype)


def init_controlnet(model: ControlNetModel, key: jax.Array, *, batch: int = 1, size: int | None = None,
                    context_len: int = 1, num_time_ids: int = 6):
    """Initialises `model`'s params ({"params": ...}) from zero inputs (`unet.dummy_inputs`, arguments as
    `unet.init_unet`'s; the control image is `hint_factor` times the latent size). Works under `jax.eval_shape`."""
    cfg = model.config
    x, t, context, y, time_ids = dummy_inputs(cfg.unet, batch=batch, size=size, context_len=context_len,
                                              num_time_ids=num_time_ids, where="init_controlnet")
    f = cfg.hint_factor
    hint = jnp.zeros((batch, f * x.shape[1], f * x.shape[2], cfg.conditioning_channels), jnp.float32)
    return model.init(key, x, t, context, hint, 1.0, y, time_ids)


def controlnet_param_shapes(config: ControlNetConfig) -> dict[str, Any]:
    """The ControlNet's params tree (no "params" level) as jax.ShapeDtypeStructs; nothing is allocated. Traced once
    per config (`_param_shapes`, cached: a conversion asks several times); each call returns its own dicts."""
    return traverse_util.unflatten_dict(traverse_util.flatten_dict(_param_shapes(config)))


@functools.lru_cache(maxsize=8)
def _param_shapes(config: ControlNetConfig) -> dict[str, Any]:
    shapes = jax.eval_shape(lambda key: init_controlnet(ControlNetModel(config), key, num_time_ids=0),
                            jax.random.key(0))
    return shapes["params"]


def controlnet_params_from_unet(unet_params: Mapping[str, Any], config: ControlNetConfig,
                                key: jax.Array) -> dict[str, Any]:
    """The initial ControlNet params for a UNet, as diffusers' `ControlNetModel.from_unet`: conv_in, the time /
    class / addition embeddings (and a learned position embedding), every down block and the mid block copied from
    `unet_params` (the UNet's params tree, no "params" level; arrays are shared, not copied); the zero convs
    (controlnet_down_blocks_j, controlnet_mid_block) zero; the hint encoder drawn from `key` as torch's default
    conv init (kernels and biases uniform within +-1/sqrt(fan_in)), its conv_out zero. float32, the shapes of
    `controlnet_param_shapes(config)`. Raises ValueError naming the first parameter whose UNet shape differs (a
    UNet of another architecture than `config.unet`) or that the UNet lacks.
    """
    shapes = controlnet_param_shapes(config)
    unet_flat = traverse_util.flatten_dict(dict(unet_params))
    hint_cfg = config.conditioning_embedding_out_channels
    hint_params = ControlNetConditioningEmbedding(config.unet.model_channels, hint_cfg).init(
        key, jnp.zeros((1, config.hint_factor, config.hint_factor, config.conditioning_channels)))["params"]
    out = {}
    for path, leaf in traverse_util.flatten_dict(shapes).items():
        if path[0] in SHARED_WITH_UNET or path[0].startswith("down_blocks_"):
            value = unet_flat.get(path)
            if value is None or tuple(np.shape(value)) != tuple(leaf.shape):
                got = "absent" if value is None else tuple(np.shape(value))
                raise ValueError(f"controlnet_params_from_unet: UNet param {'/'.join(path)} is {got}; the ControlNet "
                                 f"config needs {tuple(leaf.shape)} (a UNet of another architecture?)")
        elif path[0] == "controlnet_cond_embedding":
            value = traverse_util.flatten_dict(hint_params)[path[1:]]
        else:  # controlnet_down_blocks_j, controlnet_mid_block
            value = jnp.zeros(leaf.shape, jnp.float32)
        out[path] = value
    return traverse_util.unflatten_dict(out)
