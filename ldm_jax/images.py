"""Images at the file edge: uint8 <-> the library's float32 [-1, 1], contact-sheet grids, and ControlNet control
images.

Inside the library images are float32 NHWC in [-1, 1]; uint8 appears only here, where files are read and
written. Control images are the exception diffusers makes: float32 in [0, 1] (`prepare_control_image`).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image

RESIZE_MODES = ("default", "fill", "crop")


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


def prepare_control_image(image: Any, height: int, width: int, *, resize_mode: str = "default",
                          name: str = "control image") -> np.ndarray:
    """A control image for a ControlNet as diffusers' `VaeImageProcessor(do_convert_rgb=True, do_normalize=False)`
    prepares it: (height, width, 3) float32 in [0, 1] RGB.

    image: a PIL image (any mode), or an (H, W, C) / (H, W) array: uint8 in [0, 255] (made a PIL image) or float in
      [0, 1] (C = 3 or 1; resized by nearest neighbour as diffusers' torch interpolate does, only in "default" mode).
    PIL images are resized with Lanczos (diffusers' default resample): resize_mode "default" stretches to
    width x height; "crop" keeps the aspect ratio and crops the excess around the centre; "fill" keeps it and fills
    the margins by stretching the image's edge rows / columns (diffusers' `_resize_and_fill`). Then RGB, / 255.
    `name` names the image in errors (e.g. its file).
    """
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"{name}: resize_mode {resize_mode!r} is not one of {RESIZE_MODES}")
    if not isinstance(image, Image.Image):
        array = np.asarray(image)
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (1, 3, 4)):
            raise ValueError(f"{name}: expected an (H, W, C) image with C 1, 3 or 4; got shape {array.shape}")
        if array.dtype != np.uint8:
            return _resize_float(array.astype(np.float32), height, width, resize_mode, name)
        image = Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array)
    if resize_mode == "default":
        image = image.resize((width, height), resample=Image.LANCZOS)
    else:
        image = _resize_keeping_ratio(image, height, width, crop=resize_mode == "crop")
    return np.asarray(image.convert("RGB"), np.float32) / 255.0


def _resize_float(image: np.ndarray, height: int, width: int, resize_mode: str, name: str) -> np.ndarray:
    """A float [0, 1] (H, W, C) image resized by nearest neighbour (torch's interpolate: source index
    floor(i * in / out)), grey made RGB."""
    if resize_mode != "default":
        raise ValueError(f"{name}: resize_mode {resize_mode!r} needs a PIL or uint8 image (as diffusers)")
    if image.min() < 0 or image.max() > 1:
        raise ValueError(f"{name}: a float control image must lie in [0, 1]; got [{image.min()}, {image.max()}]")
    image = image[..., None] if image.ndim == 2 else image[..., :3]
    rows = np.minimum(np.floor(np.arange(height) * (image.shape[0] / height)).astype(int), image.shape[0] - 1)
    cols = np.minimum(np.floor(np.arange(width) * (image.shape[1] / width)).astype(int), image.shape[1] - 1)
    image = image[rows][:, cols]
    return np.ascontiguousarray(np.broadcast_to(image, (height, width, 3)), np.float32)


def _resize_keeping_ratio(image: Image.Image, height: int, width: int, *, crop: bool) -> Image.Image:
    """diffusers' `_resize_and_crop` (crop) and `_resize_and_fill` (not crop): the image scaled to cover (crop) or
    fit inside (fill) width x height, centred on a black RGB canvas; fill stretches the edges into the margins."""
    ratio, src_ratio = width / height, image.width / image.height
    if crop:
        src_w = width if ratio > src_ratio else image.width * height // image.height
        src_h = height if ratio <= src_ratio else image.height * width // image.width
    else:
        src_w = width if ratio < src_ratio else image.width * height // image.height
        src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if crop:
        return out
    if ratio < src_ratio and height // 2 - src_h // 2 > 0:
        fill = height // 2 - src_h // 2
        out.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
        out.paste(resized.resize((width, fill), box=(0, resized.height, width, resized.height)), box=(0, fill + src_h))
    elif ratio > src_ratio and width // 2 - src_w // 2 > 0:
        fill = width // 2 - src_w // 2
        out.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
        out.paste(resized.resize((fill, height), box=(resized.width, 0, resized.width, height)), box=(fill + src_w, 0))
    return out
