"""Improved precision and recall (Kynkäänniemi et al. 2019).

Each feature set defines a manifold: the union of balls around its points whose radius is the
distance to the point's k-th nearest neighbour within the same set. Precision is the fraction
of fake samples inside the real manifold (fidelity); recall is the fraction of real samples
inside the fake manifold (coverage of the real distribution).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .inputs import as_features

__all__ = ["knn_radii", "manifold_coverage", "precision_recall"]


def _sq_distances(q: np.ndarray, r: np.ndarray, r_sq: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances ``[len(q), len(r)]``, clamped at 0."""
    d = (q * q).sum(1)[:, None] + r_sq[None, :] - 2.0 * (q @ r.T)
    return np.maximum(d, 0.0)


def knn_radii(features: Any, k: int = 3, *, batch_size: int = 1024) -> np.ndarray:
    """Distance of every point to its k-th nearest neighbour in the same set (itself excluded)."""
    x = as_features(features, "features")
    n = x.shape[0]
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k >= n:
        raise ValueError(f"k={k} must be smaller than the number of samples ({n})")
    x_sq = (x * x).sum(1)
    radii = np.empty(n)
    for start in range(0, n, batch_size):
        d = _sq_distances(x[start:start + batch_size], x, x_sq)
        # Position 0 of the sorted row is the point itself (distance 0); k-th neighbour is at k.
        radii[start:start + batch_size] = np.partition(d, k, axis=1)[:, k]
    return np.sqrt(radii)


def manifold_coverage(manifold: Any, queries: Any, k: int = 3, *, batch_size: int = 1024) -> float:
    """Fraction of ``queries`` within the k-NN manifold of ``manifold``: a query ``q`` is
    inside if ``|q - p| <= r_k(p)`` for some point ``p`` of ``manifold``."""
    p = as_features(manifold, "manifold")
    q = as_features(queries, "queries")
    if p.shape[1] != q.shape[1]:
        raise ValueError(f"manifold has D={p.shape[1]} but queries has D={q.shape[1]}")
    radii_sq = knn_radii(p, k, batch_size=batch_size) ** 2
    p_sq = (p * p).sum(1)
    inside = 0
    for start in range(0, q.shape[0], batch_size):
        d = _sq_distances(q[start:start + batch_size], p, p_sq)
        inside += int((d <= radii_sq[None, :]).any(axis=1).sum())
    return inside / q.shape[0]


def precision_recall(real_features: Any, fake_features: Any, *, k: int = 3,
                     batch_size: int = 1024) -> tuple[float, float]:
    """``(precision, recall)`` of ``fake_features`` against ``real_features`` ([N, D] each)
    with k-NN manifolds; distances are computed ``batch_size`` rows at a time."""
    real = as_features(real_features, "real_features")
    fake = as_features(fake_features, "fake_features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real_features has D={real.shape[1]} but fake_features has D={fake.shape[1]}")
    for name, x in (("real_features", real), ("fake_features", fake)):
        if k >= x.shape[0]:
            raise ValueError(f"k={k} must be smaller than the number of samples in {name} ({x.shape[0]})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    precision = manifold_coverage(real, fake, k, batch_size=batch_size)
    recall = manifold_coverage(fake, real, k, batch_size=batch_size)
    return precision, recall
