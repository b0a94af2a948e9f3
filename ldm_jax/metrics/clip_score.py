"""CLIP score (Hessel et al. 2021, with torchmetrics' scale): 100 * max(cos(E_image, E_text), 0) per pair.

The score needs a CLIP model's projected image and text embeddings. ldm-jax has the CLIP text transformer
(`ldm_jax.models.text`) but no CLIP vision tower nor the projection heads, so `clip_score` refuses to run
on images; `clip_score_from_embeddings` scores embeddings computed elsewhere.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


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


def clip_score(images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
    """CLIP score of images against prompts: not available (no CLIP vision tower in ldm-jax); always raises."""
    raise NotImplementedError(
        f"clip_score: ldm-jax has no CLIP vision tower (only the text transformer), so the {len(prompts)} "
        "images cannot be embedded; compute CLIP image and text embeddings elsewhere and use "
        "clip_score_from_embeddings")
