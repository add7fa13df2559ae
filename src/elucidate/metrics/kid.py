"""Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs").

KID is the squared maximum mean discrepancy between two feature sets under the cubic
polynomial kernel ``k(x, y) = (x·y / d + 1)^3``, estimated without bias and averaged over
random subsets. Unlike FID it has an unbiased estimator, so it is comparable across sample
sizes and can be slightly negative for identical distributions.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .inputs import as_features

__all__ = ["kid", "mmd2_unbiased", "polynomial_kernel"]


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0) -> np.ndarray:
    """Gram matrix ``(x @ y.T / d + coef0) ** degree`` for ``x`` [N, d], ``y`` [M, d]."""
    return (x @ y.T / x.shape[1] + coef0) ** degree


def mmd2_unbiased(x: Any, y: Any) -> float:
    """Unbiased MMD^2 of two equal-sized sets ``x, y`` [m, d] under the KID kernel:
    ``(sum_{i!=j} k(x_i, x_j) + sum_{i!=j} k(y_i, y_j)) / (m (m-1)) - 2 sum_{i,j} k(x_i, y_j) / m^2``."""
    a, b = as_features(x, "x"), as_features(y, "y")
    if a.shape != b.shape:
        raise ValueError(f"x and y must have the same shape [m, d], got {a.shape} and {b.shape}")
    m = a.shape[0]
    if m < 2:
        raise ValueError(f"mmd2_unbiased needs at least 2 samples per set, got {m}")
    k_xx, k_yy, k_xy = polynomial_kernel(a, a), polynomial_kernel(b, b), polynomial_kernel(a, b)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / (m * m))


def kid(features_a: Any, features_b: Any, *, num_subsets: int = 100, subset_size: int = 1000,
        seed: int | None = 0, generator: np.random.Generator | None = None) -> tuple[float, float]:
    """KID ``(mean, std)`` over ``num_subsets`` random subsets of ``subset_size`` samples drawn
    without replacement from each set (``subset_size`` is clipped to the smaller set).

    ``generator`` (a ``numpy.random.Generator``) takes precedence over ``seed``; the default
    ``seed=0`` makes the result reproducible.
    """
    a, b = as_features(features_a, "features_a"), as_features(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"features_a has D={a.shape[1]} but features_b has D={b.shape[1]}")
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
    if subset_size < 2:
        raise ValueError(f"subset_size must be >= 2, got {subset_size}")
    m = min(subset_size, a.shape[0], b.shape[0])
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples in each set, got {a.shape[0]} and {b.shape[0]}")
    rng = generator if generator is not None else np.random.default_rng(seed)
    values = np.empty(num_subsets)
    for s in range(num_subsets):
        x = a[rng.choice(a.shape[0], m, replace=False)]
        y = b[rng.choice(b.shape[0], m, replace=False)]
        values[s] = mmd2_unbiased(x, y)
    return float(values.mean()), float(values.std())
