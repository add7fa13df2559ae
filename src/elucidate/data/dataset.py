"""The in-memory image dataset every dataset kind builds: raw tensors + normalizer + x-flip indexing."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from .errors import DataError
from .normalize import Normalizer

__all__ = ["ImageDataset", "check_positive_int"]


def check_positive_int(value: object, option: str, source: str) -> int | None:
    """``value`` if it is None or a positive int, else a DataError naming ``option`` and ``source``."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return value
    raise DataError(f"{source}: {option}={value!r} must be a positive int")


class ImageDataset(Dataset):
    """Map-style dataset over images held in memory as one ``[N, C, H, W]`` tensor.

    ``images`` is the raw stored tensor (uint8, or float32 in the data's own units) and ``labels``
    an int64 ``[N]`` tensor of class indices or ``None``. Items are ``(image, label)`` with the image
    float32 ``[C, H, W]`` in model units (see :attr:`normalizer`) and the label an int64 scalar
    (-1 when unlabeled). With ``xflip=True`` the length is ``2N`` and index ``i >= N`` is image
    ``i - N`` mirrored left-right (the NVlabs convention: deterministic, so training resumes exactly).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None, *, name: str,
                 xflip: bool = False, normalize: str = "auto", target_std: float = 0.5,
                 value_range: tuple[float, float] | None = None, source: str | None = None) -> None:
        source = source or name
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise DataError(f"{source}: images must be a [N, C, H, W] tensor, got {got}")
        if images.dtype not in (torch.uint8, torch.float32):
            raise DataError(f"{source}: images must be uint8 or float32, got {images.dtype}")
        if images.shape[0] == 0 or images.numel() == 0:
            raise DataError(f"{source}: no images (shape {tuple(images.shape)})")
        if images.is_floating_point():
            bad = ~torch.isfinite(images)
            if bool(bad.any()):
                first = int(bad.flatten(1).any(dim=1).nonzero()[0])
                raise DataError(f"{source}: {int(bad.sum())} non-finite values (NaN/Inf), first in item {first}")
        if labels is not None:
            if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
                got = f"{getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}"
                raise DataError(f"{source}: labels must be an int64 tensor of shape [{images.shape[0]}], got {got}")
            if bool((labels < 0).any()):
                raise DataError(f"{source}: labels must be >= 0, found {int(labels.min())}")
        if not isinstance(xflip, bool):
            raise DataError(f"{source}: xflip={xflip!r} must be true or false")
        self.images: torch.Tensor = images.contiguous()
        self.labels: torch.Tensor | None = labels
        self.name: str = name
        self.xflip: bool = xflip
        self.normalizer: Normalizer = Normalizer.fit(self.images, normalize, target_std=target_std,
                                                     value_range=value_range, source=source)

    @property
    def num_images(self) -> int:
        """Number of stored images N (``len`` is ``2N`` with xflip)."""
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        """Channels C of every image."""
        return self.images.shape[1]

    @property
    def resolution(self) -> tuple[int, int]:
        """Image size ``(H, W)``."""
        return self.images.shape[2], self.images.shape[3]

    @property
    def num_classes(self) -> int:
        """``max(label) + 1``, or 0 when unlabeled."""
        return 0 if self.labels is None else int(self.labels.max()) + 1

    def __len__(self) -> int:
        return self.num_images * (2 if self.xflip else 1)

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``[B, C, H, W]`` float32 in model units and labels ``[B]`` int64 for dataset indices."""
        indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= len(self)):
            raise IndexError(f"{self.name}: indices must lie in [0, {len(self)}), got "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        flip = indices >= self.num_images
        base = torch.where(flip, indices - self.num_images, indices)
        images = self.normalizer.to_model(self.images[base])
        if self.xflip and bool(flip.any()):
            images[flip] = images[flip].flip(-1)
        if self.labels is None:
            labels = torch.full((indices.numel(),), -1, dtype=torch.int64)
        else:
            labels = self.labels[base]
        return images, labels

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}: index {index} out of range for length {len(self)}")
        images, labels = self.get_batch(torch.tensor([index]))
        return images[0], labels[0]

    def __repr__(self) -> str:
        height, width = self.resolution
        return (f"{type(self).__name__}(name={self.name!r}, len={len(self)}, images={self.num_images}x"
                f"{self.channels}x{height}x{width} {str(self.images.dtype).removeprefix('torch.')}, "
                f"num_classes={self.num_classes}, xflip={self.xflip}, normalize={self.normalizer.mode!r})")
