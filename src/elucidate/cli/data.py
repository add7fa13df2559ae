"""Data commands: ``elucidate pack``, an image folder or zip into one array file that ``dataset: npz`` memory-maps
(docs/scale.md).

The output holds the images as stored by the dataset (uint8 ``[N, C, H, W]``, after ``channels`` conversion and
``center_crop``/``resolution``, without x-flip or normalization), written row chunk by row chunk (never the whole
array in memory) into a temporary file renamed into place:

* ``OUT.npz`` (recommended): an uncompressed zip with ``images`` and, when the data has labels (``dataset.json``,
  or the class sub-folders with ``labels=True``), ``labels`` (int64 ``[N]``). Read it with
  ``{dataset: npz, path: OUT.npz, key: images, labels_key: labels}``.
* ``OUT.npy``: the images only (labels need the ``.npz``).
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..data import DataError, ImageFolderDataset, ZipImageDataset
from ..runtime.files import atomic_path

__all__ = ["register", "pack_images", "PACK_SUFFIXES"]


def register(sub) -> dict:
    """Add the pack subcommand; returns its handler."""
    p = sub.add_parser("pack", help="pack an image folder or .zip into one .npz/.npy array that training "
                                    "memory-maps (no decoding during training)")
    p.add_argument("source", type=Path, help="image folder or .zip (the layouts of dataset: folder / zip)")
    p.add_argument("--out", type=Path, required=True,
                   help="output .npz (images and labels, uncompressed) or .npy (images only); written atomically")
    p.add_argument("--resolution", type=int, default=None, help="resize every image to R x R (default: keep)")
    p.add_argument("--center-crop", action="store_true", help="crop to a square before resizing")
    p.add_argument("--channels", type=int, default=None,
                   help="convert to 1 (L), 3 (RGB) or 4 (RGBA) channels (default: the images' own mode, the same "
                        "for all)")
    p.add_argument("--labels", action="store_true",
                   help="without a dataset.json: the top-level sub-folders are the classes (dataset.json labels "
                        "are packed whenever present)")
    return {"pack": cmd_pack}


def cmd_pack(args) -> int:
    import yaml

    result = pack_images(args.source, args.out, resolution=args.resolution, labels=True if args.labels else None,
                         channels=args.channels, center_crop=args.center_crop)
    c, h, w = result["shape"]
    classes = result["classes"]
    print(f"wrote {args.out}: {result['count']} images {c}x{h}x{w} uint8"
          + (f", labels of {len(classes)} classes ({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})"
             if classes else ", labels" if "labels_key" in result["data"] else ""))
    print("train on it with this data section:")
    print(yaml.safe_dump({"data": result["data"]}, default_flow_style=None, sort_keys=False).rstrip())
    return 0


# ---------------------------------------------------------------------------------------------- pack
PACK_SUFFIXES = (".npz", ".npy")
_ROWS = 256  # images decoded and written per chunk


def _write_npy(f, store, progress: bool) -> None:
    """The store's rows as an .npy stream: header, then chunk after chunk."""
    np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                                             "fortran_order": False, "shape": tuple(store.shape)})
    from tqdm.auto import tqdm

    with tqdm(total=store.shape[0], desc="packing", unit="img", disable=not progress) as bar:
        for start in range(0, store.shape[0], _ROWS):
            rows = store.read(torch.arange(start, min(start + _ROWS, store.shape[0])))
            f.write(np.ascontiguousarray(rows.numpy()).tobytes())
            bar.update(rows.shape[0])


def pack_images(source: str | os.PathLike, out: str | os.PathLike, *, resolution: int | None = None,
                labels: bool | None = None, channels: int | None = None, center_crop: bool = False,
                progress: bool = True) -> dict:
    """Pack the folder or ``.zip`` ``source`` into ``out`` (module docstring); returns the ``data`` section that
    reads it back plus ``count``, ``shape`` and ``classes`` (the class names of sub-folder labels, else None)."""
    source, out = Path(source), Path(out)
    if out.suffix.lower() not in PACK_SUFFIXES:
        raise DataError(f"--out {out}: expected a .npz (images and labels) or .npy (images) file")
    options = dict(resolution=resolution, labels=labels, channels=channels, center_crop=center_crop)
    if source.is_dir():
        dataset = ImageFolderDataset(source, **options)
    elif source.suffix.lower() == ".zip":
        dataset = ZipImageDataset(source, **options)
    else:
        raise DataError(f"{source}: expected an image folder or a .zip" if source.exists() else
                        f"{source}: no such folder or file")
    if dataset.labels is not None and out.suffix.lower() == ".npy":
        raise DataError(f"--out {out}: {source} has labels, which a .npy cannot hold; write a .npz")
    with atomic_path(out) as tmp:  # never half-written
        if out.suffix.lower() == ".npy":
            with open(tmp, "wb") as f:
                _write_npy(f, dataset.store, progress)
        else:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
                with archive.open("images.npy", "w", force_zip64=True) as f:
                    _write_npy(f, dataset.store, progress)
                if dataset.labels is not None:
                    with archive.open("labels.npy", "w") as f:
                        np.lib.format.write_array(f, dataset.labels.numpy(), allow_pickle=False)
    section = {"dataset": "npz", "path": str(out)}
    if out.suffix.lower() == ".npz":
        section.update(key="images", **({"labels_key": "labels"} if dataset.labels is not None else {}))
    return {"data": section, "count": dataset.num_images, "shape": list(dataset.store.shape[1:]),
            "classes": dataset.class_names}
