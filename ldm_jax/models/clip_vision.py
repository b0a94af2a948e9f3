"""The CLIP vision transformer, the two-tower `ClipModel` with its projections, and CLIP's image preprocessing.

Follows transformers' `CLIPVisionModel` / `CLIPModel` (module names mirror their keys; the strict converter is
`ldm_jax.convert.transformers_clip.convert_clip_model_state_dict`):

    ClipVisionTransformer  pixels (B, S, S, 3) float32, normalised (see `preprocess_images`) ->
      embeddings:      patch_embedding (Conv S/P x S/P patches of P x P, stride P, no bias) -> (B, N, D),
                       class_embedding (D,) prepended as token 0, + position_embedding(0..N) -> (B, N+1, D)
      pre_layrnorm:    LayerNorm (transformers' spelling, kept because it is the checkpoint key)
      encoder:         text.ClipEncoder(causal=False): the same pre-LN blocks as the text tower, unmasked
      post_layernorm:  LayerNorm of the class token only -> pooled_output (B, D)
    ClipModel
      vision_model -> pooled (B, D_v) -> visual_projection (Dense, no bias) -> image embeds (B, projection_dim)
      text_model (text.ClipTextTransformer) -> pooled_output at the end-of-text token (B, D_t)
                   -> text_projection (Dense, no bias) -> text embeds (B, projection_dim)
    = transformers' `CLIPModel.get_image_features` / `get_text_features` (unnormalised, as they are).

Channels-last input, no position-embedding interpolation: images must be exactly `image_size` square (the
preprocessing crops them to it). Dropout is 0 in CLIP and omitted; `logit_scale` (the contrastive loss's
temperature) is not part of these params (the converter drops it explicitly).

Preprocessing (`preprocess_images`, on the host with PIL/numpy) reproduces transformers' CLIPImageProcessor
(PIL backend, `CLIPImageProcessorPil`) step by step on uint8 RGB images: resize so that the shortest side is
`shortest_edge` (the long side int(shortest_edge * long / short), truncated) with PIL's BICUBIC filter on
the uint8 image, center crop to `crop_size` (top = (H - crop) // 2, left = (W - crop) // 2), scale by 1/255
(float64, then float32) and normalise with float32 mean/std. On the same uint8 images the result equals the
processor's pixel_values exactly (max abs difference 0.0, measured in tests/test_clip_score.py).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.models.attention import AttentionImpl
from ldm_jax.models.text import (ACTIVATIONS, ClipEncoder, ClipTextConfig, ClipTextTransformer,
                                 float32_layer_norm)

Dtype = Any

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


# ----------------------------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class ClipVisionConfig:
    """CLIP vision transformer. Defaults: openai/clip-vit-large-patch14 (ViT-L/14 at 224 px).

    The field names that the shared encoder blocks read (num_layers, num_heads, intermediate_size,
    hidden_act, layer_norm_eps) are those of `ClipTextConfig`.
    """

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        _require(self.hidden_size % self.num_heads == 0,
                 f"ClipVisionConfig: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        _require(self.hidden_act in ACTIVATIONS,
                 f"ClipVisionConfig.hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
        _require(self.num_layers >= 1, f"ClipVisionConfig.num_layers must be >= 1, got {self.num_layers}")
        _require(self.patch_size >= 1 and self.image_size % self.patch_size == 0,
                 f"ClipVisionConfig: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def num_patches(self) -> int:
        """(image_size / patch_size)^2 patch tokens."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        """Patch tokens plus the class token."""
        return self.num_patches + 1


@dataclasses.dataclass(frozen=True)
class ClipModelConfig:
    """Both CLIP towers and the width of the shared embedding space. Defaults: openai/clip-vit-large-patch14."""

    text: ClipTextConfig = ClipTextConfig()
    vision: ClipVisionConfig = ClipVisionConfig()
    projection_dim: int = 768

    def __post_init__(self):
        _require(isinstance(self.text, ClipTextConfig), f"ClipModelConfig.text must be a ClipTextConfig, "
                 f"got {type(self.text).__name__}")
        _require(isinstance(self.vision, ClipVisionConfig), f"ClipModelConfig.vision must be a ClipVisionConfig, "
                 f"got {type(self.vision).__name__}")
        _require(self.projection_dim >= 1, f"ClipModelConfig.projection_dim must be >= 1, got {self.projection_dim}")


@dataclasses.dataclass(frozen=True)
class ClipPreprocessConfig:
    """CLIPImageProcessor's settings: resize shortest side to `shortest_edge` (PIL bicubic), center crop
    `crop_size` square, scale to [0, 1], normalise by `mean` / `std` (per RGB channel)."""

    shortest_edge: int = 224
    crop_size: int = 224
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD

    def __post_init__(self):
        _require(self.crop_size >= 1 and self.shortest_edge >= self.crop_size,
                 f"ClipPreprocessConfig: crop_size {self.crop_size} must be in [1, shortest_edge "
                 f"{self.shortest_edge}] (cropping past the resized image would need padding)")
        _require(len(self.mean) == 3 and len(self.std) == 3 and all(s > 0 for s in self.std),
                 f"ClipPreprocessConfig: mean {self.mean} and std {self.std} need 3 values each, std > 0")


# ----------------------------------------------------------------------------------------------- preprocessing


def preprocess_images(images: np.ndarray | Sequence[np.ndarray], config: ClipPreprocessConfig) -> np.ndarray:
    """uint8 RGB images -> CLIP pixel values, as CLIPImageProcessor computes them (see the module docstring).

    images: a uint8 (B, H, W, 3) array or a sequence of uint8 (H_i, W_i, 3) arrays (sizes may differ), values
      in [0, 255].
    Returns float32 (B, crop_size, crop_size, 3), channels last, roughly in [-1.8, 2.2] ((0 - mean) / std to
    (1 - mean) / std). Raises ValueError for a non-uint8 or non-RGB image, naming its index.
    """
    from PIL import Image  # noqa: PLC0415

    if isinstance(images, np.ndarray) and images.ndim != 4:
        raise ValueError(f"images must be (B, H, W, 3) uint8, got an array of shape {images.shape}")
    if len(images) == 0:
        raise ValueError("images is empty")
    mean, std = np.asarray(config.mean, np.float32), np.asarray(config.std, np.float32)
    out = np.empty((len(images), config.crop_size, config.crop_size, 3), np.float32)
    for i, image in enumerate(images):
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"image {i}: expected uint8 (H, W, 3) RGB, got {image.dtype} {image.shape}")
        height, width = image.shape[:2]
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(config.shortest_edge * long / short)  # transformers' get_resize_output_image_size
        size_hw = (new_long, config.shortest_edge) if width <= height else (config.shortest_edge, new_long)
        resized = np.asarray(Image.fromarray(image).resize(size_hw[::-1], resample=Image.Resampling.BICUBIC))
        top = (size_hw[0] - config.crop_size) // 2
        left = (size_hw[1] - config.crop_size) // 2
        crop = resized[top:top + config.crop_size, left:left + config.crop_size]
        scaled = (crop.astype(np.float64) * (1 / 255)).astype(np.float32)
        out[i] = (scaled - mean) / std
    return out


# ----------------------------------------------------------------------------------------------- modules


@flax.struct.dataclass
class ClipVisionOutput:
    """Outputs of `ClipVisionTransformer`: (B, N+1, D) last hidden state (before post_layernorm) and the (B, D)
    pooled output (post_layernorm of the class token), as transformers' CLIPVisionModel returns them."""

    last_hidden_state: jax.Array
    pooled_output: jax.Array


class ClipVisionEmbeddings(nn.Module):
    """Patch embedding (conv, no bias) + class token + learned positions. (B, S, S, C) -> (B, N+1, D)."""

    config: ClipVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        c = self.config
        p = c.patch_size
        patches = nn.Conv(c.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                          dtype=self.dtype, param_dtype=self.param_dtype, name="patch_embedding")(pixel_values)
        patches = patches.reshape(patches.shape[0], -1, c.hidden_size)  # (B, S/P, S/P, D) -> (B, N, D), row-major
        cls = self.param("class_embedding", nn.initializers.normal(c.hidden_size ** -0.5), (c.hidden_size,),
                         self.param_dtype)
        cls = jnp.broadcast_to(cls.astype(self.dtype), (patches.shape[0], 1, c.hidden_size))
        position = nn.Embed(c.num_positions, c.hidden_size, embedding_init=nn.initializers.normal(0.02),
                            dtype=self.dtype, param_dtype=self.param_dtype, name="position_embedding")
        return jnp.concatenate([cls, patches.astype(self.dtype)], axis=1) + position(jnp.arange(c.num_positions))[None]


class ClipVisionTransformer(nn.Module):
    """CLIP vision encoder (transformers CLIPVisionModel semantics; see the module docstring).

    pixel_values: float (B, image_size, image_size, num_channels), normalised as `preprocess_images` does.
    Returns ClipVisionOutput: (B, N+1, hidden_size) last hidden state, (B, hidden_size) pooled output.
    """

    config: ClipVisionConfig
    attention: AttentionImpl = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> ClipVisionOutput:
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        expected = (c.image_size, c.image_size, c.num_channels)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"CLIP pixel_values must be (B, {', '.join(map(str, expected))}) channels-last, got "
                             f"{pixel_values.shape}")
        # 1. patches + class token + positions; 2. pre_layrnorm; 3. unmasked blocks; 4. post_layernorm of token 0.
        x = ClipVisionEmbeddings(c, name="embeddings", **kw)(pixel_values.astype(self.dtype))
        x = float32_layer_norm(c.layer_norm_eps, self.param_dtype, "pre_layrnorm")(x).astype(self.dtype)
        last, _ = ClipEncoder(c, self.attention, causal=False, name="encoder", **kw)(x)
        pooled = float32_layer_norm(c.layer_norm_eps, self.param_dtype, "post_layernorm")(last[:, 0]).astype(self.dtype)
        return ClipVisionOutput(last, pooled)


class ClipModel(nn.Module):
    """The two CLIP towers with their projections into the shared embedding space (transformers' CLIPModel).

    `image_embeds(pixel_values)`: float (B, image_size, image_size, 3) normalised pixels -> (B, projection_dim).
    `text_embeds(input_ids)`: (B, L <= max_length) ids in [0, vocab_size) -> (B, projection_dim).
    `__call__(pixel_values, input_ids)` -> (image embeds, text embeds). Embeddings are not normalised.
    """

    config: ClipModelConfig
    attention: AttentionImpl = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.text_model = ClipTextTransformer(c.text, self.attention, **kw)
        self.vision_model = ClipVisionTransformer(c.vision, self.attention, **kw)
        self.visual_projection = nn.Dense(c.projection_dim, use_bias=False, **kw)
        self.text_projection = nn.Dense(c.projection_dim, use_bias=False, **kw)

    def image_embeds(self, pixel_values: jax.Array) -> jax.Array:
        """(B, image_size, image_size, 3) normalised pixels -> (B, projection_dim) image embeddings."""
        return self.visual_projection(self.vision_model(pixel_values).pooled_output)

    def text_embeds(self, input_ids: jax.Array) -> jax.Array:
        """(B, L) token ids -> (B, projection_dim) text embeddings (projected pooled end-of-text output)."""
        return self.text_projection(self.text_model.encode(input_ids).pooled_output)

    def __call__(self, pixel_values: jax.Array, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(B_i, S, S, 3) pixels and (B_t, L) ids -> ((B_i, projection_dim), (B_t, projection_dim)) embeddings."""
        return self.image_embeds(pixel_values), self.text_embeds(input_ids)


__all__ = [
    "ClipModel", "ClipModelConfig", "ClipPreprocessConfig", "ClipVisionConfig", "ClipVisionEmbeddings",
    "ClipVisionOutput", "ClipVisionTransformer", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "preprocess_images",
]
