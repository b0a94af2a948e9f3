"""Images at the file edge: uint8 <-> the library's float32 [-1, 1], and contact-sheet grids.

Inside the library images are float32 NHWC in [-1, 1]; uint8 appears only here, where files are read and
written.
"""
from __future__ import annotations

import math

import numpy as np


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [-1, 1] (any shape) -> uint8 in [0, 255]: round((x + 1) * 127.5), clipped."""
    images = np.asarray(images, np.float32)
    return np.round((np.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def image_grid(images: np.ndarray, *, columns: int | None = None, pad: int = 0) -> np.ndarray:
    """(N, H, W, C) images (C = 1 or 3), uint8 or float in [-1, 1], -> one uint8 grid image.

    `columns` defaults to ceil(sqrt(N)); empty cells and the `pad` pixels between and around cells are black.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"image_grid: expected (N, H, W, 1 or 3) images, got shape {images.shape}")
    if images.dtype != np.uint8:
        images = to_uint8(images)
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * (h + pad) + pad, columns * (w + pad) + pad, c), np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top:top + h, left:left + w] = image
    return grid
