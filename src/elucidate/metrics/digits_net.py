"""A small CNN trained on scikit-learn's 8x8 digits, bundled as a feature network.

``fd_digits`` is the Fréchet distance computed in the penultimate-layer features of this
classifier: the digits analogue of FID (whose Inception-v3 features are meaningless on 8x8
images). The weights ship with the package (``elucidate/assets/digits_classifier.*``) and are
reproduced bit-for-bit by ``scripts/train_digits_classifier.py``; nothing is downloaded.

Input convention (shared with every extractor in :mod:`elucidate.metrics`): float images in
``[0, 255]`` (or ``uint8``), shape ``[B, C, H, W]`` with ``C`` = 1 or 3 (averaged to gray).
Any ``H, W`` is area-resized to 8x8 first. The sklearn digits (values 0..16) enter the
training set as ``x * 255 / 16``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .inputs import check_images

__all__ = [
    "DIGITS_RESOLUTION", "DIGITS_SCALE", "DigitsClassifier", "DigitsSplit", "digits_split",
    "load_digits_classifier", "load_digits_metadata", "preprocess_digits",
]

DIGITS_RESOLUTION = 8
DIGITS_SCALE = 255.0 / 16.0  # sklearn digits are 0..16; this maps them to 0..255
WEIGHTS_FILE = "digits_classifier.safetensors"
METADATA_FILE = "digits_classifier.json"


def preprocess_digits(images: Tensor) -> Tensor:
    """Map ``[B, C, H, W]`` images in [0, 255] (C = 1 or 3, any size) to the network input:
    gray, area-resized to 8x8, scaled to [-1, 1]."""
    x = check_images(images)
    if x.shape[1] == 3:
        x = x.mean(dim=1, keepdim=True)
    if x.shape[-2:] != (DIGITS_RESOLUTION, DIGITS_RESOLUTION):
        x = F.interpolate(x, size=(DIGITS_RESOLUTION, DIGITS_RESOLUTION), mode="area")
    return x / 127.5 - 1.0


class DigitsClassifier(nn.Module):
    """Three 3x3 conv layers (8x8 -> 4x4 -> 2x2) and a two-layer head.

    ``features(x)`` is the ``feature_dim``-d penultimate activation (after ReLU), used for
    ``fd_digits`` / KID / precision-recall; ``forward(x)`` returns the 10 class logits.
    Both take raw images (see :func:`preprocess_digits`).
    """

    def __init__(self, feature_dim: int = 64, channels: tuple[int, int, int] = (16, 32, 64),
                 dropout: float = 0.3) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.feature_dim = feature_dim
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.fc1 = nn.Linear(c3 * 2 * 2, feature_dim)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(feature_dim, 10)

    def features(self, images: Tensor) -> Tensor:
        """Penultimate features ``[B, feature_dim]`` of raw images in [0, 255]."""
        x = preprocess_digits(images)
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
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
    """The fixed stratified train/test split of ``sklearn.datasets.load_digits``.

    Images are float32 ``[N, 1, 8, 8]`` in [0, 255]; labels are int64 ``[N]``."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def digits_split(seed: int = 0, test_fraction: float = 0.2) -> DigitsSplit:
    """Load the 1,797 sklearn digits (shipped with scikit-learn, no download) and split them
    stratified by class with ``train_test_split(random_state=seed)``. The bundled classifier
    was trained on ``digits_split(**metadata['split'])``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = torch.from_numpy(data.images).float().mul_(DIGITS_SCALE).unsqueeze(1)
    labels = torch.from_numpy(data.target).long()
    idx_train, idx_test = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=test_fraction, stratify=data.target,
        random_state=seed)
    idx_train, idx_test = torch.from_numpy(idx_train), torch.from_numpy(idx_test)
    return DigitsSplit(images[idx_train], labels[idx_train], images[idx_test], labels[idx_test])


def _asset(name: str) -> Any:
    return resources.files("elucidate").joinpath("assets", name)


def load_digits_metadata() -> dict[str, Any]:
    """The JSON metadata shipped next to the bundled weights (accuracies, split, convention)."""
    return json.loads(_asset(METADATA_FILE).read_text(encoding="utf-8"))


def load_digits_classifier(device: str | torch.device | None = None) -> DigitsClassifier:
    """The bundled, pretrained :class:`DigitsClassifier` in eval mode (from package data)."""
    from safetensors.torch import load as load_safetensors

    meta = load_digits_metadata()
    arch = meta["architecture"]
    model = DigitsClassifier(feature_dim=int(arch["feature_dim"]),
                             channels=tuple(int(c) for c in arch["channels"]))
    state = load_safetensors(_asset(WEIGHTS_FILE).read_bytes())
    model.load_state_dict(state, strict=True)
    model.eval().requires_grad_(False)
    return model.to(device) if device is not None else model
