"""Memory-mapped arrays: a ``.npy`` file or an uncompressed (stored) ``.npz`` member opened in place, never
copied whole into memory, and the streamed store that reads a batch's rows from it.

:func:`open_array_member` gives a ``np.memmap`` (copy-on-write: writing to it never touches the file) when the
data can be mapped (C order, a stored member; ``np.savez`` and ``elucidate pack`` write stored members) and
otherwise the array loaded into memory (a compressed member, Fortran order). :class:`MappedStore` gathers a
batch's rows from the map and applies the load-time transforms to them (layout NHWC -> NCHW, float -> float32,
crop/resize); its streaming passes (the non-finite check, normalization statistics) read the file in chunks
with ordinary reads, so building a dataset does not make the mapped pages resident.
"""
from __future__ import annotations

import os
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .errors import DataError, describe
from .store import STAT_CHUNK, ImageStore
from .transforms import transform_float, transform_uint8

__all__ = ["open_array_member", "npy_data_offset", "MappedStore"]

_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # a zip member's local file header (30 bytes)
_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError, struct.error)


def npy_data_offset(file, start: int = 0) -> tuple[int, tuple[int, ...], np.dtype, bool]:
    """(offset of the data, shape, dtype, fortran order) of the ``.npy`` stream starting at ``start`` of the
    open binary ``file``."""
    file.seek(start)
    version = np.lib.format.read_magic(file)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(file)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(file)
    else:
        shape, fortran, dtype = np.lib.format._read_array_header(file, version)  # 3.0: utf-8 header
    return file.tell(), tuple(shape), dtype, bool(fortran)


def _member_start(file, info: zipfile.ZipInfo) -> int:
    """Offset in the zip of a member's data (after its local header, whose name/extra lengths may differ from
    the central directory's)."""
    file.seek(info.header_offset)
    fields = _LOCAL_HEADER.unpack(file.read(_LOCAL_HEADER.size))
    if fields[0] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header of {info.filename}")
    return info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1]


def open_array_member(path: str | os.PathLike, name: str | None = None) -> np.ndarray:
    """The array of a ``.npy`` file (``name`` None) or the array ``name`` of an ``.npz``: memory-mapped when
    possible (see the module docstring), else loaded. Never unpickles. Errors are the low-level exceptions of
    numpy/zipfile (the caller names the file)."""
    path = Path(path)
    if name is None:
        with open(path, "rb") as f:
            offset, shape, dtype, fortran = npy_data_offset(f)
        if dtype.hasobject:
            raise ValueError("object arrays cannot be loaded without pickle")
        if fortran or not shape or 0 in shape:
            return np.load(path, allow_pickle=False)
        return np.memmap(path, dtype=dtype, mode="c", offset=offset, shape=shape)
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(name + ".npy")
        if info.compress_type == zipfile.ZIP_STORED:
            with open(path, "rb") as f:
                offset, shape, dtype, fortran = npy_data_offset(f, _member_start(f, info))
            if not dtype.hasobject and not fortran and shape and 0 not in shape:
                return np.memmap(path, dtype=dtype, mode="c", offset=offset, shape=shape)
        with archive.open(info) as member:
            return np.lib.format.read_array(member, allow_pickle=False)


class MappedStore(ImageStore):
    """Rows of a memory-mapped ``array`` (N,H,W / NCHW / NHWC as ``nhwc`` says; uint8 or float), the first
    ``count`` of them, each batch transposed to NCHW, converted (float -> float32) and cropped/resized to
    ``size`` like the in-memory path does to the whole array."""

    kind = "memory-mapped"

    def __init__(self, array: np.memmap, *, nhwc: bool, count: int, size: tuple[int, int] | None,
                 center_crop: bool, source: str) -> None:
        self.array, self.nhwc, self.size, self.center_crop, self.source = array, nhwc, size, center_crop, source
        if array.dtype != np.uint8 and array.dtype.kind != "f":
            raise DataError(f"{source}: dtype {array.dtype} is not supported; use uint8 or float (16/32/64)")
        dtype = torch.uint8 if array.dtype == np.uint8 else torch.float32
        if dtype == torch.float32:
            self._check_values(count)
        probe = self._transform(np.asarray(array[:1]))
        super().__init__((count, *probe.shape[1:]), dtype)

    def _transform(self, raw: np.ndarray) -> torch.Tensor:
        """Stored rows (as in the file) -> ``[B, C, H, W]`` uint8/float32 at the final size."""
        raw = raw[:, None] if raw.ndim == 3 else (raw.transpose(0, 3, 1, 2) if self.nhwc else raw)
        if raw.dtype == np.uint8:
            return transform_uint8(torch.from_numpy(np.ascontiguousarray(raw)), self.size, self.center_crop)
        return transform_float(torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32)), self.size,
                               self.center_crop)

    def read(self, rows: torch.Tensor) -> torch.Tensor:
        return self._transform(self.array[np.asarray(rows, dtype=np.int64)])

    def _file_chunks(self, count: int, size: int) -> Iterator[np.ndarray]:
        """The first ``count`` stored rows, ``size`` at a time, read from the file with ordinary reads (the
        mapped pages are not made resident by a pass)."""
        row = int(np.prod(self.array.shape[1:]))
        with open(self.array.filename, "rb") as f:
            for start in range(0, count, size):
                n = min(size, count - start)
                f.seek(self.array.offset + start * row * self.array.dtype.itemsize)
                chunk = np.fromfile(f, dtype=self.array.dtype, count=n * row)
                if chunk.size != n * row:
                    raise DataError(f"{self.source}: the file is shorter than its header says (truncated?)")
                yield chunk.reshape(n, *self.array.shape[1:])

    def chunks(self, size: int = STAT_CHUNK, progress: str | None = None) -> Iterator[torch.Tensor]:
        bar = None
        if progress is not None and self.shape[0] > size:
            from tqdm.auto import tqdm
            bar = tqdm(total=self.shape[0], desc=progress, unit="img", leave=False)
        try:
            for chunk in self._file_chunks(self.shape[0], size):
                yield self._transform(chunk)
                if bar is not None:
                    bar.update(chunk.shape[0])
        finally:
            if bar is not None:
                bar.close()

    def _check_values(self, count: int) -> None:
        """The in-memory path's float checks, streamed: no NaN/Inf, nothing overflowing float32."""
        bad, first, overflow = 0, None, False
        rows = max(1, min(STAT_CHUNK, (1 << 21) // max(1, int(np.prod(self.array.shape[1:])))))
        try:
            for start, chunk in zip(range(0, count, rows), self._file_chunks(count, rows)):
                finite = np.isfinite(chunk)
                if not finite.all():
                    bad += int((~finite).sum())
                    first = start + int(np.argwhere(~finite)[0][0]) if first is None else first
                elif chunk.dtype != np.float32:
                    with np.errstate(over="ignore"):
                        overflow = overflow or not np.isfinite(chunk.astype(np.float32)).all()
        except OSError as exc:
            raise DataError(f"{self.source}: cannot read ({describe(exc)})") from exc
        if bad:
            raise DataError(f"{self.source}: {bad} non-finite values (NaN/Inf), first in item {first}")
        if overflow:
            raise DataError(f"{self.source}: values overflow float32 (|x| > 3.4e38)")

    def __getstate__(self) -> dict:  # a worker started by spawn maps the file again
        state = dict(self.__dict__)
        state["array"] = (self.array.filename, self.array.dtype.str, self.array.offset, self.array.shape)
        return state

    def __setstate__(self, state: dict) -> None:
        filename, dtype, offset, shape = state["array"]
        state["array"] = np.memmap(filename, dtype=np.dtype(dtype), mode="c", offset=offset, shape=shape)
        self.__dict__.update(state)
