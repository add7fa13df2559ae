"""Writing generated samples: one PNG grid, a folder of PNGs (one per seed), or an .npz archive; never
samples with NaN/Inf (:func:`check_finite`)."""
from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..data.pixels import to_uint8
from ..errors import UserError
from ..runtime.files import WriteError, atomic_path, atomic_write_bytes
from ..viz import image_grid, save_image_grid

__all__ = ["write_samples", "output_kind", "check_finite", "NonFiniteSamples"]


class NonFiniteSamples(UserError):
    """Sampling produced NaN/Inf (a diverged model or an unstable sampler setting)."""


def check_finite(x: torch.Tensor, seeds: Sequence[int]) -> None:
    """Raise :class:`NonFiniteSamples` naming how many samples (and which seeds) hold NaN/Inf."""
    bad = ~torch.isfinite(x.reshape(len(x), -1)).all(dim=1)
    if bool(bad.any()):
        which = [int(s) for s, b in zip(seeds, bad.tolist()) if b]
        shown = ", ".join(map(str, which[:5])) + (", ..." if len(which) > 5 else "")
        raise NonFiniteSamples(f"{len(which)} of {len(x)} samples contain NaN/Inf (seeds {shown}): the model or the "
                               f"sampler settings diverged; nothing was written")


def output_kind(out: Path) -> str:
    """'grid' for .png/.jpg, 'npz' for .npz, 'dir' for a folder (trailing slash, existing dir or no suffix)."""
    text = str(out)
    if text.endswith(("/", os.sep)) or out.is_dir() or out.suffix == "":
        return "dir"
    suffix = out.suffix.lower()
    if suffix in (".png", ".jpg", ".jpeg", ".webp"):
        return "grid"
    if suffix == ".npz":
        return "npz"
    raise UserError(f"--out {out}: expected a .png grid, a .npz file or a directory (ending in /)")


def write_samples(x: torch.Tensor, seeds: Sequence[int], out: Path, *, normalizer=None) -> Path:
    """Write model-range samples ``[N, C, H, W]``; returns the path written. Every file appears
    atomically; a failed write raises :class:`~elucidate.runtime.files.WriteError` (one line: path, OS error)."""
    out = Path(out)
    kind = output_kind(out)
    if kind == "grid":
        return save_image_grid(x, out)
    pixels = to_uint8(x, normalizer=normalizer)
    if kind == "npz":
        arrays = {"samples": pixels, "seeds": np.asarray(list(seeds), dtype=np.int64)}
        if normalizer is not None:  # values in the data's own units (e.g. physical fields)
            arrays["values"] = normalizer.from_model(x).permute(0, 2, 3, 1).numpy().astype(np.float32)
        with atomic_path(out, suffix=".npz") as tmp:
            np.savez_compressed(tmp, **arrays)
        return out
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(out, e) from e
    from PIL import Image

    for i, (seed, image) in enumerate(zip(seeds, x)):
        C = image.shape[0]
        if C in (1, 3):
            array = pixels[i]
            array = array[..., 0] if C == 1 else array
        else:
            array = image_grid(image[None], scale=1)
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        atomic_write_bytes(buffer.getvalue(), out / f"{int(seed):06d}.png")
    return out
