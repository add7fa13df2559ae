"""Fréchet distance between Gaussians and streaming feature statistics (FID-style).

Notation (Heusel et al. 2017): features of two sets are summarised by their mean ``mu`` and
covariance ``sigma``; the Fréchet (2-Wasserstein) distance between N(mu1, S1) and N(mu2, S2) is

    d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).

Reference statistics are ``.npz`` files holding ``mu`` [D] and ``sigma`` [D, D], the format
written by NVlabs/edm's ``fid.py ref`` and pytorch-fid's ``--save-stats``, so published
statistics load as they are.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg

from ..runtime.files import atomic_path

__all__ = ["FeatureStats", "MissingFileError", "frechet_distance", "load_stats", "save_stats"]


class MissingFileError(FileNotFoundError, ValueError):
    """A required file does not exist (catchable as ``FileNotFoundError`` or ``ValueError``)."""


def _as_array(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a numeric array: {e}") from None


def _check_stats(mu: np.ndarray, sigma: np.ndarray, mu_name: str, sigma_name: str) -> None:
    if mu.ndim != 1:
        raise ValueError(f"{mu_name} must be 1-D [D], got shape {mu.shape}")
    if sigma.ndim != 2 or sigma.shape[0] != sigma.shape[1]:
        raise ValueError(f"{sigma_name} must be a square [D, D] matrix, got shape {sigma.shape}")
    if sigma.shape[0] != mu.shape[0]:
        raise ValueError(f"{sigma_name} has shape {sigma.shape} but {mu_name} has D={mu.shape[0]}")


def _sqrtm(a: np.ndarray) -> tuple[np.ndarray, bool]:
    """Principal square root of ``a``; the flag says whether scipy found it unreliable."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(a)
    unreliable = any(issubclass(w.category, scipy.linalg.LinAlgWarning) for w in caught)
    return np.asarray(root), unreliable or not np.isfinite(root).all()


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, *, eps: float = 1e-6) -> float:
    """Fréchet distance ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2))`` between two Gaussians.

    Computed in float64 with ``scipy.linalg.sqrtm``. If ``S1 S2`` is (numerically) singular,
    ``eps * I`` is added to both covariances and the root retried; imaginary parts that are
    round-off (|Im diag| <= 1e-3) are dropped, larger ones raise ``ValueError``.
    """
    m1, s1 = _as_array(mu1, "mu1"), _as_array(sigma1, "sigma1")
    m2, s2 = _as_array(mu2, "mu2"), _as_array(sigma2, "sigma2")
    _check_stats(m1, s1, "mu1", "sigma1")
    _check_stats(m2, s2, "mu2", "sigma2")
    if m1.shape != m2.shape:
        raise ValueError(f"mu1 and mu2 have different dimensions: {m1.shape[0]} vs {m2.shape[0]}")
    diff = m1 - m2
    covmean, unreliable = _sqrtm(s1 @ s2)
    if unreliable:
        offset = np.eye(s1.shape[0]) * eps
        covmean, _ = _sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        max_imag = float(np.max(np.abs(np.diagonal(covmean).imag)))
        if max_imag > 1e-3:
            raise ValueError(f"sqrtm(sigma1 @ sigma2) has a large imaginary component "
                             f"({max_imag:.3g}); are sigma1/sigma2 valid covariances?")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


class FeatureStats:
    """Streaming mean and (unbiased, like ``np.cov``) covariance of features, in float64.

    ``update(features [B, D])`` merges a batch with Chan et al.'s parallel formula, so the
    result equals ``np.mean`` / ``np.cov(rowvar=False)`` of the concatenation. With
    ``keep_features=True`` the raw features are also kept (``.features``) for KID and
    precision/recall.
    """

    def __init__(self, keep_features: bool = False) -> None:
        self.keep_features = keep_features
        self.count = 0
        self._mean: np.ndarray | None = None
        self._m2: np.ndarray | None = None  # sum of outer products of deviations
        self._kept: list[np.ndarray] = []

    @property
    def dim(self) -> int | None:
        """Feature dimension D (``None`` before the first update)."""
        return None if self._mean is None else int(self._mean.shape[0])

    def update(self, features: Any) -> None:
        """Add a batch of features ``[B, D]`` (numpy array or torch tensor)."""
        x = _as_array(features, "features")
        if x.ndim != 2:
            raise ValueError(f"features must be 2-D [B, D], got shape {x.shape}")
        if self.dim is not None and x.shape[1] != self.dim:
            raise ValueError(f"features has D={x.shape[1]} but earlier batches had D={self.dim}")
        b = x.shape[0]
        if b == 0:
            return
        if self.keep_features:
            self._kept.append(x.astype(np.float32))
        mean_b = x.mean(axis=0)
        dev = x - mean_b
        m2_b = dev.T @ dev
        if self._mean is None:
            self.count, self._mean, self._m2 = b, mean_b, m2_b
            return
        n = self.count + b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (b / n)
        self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (self.count * b / n)
        self.count = n

    @property
    def mean(self) -> np.ndarray:
        """Mean ``mu`` [D] of all features seen."""
        if self._mean is None:
            raise ValueError("FeatureStats is empty: call update() with features first")
        return self._mean.copy()

    @property
    def cov(self) -> np.ndarray:
        """Unbiased covariance ``sigma`` [D, D] (needs at least 2 samples)."""
        if self._m2 is None or self.count < 2:
            raise ValueError(f"covariance needs at least 2 samples, got {self.count}")
        return self._m2 / (self.count - 1)

    @property
    def features(self) -> np.ndarray:
        """All features seen, ``[N, D]`` float32 (only with ``keep_features=True``)."""
        if not self.keep_features:
            raise ValueError("features were not kept: construct FeatureStats(keep_features=True)")
        if not self._kept:
            raise ValueError("FeatureStats is empty: call update() with features first")
        if len(self._kept) > 1:
            self._kept = [np.concatenate(self._kept, axis=0)]
        return self._kept[0]

    def save(self, path: str | os.PathLike[str], **extra: Any) -> None:
        """Write ``mu``/``sigma`` (and ``extra`` arrays) with :func:`save_stats`."""
        save_stats(path, self.mean, self.cov, **extra)

    def __repr__(self) -> str:
        return f"FeatureStats(count={self.count}, dim={self.dim}, keep_features={self.keep_features})"


def save_stats(path: str | os.PathLike[str], mu: Any, sigma: Any, **extra: Any) -> None:
    """Atomically write reference statistics ``{mu, sigma, **extra}`` to the ``.npz`` ``path``
    (temporary file in the same directory, then rename). The name is used as given."""
    m, s = _as_array(mu, "mu"), _as_array(sigma, "sigma")
    _check_stats(m, s, "mu", "sigma")
    reserved = {"mu", "sigma"} & set(extra)
    if reserved:
        raise ValueError(f"extra may not redefine {sorted(reserved)}")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, mu=m, sigma=s, **{k: np.asarray(v) for k, v in extra.items()})


def load_stats(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read ``(mu, sigma)`` as float64 from a ``.npz`` written by :func:`save_stats`, NVlabs/edm
    (``fid.py ref``) or pytorch-fid. Raises ``ValueError`` naming the file and the problem
    (missing file — also a ``FileNotFoundError`` —, unreadable file, missing key, bad shapes)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"reference statistics file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = list(data.files)
            missing = [k for k in ("mu", "sigma") if k not in keys]
            if not missing:
                mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    except Exception as e:  # np.load raises ValueError/OSError/BadZipFile/... on bad files
        raise ValueError(f"{path}: not a readable .npz statistics file ({e})") from None
    if missing:
        raise ValueError(f"{path}: missing key {missing[0]!r} (found keys: {keys})")
    try:
        _check_stats(mu, sigma, "mu", "sigma")
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return mu, sigma
