"""Inception-v3 as pytorch-fid builds it for FID (`pytorch_fid.inception.fid_inception_v3`), up to pool3.

The network is torchvision's `Inception3` with pytorch-fid's patched blocks: `FIDInceptionA` / `FIDInceptionC`
/ `FIDInceptionE_1` average-pool their pool branch with count_include_pad=False (TensorFlow's behaviour),
and `FIDInceptionE_2` (Mixed_7c) max-pools it. Submodule names are torchvision's attribute names, so the
params tree mirrors the keys of pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (the strict converter
is `ldm_jax.convert.inception`):

    InceptionV3  images (B, H, W, 3) float32 in [0, 1]  ->  pool3 features (B, 2048) float32
      input:   bilinear resize to 299 x 299 (F.interpolate, align_corners=False; `resize_input`), then
               [0, 1] -> [-1, 1] (`normalize_input`), as pytorch-fid's `InceptionV3.forward`
      block 0: Conv2d_1a_3x3 (32, 3x3 /2) Conv2d_2a_3x3 (32, 3x3) Conv2d_2b_3x3 (64, 3x3 pad 1), max-pool 3 /2
      block 1: Conv2d_3b_1x1 (80, 1x1) Conv2d_4a_3x3 (192, 3x3), max-pool 3 /2               -> 35x35x192
      block 2: Mixed_5b/5c/5d (InceptionA, pool features 32/64/64)                         -> 35x35x288
               Mixed_6a (InceptionB)                                                         -> 17x17x768
               Mixed_6b/6c/6d/6e (InceptionC, 7x7 channels 128/160/160/192)                  -> 17x17x768
      block 3: Mixed_7a (InceptionD)                                                         -> 8x8x1280
               Mixed_7b (InceptionE, avg pool) Mixed_7c (InceptionE, max pool)               -> 8x8x2048
               global average pool                                                           -> 2048
    (sizes for a 299 x 299 input). The 1008-way classifier `fc` after pool3 is not part of this module.

Every conv is torchvision's `BasicConv2d`: Conv (no bias) -> BatchNorm (inference: running statistics,
eps 1e-3) -> ReLU. The running statistics live in the `batch_stats` collection (`mean`, `var`), beside
`params` (`conv/kernel`, `bn/scale`, `bn/bias`): apply with `{"params": ..., "batch_stats": ...}`.

float32 throughout, with convolutions at `lax.Precision.HIGHEST` so that accelerators do not drop to
TF32/bf16 passes: FID is only comparable across implementations when the features are.
"""
from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

INPUT_SIZE = 299  # pytorch-fid resizes every image to 299 x 299
FEATURE_DIM = 2048  # pool3
BN_EPSILON = 1e-3  # torchvision BasicConv2d


def resize_bilinear(images: jax.Array, size: tuple[int, int] = (INPUT_SIZE, INPUT_SIZE)) -> jax.Array:
    """(B, H, W, C) -> (B, size[0], size[1], C), as torch `F.interpolate(mode="bilinear", align_corners=False)`
    (no antialiasing; half-pixel centres, edges clamped). Values keep their range; float32 in, float32 out.

    `jax.image.resize(method="bilinear", antialias=False)` is that interpolation: a width-1 triangle kernel at
    the half-pixel source positions, with out-of-range taps dropped and the rest renormalised, which equals
    torch's clamp of the source index at the borders (checked against F.interpolate, up- and downsampling,
    in tests/test_fid_inception.py). An image already at `size` is returned unchanged.
    """
    batch, height, width, channels = images.shape
    if (height, width) == tuple(size):
        return images
    return jax.image.resize(images, (batch, *size, channels), method="bilinear", antialias=False)


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (running statistics, eps 1e-3) -> ReLU: (B, H, W, C) -> (B, H', W', features).

    kernel_size, strides, padding: ints or (height, width) pairs, as torch's Conv2d arguments (padding is
    symmetric zero padding).
    """

    features: int
    kernel_size: int | tuple[int, int]
    strides: int | tuple[int, int] = 1
    padding: int | tuple[int, int] = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad_h, pad_w = _pair(self.padding)
        x = nn.Conv(self.features, _pair(self.kernel_size), strides=_pair(self.strides),
                    padding=((pad_h, pad_h), (pad_w, pad_w)), use_bias=False,
                    precision=jax.lax.Precision.HIGHEST, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    """3x3, stride 1, padding 1, padded zeros not counted (F.avg_pool2d(count_include_pad=False))."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: jax.Array, stride: int, padding: int) -> jax.Array:
    """3x3 max-pool; padding is -inf (as F.max_pool2d), floor division of the output size."""
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((padding, padding),) * 2)


class InceptionA(nn.Module):
    """pytorch-fid FIDInceptionA: (B, H, W, C) -> (B, H, W, 64 + 64 + 96 + pool_features)."""

    pool_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch1x1 = BasicConv2d(64, 1, name="branch1x1")(x)
        branch5x5 = BasicConv2d(48, 1, name="branch5x5_1")(x)
        branch5x5 = BasicConv2d(64, 5, padding=2, name="branch5x5_2")(branch5x5)
        branch3x3dbl = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
        branch3x3dbl = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(branch3x3dbl)
        branch3x3dbl = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_3")(branch3x3dbl)
        branch_pool = BasicConv2d(self.pool_features, 1, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
    """torchvision InceptionB (Mixed_6a): (B, H, W, C) -> (B, (H-3)//2+1, (W-3)//2+1, 384 + 96 + C)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch3x3 = BasicConv2d(384, 3, strides=2, name="branch3x3")(x)
        branch3x3dbl = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
        branch3x3dbl = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(branch3x3dbl)
        branch3x3dbl = BasicConv2d(96, 3, strides=2, name="branch3x3dbl_3")(branch3x3dbl)
        branch_pool = _max_pool_3x3(x, stride=2, padding=0)
        return jnp.concatenate([branch3x3, branch3x3dbl, branch_pool], axis=-1)


class InceptionC(nn.Module):
    """pytorch-fid FIDInceptionC: (B, H, W, C) -> (B, H, W, 4 * 192), factorised 7x7 convs."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c7 = self.channels_7x7
        branch1x1 = BasicConv2d(192, 1, name="branch1x1")(x)
        branch7x7 = BasicConv2d(c7, 1, name="branch7x7_1")(x)
        branch7x7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(branch7x7)
        branch7x7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(branch7x7)
        branch7x7dbl = BasicConv2d(c7, 1, name="branch7x7dbl_1")(x)
        branch7x7dbl = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(branch7x7dbl)
        branch7x7dbl = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(branch7x7dbl)
        branch7x7dbl = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(branch7x7dbl)
        branch7x7dbl = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(branch7x7dbl)
        branch_pool = BasicConv2d(192, 1, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
    """torchvision InceptionD (Mixed_7a): (B, H, W, C) -> (B, (H-3)//2+1, (W-3)//2+1, 320 + 192 + C)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch3x3 = BasicConv2d(192, 1, name="branch3x3_1")(x)
        branch3x3 = BasicConv2d(320, 3, strides=2, name="branch3x3_2")(branch3x3)
        branch7x7x3 = BasicConv2d(192, 1, name="branch7x7x3_1")(x)
        branch7x7x3 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(branch7x7x3)
        branch7x7x3 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(branch7x7x3)
        branch7x7x3 = BasicConv2d(192, 3, strides=2, name="branch7x7x3_4")(branch7x7x3)
        branch_pool = _max_pool_3x3(x, stride=2, padding=0)
        return jnp.concatenate([branch3x3, branch7x7x3, branch_pool], axis=-1)


class InceptionE(nn.Module):
    """pytorch-fid FIDInceptionE_1 (pool="avg", Mixed_7b) / FIDInceptionE_2 (pool="max", Mixed_7c):
    (B, H, W, C) -> (B, H, W, 320 + 768 + 768 + 192 = 2048)."""

    pool: str = "avg"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.pool not in ("avg", "max"):
            raise ValueError(f"InceptionE: pool must be 'avg' or 'max', got {self.pool!r}")
        branch1x1 = BasicConv2d(320, 1, name="branch1x1")(x)
        branch3x3 = BasicConv2d(384, 1, name="branch3x3_1")(x)
        branch3x3 = jnp.concatenate([
            BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(branch3x3),
            BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(branch3x3),
        ], axis=-1)
        branch3x3dbl = BasicConv2d(448, 1, name="branch3x3dbl_1")(x)
        branch3x3dbl = BasicConv2d(384, 3, padding=1, name="branch3x3dbl_2")(branch3x3dbl)
        branch3x3dbl = jnp.concatenate([
            BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(branch3x3dbl),
            BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(branch3x3dbl),
        ], axis=-1)
        pooled = _avg_pool_3x3(x) if self.pool == "avg" else _max_pool_3x3(x, stride=1, padding=1)
        branch_pool = BasicConv2d(192, 1, name="branch_pool")(pooled)
        return jnp.concatenate([branch1x1, branch3x3, branch3x3dbl, branch_pool], axis=-1)


class InceptionV3(nn.Module):
    """pytorch-fid's `InceptionV3([3])` (the FID network, default block): images -> pool3 features.

    resize_input: bilinearly resize to 299 x 299 first (pytorch-fid's default; standard FID).
    normalize_input: map [0, 1] to [-1, 1] (2x - 1) after the resize (pytorch-fid's default).
    __call__: images (B, H, W, 3) float32, in [0, 1] when normalize_input (else already in [-1, 1]);
      without resize_input, H and W must be at least 75 -> (B, 2048) float32, each >= 0 (a mean of ReLUs).
    """

    resize_input: bool = True
    normalize_input: bool = True

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"InceptionV3: expected images (B, H, W, 3), got shape {images.shape}")
        x = jnp.asarray(images, jnp.float32)
        if self.resize_input:
            x = resize_bilinear(x)
        if self.normalize_input:
            x = 2 * x - 1
        # block 0 -> (B, 73, 73, 64) at 299
        x = BasicConv2d(32, 3, strides=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, 3, name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3(x, stride=2, padding=0)
        # block 1 -> (B, 35, 35, 192)
        x = BasicConv2d(80, 1, name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, 3, name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3(x, stride=2, padding=0)
        # block 2 -> (B, 17, 17, 768)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = InceptionC(128, name="Mixed_6b")(x)
        x = InceptionC(160, name="Mixed_6c")(x)
        x = InceptionC(160, name="Mixed_6d")(x)
        x = InceptionC(192, name="Mixed_6e")(x)
        # block 3 -> (B, 8, 8, 2048) -> global average pool (B, 2048)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE(pool="avg", name="Mixed_7b")(x)
        x = InceptionE(pool="max", name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))
