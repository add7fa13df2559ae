"""Input checks shared by the metrics: feature matrices and image batches."""
from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor

__all__ = ["as_features", "check_images"]


def as_features(x: Any, name: str) -> np.ndarray:
    """A non-empty 2-D ``[N, D]`` float64 array from a tensor or array (ValueError naming ``name``)."""
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    return x


def check_images(images: Any) -> Tensor:
    """Validate a ``[B, C, H, W]`` tensor with C = 1 or 3 and return it as float32."""
    if not isinstance(images, Tensor):
        raise ValueError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got C={images.shape[1]}")
    return images.float()
