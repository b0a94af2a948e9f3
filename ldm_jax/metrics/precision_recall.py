"""Improved precision and recall of a generative model (Kynkaanniemi et al. 2019, "Improved Precision and Recall
Metric for Assessing Generative Models"), on feature vectors.

Definitions (Euclidean distance d in feature space, k >= 1, both sets of at least k + 1 points):
- The k-NN radius of a point x of a set S is r_k(x, S) = the distance from x to its k-th nearest neighbour in S other
  than x itself (a duplicate of x elsewhere in S counts as a neighbour at distance 0).
- The manifold of S is the union of closed balls {y : d(y, x) <= r_k(x, S)} over x in S, and
  f(y, S) = 1 when y lies in it, else 0.
- precision = mean over generated g of f(g, real): the fraction of generated samples that look real.
- recall    = mean over real r of f(r, generated): the fraction of real samples the generator covers.
Both lie in [0, 1]. The paper uses k = 3 (`DEFAULT_K`) on VGG-16 features; NVlabs' reference code computes the same
with the radii from the squared distances, as here. Distances are computed in float64 blocks of `block_size` rows
(memory O(block_size * N)), so a few thousand points of a few hundred dimensions take well under a second.
"""
from __future__ import annotations

import numpy as np

DEFAULT_K = 3


def pairwise_sq_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances between rows: a (N, D), b (M, D) -> (N, M) float64, clipped at 0 (the expansion
    |a|^2 + |b|^2 - 2 a.b can round slightly below 0)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(sq, 0.0)


def knn_sq_radii(features: np.ndarray, k: int = DEFAULT_K, *, block_size: int = 1024) -> np.ndarray:
    """Squared k-NN radius of every point of a set: (N, D) features, N > k -> (N,) float64, r_k(x, S)^2 with x
    itself excluded (the module doc)."""
    features = _check_features(features, "features")
    if not 1 <= k < features.shape[0]:
        raise ValueError(f"knn_sq_radii: k must be in [1, N - 1] = [1, {features.shape[0] - 1}], got {k}")
    radii = np.empty(features.shape[0])
    for start in range(0, features.shape[0], block_size):
        block = pairwise_sq_distances(features[start:start + block_size], features)  # (B, N)
        rows = np.arange(block.shape[0])
        block[rows, start + rows] = 0.0  # exactly, whatever the expansion rounded to
        # Position 0 of each sorted row is the point itself (distance 0, possibly tied with duplicates, which are
        # neighbours at distance 0 too), so the k-th neighbour is position k.
        radii[start:start + block_size] = np.partition(block, k, axis=1)[:, k]
    return radii


def manifold_coverage(queries: np.ndarray, support: np.ndarray, support_sq_radii: np.ndarray, *,
                      block_size: int = 1024) -> np.ndarray:
    """f(q, S) for every query: queries (N, D), support (M, D) with its squared k-NN radii (M,) -> bool (N,),
    True where some support point s has |q - s|^2 <= radius(s)^2."""
    queries, support = _check_features(queries, "queries"), _check_features(support, "support")
    if queries.shape[1] != support.shape[1]:
        raise ValueError(f"manifold_coverage: queries have {queries.shape[1]} features, support {support.shape[1]}")
    support_sq_radii = np.asarray(support_sq_radii, np.float64)
    if support_sq_radii.shape != (support.shape[0],):
        raise ValueError(f"manifold_coverage: expected {support.shape[0]} radii, got shape {support_sq_radii.shape}")
    inside = np.empty(queries.shape[0], bool)
    for start in range(0, queries.shape[0], block_size):
        block = pairwise_sq_distances(queries[start:start + block_size], support)  # (B, M)
        inside[start:start + block_size] = (block <= support_sq_radii[None, :]).any(axis=1)
    return inside


def precision_recall(real: np.ndarray, generated: np.ndarray, k: int = DEFAULT_K, *,
                     block_size: int = 1024) -> tuple[float, float]:
    """(precision, recall) of generated (M, D) against real (N, D) features, both in [0, 1] (the module doc);
    N, M > k."""
    real, generated = _check_features(real, "real"), _check_features(generated, "generated")
    if real.shape[1] != generated.shape[1]:
        raise ValueError(f"precision_recall: real features have {real.shape[1]} dimensions, generated "
                         f"{generated.shape[1]}")
    real_radii = knn_sq_radii(real, k, block_size=block_size)
    generated_radii = knn_sq_radii(generated, k, block_size=block_size)
    precision = manifold_coverage(generated, real, real_radii, block_size=block_size).mean()
    recall = manifold_coverage(real, generated, generated_radii, block_size=block_size).mean()
    return float(precision), float(recall)


def _check_features(features: np.ndarray, name: str) -> np.ndarray:
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"precision_recall: {name} must be (N, D) features with N >= 1, got shape {features.shape}")
    if not np.all(np.isfinite(features)):
        raise ValueError(f"precision_recall: {name} hold non-finite values")
    return features
