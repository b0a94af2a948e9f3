"""Frechet Inception Distance (Heusel et al. 2017), pytorch-fid compatible.

FID = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)) between Gaussians fitted to two feature sets
(mean and unbiased covariance, as pytorch-fid computes them), with pytorch-fid's numerical guards: when
sqrtm(S_1 S_2) is not finite, eps * I is added to both covariances; an imaginary part larger than 1e-3 on
the root's diagonal (the only part the trace uses) raises, a smaller one is discarded. With fewer samples
than feature dimensions the covariances are singular and sqrtm's off-diagonal entries can be far from real
while its trace stays accurate (measured once with 4 + 4 samples, D = 2048: the trace within 2e-6 relative of the
sum of the square roots of the eigenvalues, off-diagonal imaginary parts up to ~30), so, like pytorch-fid,
only the diagonal is checked.

Standard FID features: `inception_feature_fn(weights_path)` loads pytorch-fid's own weights file
(pt_inception-2015-12-05-6726825d.pth, which users download themselves) into the Flax port of pytorch-fid's
Inception-v3 (`ldm_jax.models.inception`) and returns its pool3 feature function, so FID computed here is
comparable with `python -m pytorch_fid` (float32 features within 2e-6 of the largest feature of pytorch-fid's,
FID within ~1e-6 relative, measured with random weights in tests/test_fid_inception.py). `compute_fid` runs
any feature function over two image sets; `load_statistics` reads pytorch-fid's `--save-stats` files (.npz
with `mu` and `sigma`) or raw (N, D) features (.npz `features` or .npy).
"""
from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterable

import numpy as np
import scipy.linalg

INCEPTION_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_WEIGHTS)
IMAG_TOLERANCE = 1e-3


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2): mu (D,), sigma (D, D); a float >= 0
    (up to rounding). See the module doc for the guards."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    dim = mu1.shape[0]
    for name, array, shape in (("mu1", mu1, (dim,)), ("mu2", mu2, (dim,)),
                               ("sigma1", sigma1, (dim, dim)), ("sigma2", sigma2, (dim, dim))):
        if array.shape != shape:
            raise ValueError(f"frechet_distance: {name} has shape {array.shape}, expected {shape} (D = {dim})")
    root = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.all(np.isfinite(root)):
        offset = np.eye(dim) * eps
        root = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(root):
        largest = float(np.max(np.abs(np.diagonal(root).imag)))
        if largest > IMAG_TOLERANCE:
            raise ValueError(f"frechet_distance: sqrtm(sigma1 @ sigma2) has an imaginary part of {largest:.3g} on "
                             f"its diagonal (> {IMAG_TOLERANCE}); the covariances are not positive semi-definite "
                             "enough")
        root = root.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(root))


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features, N >= 2 -> (mu (D,), sigma (D, D)): the mean and the unbiased covariance, float64."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"feature_statistics: expected (N, D) features with N >= 2, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], features.shape[1])


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """FID between two (N_i, D) feature sets."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def load_statistics(path: str | pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from a .npz with `mu` and `sigma` (pytorch-fid --save-stats), a .npz with `features`, or
    a .npy of (N, D) features. Raises FileNotFoundError / ValueError naming the file and the keys found."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FID statistics file {path} does not exist")
    if path.suffix == ".npy":
        return feature_statistics(np.load(path))
    if path.suffix != ".npz":
        raise ValueError(f"FID statistics file {path}: expected .npz (mu + sigma, or features) or .npy (features)")
    with np.load(path) as data:
        if {"mu", "sigma"} <= set(data.files):
            return np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
        if "features" in data.files:
            return feature_statistics(data["features"])
        raise ValueError(f"FID statistics file {path} holds {sorted(data.files)}; expected `mu` and `sigma` "
                         "(pytorch-fid --save-stats) or `features` (N, D)")


def compute_features(images: Iterable[np.ndarray], feature_fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Runs feature_fn over batches of images ((B, H, W, 3) each) and stacks the (B, D) outputs into (N, D)."""
    features = [np.asarray(feature_fn(batch), np.float64) for batch in images]
    if not features:
        raise ValueError("compute_features: no image batches")
    bad = [f.shape for f in features if f.ndim != 2]
    if bad:
        raise ValueError(f"compute_features: feature_fn must return (B, D) arrays, got shape {bad[0]}")
    return np.concatenate(features, axis=0)


def compute_fid(images1: Iterable[np.ndarray], images2: Iterable[np.ndarray],
                feature_fn: Callable[[np.ndarray], np.ndarray]) -> float:
    """FID between two image sets (iterables of (B, H, W, 3) batches) in the feature space of feature_fn."""
    return fid_from_features(compute_features(images1, feature_fn), compute_features(images2, feature_fn))


def inception_feature_fn(weights_path: str | pathlib.Path) -> Callable[[np.ndarray], np.ndarray]:
    """pytorch-fid's Inception-v3 pool3 feature function, with the weights of `weights_path`.

    weights_path: pytorch-fid's state dict file pt_inception-2015-12-05-6726825d.pth (INCEPTION_URL); read
      without torch (`ldm_jax.convert.inception.load_inception_variables`).
    Returns a function: images (B, H, W, 3), uint8 in [0, 255] or float in [0, 1] (any H, W; resized to
    299 x 299 bilinearly as pytorch-fid does) -> (B, 2048) float32 numpy features. uint8 images are divided by
    255 first, as pytorch-fid's image loader (`to_tensor`) does. The network is jitted once per input
    shape and dtype; the weights are passed as an argument, not baked into the program.
    Raises FileNotFoundError naming the missing file and where to get it, CheckpointError / ConversionError
    (ValueErrors) for a file that is not pytorch-fid's FID Inception.
    """
    weights_path = pathlib.Path(weights_path)
    if not weights_path.is_file():
        raise FileNotFoundError(f"FID Inception weights {weights_path} not found: standard FID needs pytorch-fid's "
                                f"{INCEPTION_WEIGHTS}; download it yourself from {INCEPTION_URL} and pass its path")
    import jax  # noqa: PLC0415 (keeps `fid` importable and cheap for statistics-only use)
    import jax.numpy as jnp  # noqa: PLC0415

    from ldm_jax.convert.inception import load_inception_variables  # noqa: PLC0415
    from ldm_jax.models.inception import InceptionV3  # noqa: PLC0415

    variables = jax.device_put(load_inception_variables(weights_path))
    model = InceptionV3()

    @jax.jit
    def features(variables, images):
        if images.dtype == jnp.uint8:
            images = images.astype(jnp.float32) / 255.0
        return model.apply(variables, images.astype(jnp.float32))

    def feature_fn(images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"inception features: expected images (B, H, W, 3), got shape {images.shape}")
        if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
            raise ValueError(f"inception features: expected uint8 or float images, got {images.dtype}")
        return np.asarray(features(variables, images))

    return feature_fn
