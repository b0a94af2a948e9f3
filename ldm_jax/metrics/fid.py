"""Frechet Inception Distance over features the caller supplies (Heusel et al. 2017).

FID = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)) between Gaussians fitted to two feature sets
(mean and unbiased covariance, as pytorch-fid computes them), with pytorch-fid's numerical guards: when
sqrtm(S_1 S_2) is not finite, eps * I is added to both covariances; an imaginary part of the root larger
than 1e-3 raises, a smaller one is discarded.

What is here and what is not: ldm-jax has no Flax Inception-v3 yet, so standard (pytorch-fid-comparable)
FID needs features or statistics computed elsewhere: `load_statistics` reads pytorch-fid's `--save-stats`
files (.npz with `mu` and `sigma`) or raw (N, D) features (.npz `features` or .npy). `compute_fid` runs any
feature function over two image sets. `inception_feature_fn` names the weights file standard FID needs and
says that the network is not implemented, rather than returning numbers on another feature space.
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
        largest = float(np.max(np.abs(root.imag)))
        if largest > IMAG_TOLERANCE:
            raise ValueError(f"frechet_distance: sqrtm(sigma1 @ sigma2) has an imaginary part of {largest:.3g} "
                             f"(> {IMAG_TOLERANCE}); the covariances are not positive semi-definite enough "
                             "(too few samples for the feature dimension?)")
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
    """The pytorch-fid Inception-v3 pool3 feature function: not implemented in ldm-jax yet.

    Raises FileNotFoundError naming the missing weights file (pytorch-fid's pt_inception-2015-12-05 state
    dict), and NotImplementedError when it exists: compute features with pytorch-fid and pass its
    --save-stats .npz files to `load_statistics` / `python -m ldm_jax.evaluate fid`.
    """
    weights_path = pathlib.Path(weights_path)
    if not weights_path.is_file():
        raise FileNotFoundError(f"FID Inception weights {weights_path} not found: standard FID needs pytorch-fid's "
                                f"{INCEPTION_WEIGHTS} ({INCEPTION_URL})")
    raise NotImplementedError(
        f"ldm-jax has no Flax Inception-v3 yet, so {weights_path} cannot be used here; compute statistics with "
        "pytorch-fid (`python -m pytorch_fid --save-stats DIR out.npz`) and compare them with "
        "`python -m ldm_jax.evaluate fid --stats A.npz B.npz`, or pass your own feature_fn to compute_fid")
