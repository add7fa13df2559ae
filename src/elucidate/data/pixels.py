"""Model-range images -> 8-bit pixels: the one conversion every writer, grid and metric uses.

Float ``[N, C, H, W]`` (or one ``[C, H, W]``) in ``value_range`` (default the model range [-1, 1])
maps to ``uint8 = floor(255 (x - lo) / (hi - lo) + 1/2)`` after clipping to the range (NaN -> lo). With
a dataset ``normalizer`` that knows the stored value range, images are first mapped back to the
data's own units and that range is used (e.g. digits 0..16). uint8 ``[N, H, W, C]`` passes through.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["to_uint8", "to_pixels"]


def _to_numpy(images) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu()
        if images.is_floating_point() and images.dtype != torch.float64:
            images = images.float()
        return images.numpy()
    return np.asarray(images)


def to_uint8(images, value_range: tuple[float, float] = (-1.0, 1.0), *, normalizer=None) -> np.ndarray:
    """Images as uint8 ``[N, H, W, C]`` (see the module docstring for the accepted inputs)."""
    if normalizer is not None and getattr(normalizer, "value_range", None) is not None and \
            isinstance(images, torch.Tensor) and images.is_floating_point():
        images, value_range = normalizer.from_model(images), normalizer.value_range
    arr = _to_numpy(images)
    if arr.dtype == np.uint8:
        if arr.ndim == 3:
            arr = arr[..., None]
        if arr.ndim != 4:
            raise ValueError(f"uint8 images must be [N, H, W, C] or [N, H, W], got shape {arr.shape}")
        return arr
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"images must be float [N, C, H, W] or uint8 [N, H, W, C], got dtype {arr.dtype}")
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise ValueError(f"float images must be [N, C, H, W] or [C, H, W], got shape {arr.shape}")
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise ValueError(f"value_range must be (lo, hi) with hi > lo, got {value_range}")
    unit = np.clip((np.nan_to_num(arr.astype(np.float64), nan=lo) - lo) / (hi - lo), 0.0, 1.0)
    return np.floor(unit * 255 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1)


def to_pixels(x: torch.Tensor, normalizer=None) -> torch.Tensor:
    """Model-range images ``[N, C, H, W]`` -> float ``[N, C, H, W]`` pixel values 0..255 (what the
    feature networks take), quantized exactly like the PNGs and ``.npz`` files we write."""
    pixels = torch.from_numpy(np.ascontiguousarray(to_uint8(x, normalizer=normalizer).transpose(0, 3, 1, 2)))
    return pixels.float().to(x.device)
