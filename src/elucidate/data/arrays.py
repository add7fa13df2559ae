"""Array datasets from .npy/.npz files: any channel count, uint8 or float, NCHW/NHWC/NHW layouts.

Layout: ``N,H,W`` is gray; for 4-D arrays ``layout`` (``"NCHW"``/``"NHWC"``) says where the
channels are, or, when omitted, the channel axis is the smaller of axes 1 and 3 (a tie is an error
unless ``channels`` singles one out). ``.npz`` files with one array need no ``key`` (nor when the
only other array is ``labels_key``). uint8 stays uint8; float16/32/64 become float32 and must be
finite. Labels (``labels_key``) must be a 1-D non-negative integer array with one entry per item.

Conditions: ``cond_key`` names a spatial condition array ``[N, C', H', W']`` (NCHW/NHWC as ``layout``
or the small-axis rule; N,H,W is one channel), cropped and resized to the images' final size like the
images and normalized by its own normalizer (mode ``cond_normalize``, default the images' mode);
``context_key`` a float ``[N, L, D]`` token array (``[N, D]`` is one token) used as stored.

Streaming: the image array of a ``.npy`` file or an uncompressed ``.npz`` member (``np.savez``, ``elucidate pack``)
is memory-mapped and read per batch (:mod:`.mapped`): layout, float32 conversion and resizing happen to each
batch's rows, the float checks and normalization statistics are chunked passes over the file. A compressed
member (``np.savez_compressed``) or a Fortran-order array is loaded into memory as before. Labels and
conditions are always loaded into memory.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from .dataset import ImageDataset, check_positive_int
from .errors import DataError, describe
from .mapped import MappedStore, open_array_member
from .transforms import parse_resolution, transform_float, transform_uint8

__all__ = ["ARRAY_SUFFIXES", "LAYOUTS", "ArrayDataset", "read_array", "to_nchw"]

ARRAY_SUFFIXES = (".npy", ".npz")
LAYOUTS = ("NCHW", "NHWC")
_LOAD_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError)


def _pick_key(keys: list[str], key: str | None, labels_key: str | None, source: str,
              others: tuple[str, ...] = ()) -> str:
    listing = ", ".join(keys) if keys else "none"
    if key is not None:
        if key not in keys:
            raise DataError(f"{source}: no array {key!r}; keys: {listing}")
        return key
    candidates = [k for k in keys if k != labels_key and k not in others]
    if len(candidates) != 1:
        raise DataError(f"{source}: {'contains no arrays' if not candidates else 'holds several arrays'}; "
                        f"set key to one of: {listing}")
    return candidates[0]


def read_array(path: str | os.PathLike, key: str | None = None, labels_key: str | None = None, *,
               with_labels: bool = True, others: tuple[str, ...] = ()) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Open the image array (memory-mapped when it can be: :func:`~.mapped.open_array_member`) and load the
    ``labels_key`` array unless ``with_labels`` is False, from .npy/.npz.

    Returns ``(images, labels_or_None, source)`` where ``source`` names file and key for messages.
    ``others`` are arrays read separately (conditions), never picked as the images.
    """
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{file}: no such file" if not file.exists() else f"{file}: not a file")
    suffix = file.suffix.lower()
    if suffix not in ARRAY_SUFFIXES:
        raise DataError(f"{file}: expected a .npy or .npz file, got suffix {file.suffix!r}")
    if suffix == ".npy":
        for option, value in (("key", key), ("labels_key", labels_key), *(("cond_key/context_key", o) for o in others)):
            if value is not None:
                raise DataError(f"{file}: option {option}={value!r} needs an .npz file (a .npy holds one array)")
    try:
        if suffix == ".npy":
            return open_array_member(file), None, str(file)
        archive = np.load(file, allow_pickle=False)
    except _LOAD_ERRORS as exc:
        if suffix == ".npy" and zipfile.is_zipfile(file):
            raise DataError(f"{file}: content is an .npz archive, which does not match its suffix "
                            f"{file.suffix!r}") from None
        raise DataError(f"{file}: cannot read {suffix[1:]} ({describe(exc)})") from exc
    if isinstance(archive, np.ndarray):
        raise DataError(f"{file}: content is a single .npy array, which does not match its suffix {file.suffix!r}")
    with archive:
        keys = list(archive.files)
        chosen = _pick_key(keys, key, labels_key, str(file), others)
        if labels_key is not None and labels_key not in keys:
            raise DataError(f"{file}: no labels array {labels_key!r}; keys: {', '.join(keys)}")
        arrays = []
        for name, mapped in ((chosen, True), (labels_key if with_labels else None, False)):
            try:
                arrays.append(None if name is None else open_array_member(file, name) if mapped else archive[name])
            except _LOAD_ERRORS as exc:
                raise DataError(f"{file}:{name}: cannot read array ({describe(exc)})") from exc
    return arrays[0], arrays[1], f"{file}:{chosen}"


def read_named(path: str | os.PathLike, name: str, what: str) -> np.ndarray:
    """The array ``name`` of an .npz (after :func:`read_array` validated the file); ``what`` names its role."""
    with np.load(Path(path), allow_pickle=False) as archive:
        if name not in archive.files:
            raise DataError(f"{path}: no {what} array {name!r}; keys: {', '.join(archive.files)}")
        try:
            return archive[name]
        except _LOAD_ERRORS as exc:
            raise DataError(f"{path}:{name}: cannot read array ({describe(exc)})") from exc


def to_nchw(array: np.ndarray, layout: str | None, channels: int | None, source: str) -> np.ndarray:
    """Reorder a 3-D (N,H,W) or 4-D array to N,C,H,W following ``layout`` or the small-axis rule."""
    if layout is not None and layout not in LAYOUTS:
        raise DataError(f"{source}: layout={layout!r} is not one of {', '.join(LAYOUTS)}")
    if array.ndim == 3:
        array = array[:, None]
        layout = "NCHW"
    elif array.ndim != 4:
        raise DataError(f"{source}: array of shape {array.shape} has ndim {array.ndim}; "
                        "expected N,H,W or N,C,H,W / N,H,W,C")
    if layout is None:
        matches = [axis for axis in (1, 3) if channels is not None and array.shape[axis] == channels]
        if len(matches) == 1:
            layout = "NCHW" if matches[0] == 1 else "NHWC"
        elif array.shape[1] != array.shape[3]:
            layout = "NCHW" if array.shape[1] < array.shape[3] else "NHWC"
        else:
            raise DataError(f"{source}: cannot tell the channel axis of shape {array.shape}; set layout: NCHW or NHWC")
    if layout == "NHWC":
        array = array.transpose(0, 3, 1, 2)
    if channels is not None and array.shape[1] != channels:
        raise DataError(f"{source}: has {array.shape[1]} channels (shape {array.shape} as {layout}), "
                        f"expected channels={channels}")
    return array


def _to_tensor(array: np.ndarray, source: str) -> torch.Tensor:
    if array.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(array))
    if array.dtype.kind != "f":
        raise DataError(f"{source}: dtype {array.dtype} is not supported; use uint8 or float (16/32/64)")
    finite = np.isfinite(array)
    if not finite.all():
        first = int(np.argwhere(~finite)[0][0])
        raise DataError(f"{source}: {int((~finite).sum())} non-finite values (NaN/Inf), first in item {first}")
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if not bool(torch.isfinite(tensor).all()):
        raise DataError(f"{source}: values overflow float32 (|x| > 3.4e38)")
    return tensor


def _to_labels(labels: np.ndarray, count: int, source: str) -> torch.Tensor:
    if labels.dtype.kind not in "iu" or labels.ndim != 1 or labels.shape[0] != count:
        raise DataError(f"{source}: labels must be a 1-D integer array of length {count}, "
                        f"got {labels.dtype} with shape {labels.shape}")
    if labels.size and labels.min() < 0:
        raise DataError(f"{source}: labels must be >= 0, found {int(labels.min())}")
    return torch.from_numpy(labels.astype(np.int64))


def _resize(tensor: torch.Tensor, size: tuple[int, int] | None, center_crop: bool) -> torch.Tensor:
    return (transform_uint8 if tensor.dtype == torch.uint8 else transform_float)(tensor, size, center_crop)


def _read_condition(path, cond_key: str, layout: str | None, count: int, size: tuple[int, int],
                    center_crop: bool, max_size: int | None) -> torch.Tensor:
    """The spatial condition as a uint8/float32 ``[N, C', H, W]`` tensor at the images' final size."""
    source = f"{path}:{cond_key}"
    array = to_nchw(read_named(path, cond_key, "condition"), layout, None, source)
    if array.shape[0] != count:
        raise DataError(f"{source}: has {array.shape[0]} items but the images have {count}")
    return _resize(_to_tensor(array[:max_size], source), size, center_crop)  # (crop to their aspect,) their size


def _read_context(path, context_key: str, count: int, max_size: int | None) -> torch.Tensor:
    """The context as a float32 ``[N, L, D]`` tensor (``[N, D]`` is one token per item)."""
    source = f"{path}:{context_key}"
    array = read_named(path, context_key, "context")
    if array.ndim == 2:
        array = array[:, None]
    if array.ndim != 3 or array.shape[0] != count or array.dtype.kind != "f":
        raise DataError(f"{source}: the context must be a float [N, L, D] (or [N, D]) array with N = {count}, "
                        f"got {array.dtype} with shape {array.shape}")
    return _to_tensor(array[:max_size], source)


class ArrayDataset(ImageDataset):
    """Images from a ``.npy`` or ``.npz`` array (see the module docstring for layouts and keys).

    uint8 arrays are images in [0, 255]; float arrays keep their units (``normalize='auto'`` is
    ``none`` for them). ``channels`` asserts the channel count; ``max_size`` keeps the first N items.
    ``cond_key`` / ``context_key`` add conditions (module docstring).
    """

    def __init__(self, path: str | os.PathLike, *, key: str | None = None, labels_key: str | None = None,
                 layout: str | None = None, resolution: int | list[int] | tuple[int, int] | None = None,
                 center_crop: bool = False, xflip: bool = False, normalize: str = "auto", target_std: float = 0.5,
                 channels: int | None = None, labels: bool = True, max_size: int | None = None,
                 cond_key: str | None = None, context_key: str | None = None,
                 cond_normalize: str | None = None) -> None:
        size = parse_resolution(resolution, f"{path}: resolution")
        channels = check_positive_int(channels, "channels", str(path))
        max_size = check_positive_int(max_size, "max_size", str(path))
        if not isinstance(center_crop, bool):
            raise DataError(f"{path}: center_crop={center_crop!r} must be true or false")
        others = tuple(k for k in (cond_key, context_key) if k is not None)
        array, label_array, source = read_array(path, key, labels_key, with_labels=labels, others=others)
        count = array.shape[0] if max_size is None else min(max_size, array.shape[0])
        nchw = to_nchw(array, layout, channels, source)  # a view: validates the layout, reads nothing
        label_tensor = None
        if label_array is not None:
            label_tensor = _to_labels(label_array, array.shape[0], f"{path}:{labels_key}")[:max_size]
        if isinstance(array, np.memmap):  # streamed: rows are read and transformed per batch
            images = MappedStore(array, nhwc=array.ndim == 4 and nchw.strides != array.strides, count=count,
                                 size=size, center_crop=center_crop, source=source)
        else:
            images = _resize(_to_tensor(nchw[:max_size], source), size, center_crop)
        final = (images.shape[2], images.shape[3])
        concat = None if cond_key is None else _read_condition(path, cond_key, layout, array.shape[0], final,
                                                               center_crop, max_size)
        context = None if context_key is None else _read_context(path, context_key, array.shape[0], max_size)
        super().__init__(images, label_tensor, name=Path(path).stem, xflip=xflip, normalize=normalize,
                         target_std=target_std, source=source, concat=concat, context=context,
                         cond_normalize=cond_normalize)
