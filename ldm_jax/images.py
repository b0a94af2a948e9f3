"""Images at the file edge: the one image-file decoder, uint8 <-> the library's float32 [-1, 1], contact-sheet
grids, and ControlNet control images.

Inside the library images are float32 NHWC in [-1, 1]; uint8 appears only here, where files are read and
written. Control images are the exception diffusers makes: float32 in [0, 1] (`prepare_control_image`).

Every image file (or encoded bytes) the library reads goes through `decode_image` (or `open_image`): the dataset
readers (`data.readers`), `ldm-jax sample`'s --init-image / --mask / --control-image and `ldm-jax evaluate`'s PNGs.
Anything PIL cannot decode (not an image, truncated, a broken chunk, a decompression bomb) is one `ImageFileError`,
a ValueError whose message is one line naming the file. What becomes of transparency is the caller's `alpha`:
"white" composites transparent pixels onto white (the dataset's training images); "drop" drops the alpha channel
as PIL's convert("RGB") does (diffusers' control images in train_controlnet.py and its pipelines, pytorch-fid's
images). Control images use CONTROL_ALPHA in training and in sampling alike, and CONTROL_RESAMPLE when resized.
"""
from __future__ import annotations

import io
import math
import os
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ldm_jax.cli import one_line

RESIZE_MODES = ("default", "fill", "crop")
ALPHA_MODES = ("white", "drop")
# Control images: diffusers converts them with a plain convert("RGB") in training (train_controlnet.py) and in its
# pipelines (VaeImageProcessor(do_convert_rgb=True)), so ControlNets trained there saw transparent pixels as their
# stored RGB (usually black); ours see the same, in training (`data.readers`) and in `ldm-jax sample`.
CONTROL_ALPHA = "drop"
# The filter control images are resized with, in sampling (`prepare_control_image`, diffusers' VaeImageProcessor
# default) and in training (`data.pipeline.preprocess_with_control`; the training image itself stays bicubic).
CONTROL_RESAMPLE = Image.Resampling.LANCZOS
# What PIL raises on a corrupt, truncated, oversized or unsupported file: UnidentifiedImageError and "image file is
# truncated" are OSErrors, a broken PNG chunk is a SyntaxError, a decompression bomb neither.
_PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class ImageFileError(ValueError):
    """An image file (or encoded bytes) that cannot be decoded; the message is one line naming it. `reason` is
    the message without the name."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: cannot read the image ({reason})")
        self.name, self.reason = name, reason


def open_image(source: str | os.PathLike | bytes, *, name: str | None = None) -> Image.Image:
    """The PIL image of a file path or encoded bytes, its pixels decoded (`Image.load`), for the caller to close
    (`with open_image(...) as image:`). Any decoding problem is an ImageFileError naming `name` (default: the
    path, or "image bytes")."""
    encoded = isinstance(source, (bytes, bytearray, memoryview))
    name = name or ("image bytes" if encoded else os.fspath(source))
    try:
        image = Image.open(io.BytesIO(source) if encoded else source)
    except _PIL_ERRORS as error:
        raise ImageFileError(name, _reason(error)) from None
    try:
        image.load()
    except _PIL_ERRORS as error:
        image.close()
        raise ImageFileError(name, _reason(error)) from None
    return image


def _reason(error: BaseException) -> str:
    if isinstance(error, UnidentifiedImageError):  # its message repeats the path
        return "not an image PIL can read"
    if isinstance(error, FileNotFoundError):
        return "no such file"
    return one_line(error) or type(error).__name__


def to_rgb(image: Image.Image, *, alpha: str) -> np.ndarray:
    """A PIL image (any mode) -> uint8 (H, W, 3) RGB; transparency per `alpha` (module doc): "white" composites
    transparent pixels onto white, "drop" drops the alpha channel (PIL's convert("RGB"))."""
    if alpha not in ALPHA_MODES:
        raise ValueError(f"alpha {alpha!r} is not one of {ALPHA_MODES}")
    transparent = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info)
    if alpha == "white" and transparent:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def decode_image(source: str | os.PathLike | bytes, *, alpha: str, mode: str = "RGB",
                 name: str | None = None) -> np.ndarray:
    """An image file or encoded bytes -> uint8 (H, W, 3) RGB (mode "RGB"), or (H, W) grey (mode "L": the RGB
    image's luminance, PIL's convert("L")); transparency per `alpha` ("white" or "drop", module doc).
    ImageFileError (one line naming `name`, default the path) when it cannot be decoded."""
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode {mode!r} is not RGB or L")
    with open_image(source, name=name) as image:
        if mode == "L" and alpha == "drop":
            return np.asarray(image.convert("L"))
        rgb = to_rgb(image, alpha=alpha)
    return rgb if mode == "RGB" else np.asarray(Image.fromarray(rgb).convert("L"))


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
        image = image.resize((width, height), resample=CONTROL_RESAMPLE)
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
    resized = image.resize((src_w, src_h), resample=CONTROL_RESAMPLE)
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
