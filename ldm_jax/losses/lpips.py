"""LPIPS perceptual distance (Zhang et al. 2018, v0.1) on a VGG16 trunk, in Flax.

d(x0, x1) = sum_l mean_hw( w_l . (n(f_l(x0)) - n(f_l(x1)))^2 ), where f_l are the VGG16 activations
relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of the ScalingLayer-normalised input, n() divides each
spatial position's feature vector by its L2 norm (+1e-10), and w_l is a 1x1 linear head without bias
(the lpips package's `linN.model.1`; its dropout is inactive at eval and omitted here).

Input: two NHWC float32 image batches in [-1, 1], H and W >= 16 (four 2x2 max-pools precede relu5_3).
Output: (B,) float32 distances. The losses treat LPIPS as frozen: they stop gradients to its params.

Param names are the checkpoint contract (`ldm_jax.convert.lpips`): `vgg/features_N/{kernel,bias}` with N
torchvision's `vgg16().features` index, and `linK/kernel` (1, 1, C_K, 1) for the lpips heads.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.models.layers import conv

Dtype = Any

# The lpips ScalingLayer: (x - shift) / scale maps [-1, 1] inputs to ImageNet-normalised ones.
SCALING_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
SCALING_SCALE = np.array([0.458, 0.448, 0.450], np.float32)

VGG16_WIDTHS = (64, 128, 256, 512, 512)
# torchvision `vgg16().features` indices of the 3x3 convs, one tuple per stage; a 2x2 max-pool follows
# every stage but the last. The stage's last ReLU is the tapped feature (relu1_2 ... relu5_3).
VGG16_CONV_INDICES = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
MIN_SIZE = 16


class VGG16Features(nn.Module):
    """The VGG16 conv trunk up to relu5_3, returning the five tapped ReLU activations.

    Input (B, H, W, 3); output a list of five (B, H / 2^k, W / 2^k, widths[k]) arrays, k = 0..4.
    `widths` other than VGG16's are for tiny tests; pretrained weights need the default.
    """

    widths: tuple[int, ...] = VGG16_WIDTHS
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        if len(self.widths) != len(VGG16_CONV_INDICES):
            raise ValueError(f"VGG16Features: widths must have {len(VGG16_CONV_INDICES)} entries, got {self.widths}")
        taps = []
        for stage, (width, indices) in enumerate(zip(self.widths, VGG16_CONV_INDICES)):
            if stage:
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
            for index in indices:
                x = conv(width, 3, dtype=self.dtype, param_dtype=self.param_dtype, name=f"features_{index}")(x)
                x = nn.relu(x)
            taps.append(x)
        return taps


def _unit_normalize(x: jax.Array, eps: float = 1e-10) -> jax.Array:
    """x / (||x||_2 over channels + eps), float32. The norm's gradient is taken as 0 where ||x|| == 0
    (all-zero ReLU features), where the plain sqrt would give 0 * inf = NaN; values are unchanged."""
    x = x.astype(jnp.float32)
    sumsq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    positive = sumsq > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sumsq, 1.0)), 0.0)
    return x / (norm + eps)


class LPIPS(nn.Module):
    """LPIPS distance between two image batches.

    x0, x1: (B, H, W, 3) in [-1, 1], H, W >= 16. Returns (B,) float32 per-image distances.
    Both batches go through the VGG trunk together as one (2B, H, W, 3) batch.
    """

    widths: tuple[int, ...] = VGG16_WIDTHS
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x0: jax.Array, x1: jax.Array) -> jax.Array:
        _check_images(x0, x1)
        batch = x0.shape[0]
        x = jnp.concatenate([x0, x1], axis=0).astype(jnp.float32)
        x = (x - SCALING_SHIFT) / SCALING_SCALE
        taps = VGG16Features(self.widths, dtype=self.dtype, param_dtype=self.param_dtype, name="vgg")(
            x.astype(self.dtype))
        total = jnp.zeros((batch,), jnp.float32)
        for k, feats in enumerate(taps):
            feats = _unit_normalize(feats)
            diff = jnp.square(feats[:batch] - feats[batch:])
            head = nn.Conv(1, (1, 1), use_bias=False, dtype=jnp.float32, param_dtype=self.param_dtype,
                           name=f"lin{k}")
            total = total + head(diff).mean(axis=(1, 2, 3))
        return total


def _check_images(x0: jax.Array, x1: jax.Array) -> None:
    if x0.shape != x1.shape:
        raise ValueError(f"LPIPS: the two image batches differ in shape: {x0.shape} vs {x1.shape}")
    if x0.ndim != 4 or x0.shape[-1] != 3:
        raise ValueError(f"LPIPS: expected NHWC RGB images (B, H, W, 3), got shape {x0.shape}")
    if min(x0.shape[1:3]) < MIN_SIZE:
        raise ValueError(
            f"LPIPS: images must be at least {MIN_SIZE}x{MIN_SIZE} (four 2x2 max-pools precede relu5_3), "
            f"got {x0.shape[1]}x{x0.shape[2]}"
        )
