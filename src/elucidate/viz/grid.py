"""Sample grids as uint8 arrays and PNG files (NumPy + Pillow; no matplotlib figure involved).

Inputs are float ``[N, C, H, W]`` in ``value_range`` (default the model range (-1, 1)) or uint8
``[N, H, W, C]``, converted by :func:`elucidate.data.pixels.to_uint8`.

C = 1 gives a grey grid ``[H, W, 1]`` and C = 3 an RGB grid ``[H, W, 3]``. Any other channel count
(C = 2 or C > 3: multi-channel physical fields such as velocity components) is shown as one row
of C per-channel panels per sample, each channel mapped through ``cmap`` (viridis by default) with
the same fixed range, so colours are comparable across channels and samples; the grid is RGB.
"""
from __future__ import annotations

import io
import math
import os
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image

from ..data.pixels import to_uint8
from .common import atomic_write_bytes

__all__ = ["to_uint8", "image_grid", "save_image_grid", "auto_scale"]


def auto_scale(height: int, width: int, target: int = 64) -> int:
    """Nearest-neighbour upscale factor that makes an image at least ``target`` pixels on its long side."""
    return max(1, math.ceil(target / max(height, width, 1)))


def _colormap_lut(cmap: str) -> np.ndarray:
    colors = matplotlib.colormaps[cmap](np.linspace(0.0, 1.0, 256))[:, :3]
    return np.floor(colors * 255 + 0.5).astype(np.uint8)


def _assemble(tiles: np.ndarray, ncol: int, pad: int, pad_value: int) -> np.ndarray:
    """Lay ``[N, h, w, c]`` tiles out row-major on a ``pad``-separated (and bordered) canvas."""
    n, h, w, c = tiles.shape
    nrows = math.ceil(n / ncol)
    canvas = np.full((nrows * h + (nrows + 1) * pad, ncol * w + (ncol + 1) * pad, c), pad_value, np.uint8)
    for k in range(n):
        r, q = divmod(k, ncol)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        canvas[top:top + h, left:left + w] = tiles[k]
    return canvas


def image_grid(images, nrow: int | None = None, pad: int = 1, *, scale: int | None = 1,
               pad_value: int = 255, cmap: str = "viridis",
               value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """Tile images into one uint8 ``[H, W, C]`` grid with ``pad`` pixels between and around tiles.

    ``nrow`` is the number of samples per grid row (as in torchvision's ``make_grid``); default
    ``ceil(sqrt(N))`` for C in {1, 3} and 1 for multi-channel fields (one sample per row).
    ``scale`` upscales every image by an integer factor with nearest neighbour before padding
    (``None`` picks :func:`auto_scale`, e.g. 8 for 8x8 digits). C = 1 returns ``[H, W, 1]``,
    everything else ``[H, W, 3]``.
    """
    tiles = to_uint8(images, value_range)
    n, h, w, c = tiles.shape
    if n == 0 or h == 0 or w == 0 or c == 0:
        raise ValueError(f"nothing to show: images have shape {tiles.shape} (as [N, H, W, C])")
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ValueError(f"pad must be an integer >= 0, got {pad!r}")
    if not 0 <= int(pad_value) <= 255:
        raise ValueError(f"pad_value must be in 0..255, got {pad_value!r}")
    scale = auto_scale(h, w) if scale is None else scale
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be an integer >= 1 or None, got {scale!r}")
    if scale > 1:
        tiles = tiles.repeat(scale, axis=1).repeat(scale, axis=2)
    if c not in (1, 3):  # multi-channel field: each sample becomes a row of colour-mapped panels
        panels = _colormap_lut(cmap)[tiles.transpose(0, 3, 1, 2)]  # [N, C, h, w, 3]
        tiles = np.stack([_assemble(p, c, pad, pad_value)[pad:-pad or None, pad:-pad or None]
                          for p in panels])
        default_nrow = 1
    else:
        default_nrow = math.ceil(math.sqrt(n))
    ncol = default_nrow if nrow is None else nrow
    if isinstance(ncol, bool) or not isinstance(ncol, int) or ncol < 1:
        raise ValueError(f"nrow must be an integer >= 1 or None, got {nrow!r}")
    return _assemble(tiles, min(ncol, n), pad, pad_value)


def save_image_grid(images, path: str | os.PathLike, nrow: int | None = None, pad: int = 1, *,
                    scale: int | None = None, pad_value: int = 255, cmap: str = "viridis",
                    value_range: tuple[float, float] = (-1.0, 1.0)) -> Path:
    """Write :func:`image_grid` to a PNG at ``path`` atomically; returns the path.

    Unlike :func:`image_grid`, ``scale`` defaults to ``None`` (automatic upscaling of tiny images).
    """
    grid = image_grid(images, nrow, pad, scale=scale, pad_value=pad_value, cmap=cmap,
                      value_range=value_range)
    image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)  # "L" or "RGB"
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return atomic_write_bytes(buffer.getvalue(), path)
