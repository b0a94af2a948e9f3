"""Classifier-free guidance as one batched model call, and the SD-inpainting channel helper.

CFG (Ho & Salimans 2022): pred = pred_uncond + scale * (pred_cond - pred_uncond), with uncond and cond run
together as one batch of 2B (uncond first). Negative conditioning is the "uncond" context: pass the negative
prompt's conditioning there. The scale lives in the conditioning pytree, so it is a traced value and changing
it does not recompile a jitted sampler.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

ModelFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


@flax.struct.dataclass
class GuidedCond:
    """Conditioning for `classifier_free_guidance`: two pytrees of the same structure and shapes (every leaf
    (B, ...)) and the guidance scale, () or (B,) float32."""

    cond: Any
    uncond: Any
    scale: jax.Array


def guided_cond(cond: Any, uncond: Any, scale: Any) -> GuidedCond:
    """Builds a `GuidedCond`, checking that cond and uncond have the same structure and leaf shapes."""
    cond_shapes = jax.tree.map(jnp.shape, cond)
    uncond_shapes = jax.tree.map(jnp.shape, uncond)
    if jax.tree.structure(cond) != jax.tree.structure(uncond) or cond_shapes != uncond_shapes:
        raise ValueError(f"cond and uncond must have the same structure and shapes; got cond {cond_shapes} and "
                         f"uncond {uncond_shapes}")
    scale = jnp.asarray(scale, jnp.float32)
    if scale.ndim > 1:
        raise ValueError(f"guidance scale must be a scalar or (B,), got shape {scale.shape}")
    return GuidedCond(cond=cond, uncond=uncond, scale=scale)


def classifier_free_guidance(model_fn: ModelFn) -> ModelFn:
    """Wraps model_fn(x, t, cond) into guided(x, t, GuidedCond) making one model call on a batch of 2B.

    x (B, H, W, C_in), t (B,); every conditioning leaf (B, ...). Returns (B, H, W, C) float32.
    """

    def guided(x: jax.Array, t: jax.Array, gc: GuidedCond) -> jax.Array:
        b = x.shape[0]
        for leaf in jax.tree.leaves((gc.cond, gc.uncond)):
            if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != b:
                raise ValueError(f"every conditioning leaf must have batch size {b} first, got {jnp.shape(leaf)}")
        both = jax.tree.map(lambda u, c: jnp.concatenate([u, c], axis=0), gc.uncond, gc.cond)
        out = model_fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0), both)
        out = out.astype(jnp.float32)
        out_uncond, out_cond = out[:b], out[b:]
        scale = gc.scale.reshape(gc.scale.shape + (1,) * (out.ndim - gc.scale.ndim))
        return out_uncond + scale * (out_cond - out_uncond)

    return guided


def inpaint_channels(mask: jax.Array, masked_latent: jax.Array) -> jax.Array:
    """The extra model-input channels of an SD inpainting UNet: [mask, masked_latent] along channels.

    mask (B, H, W, 1) in [0, 1] (1 = to generate), masked_latent (B, H, W, C) the encoding of the image with
    the region to generate blanked. Returns (B, H, W, 1 + C); `sample(..., extra_channels=...)` appends it to
    the latent, giving the UNet [x, mask, masked_latent] (4 + 1 + 4 = 9 channels for SD).
    """
    if mask.ndim != 4 or mask.shape[-1] != 1 or mask.shape[:3] != masked_latent.shape[:3]:
        raise ValueError(f"mask must be (B, H, W, 1) matching masked_latent {masked_latent.shape}, "
                         f"got {mask.shape}")
    return jnp.concatenate([mask.astype(jnp.float32), masked_latent.astype(jnp.float32)], axis=-1)
