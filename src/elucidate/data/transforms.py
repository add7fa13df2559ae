"""Load-time geometric transforms: center crop to the target aspect, then resize.

uint8 data is resized with Pillow (Lanczos when shrinking, bicubic otherwise; both antialiased),
float data with ``torch.nn.functional.interpolate`` (bilinear with antialias, so no overshoot,
or nearest). The x-flip augmentation is not here: datasets apply it at access time.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import DataError

__all__ = ["parse_resolution", "crop_box", "transform_pil", "transform_uint8", "transform_float"]

FLOAT_MODES = ("bilinear", "nearest")


def parse_resolution(value: object, source: str = "resolution") -> tuple[int, int] | None:
    """``None``, an int ``R`` or ``[H, W]`` to ``None`` or ``(H, W)``; DataError on anything else."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise DataError(f"{source}={value!r} must be a positive int or [H, W]")
    if isinstance(value, int):
        value = (value, value)
    if (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        return int(value[0]), int(value[1])
    raise DataError(f"{source}={value!r} must be a positive int or [H, W] of positive ints")


def crop_box(height: int, width: int, target: tuple[int, int] | None) -> tuple[int, int, int, int]:
    """The centered ``(top, left, crop_h, crop_w)`` window with the aspect of ``target`` (square if None)."""
    aspect_h, aspect_w = target if target is not None else (1, 1)
    if height * aspect_w > width * aspect_h:   # too tall: keep full width
        crop_w, crop_h = width, max(1, round(width * aspect_h / aspect_w))
    else:                                       # too wide (or exact): keep full height
        crop_h, crop_w = height, max(1, round(height * aspect_w / aspect_h))
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def _pil_filter(size: tuple[int, int], target: tuple[int, int]) -> Image.Resampling:
    shrinking = target[0] <= size[0] and target[1] <= size[1]
    return Image.Resampling.LANCZOS if shrinking else Image.Resampling.BICUBIC


def transform_pil(image: Image.Image, resolution: tuple[int, int] | None, center_crop: bool) -> Image.Image:
    """Center-crop (optional) then resize a Pillow image to ``resolution (H, W)`` (optional)."""
    if center_crop:
        top, left, crop_h, crop_w = crop_box(image.height, image.width, resolution)
        if (crop_h, crop_w) != (image.height, image.width):
            image = image.crop((left, top, left + crop_w, top + crop_h))
    if resolution is not None and (image.height, image.width) != resolution:
        image = image.resize((resolution[1], resolution[0]),
                             _pil_filter((image.height, image.width), resolution))
    return image


def _crop_tensor(x: torch.Tensor, resolution: tuple[int, int] | None) -> torch.Tensor:
    top, left, crop_h, crop_w = crop_box(x.shape[-2], x.shape[-1], resolution)
    return x[..., top:top + crop_h, left:left + crop_w]


def transform_uint8(x: torch.Tensor, resolution: tuple[int, int] | None, center_crop: bool) -> torch.Tensor:
    """Center-crop/resize uint8 ``[N, C, H, W]`` with Pillow, one channel at a time (any C)."""
    if center_crop:
        x = _crop_tensor(x, resolution)
    if resolution is None or tuple(x.shape[-2:]) == resolution:
        return x.contiguous()
    resample = _pil_filter(tuple(x.shape[-2:]), resolution)
    planes = x.reshape(-1, *x.shape[-2:]).numpy()
    out = np.empty((planes.shape[0], *resolution), dtype=np.uint8)
    for i, plane in enumerate(planes):
        out[i] = np.asarray(Image.fromarray(plane).resize((resolution[1], resolution[0]), resample))
    return torch.from_numpy(out).reshape(*x.shape[:2], *resolution)


def transform_float(x: torch.Tensor, resolution: tuple[int, int] | None, center_crop: bool,
                    mode: str = "bilinear") -> torch.Tensor:
    """Center-crop/resize float32 ``[N, C, H, W]`` with ``F.interpolate`` (bilinear+antialias or nearest)."""
    if mode not in FLOAT_MODES:
        raise DataError(f"interpolation={mode!r} is not one of {', '.join(FLOAT_MODES)}")
    if center_crop:
        x = _crop_tensor(x, resolution)
    if resolution is None or tuple(x.shape[-2:]) == resolution:
        return x.contiguous()
    if mode == "nearest":
        return F.interpolate(x, size=resolution, mode="nearest-exact")
    return F.interpolate(x, size=resolution, mode="bilinear", align_corners=False, antialias=True)
