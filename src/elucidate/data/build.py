"""``build_dataset(config)``: the one entry point from a data config dict to a dataset.

Accepted keys: :data:`KEY_DOCS` (all optional except ``dataset``; ``None`` means the default).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .arrays import ArrayDataset
from .bundled import DigitsDataset, FacesDataset, MnistDataset
from .dataset import ImageDataset
from .errors import DataError
from .images import ImageFolderDataset, ZipImageDataset
from .loader import check_workers
from .pairs import PairsDataset

__all__ = ["DATASETS", "CONFIG_KEYS", "DATA_KEYS", "RESUMABLE_DATA_KEYS", "build_dataset", "data_section_for"]

DATASETS = ("digits", "folder", "zip", "npz", "faces", "mnist")
#: Every data config key with its one-line description (the config reference is generated from it).
KEY_DOCS = {
    "dataset": "kind of dataset: " + ", ".join(DATASETS) + " (npz also reads .npy files)",
    "path": "folder, zip or array file (required for folder/zip/npz; not for the bundled ones)",
    "key": "npz only: the array to read when the file holds several",
    "labels_key": "npz only: the integer label array",
    "cond_key": "npz only: a spatial condition array [N, C, H, W] or NHWC (network.conditioning concat), resized "
                "like the images to their size",
    "context_key": "npz only: a float [N, L, D] (or [N, D]) token array (network.conditioning crossattn), used as "
                   "stored; all-zero tokens are padding",
    "cond_normalize": "normalize mode of the spatial condition (default: the images' normalize)",
    "condition": "digits/faces only: derived conditions, lowres (concat: the 2x-downsampled image) and/or "
                 "class_tokens (digits; context: the label's name as 5 letter tokens of 31 dims)",
    "layout": "npz only: NCHW or NHWC (default: the channel axis is the small one)",
    "resolution": "int or [H, W]: resize (after the optional crop)",
    "center_crop": "crop to the target aspect ratio before resizing (default false)",
    "xflip": "add mirrored copies (doubles the length; default false)",
    "normalize": "auto (8-bit images and digits -> [-1, 1], float arrays unchanged), minus_one_one, zero_one, "
                 "minmax, standardize (per channel, std = target_std) or none",
    "target_std": "std for normalize: standardize (EDM's sigma_data; default 0.5)",
    "channels": "expected channel count; for image files it picks the conversion (1 = L, 3 = RGB, 4 = RGBA)",
    "labels": "use labels when present (default); true on a folder/zip without dataset.json: the sub-folders "
              "are the classes (sorted names); false: no labels",
    "max_size": "keep only the first N items",
    "workers": "processes that read (decode) training batches of a streamed dataset (a memory-mapped .npy/.npz, "
               "a folder or zip) ahead of the step; 0 = in the training process (default: min(4, CPUs - 1))",
    "pairs": "a pairs file of (sample, noise) couplings written by `elucidate reflow`: trained on instead of the "
             "data's images, each with its own noise (rectified flow's reflow); the rest of the section still says "
             "which data the samples stand for (units, metrics)",
}
CONFIG_KEYS = tuple(KEY_DOCS)
#: data keys that may change when a run is resumed: they change how batches are read, never which
RESUMABLE_DATA_KEYS = ("workers",)
DATA_KEYS = CONFIG_KEYS  # the name the run config uses for the accepted ``data:`` keys
_BUNDLED = {"digits": DigitsDataset, "faces": FacesDataset, "mnist": MnistDataset}
_ARRAY_ONLY = ("key", "labels_key", "layout", "cond_key", "context_key")
_BOOLS = ("center_crop", "xflip", "labels")
_STRINGS = ("key", "labels_key", "layout", "normalize", "cond_key", "context_key", "cond_normalize", "pairs")


def build_dataset(config: Mapping[str, Any]) -> ImageDataset:
    """Build the dataset a data config describes; every problem is a one-line DataError at this call."""
    if not isinstance(config, Mapping):
        raise DataError(f"data config must be a mapping, got {type(config).__name__}")
    for name in config:
        if name not in CONFIG_KEYS:
            raise DataError(f"data config: unknown key {name!r}; accepted: {', '.join(CONFIG_KEYS)}")
    options = {name: value for name, value in config.items() if value is not None}
    kind = options.pop("dataset", None)
    if kind not in DATASETS:
        raise DataError(f"data config: dataset={kind!r} is not one of {', '.join(DATASETS)}")
    for name in _BOOLS:
        if name in options and not isinstance(options[name], bool):
            raise DataError(f"data config: {name}={options[name]!r} must be true or false")
    for name in _STRINGS:
        if name in options and not isinstance(options[name], str):
            raise DataError(f"data config: {name}={options[name]!r} must be a string")
    for name in _ARRAY_ONLY:
        if name in options and kind != "npz":
            raise DataError(f"data config: {name} applies only to dataset 'npz', not {kind!r}")
    if "cond_normalize" in options and kind in ("folder", "zip"):
        raise DataError(f"data config: cond_normalize applies to datasets with a spatial condition "
                        f"(npz cond_key, condition: lowres), not {kind!r}")
    if "condition" in options and kind not in _BUNDLED:
        raise DataError(f"data config: condition applies only to the bundled datasets "
                        f"({', '.join(_BUNDLED)}), not {kind!r}; use cond_key/context_key with npz")
    workers = check_workers(options.pop("workers", None))
    dataset = _build(kind, options, config)
    dataset.workers = workers
    return dataset


def _build(kind: str, options: dict, config: Mapping[str, Any]) -> ImageDataset:
    pairs = options.pop("pairs", None)
    if pairs is not None:
        if options.get("xflip"):
            raise DataError("data config: xflip cannot be used with pairs (a mirrored sample is not the ODE's "
                            "image of its noise)")
        return PairsDataset(pairs, build_dataset({**config, "pairs": None}))
    path = options.pop("path", None)
    if kind in _BUNDLED:
        if path is not None:
            raise DataError(f"data config: path is not allowed for the bundled dataset {kind!r}")
        return _BUNDLED[kind](**options)
    if path is None:
        raise DataError(f"data config: dataset {kind!r} needs a path")
    if not isinstance(path, (str, os.PathLike)):
        raise DataError(f"data config: path={path!r} must be a string")
    factory = {"folder": ImageFolderDataset, "zip": ZipImageDataset, "npz": ArrayDataset}[kind]
    return factory(path, **options)


def data_section_for(spec: str) -> dict | None:
    """The ``data`` section a command-line dataset names: a bundled dataset (digits, mnist, faces), an
    image folder, a .zip, or an .npz/.npy array; None when ``spec`` is none of them. A folder of that name
    comes before a bundled dataset (your ``faces/`` folder is your faces)."""
    suffix = os.path.splitext(spec)[1].lower()
    if os.path.isdir(spec):
        return {"dataset": "folder", "path": spec}
    if spec in ("digits", "faces", "mnist"):
        return {"dataset": spec}
    if suffix == ".zip":
        return {"dataset": "zip", "path": spec}
    if suffix in (".npz", ".npy"):
        return {"dataset": "npz", "path": spec}
    return None
