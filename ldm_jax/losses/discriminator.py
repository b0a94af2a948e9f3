"""PatchGAN discriminator (taming-transformers `NLayerDiscriminator`, pix2pix) with ActNorm or BatchNorm.

Layout for n_layers = 3 (torch `main.N` indices, our names `main_N`):
  main_0 conv 4x4/2 (+bias), LeakyReLU(0.2)
  main_2/main_3, main_5/main_6: conv 4x4/2 (no bias under BatchNorm), norm, LeakyReLU(0.2)
  main_8/main_9: conv 4x4/1, norm, LeakyReLU(0.2)
  main_11: conv 4x4/1 (+bias) -> one logit per patch
Widths ndf * min(2^k, 8). Input (B, H, W, C) NHWC; output (B, h, w, 1) float32 logits, with
h = H / 2^n_layers - 2 (for H divisible by 2^n_layers); too small an input is an error.

Initialisation is taming's `weights_init`: conv kernels N(0, 0.02); BatchNorm scale N(1, 0.02), bias 0.
Conv biases keep PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)), which `weights_init` leaves alone.
BatchNorm (momentum 0.1 in torch terms, eps 1e-5) keeps running statistics in the `batch_stats`
collection; the reference always runs it in training mode (batch statistics) while training. Unlike torch,
flax updates the running variance with the biased batch variance (it matters only at evaluation).
ActNorm (`use_actnorm=True`) is initialised from data, as taming's is on its first training forward: `init`
must be called with a real batch; loc = -mean and scale = 1 / (std + 1e-6) per channel (unbiased std).
Norms, the LeakyReLUs after them and the last conv run in float32.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

KERNEL = 4
PADDING = ((1, 1), (1, 1))


class ActNorm(nn.Module):
    """Per-channel affine y = scale * (x + loc) with data-dependent initialisation (taming `ActNorm`).

    Input (..., C); output float32 of the same shape. Params `loc`, `scale` (C,). At `init`, loc and scale
    standardise the init batch per channel (std with Bessel's correction, + 1e-6).
    """

    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        flat = x.astype(jnp.float32).reshape(-1, x.shape[-1])
        loc = self.param("loc", lambda _: (-flat.mean(axis=0)).astype(self.param_dtype))
        scale = self.param("scale", lambda _: (1.0 / (flat.std(axis=0, ddof=1) + 1e-6)).astype(self.param_dtype))
        return scale.astype(jnp.float32) * (x.astype(jnp.float32) + loc.astype(jnp.float32))


def _torch_bias_init(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _batchnorm_scale_init(key, shape, dtype=jnp.float32):
    return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


def patch_grid_size(size: int, n_layers: int) -> int:
    """Output height (or width) of the discriminator for an input of height (or width) `size`."""
    for _ in range(n_layers):  # stride-2 convs, kernel 4, padding 1
        size = (size + 2 - KERNEL) // 2 + 1
    return size - 2  # two stride-1 convs, kernel 4, padding 1: each removes one


class NLayerDiscriminator(nn.Module):
    """PatchGAN logits for (B, H, W, in_channels) images in [-1, 1] -> (B, h, w, 1) float32.

    train: BatchNorm uses batch statistics and updates `batch_stats` (call `apply` with
    mutable=["batch_stats"]); False uses the running averages. ActNorm ignores it.
    """

    n_layers: int = 3
    ndf: int = 64
    use_actnorm: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = True) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(f"NLayerDiscriminator: expected NHWC images (B, H, W, C), got shape {x.shape}")
        if self.n_layers < 1:
            raise ValueError(f"NLayerDiscriminator: n_layers must be >= 1, got {self.n_layers}")
        grid = min(patch_grid_size(s, self.n_layers) for s in x.shape[1:3])
        if grid < 1:
            raise ValueError(
                f"NLayerDiscriminator: {x.shape[1]}x{x.shape[2]} images are too small for n_layers="
                f"{self.n_layers} (the patch grid would be empty); use larger images or fewer layers"
            )
        index = 0
        h = self._conv(self.ndf, 2, True, index, x.shape[-1])(x.astype(self.dtype))
        h = nn.leaky_relu(h, 0.2)
        index += 2
        width = self.ndf
        for n in range(1, self.n_layers + 1):
            new_width = self.ndf * min(2**n, 8)
            stride = 2 if n < self.n_layers else 1
            h = self._conv(new_width, stride, self.use_actnorm, index, width)(h)
            h = self._norm(index + 1)(h, train)
            h = nn.leaky_relu(h, 0.2).astype(self.dtype)
            index += 3
            width = new_width
        logits = self._conv(1, 1, True, index, width, dtype=jnp.float32)(h.astype(jnp.float32))
        return logits

    def _conv(self, features: int, stride: int, use_bias: bool, index: int, fan_in_channels: int,
              dtype: Dtype | None = None) -> nn.Conv:
        return nn.Conv(
            features,
            (KERNEL, KERNEL),
            strides=(stride, stride),
            padding=PADDING,
            use_bias=use_bias,
            kernel_init=nn.initializers.normal(0.02),
            bias_init=_torch_bias_init(fan_in_channels * KERNEL * KERNEL),
            dtype=dtype or self.dtype,
            param_dtype=self.param_dtype,
            name=f"main_{index}",
        )

    def _norm(self, index: int):
        if self.use_actnorm:
            actnorm = ActNorm(param_dtype=self.param_dtype, name=f"main_{index}")
            return lambda h, train: actnorm(h)
        batchnorm = nn.BatchNorm(
            momentum=0.9,
            epsilon=1e-5,
            dtype=jnp.float32,
            param_dtype=self.param_dtype,
            scale_init=_batchnorm_scale_init,
            use_fast_variance=False,
            name=f"main_{index}",
        )
        return lambda h, train: batchnorm(h.astype(jnp.float32), use_running_average=not train)
