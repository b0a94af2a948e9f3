"""Shared building blocks: float32 GroupNorm, convolutions, ResnetBlock, up/down-sampling, timestep embedding.

Conventions (../DESIGN.md): NHWC; `dtype` is the compute dtype and `param_dtype` the storage dtype of
every layer; normalisation statistics are float32 whatever the compute dtype. Submodule names follow
diffusers (`norm1`, `conv1`, `time_emb_proj`, `conv_shortcut`, ...): they are the checkpoint contract
that `ldm_jax.convert` maps onto.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
LECUN_NORMAL = nn.initializers.lecun_normal()  # flax's default kernel init
# `jax.checkpoint_policies` a `remat` run-time option may name (besides False / True).
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable", "everything_saveable")


def check_remat(remat: bool | str, where: str) -> bool | str:
    """Returns `remat` if it is a bool or a name in REMAT_POLICIES, else a ValueError naming `where` and the choices."""
    if not isinstance(remat, bool) and remat not in REMAT_POLICIES:
        raise ValueError(f"{where}: remat={remat!r}; expected False, True or one of {REMAT_POLICIES}")
    return remat


def maybe_remat(cls: type[nn.Module], remat: bool | str, static_argnums: tuple[int, ...]) -> type[nn.Module]:
    """`cls` itself (remat False), or its `nn.remat` version recomputing it in the backward pass (True: save
    nothing; a REMAT_POLICIES name: that `jax.checkpoint_policies` policy). `static_argnums` counts `self`."""
    if check_remat(remat, cls.__name__) is False:
        return cls
    policy = None if remat is True else getattr(jax.checkpoint_policies, remat)
    return nn.remat(cls, policy=policy, static_argnums=static_argnums)


class GroupNorm32(nn.Module):
    """GroupNorm with statistics in float32 (the reference's `Normalize`: 32 groups, eps 1e-6).

    Input (..., C) with C divisible by `num_groups`; output in `dtype`.
    """

    num_groups: int = 32
    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        if channels % self.num_groups:
            raise ValueError(f"GroupNorm: {channels} channels are not divisible by {self.num_groups} groups")
        scale = self.param("scale", nn.initializers.ones, (channels,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype)
        xf = x.astype(jnp.float32)
        grouped = xf.reshape(*x.shape[:-1], self.num_groups, channels // self.num_groups)
        axes = tuple(range(1, grouped.ndim - 2)) + (grouped.ndim - 1,)  # all but batch and group
        mean = grouped.mean(axes, keepdims=True)
        var = jnp.square(grouped - mean).mean(axes, keepdims=True)
        y = ((grouped - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(xf.shape)
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


def conv(features: int, kernel: int, *, stride: int = 1, padding: Any = None, dtype: Dtype, param_dtype: Dtype,
         name: str | None = None, kernel_init: Any = LECUN_NORMAL) -> nn.Conv:
    """An NHWC `nn.Conv` with "same" padding for odd kernels unless `padding` is given."""
    if padding is None:
        padding = ((kernel // 2, kernel // 2),) * 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=kernel_init,
        name=name,
    )


class ResnetBlock(nn.Module):
    """Pre-activation residual block: GN-SiLU-conv, (+ timestep), GN-SiLU-dropout-conv, + shortcut.

    Input (B, H, W, C_in), optional `temb` (B, T); output (B, H, W, out_channels).
    `time_embedding_norm="scale_shift"` is the reference's `use_scale_shift_norm` (FiLM on norm2).
    The shortcut is a 1x1 conv (`conv_shortcut`) when C_in != out_channels. `epsilon` is the GroupNorm
    epsilon (1e-6 in the CompVis autoencoder, 1e-5 in the CompVis UNet).
    """

    out_channels: int
    dropout: float = 0.0
    time_embedding_norm: str = "default"  # "default" (add) or "scale_shift"
    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None, *, deterministic: bool = True) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm_kw = dict(epsilon=self.epsilon, **kw)
        h = nn.silu(GroupNorm32(name="norm1", **norm_kw)(x))
        h = conv(self.out_channels, 3, name="conv1", **kw)(h)
        if temb is not None:
            n_out = 2 * self.out_channels if self.time_embedding_norm == "scale_shift" else self.out_channels
            t = nn.Dense(n_out, name="time_emb_proj", **kw)(nn.silu(temb))[:, None, None, :]
            if self.time_embedding_norm == "scale_shift":
                scale, shift = jnp.split(t, 2, axis=-1)
                h = GroupNorm32(name="norm2", **norm_kw)(h) * (1 + scale) + shift
            else:
                h = GroupNorm32(name="norm2", **norm_kw)(h + t)
        else:
            h = GroupNorm32(name="norm2", **norm_kw)(h)
        h = nn.silu(h)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = conv(self.out_channels, 3, name="conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, name="conv_shortcut", **kw)(x)
        return x + h


class Downsample(nn.Module):
    """Halve H and W: a stride-2 3x3 conv (`with_conv`) or 2x2 average pooling.

    `asymmetric_padding=True` pads (0, 1) on H and W as the CompVis autoencoder does; False pads
    (1, 1) as the CompVis UNet does. Input (B, H, W, C) with even H, W; output (B, H/2, W/2, C).
    """

    with_conv: bool = True
    asymmetric_padding: bool = True
    out_channels: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if not self.with_conv:
            return nn.avg_pool(x, (2, 2), strides=(2, 2))
        padding = ((0, 1), (0, 1)) if self.asymmetric_padding else ((1, 1), (1, 1))
        features = self.out_channels or x.shape[-1]
        return conv(features, 3, stride=2, padding=padding, dtype=self.dtype, param_dtype=self.param_dtype,
                    name="conv")(x)


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour repetition (or resize to `size`, nearest), then an optional 3x3 conv.

    Input (B, H, W, C); output (B, 2H, 2W, out_channels or C), or (B, *size, ...) with `size` (the UNet's
    decoder passes its next skip's size when a halving was not exact, as diffusers' `upsample_size`): pixel i
    of an output side n takes input pixel floor(i * m / n), m the input side, which is PyTorch's
    `F.interpolate(size=..., mode="nearest")`.
    """

    with_conv: bool = True
    out_channels: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
        height, width = x.shape[1:3]
        if size is None or tuple(size) == (2 * height, 2 * width):
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        else:
            rows = (np.arange(size[0]) * height) // size[0]
            cols = (np.arange(size[1]) * width) // size[1]
            x = x[:, rows][:, :, cols]
        if self.with_conv:
            x = conv(self.out_channels or x.shape[-1], 3, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="conv")(x)
        return x


def timestep_embedding(
    timesteps: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> jax.Array:
    """Sinusoidal timestep features, float32.

    timesteps: (B,) integer or float timesteps. Returns (B, dim).
    freqs_i = exp(-log(max_period) * i / (dim/2 - downscale_freq_shift)), i < dim/2.
    The CompVis UNet is `flip_sin_to_cos=True, downscale_freq_shift=0` ([cos, sin]); the diffusers default
    for other models is `flip_sin_to_cos=False, downscale_freq_shift=1` ([sin, cos]). Odd `dim` is zero-padded.
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb
