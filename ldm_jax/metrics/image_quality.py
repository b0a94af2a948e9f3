"""Reconstruction quality: PSNR, SSIM (numpy, float64) and LPIPS (the Flax model, optional weights).

Images are NHWC (or one HWC image): float in [-1, 1] (the library's convention) or uint8 in [0, 255].
Both metrics work on the [0, 1] scale with data range L = 1, which gives exactly the values of the usual
[0, 255] / L = 255 computation (PSNR and SSIM with C1 = (K1 L)^2, C2 = (K2 L)^2 are invariant to the scale).

SSIM is Wang, Bovik, Sheikh and Simoncelli (2004), as in their reference code: an 11x11 Gaussian window
(sigma 1.5, normalised to sum 1), K1 = 0.01, K2 = 0.03, local means/variances/covariance with population
(1/N) weights over the window, the SSIM map over the "valid" positions only (no padding), averaged over the
map and then over RGB channels. Computed in float64: float32 loses the small variances to cancellation.
"""
from __future__ import annotations

import pathlib
from collections.abc import Callable

import numpy as np

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
# Float inputs may overshoot [-1, 1] a little (decoders are not clipped); beyond this they are on another scale.
FLOAT_RANGE_SLACK = 0.5


def to_unit_interval(images: np.ndarray, *, name: str = "images") -> np.ndarray:
    """uint8 [0, 255] -> x / 255; float [-1, 1] -> (x + 1) / 2, clipped to [0, 1]; float64 out, same shape.

    Floats outside [-1.5, 1.5] raise (they are on another scale, e.g. [0, 255] floats): convert them first.
    """
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images.astype(np.float64) / 255.0
    if not np.issubdtype(images.dtype, np.floating):
        raise TypeError(f"{name}: expected uint8 in [0, 255] or float in [-1, 1], got dtype {images.dtype}")
    if images.size and not np.all(np.isfinite(images)):
        raise ValueError(f"{name}: contains NaN or infinite values")
    low, high = (float(images.min()), float(images.max())) if images.size else (0.0, 0.0)
    if low < -1 - FLOAT_RANGE_SLACK or high > 1 + FLOAT_RANGE_SLACK:
        raise ValueError(f"{name}: float images must lie in [-1, 1], got values in [{low:.4g}, {high:.4g}] "
                         "(pass uint8 for [0, 255] data, or rescale)")
    return np.clip((images.astype(np.float64) + 1.0) / 2.0, 0.0, 1.0)


def _pair(x: np.ndarray, y: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Both batches on [0, 1] as (B, H, W, C) float64, with matching shapes."""
    x, y = to_unit_interval(x, name=f"{what} x"), to_unit_interval(y, name=f"{what} y")
    if x.shape != y.shape:
        raise ValueError(f"{what}: the two image batches differ in shape: {x.shape} vs {y.shape}")
    if x.ndim == 3:
        x, y = x[None], y[None]
    if x.ndim != 4:
        raise ValueError(f"{what}: expected (B, H, W, C) or (H, W, C) images, got shape {x.shape}")
    return x, y


def psnr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Peak signal-to-noise ratio in dB, 10 log10(1 / MSE) on [0, 1]; (B,) float64 (a scalar for HWC input).

    Identical images give +inf.
    """
    single = np.ndim(x) == 3
    x, y = _pair(x, y, "psnr")
    mse = np.mean(np.square(x - y), axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        out = 10.0 * np.log10(1.0 / mse)
    return out[0] if single else out


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """(size,) float64 Gaussian taps centred on the middle tap, summing to 1 (the 2-D window is its outer product)."""
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2
    taps = np.exp(-offsets**2 / (2 * sigma**2))
    return taps / taps.sum()


def _filter_valid(images: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation of (..., H, W, C) over H and W: (..., H - k + 1, W - k + 1, C)."""
    k = len(taps)
    rows = np.lib.stride_tricks.sliding_window_view(images, k, axis=-3) @ taps  # (..., H-k+1, W, C)
    return np.lib.stride_tricks.sliding_window_view(rows, k, axis=-2) @ taps


def ssim(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Mean SSIM (Wang et al. 2004; see the module doc) per image: (B,) float64 in [-1, 1], 1 iff identical.

    x, y: (B, H, W, C) or (H, W, C) (then a scalar), float in [-1, 1] or uint8, H and W >= 11.
    """
    single = np.ndim(x) == 3
    x, y = _pair(x, y, "ssim")
    if min(x.shape[1:3]) < SSIM_WINDOW:
        raise ValueError(f"ssim: images must be at least {SSIM_WINDOW}x{SSIM_WINDOW} (the Gaussian window), "
                         f"got {x.shape[1]}x{x.shape[2]}")
    taps = gaussian_window()
    c1, c2 = (SSIM_K1 * 1.0) ** 2, (SSIM_K2 * 1.0) ** 2  # data range L = 1
    mu_x, mu_y = _filter_valid(x, taps), _filter_valid(y, taps)
    var_x = _filter_valid(x * x, taps) - mu_x**2
    var_y = _filter_valid(y * y, taps) - mu_y**2
    cov = _filter_valid(x * y, taps) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    out = ssim_map.mean(axis=(1, 2, 3))
    return out[0] if single else out


def lpips_metric(vgg_path: str | pathlib.Path,
                 heads_path: str | pathlib.Path | None = None) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """LPIPS (VGG16, v0.1) as a metric: returns f(x, y) -> (B,) float32 distances (lower is closer).

    vgg_path: torchvision's vgg16-397923af.pth; heads_path: lpips' weights/v0.1/vgg.pth (default: the
    installed lpips package's). A missing file raises FileNotFoundError naming it and where to get it.
    x, y: (B, H, W, 3), float in [-1, 1] or uint8, H and W >= 16.
    """
    from ldm_jax.convert.lpips import load_lpips_params  # noqa: PLC0415 (torch-free, but heavy)

    return make_lpips_metric(load_lpips_params(vgg_path, heads_path))


def make_lpips_metric(params: dict, widths: tuple[int, ...] | None = None
                      ) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """LPIPS metric from already converted `ldm_jax.losses.lpips.LPIPS` params (`widths` for tiny test models)."""
    import jax  # noqa: PLC0415 (PSNR/SSIM users need no JAX)

    from ldm_jax.losses.lpips import LPIPS  # noqa: PLC0415

    model = LPIPS() if widths is None else LPIPS(widths)
    apply = jax.jit(lambda p, a, b: model.apply({"params": p}, a, b))

    def metric(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        a, b = _pair(x, y, "lpips")
        return np.asarray(apply(params, (2 * a - 1).astype(np.float32), (2 * b - 1).astype(np.float32)))

    return metric
