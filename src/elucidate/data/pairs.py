"""Couplings of noise and data: the training set of rectified flow's reflow (Liu et al. 2023).

A pairs file (``.npz``, written by ``elucidate reflow``) holds ``images`` ``[N, C, H, W]`` float32 samples in model
units, ``noise`` ``[N, C, H, W]`` float32, the standard normal noise each sample was generated from (x at the
first level = sigma_max * noise), and optionally ``labels`` ``[N]`` int64. Trained on, a pair (y, n) gives the noisy
input y + sigma n with *its* n instead of a fresh draw, so the network learns the straight path from n to y: for
Flow, x_t = (1 - t) y + t n.

The data section names the real data the pairs stand for (``data: {dataset: digits, pairs: PATH}``): its
normalizer maps the samples back to pixels and the metrics know which data the model is of; its images are not
trained on.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from .dataset import ImageDataset
from .errors import DataError, describe

__all__ = ["PairsDataset", "read_pairs", "write_pairs", "PAIR_ARRAYS"]

PAIR_ARRAYS = ("images", "noise", "labels")


def write_pairs(path: str | os.PathLike, images: torch.Tensor, noise: torch.Tensor,
                labels: torch.Tensor | None = None) -> Path:
    """Write a pairs file atomically (a temporary file renamed into place; never half-written)."""
    path = Path(path)
    if images.shape != noise.shape or images.ndim != 4:
        raise ValueError(f"images {tuple(images.shape)} and noise {tuple(noise.shape)} must be equal [N, C, H, W]")
    arrays = {"images": images.float().cpu().numpy(), "noise": noise.float().cpu().numpy()}
    if labels is not None:
        arrays["labels"] = labels.long().cpu().numpy()
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)
    return path


def read_pairs(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(images, noise, labels or None) of a pairs file; a one-line DataError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such pairs file (write one with `elucidate reflow`)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in ("images", "noise") if k not in archive.files]
            if missing:
                raise DataError(f"{path}: not a pairs file: no {missing[0]!r} array; keys: {', '.join(archive.files)}")
            images, noise = archive["images"], archive["noise"]
            labels = archive["labels"] if "labels" in archive.files else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: cannot read pairs file ({describe(exc)})") from exc
    if images.ndim != 4 or images.shape != noise.shape or images.dtype != np.float32 or noise.dtype != np.float32:
        raise DataError(f"{path}: images and noise must be float32 [N, C, H, W] arrays of one shape, got "
                        f"{images.dtype} {images.shape} and {noise.dtype} {noise.shape}")
    if labels is not None and (labels.shape != images.shape[:1] or labels.dtype.kind not in "iu"):
        raise DataError(f"{path}: labels must be an integer [{images.shape[0]}] array, got {labels.dtype} "
                        f"{labels.shape}")
    if not (np.isfinite(images).all() and np.isfinite(noise).all()):
        raise DataError(f"{path}: non-finite values (NaN/Inf) in images or noise")
    return (torch.from_numpy(images), torch.from_numpy(noise),
            None if labels is None else torch.from_numpy(labels.astype(np.int64)))


class PairsDataset(ImageDataset):
    """The couplings of a pairs file, standing for the data ``real`` (whose normalizer, class names and name it
    takes; its shape must match). Items are the samples; :meth:`get_noise` gives each one's noise. Pairs without
    labels (an unconditional model's) make an unlabeled dataset even when the real data has labels."""

    def __init__(self, path: str | os.PathLike, real: ImageDataset) -> None:
        images, noise, labels = read_pairs(path)
        shape = (real.channels, *real.resolution)
        if tuple(images.shape[1:]) != shape:
            raise DataError(f"{path}: pairs of shape {tuple(images.shape[1:])} but the data ({real.source}) is "
                            f"{shape}")
        if real.concat is not None or real.context is not None:
            raise DataError(f"{path}: pairs of data with spatial or token conditions are not supported")
        if labels is not None and real.labels is None:
            raise DataError(f"{path}: the pairs have labels but the data ({real.source}) has none")
        self.pair_noise = noise.contiguous()
        self.pairs_path = Path(path)
        # stored in the data's units, so the images come back in model units through the data's normalizer
        super().__init__(real.normalizer.from_model(images), labels, name=real.name, normalizer=real.normalizer,
                         source=f"{path} (reflow pairs of {real.source})",
                         class_names=None if labels is None else real.class_names)

    def get_noise(self, indices: torch.Tensor) -> torch.Tensor:
        return self.pair_noise[self._locate(indices)[0]]
