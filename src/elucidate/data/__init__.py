"""Datasets for diffusion training, validated up front; small data is held in memory as tensors, large data
streamed per batch (memory-mapped ``.npy``/stored ``.npz`` arrays, lazily decoded folders and zips: :mod:`.store`,
:mod:`.mapped`, :mod:`.images`), its training batches read ahead in worker processes (:mod:`.loader`).

Kinds: image folders and zips (PNG/JPEG/WEBP/BMP, NVlabs ``dataset.json`` labels), ``.npy``/``.npz``
arrays (any channel count, uint8 or float), the bundled real ``digits`` (and ``faces``), and reflow's (sample,
noise) couplings (:mod:`.pairs`).
Every dataset yields ``(image [C, H, W] float32 in model units, label int64 scalar or -1)``, has a
fast ``get_batch(indices)``, NVlabs-style x-flip indexing and a serializable ``normalizer``.
Use :func:`build_dataset` with a config dict; all problems raise :class:`DataError` at construction.

May import: errors.
"""
from .arrays import ArrayDataset
from .build import CONFIG_KEYS, DATA_KEYS, DATASETS, build_dataset, data_section_for
from .bundled import DigitsDataset, FacesDataset
from .dataset import ImageDataset
from .errors import DataError
from .images import IMAGE_EXTENSIONS, ImageFolderDataset, ZipImageDataset
from .normalize import NORMALIZE_MODES, Normalizer
from .pairs import PairsDataset, read_pairs, write_pairs

__all__ = ["DataError", "Normalizer", "NORMALIZE_MODES", "ImageDataset", "ImageFolderDataset", "ZipImageDataset",
           "ArrayDataset", "PairsDataset", "read_pairs", "write_pairs", "DigitsDataset", "FacesDataset",
           "IMAGE_EXTENSIONS", "DATASETS", "CONFIG_KEYS", "DATA_KEYS", "build_dataset", "data_section_for"]
