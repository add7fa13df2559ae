"""Normalization between a dataset's stored units and the range the diffusion model is trained in.

A :class:`Normalizer` is a per-channel affine map ``model = raw * scale + bias`` fitted once when a
dataset is built. It serializes to a small JSON-able dict (``to_config``/``from_config``) so a run
directory can store it and sampling can write samples back in the data's original units.

Modes (``normalize`` in the data config):

* ``auto``: ``minus_one_one`` when the data has a known value range (uint8 images: [0, 255];
  the bundled datasets), otherwise ``none`` (float arrays are used as stored).
* ``minus_one_one``: the value range maps to [-1, 1] (uint8: ``x / 127.5 - 1``). Float arrays
  without a known range must lie in [0, 1].
* ``zero_one``: the value range maps to [0, 1] (same range rules).
* ``minmax``: the dataset's global min and max map to -1 and 1.
* ``standardize``: each channel gets zero mean and standard deviation ``target_std``
  (default 0.5, EDM's sigma_data).
* ``none``: identity.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import DataError

__all__ = ["NORMALIZE_MODES", "Normalizer"]

NORMALIZE_MODES = ("auto", "minus_one_one", "zero_one", "minmax", "standardize", "none")
_RESOLVED_MODES = NORMALIZE_MODES[1:]
_CONFIG_KEYS = ("mode", "scale", "bias", "dtype", "value_range")
_FLOAT_RANGE_TOLERANCE = 1e-4
_CHUNK = 1024
_CHUNK_VALUES = 1 << 21


def chunk_rows(shape) -> int:
    """Rows per chunk of a pass over ``[N, C, H, W]`` data: at most 1024 and about 2M values (16 MB as
    float64), so a pass over large images stays small in memory."""
    return max(1, min(_CHUNK, _CHUNK_VALUES // max(1, int(shape[1]) * int(shape[2]) * int(shape[3]))))


def _chunks(images) -> Iterator[torch.Tensor]:
    """``images`` ``[N, C, H, W]`` in consecutive chunks of rows: a tensor sliced, a streamed store
    (:class:`~.store.ImageStore`) read in one pass."""
    rows = chunk_rows(images.shape)
    if isinstance(images, torch.Tensor):
        for start in range(0, images.shape[0], rows):
            yield images[start:start + rows]
    else:
        yield from images.chunks(rows, progress="data statistics")


def _data_stats(images) -> tuple[float, float, list[float], list[float]]:
    """(min, max, per-channel mean, per-channel population std) of ``images`` in one chunked pass (sums in
    float64); the same numbers whether the rows are in memory or streamed."""
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    low, high = math.inf, -math.inf
    for chunk in _chunks(images):
        low, high = min(low, float(chunk.min())), max(high, float(chunk.max()))
        chunk = chunk.to(torch.float64)
        total += chunk.sum(dim=(0, 2, 3))
        total_sq += chunk.square().sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    var = (total_sq / count - mean.square()).clamp_min(0.0)
    return low, high, mean.tolist(), var.sqrt().tolist()


@dataclass(frozen=True)
class Normalizer:
    """Per-channel affine map between stored units and model units.

    ``mode`` is the resolved mode (never ``auto``), ``scale``/``bias`` have one entry per channel,
    ``dtype`` is the stored dtype (``uint8`` or ``float32``) and ``value_range`` the nominal
    (low, high) range of the stored values when known (used by :func:`elucidate.data.pixels.to_uint8`).
    """

    mode: str
    scale: tuple[float, ...]
    bias: tuple[float, ...]
    dtype: str = "float32"
    value_range: tuple[float, float] | None = None
    _scale: torch.Tensor = field(init=False, repr=False, compare=False)
    _bias: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in _RESOLVED_MODES:
            raise DataError(f"normalizer mode {self.mode!r} is not one of {', '.join(_RESOLVED_MODES)}")
        scale = tuple(float(s) for s in self.scale)
        bias = tuple(float(b) for b in self.bias)
        if not scale or len(scale) != len(bias):
            raise DataError(f"normalizer needs one scale and bias per channel, got {len(scale)} and {len(bias)}")
        if not all(math.isfinite(s) and s != 0.0 for s in scale) or not all(map(math.isfinite, bias)):
            raise DataError(f"normalizer scale must be finite and non-zero and bias finite, got {scale}, {bias}")
        if self.dtype not in ("uint8", "float32"):
            raise DataError(f"normalizer dtype {self.dtype!r} is not 'uint8' or 'float32'")
        value_range = None
        if self.value_range is not None:
            value_range = tuple(float(v) for v in self.value_range)
            if len(value_range) != 2 or not all(map(math.isfinite, value_range)) or value_range[0] >= value_range[1]:
                raise DataError(f"normalizer value_range must be finite [low, high] with low < high, "
                                f"got {self.value_range}")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "bias", bias)
        object.__setattr__(self, "value_range", value_range)
        object.__setattr__(self, "_scale", torch.tensor(scale, dtype=torch.float32).view(-1, 1, 1))
        object.__setattr__(self, "_bias", torch.tensor(bias, dtype=torch.float32).view(-1, 1, 1))

    @property
    def channels(self) -> int:
        """Number of channels the normalizer applies to."""
        return len(self.scale)

    @property
    def is_uint8(self) -> bool:
        """Whether the data was stored as uint8 (then ``from_model`` gives [0, 255] floats)."""
        return self.dtype == "uint8"

    @classmethod
    def fit(cls, images, mode: str = "auto", *, target_std: float = 0.5,
            value_range: tuple[float, float] | None = None, source: str = "data") -> Normalizer:
        """Fit the normalizer for ``images [N, C, H, W]`` (uint8 or float32) in the given mode.

        ``images`` is a tensor or a streamed :class:`~.store.ImageStore` (the statistics that ``minmax``,
        ``standardize`` and float ``minus_one_one``/``zero_one`` need are then one chunked pass over it).
        ``value_range`` is the nominal range of float data when known (uint8 is always [0, 255]);
        ``source`` names the data in error messages.
        """
        if mode not in NORMALIZE_MODES:
            raise DataError(f"{source}: normalize={mode!r} is not one of {', '.join(NORMALIZE_MODES)}")
        if not (isinstance(target_std, (int, float)) and math.isfinite(target_std) and target_std > 0):
            raise DataError(f"{source}: target_std={target_std!r} must be a positive number")
        dtype = "uint8" if images.dtype == torch.uint8 else "float32"
        if dtype == "uint8":
            value_range = (0.0, 255.0)
        if mode == "auto":
            mode = "minus_one_one" if value_range is not None else "none"
        channels = images.shape[1]
        if mode in ("minus_one_one", "zero_one"):
            if value_range is None:
                low, high = _data_stats(images)[:2]
                if low < -_FLOAT_RANGE_TOLERANCE or high > 1.0 + _FLOAT_RANGE_TOLERANCE:
                    raise DataError(f"{source}: normalize={mode!r} expects float data in [0, 1] but values span "
                                    f"[{low:.6g}, {high:.6g}]; use 'minmax' or 'standardize'")
                value_range = (0.0, 1.0)
            low, high = value_range
            width = 2.0 if mode == "minus_one_one" else 1.0
            s = width / (high - low)
            scale, bias = [s] * channels, [(-1.0 if mode == "minus_one_one" else 0.0) - low * s] * channels
        elif mode == "minmax":
            low, high = _data_stats(images)[:2]
            s = 2.0 / (high - low) if high > low else 1.0
            scale, bias = [s] * channels, [-1.0 - low * s if high > low else -low] * channels
        elif mode == "standardize":
            mean, std = _data_stats(images)[2:]
            scale = [target_std / sd if sd > 0 else 1.0 for sd in std]
            bias = [-m * s for m, s in zip(mean, scale)]
        else:
            scale, bias = [1.0] * channels, [0.0] * channels
        return cls(mode=mode, scale=tuple(scale), bias=tuple(bias), dtype=dtype, value_range=value_range)

    def _coefficients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.ndim < 3 or x.shape[-3] != self.channels:
            raise DataError(f"normalizer expects [..., {self.channels}, H, W] tensors, got shape {tuple(x.shape)}")
        return self._scale.to(x.device), self._bias.to(x.device)

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        """Stored units (uint8 or float, ``[..., C, H, W]``) to model units, as float32."""
        x = x.to(torch.float32) if x.dtype != torch.float32 else x
        scale, bias = self._coefficients(x)
        return x * scale + bias

    def from_model(self, x: torch.Tensor) -> torch.Tensor:
        """Model units back to the original units as float32 (uint8-origin images: [0, 255] floats)."""
        x = x.to(torch.float32) if x.dtype != torch.float32 else x
        scale, bias = self._coefficients(x)
        return (x - bias) / scale

    def to_config(self) -> dict[str, Any]:
        """A JSON-serializable dict that :meth:`from_config` turns back into this normalizer."""
        return {"mode": self.mode, "scale": list(self.scale), "bias": list(self.bias), "dtype": self.dtype,
                "value_range": None if self.value_range is None else list(self.value_range)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Normalizer:
        """Rebuild a normalizer from :meth:`to_config` output (e.g. loaded from a run directory)."""
        if not isinstance(config, dict):
            raise DataError(f"normalizer config must be a dict, got {type(config).__name__}")
        unknown = sorted(set(config) - set(_CONFIG_KEYS))
        if unknown:
            raise DataError(f"normalizer config: unknown key {unknown[0]!r}; accepted: {', '.join(_CONFIG_KEYS)}")
        missing = [key for key in ("mode", "scale", "bias") if key not in config]
        if missing:
            raise DataError(f"normalizer config: missing key {missing[0]!r}")
        try:
            value_range = config.get("value_range")
            return cls(mode=config["mode"], scale=tuple(config["scale"]), bias=tuple(config["bias"]),
                       dtype=config.get("dtype", "float32"),
                       value_range=None if value_range is None else tuple(value_range))
        except (TypeError, ValueError) as exc:
            if isinstance(exc, DataError):
                raise
            raise DataError(f"normalizer config: invalid values ({exc})") from exc
