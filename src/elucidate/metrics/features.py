"""A common feature-extractor interface, batched statistics and a classifier score.

Every extractor maps images ``[B, C, H, W]`` as float in [0, 255] (or uint8) to float32
features ``[B, D]`` on the CPU, without gradients, and exposes ``.dim`` and ``.name``:

* ``"fd_digits"`` / ``"fd_mnist"``: the bundled digits classifiers' 64-d penultimate features (8x8
  sklearn digits / 28x28 MNIST);
* ``"fid"`` / ``"inception"``: FID Inception-v3 pool3 (2048-d), weights from a local ``path``;
* :class:`ModuleExtractor`: any ``nn.Module`` of your own.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .frechet import FeatureStats

__all__ = ["feature_extractor", "ClassifierScore", "FeatureExtractor", "ModuleExtractor", "classifier_score",
           "compute_stats", "get_feature_extractor"]

EXTRACTOR_NAMES = ("fd_digits", "fd_mnist", "fid", "inception")


class FeatureExtractor:
    """Callable ``images [B, C, H, W] in [0, 255] -> features [B, D]`` (float32, CPU)."""

    name: str = "features"

    @property
    def dim(self) -> int:
        """Feature dimension D."""
        raise NotImplementedError

    def __call__(self, images: Tensor) -> Tensor:
        raise NotImplementedError


class ModuleExtractor(FeatureExtractor):
    """Use any ``nn.Module`` (or callable) as a feature extractor.

    ``preprocess`` (optional) is applied to the images first; the module's output is
    flattened to ``[B, D]``. ``dim`` may be left ``None``; it is then known after the first
    call. ``device`` moves the module and each batch there; the module runs in eval mode
    under ``torch.inference_mode``.
    """

    def __init__(self, module: nn.Module | Callable[[Tensor], Tensor], dim: int | None = None,
                 preprocess: Callable[[Tensor], Tensor] | None = None, *, name: str | None = None,
                 device: str | torch.device | None = None) -> None:
        self.module = module
        self.preprocess = preprocess
        self.name = name or type(module).__name__
        self.device = torch.device(device) if device is not None else None
        self._dim = dim
        if isinstance(module, nn.Module):
            module.eval()
            if self.device is not None:
                module.to(self.device)

    @property
    def dim(self) -> int:
        if self._dim is None:
            raise ValueError(f"{self.name}: feature dim unknown until the first call "
                             f"(pass dim= to ModuleExtractor)")
        return self._dim

    def __call__(self, images: Tensor) -> Tensor:
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if not isinstance(images, Tensor):
            raise ValueError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.ndim != 4:
            raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
        with torch.inference_mode():
            x = images.to(self.device) if self.device is not None else images
            if self.preprocess is not None:
                x = self.preprocess(x)
            out = self.module(x)
        out = out.reshape(out.shape[0], -1).float().cpu()
        if self._dim is None:
            self._dim = int(out.shape[1])
        elif out.shape[1] != self._dim:
            raise ValueError(f"{self.name}: module returned D={out.shape[1]}, expected dim={self._dim}")
        return out

    def __repr__(self) -> str:
        return f"ModuleExtractor(name={self.name!r}, dim={self._dim})"


def get_feature_extractor(name: str, *, path: str | None = None,
                          device: str | torch.device | None = None) -> ModuleExtractor:
    """Extractor by name: ``"fd_digits"`` / ``"fd_mnist"`` (bundled weights) or ``"fid"`` /
    ``"inception"`` (Inception-v3; ``path`` to the local ``pt_inception-2015-12-05-6726825d.pth``
    is required)."""
    from .digits_net import BUNDLED_CLASSIFIERS

    if name in BUNDLED_CLASSIFIERS:
        from .digits_net import load_bundled_classifier
        classifier = load_bundled_classifier(name, device=device)
        return ModuleExtractor(classifier.features, dim=classifier.feature_dim, name=name, device=device)
    if name in ("fid", "inception"):
        if path is None:
            raise ValueError(f"feature extractor {name!r} needs path= to the Inception weights "
                             "(pt_inception-2015-12-05-6726825d.pth); see docs/metrics.md")
        from .inception import load_inception
        net = load_inception(path, device=device)
        return ModuleExtractor(net, dim=net.feature_dim, name=name, device=device)
    raise ValueError(f"unknown feature extractor name {name!r}; choose one of {EXTRACTOR_NAMES}")


def _batches(images: Any, batch_size: int) -> Iterable[Any]:
    if isinstance(images, (Tensor, np.ndarray)):
        if images.ndim != 4:
            raise ValueError(f"images must be [N, C, H, W] or an iterable of batches, "
                             f"got shape {tuple(images.shape)}")
        return (images[i:i + batch_size] for i in range(0, images.shape[0], batch_size))
    return images


def compute_stats(extractor: Callable[[Tensor], Tensor], images_iterable: Iterable[Any] | Tensor,
                  *, keep_features: bool = False, batch_size: int = 256) -> FeatureStats:
    """Feature statistics of all images: ``images_iterable`` yields ``[B, C, H, W]`` batches
    (tensors or arrays in [0, 255]), or is one ``[N, C, H, W]`` tensor/array that is split into
    ``batch_size`` chunks. Returns a :class:`FeatureStats` (``keep_features`` for KID / PR)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    stats = FeatureStats(keep_features=keep_features)
    for batch in _batches(images_iterable, batch_size):
        if isinstance(batch, np.ndarray):
            batch = torch.from_numpy(batch)
        stats.update(extractor(batch))
    if stats.count == 0:
        raise ValueError("images_iterable yielded no images")
    return stats


@dataclass(frozen=True)
class ClassifierScore:
    """Recognizability of generated samples under a classifier.

    ``confident_fraction``: share of samples whose top probability is >= ``threshold``;
    ``histogram``: predicted-class counts [K]; ``class_fractions``: ``histogram / N``;
    ``mean_confidence``: mean top probability; ``class_entropy``: entropy (nats) of
    ``class_fractions`` (log K for perfectly balanced classes)."""

    confident_fraction: float
    histogram: np.ndarray
    class_fractions: np.ndarray
    mean_confidence: float
    class_entropy: float
    threshold: float
    count: int


def classifier_score(probabilities: Any, *, threshold: float = 0.9) -> ClassifierScore:
    """Summarise class probabilities ``[N, K]`` (rows summing to 1, e.g. from
    ``DigitsClassifier.predict_proba``) into a :class:`ClassifierScore`."""
    if isinstance(probabilities, Tensor):
        probabilities = probabilities.detach().cpu().numpy()
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] == 0:
        raise ValueError(f"probabilities must be a non-empty [N, K] array, got shape {p.shape}")
    if (p < -1e-6).any() or not np.allclose(p.sum(1), 1.0, atol=1e-3):
        raise ValueError("probabilities must be non-negative with rows summing to 1 "
                         "(apply softmax to logits first)")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    top = p.max(1)
    hist = np.bincount(p.argmax(1), minlength=p.shape[1])
    frac = hist / p.shape[0]
    nz = frac[frac > 0]
    return ClassifierScore(
        confident_fraction=float((top >= threshold).mean()), histogram=hist, class_fractions=frac,
        mean_confidence=float(top.mean()), class_entropy=float(-(nz * np.log(nz)).sum()),
        threshold=float(threshold), count=int(p.shape[0]))


def feature_extractor(name: str, inception: str | None = None, device=None):
    """The feature network by name ("fd_digits" or "inception" from a local weights file)."""
    from ..errors import UserError

    if name == "inception" and inception is None:
        raise UserError("Inception features need --inception PATH to pt_inception-2015-12-05-6726825d.pth "
                        "(see docs/metrics.md; nothing is downloaded)")
    try:
        return get_feature_extractor(name, path=inception, device=device)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from None
