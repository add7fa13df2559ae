"""Image datasets from a folder tree or a .zip: PNG/JPEG/WEBP/BMP decoded with Pillow into uint8.

Files are found recursively (extensions case-insensitive; hidden files/dirs and ``__MACOSX`` are
skipped) and ordered by sorted relative path. Labels come from an optional ``dataset.json`` at the
root in the NVlabs/edm format ``{"labels": [["relative/path.png", 3], ...]}`` (or ``"labels": null``).
With ``labels=True`` and no ``dataset.json``, the folders are the classes: every image must sit in a
top-level sub-folder, and the class of ``cat/x.png`` is the index of ``cat`` among the sorted
sub-folder names (kept as ``class_names``). ``labels=None`` (the default) uses only ``dataset.json``.

Image modes: palette/bilevel/CMYK/YCbCr images count as their natural mode (L, LA, RGB or RGBA).
Without ``channels`` all images must share one mode (otherwise a DataError names one file of each);
``channels`` (1 -> L, 2 -> LA, 3 -> RGB, 4 -> RGBA) converts every image to that mode.
16/32-bit and float images are rejected (store them as .npy instead).

Lazy decoding: building a dataset only indexes the files (names, labels, and each image's header: mode and
size, read by Pillow without decoding the pixels), so mixed modes/sizes and files that are not images are
found at once; the pixels are decoded per item when a batch asks for them (:class:`ImageFileStore`; training
reads batches in DataLoader worker processes, ``data.workers``). A file whose header is fine but whose data
is damaged (a truncated PNG) is reported, by name, when it is first decoded.
"""
from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .dataset import ImageDataset, check_positive_int
from .errors import DataError, describe
from .store import ImageStore
from .transforms import crop_box, parse_resolution, transform_pil

__all__ = ["IMAGE_EXTENSIONS", "LABELS_FILE", "ImageFolderDataset", "ZipImageDataset", "ImageFileStore",
           "FolderFiles", "ZipFiles", "index_images", "load_images"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
LABELS_FILE = "dataset.json"
CHANNEL_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
_NATURAL_MODES = {"1": "L", "L": "L", "LA": "LA", "La": "LA", "RGB": "RGB", "RGBA": "RGBA", "RGBa": "RGBA",
                  "RGBX": "RGB", "CMYK": "RGB", "YCbCr": "RGB", "PA": "RGBA"}


def _is_image(name: str) -> bool:
    parts = name.split("/")
    hidden = any(part.startswith(".") or part == "__MACOSX" for part in parts)
    return not hidden and name.lower().endswith(IMAGE_EXTENSIONS)


def _natural_mode(image: Image.Image, where: str) -> str:
    if image.mode == "P":
        return "RGBA" if "transparency" in image.info else "RGB"
    if image.mode not in _NATURAL_MODES:
        raise DataError(f"{where}: unsupported image mode {image.mode!r} (16/32-bit or float); "
                        "convert it to 8-bit or store the data as .npy")
    return _NATURAL_MODES[image.mode]


def _decode(read: Callable[[str], bytes], name: str, where: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(read(name)))
        image.load()
    except DataError:
        raise
    except Exception as exc:  # Pillow raises many types for corrupt data
        raise DataError(f"{where}: cannot read image ({describe(exc)})") from exc
    return image


def parse_labels(raw: bytes, where: str) -> dict[str, int] | None:
    """Parse an NVlabs ``dataset.json``: relative path -> class index, or None for ``"labels": null``."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{where}: invalid JSON ({describe(exc)})") from exc
    if not isinstance(data, dict) or "labels" not in data:
        raise DataError(f"{where}: expected an object with a 'labels' list, e.g. {{\"labels\": [[\"a.png\", 0]]}}")
    entries = data["labels"]
    if entries is None:
        return None
    if not isinstance(entries, list):
        raise DataError(f"{where}: 'labels' must be a list of [path, label] pairs, got {type(entries).__name__}")
    labels: dict[str, int] = {}
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
            raise DataError(f"{where}: each label entry must be [\"relative/path.png\", int], got {str(entry)[:80]}")
        path, label = entry
        if isinstance(label, bool) or not isinstance(label, int) or label < 0:
            raise DataError(f"{where}: label of {path!r} must be an int >= 0, got {label!r}")
        if path in labels:
            raise DataError(f"{where}: {path!r} is listed twice")
        labels[path] = label
    return labels


def _match_labels(table: dict[str, int], all_names: list[str], kept: list[str], where: str) -> torch.Tensor:
    existing = set(all_names)
    for path in table:
        if path not in existing:
            raise DataError(f"{where}: lists {path!r} but no such image exists")
    for name in kept:
        if name not in table:
            raise DataError(f"{where}: no label for image {name!r}")
    return torch.tensor([table[name] for name in kept], dtype=torch.int64)


def folder_classes(names: list[str], where: str) -> tuple[dict[str, int], list[str]]:
    """Labels from top-level sub-folders: (relative path -> index in the sorted folder names, names)."""
    loose = [name for name in names if "/" not in name]
    if loose:
        raise DataError(f"{where}: labels=true without {LABELS_FILE} takes the sub-folders as classes, but "
                        f"{loose[0]!r} is not in a sub-folder (add a {LABELS_FILE} or move it into its class folder)")
    classes = sorted({name.split("/", 1)[0] for name in names})
    index = {c: i for i, c in enumerate(classes)}
    return {name: index[name.split("/", 1)[0]] for name in names}, classes


def convert_item(image: Image.Image, where: str, mode: str | None, resolution: tuple[int, int] | None,
                 center_crop: bool) -> np.ndarray:
    """A decoded image converted to ``mode`` (None: its natural mode), cropped and resized: uint8 ``[H, W, C]``
    (the one conversion of the in-memory and the lazy path)."""
    natural = _natural_mode(image, where)
    if image.mode != natural:
        image = image.convert(natural)
    if mode is not None and image.mode != mode:
        image = image.convert(mode)
    array = np.asarray(transform_pil(image, resolution, center_crop))
    return array[:, :, None] if array.ndim == 2 else array


def load_images(names: list[str], read: Callable[[str], bytes], source: str, *, sep: str = "/",
                resolution: tuple[int, int] | None = None, center_crop: bool = False,
                channels: int | None = None) -> torch.Tensor:
    """Decode, convert, crop and resize the named images into one uint8 ``[N, C, H, W]`` tensor in memory.

    ``read(name)`` returns a file's bytes; errors name ``f"{source}{sep}{name}"``.
    """
    target_mode = CHANNEL_MODES[channels] if channels is not None else None
    out: np.ndarray | None = None
    first_name, first_mode = "", ""
    for i, name in enumerate(names):
        where = f"{source}{sep}{name}"
        image = _decode(read, name, where)
        mode = _natural_mode(image, where)
        if i == 0:
            first_name, first_mode = name, mode
        elif target_mode is None and mode != first_mode:
            raise DataError(_mixed_modes(source, first_name, first_mode, name, mode))
        array = convert_item(image, where, target_mode, resolution, center_crop)
        if out is None:
            out = np.empty((len(names), *array.shape), dtype=np.uint8)
        elif array.shape != out.shape[1:]:
            raise DataError(_mixed_sizes(source, first_name, out.shape[1:3], name, array.shape[:2]))
        out[i] = array
    assert out is not None
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _mixed_modes(source: str, first: str, first_mode: str, name: str, mode: str) -> str:
    return (f"{source}: mixed image modes: {first!r} is {first_mode}, {name!r} is {mode}; "
            "set channels (1=L, 3=RGB, 4=RGBA) to convert all images")


def _mixed_sizes(source: str, first: str, first_size, name: str, size) -> str:
    return (f"{source}: mixed image sizes: {first!r} is {first_size[0]}x{first_size[1]}, {name!r} is "
            f"{size[0]}x{size[1]} (HxW); set resolution to resize them")


# ---------------------------------------------------------------------------------------------- lazy decoding
class FolderFiles:
    """The files of a folder, by relative path: bytes and image headers."""

    def __init__(self, root: Path) -> None:
        self.root, self.source, self.sep = root, str(root), "/"

    def read(self, name: str) -> bytes:
        try:
            return (self.root / name).read_bytes()
        except OSError as exc:
            raise DataError(f"{self.root}/{name}: cannot read file ({describe(exc)})") from exc

    def header(self, name: str) -> Image.Image:
        """The image opened without decoding its pixels (Pillow reads the header only)."""
        return Image.open(self.root / name)


class ZipFiles:
    """The members of a zip archive, by name: bytes and image headers. The archive is opened once per process
    (DataLoader workers each open their own: a shared file offset would mix their reads)."""

    def __init__(self, path: Path) -> None:
        self.path, self.source, self.sep = path, str(path), ":"
        self._archive, self._pid = None, None

    def archive(self) -> zipfile.ZipFile:
        if self._archive is None or self._pid != os.getpid():
            try:
                self._archive, self._pid = zipfile.ZipFile(self.path), os.getpid()
            except (zipfile.BadZipFile, OSError) as exc:
                raise DataError(f"{self.path}: not a readable zip archive ({describe(exc)})") from exc
        return self._archive

    def read(self, name: str) -> bytes:
        try:
            return self.archive().read(name)
        except (zipfile.BadZipFile, OSError, RuntimeError, EOFError, KeyError) as exc:
            raise DataError(f"{self.path}:{name}: cannot read zip member ({describe(exc)})") from exc

    def header(self, name: str) -> Image.Image:
        return Image.open(self.archive().open(name))

    def close(self) -> None:
        if self._archive is not None and self._pid == os.getpid():
            self._archive.close()
        self._archive = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_archive": None, "_pid": None}


class ImageFileStore(ImageStore):
    """Image files decoded per item: ``names`` of ``files`` (:class:`FolderFiles`/:class:`ZipFiles`), each
    converted to ``mode`` (None: its natural mode, the same for all) and cropped/resized to ``resolution``,
    ``shape`` known from the headers."""

    kind = "decoded per batch"

    def __init__(self, files: FolderFiles | ZipFiles, names: list[str], shape: tuple[int, int, int, int],
                 mode: str | None, resolution: tuple[int, int] | None, center_crop: bool) -> None:
        super().__init__(shape, torch.uint8)
        self.files, self.names, self.mode = files, list(names), mode
        self.resolution, self.center_crop = resolution, center_crop

    def read(self, rows: torch.Tensor) -> torch.Tensor:
        out = np.empty((rows.numel(), self.shape[2], self.shape[3], self.shape[1]), dtype=np.uint8)
        for i, row in enumerate(rows.tolist()):
            name = self.names[row]
            where = f"{self.files.source}{self.files.sep}{name}"
            array = convert_item(_decode(self.files.read, name, where), where, self.mode, self.resolution,
                                 self.center_crop)
            if array.shape != out.shape[1:]:
                raise DataError(f"{where}: decodes to {array.shape[0]}x{array.shape[1]}x{array.shape[2]} (HxWxC) but "
                                f"its header said {out.shape[1]}x{out.shape[2]}x{out.shape[3]} (changed since?)")
            out[i] = array
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _headers(files: FolderFiles | ZipFiles, names: list[str]) -> Iterator[tuple[str, str, tuple[int, int]]]:
    """(name, natural mode, (H, W)) of each image from its header, with a progress bar for many files."""
    from tqdm.auto import tqdm

    for name in tqdm(names, desc="indexing images", unit="file", leave=False, disable=len(names) < 5000):
        where = f"{files.source}{files.sep}{name}"
        try:
            with files.header(name) as image:
                yield name, _natural_mode(image, where), (image.height, image.width)
        except DataError:
            raise
        except Exception as exc:  # Pillow raises many types for data that is not an image
            raise DataError(f"{where}: cannot read image ({describe(exc)})") from exc


def index_images(files: FolderFiles | ZipFiles, names: list[str], *, resolution: tuple[int, int] | None,
                 center_crop: bool, channels: int | None) -> ImageFileStore:
    """The lazily decoded store of ``names``: every header read once (modes and sizes checked as the
    in-memory path checks the decoded images), no pixels decoded."""
    target_mode = CHANNEL_MODES[channels] if channels is not None else None
    first = None
    for name, mode, (height, width) in _headers(files, names):
        if resolution is not None:
            size = resolution
        elif center_crop:
            size = crop_box(height, width, None)[2:]
        else:
            size = (height, width)
        if first is None:
            first = (name, mode, size)
        elif target_mode is None and mode != first[1]:
            raise DataError(_mixed_modes(files.source, first[0], first[1], name, mode))
        elif size != first[2]:
            raise DataError(_mixed_sizes(files.source, first[0], first[2], name, size))
    assert first is not None
    mode = target_mode or first[1]
    return ImageFileStore(files, names, (len(names), len(mode), *first[2]), target_mode or first[1], resolution,
                          center_crop)


def _check_image_options(source: str, channels: int | None, center_crop: bool) -> None:
    if channels is not None and channels not in CHANNEL_MODES:
        raise DataError(f"{source}: channels={channels!r} is not supported for images; "
                        "use 1 (L), 2 (LA), 3 (RGB) or 4 (RGBA)")
    if not isinstance(center_crop, bool):
        raise DataError(f"{source}: center_crop={center_crop!r} must be true or false")


def _load_tree(files: FolderFiles | ZipFiles, all_names: list[str], labels_raw: bytes | None, *,
               resolution: int | list[int] | tuple[int, int] | None, center_crop: bool, channels: int | None,
               max_size: int | None, class_folders: bool = False
               ) -> tuple[ImageFileStore, torch.Tensor | None, list[str] | None]:
    """Shared folder/zip logic: options, labels matching (``dataset.json``, else sub-folders when
    ``class_folders``), then the index of the first ``max_size`` images. Returns (store, labels, class names)."""
    source, sep = files.source, files.sep
    size = parse_resolution(resolution, f"{source}: resolution")
    _check_image_options(source, check_positive_int(channels, "channels", source), center_crop)
    if not all_names:
        raise DataError(f"{source}: no images ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}) found")
    kept = all_names[:check_positive_int(max_size, "max_size", source)]
    labels_where = f"{source}{sep}{LABELS_FILE}"
    table = parse_labels(labels_raw, labels_where) if labels_raw is not None else None
    class_names = None
    if table is None and labels_raw is None and class_folders:
        table, class_names = folder_classes(all_names, source)
    labels = _match_labels(table, all_names, kept, labels_where) if table is not None else None
    store = index_images(files, kept, resolution=size, center_crop=center_crop, channels=channels)
    return store, labels, class_names


def _check_labels_option(labels: object, source: str) -> None:
    if labels is not None and not isinstance(labels, bool):
        raise DataError(f"{source}: labels={labels!r} must be true, false or unset")


class ImageFolderDataset(ImageDataset):
    """All images under a folder (recursive), with labels from ``<folder>/dataset.json`` if present,
    or from its class sub-folders with ``labels=True`` (see the module docstring), decoded per batch.

    ``labels=False`` ignores ``dataset.json``; ``max_size`` keeps the first N images in path order.
    """

    def __init__(self, path: str | os.PathLike, *, resolution: int | list[int] | tuple[int, int] | None = None,
                 center_crop: bool = False, xflip: bool = False, normalize: str = "auto", target_std: float = 0.5,
                 channels: int | None = None, labels: bool | None = None, max_size: int | None = None) -> None:
        root = Path(path)
        if not root.exists():
            raise DataError(f"{root}: no such directory")
        if not root.is_dir():
            raise DataError(f"{root}: not a directory (use dataset 'zip' or 'npz' for files)")
        names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        names = [n for n in names if _is_image(n)]
        files = FolderFiles(root)
        _check_labels_option(labels, str(root))
        labels_raw = files.read(LABELS_FILE) if labels is not False and (root / LABELS_FILE).is_file() else None
        store, label_tensor, classes = _load_tree(files, names, labels_raw, resolution=resolution,
                                                  center_crop=center_crop, channels=channels, max_size=max_size,
                                                  class_folders=labels is True)
        super().__init__(store, label_tensor, name=root.resolve().name, xflip=xflip, normalize=normalize,
                         target_std=target_std, source=str(root), class_names=classes)


class ZipImageDataset(ImageDataset):
    """All images inside a .zip (any depth), with labels from a root ``dataset.json`` member if present.

    Same rules as :class:`ImageFolderDataset` (class sub-folders too); members are decoded per batch.
    """

    def __init__(self, path: str | os.PathLike, *, resolution: int | list[int] | tuple[int, int] | None = None,
                 center_crop: bool = False, xflip: bool = False, normalize: str = "auto", target_std: float = 0.5,
                 channels: int | None = None, labels: bool | None = None, max_size: int | None = None) -> None:
        file = Path(path)
        if not file.is_file():
            raise DataError(f"{file}: no such file" if not file.exists() else f"{file}: not a file")
        files = ZipFiles(file)
        members = [info.filename for info in files.archive().infolist() if not info.is_dir()]
        names = sorted(n for n in members if _is_image(n))
        _check_labels_option(labels, str(file))
        labels_raw = files.read(LABELS_FILE) if labels is not False and LABELS_FILE in members else None
        store, label_tensor, classes = _load_tree(files, names, labels_raw, resolution=resolution,
                                                  center_crop=center_crop, channels=channels, max_size=max_size,
                                                  class_folders=labels is True)
        super().__init__(store, label_tensor, name=file.stem, xflip=xflip, normalize=normalize,
                         target_std=target_std, source=str(file), class_names=classes)
