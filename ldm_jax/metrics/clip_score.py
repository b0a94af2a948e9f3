"""CLIP score (Hessel et al. 2021, with torchmetrics' scale): 100 * max(cos(E_image, E_text), 0) per pair.

`clip_score(images, prompts, model)` embeds uint8 images and their prompts with a CLIP model read from a local
transformers CLIPModel folder (`ldm_jax.convert.transformers_clip.load_clip_model`: our Flax
`models.clip_vision.ClipModel`, converted strictly, no network) and scores each pair:
- images: CLIPImageProcessor's preprocessing on the host (`clip_vision.preprocess_images`: PIL bicubic resize
  of the shortest side, center crop, [0, 1], CLIP mean/std), then the vision tower and visual_projection;
- prompts: the folder's tokenizer (`models.tokenizer.tokenize`, padded/truncated to the text tower's
  max_length, 77 for OpenAI CLIP, with a warning for longer prompts, as torchmetrics truncates), then the text
  tower's pooled end-of-text output and text_projection.
This matches torchmetrics' `CLIPScore` (transformers' `get_image_features` / `get_text_features`, cosine of
the two, clipped at 0, times 100). `clip_score_from_embeddings` scores embeddings computed elsewhere.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import jax
import numpy as np

from ldm_jax.convert.transformers_clip import LoadedClip, load_clip_model
from ldm_jax.models.clip_vision import ClipModel, ClipModelConfig, preprocess_images
from ldm_jax.models.text import check_ids
from ldm_jax.models.tokenizer import tokenize


def clip_score_from_embeddings(image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
    """(B, D) image and (B, D) text embeddings (any norm) -> (B,) float64 scores in [0, 100]."""
    image_embeds, text_embeds = np.asarray(image_embeds, np.float64), np.asarray(text_embeds, np.float64)
    if image_embeds.ndim != 2 or image_embeds.shape != text_embeds.shape:
        raise ValueError(f"clip_score: expected two (B, D) embedding arrays of one shape, got {image_embeds.shape} "
                         f"and {text_embeds.shape}")
    norms = np.linalg.norm(image_embeds, axis=1) * np.linalg.norm(text_embeds, axis=1)
    if np.any(norms == 0):
        raise ValueError(f"clip_score: zero embedding at index {int(np.flatnonzero(norms == 0)[0])}")
    cosine = np.sum(image_embeds * text_embeds, axis=1) / norms
    return 100.0 * np.maximum(cosine, 0.0)


@functools.partial(jax.jit, static_argnames=("config", "method"))
def _embed(params, inputs, *, config: ClipModelConfig, method: str) -> jax.Array:
    return ClipModel(config).apply({"params": params}, inputs, method=method)


def _batched(model: LoadedClip, inputs: np.ndarray, method: str, batch_size: int) -> np.ndarray:
    """Runs `method` over `inputs` in chunks of one size (the last one padded by repeating its last row, so one
    compilation serves every chunk); returns float32 (B, projection_dim)."""
    chunk = min(batch_size, len(inputs))
    out = []
    for start in range(0, len(inputs), chunk):
        part = inputs[start:start + chunk]
        padded = np.concatenate([part, np.repeat(part[-1:], chunk - len(part), axis=0)])
        out.append(np.asarray(_embed(model.params, padded, config=model.config, method=method))[:len(part)])
    return np.concatenate(out)


def clip_image_embeds(model: LoadedClip, images: np.ndarray | Sequence[np.ndarray], *,
                      batch_size: int = 32) -> np.ndarray:
    """uint8 RGB images ((B, H, W, 3) array, or B arrays (H_i, W_i, 3) of any sizes), values in [0, 255]
    -> float32 (B, projection_dim) CLIP image embeddings (unnormalised, as get_image_features)."""
    pixels = preprocess_images(images, model.preprocess)
    return _batched(model, pixels, "image_embeds", batch_size)


def clip_text_embeds(model: LoadedClip, prompts: Sequence[str], *, batch_size: int = 32) -> np.ndarray:
    """B prompts -> float32 (B, projection_dim) CLIP text embeddings (unnormalised, as get_text_features).
    Prompts longer than the text tower's max_length tokens are truncated with a warning."""
    text = model.config.text
    ids = tokenize(model.tokenizer, prompts, pad_token_id=text.pad_token_id, max_length=text.max_length)
    # Checked here: under jit an id outside the text tower's vocabulary would give a NaN embedding.
    check_ids(ids, text.vocab_size, what=f"token ids from the tokenizer of {model.model_dir or 'the CLIP model'}",
              ndim=2, max_length=text.max_length)
    return _batched(model, ids, "text_embeds", batch_size)


def clip_score(images: np.ndarray | Sequence[np.ndarray], prompts: Sequence[str],
               model: str | os.PathLike | LoadedClip, *, batch_size: int = 32) -> np.ndarray:
    """CLIP score of each image against its prompt: (B,) float64 in [0, 100], 100 * max(cos, 0).

    images: uint8 RGB, a (B, H, W, 3) array or a sequence of B (H_i, W_i, 3) arrays, values in [0, 255].
    prompts: B strings, prompts[i] belongs to images[i].
    model: a transformers CLIPModel folder (see `load_clip_model` for the files) or a LoadedClip (load once
      when scoring in chunks).
    batch_size: images / prompts per forward pass.
    Raises FileNotFoundError naming the folder and the files expected when the folder or a file is missing,
    ValueError for mismatched counts, non-uint8 images or a checkpoint that does not fit its config.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings (wrap a single prompt in a list)")
    if len(images) != len(prompts):
        raise ValueError(f"clip_score: {len(images)} images but {len(prompts)} prompts; expected one prompt per image")
    if batch_size < 1:
        raise ValueError(f"clip_score: batch_size must be >= 1, got {batch_size}")
    if not isinstance(model, LoadedClip):
        model = load_clip_model(model)
    image_embeds = clip_image_embeds(model, images, batch_size=batch_size)
    text_embeds = clip_text_embeds(model, prompts, batch_size=batch_size)
    return clip_score_from_embeddings(image_embeds, text_embeds)
