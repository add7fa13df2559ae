"""The image dataset every dataset kind builds: stored images (in memory, or streamed per batch from a
memory-mapped array or lazily decoded files: :mod:`.store`) + normalizer + x-flip indexing, plus optional
conditions (a spatial map to concatenate, a token sequence to cross-attend to), which stay in memory."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from .errors import DataError
from .normalize import Normalizer, chunk_rows
from .store import ImageStore, TensorStore

__all__ = ["ImageDataset", "check_positive_int"]


def check_positive_int(value: object, option: str, source: str) -> int | None:
    """``value`` if it is None or a positive int, else a DataError naming ``option`` and ``source``."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return value
    raise DataError(f"{source}: {option}={value!r} must be a positive int")


class ImageDataset(Dataset):
    """Map-style dataset over ``[N, C, H, W]`` stored images: one tensor in memory or a streamed
    :class:`~.store.ImageStore` (rows read per batch; :attr:`streamed`).

    ``images`` is the raw stored tensor or store (uint8, or float32 in the data's own units) and ``labels``
    an int64 ``[N]`` tensor of class indices or ``None``. Items are ``(image, label)`` with the image
    float32 ``[C, H, W]`` in model units (see :attr:`normalizer`) and the label an int64 scalar
    (-1 when unlabeled). With ``xflip=True`` the length is ``2N`` and index ``i >= N`` is image
    ``i - N`` mirrored left-right (the NVlabs convention: deterministic, so training resumes exactly).

    Conditions (:meth:`get_conditions`): ``concat`` is a raw ``[N, C', H, W]`` map (uint8 or float32,
    same H, W as the images; mirrored with its image) normalized by its own :attr:`cond_normalizer`
    (mode ``cond_normalize``, default: the images' ``normalize``, same ``target_std`` and
    ``value_range``); ``context`` is a float32 ``[N, L, D]`` token sequence used as stored (a token
    of all zeros is padding, a row of all zeros means "no context"). ``class_names`` names the labels.
    ``normalizer``: use this map to model units instead of fitting one (``normalize`` is then unused).
    ``workers``: DataLoader worker processes that read a streamed dataset's training batches (``data.workers``;
    None: :func:`~.loader.default_workers`), set by :func:`~.build.build_dataset`.
    """

    workers: int | None = None

    def __init__(self, images: torch.Tensor | ImageStore, labels: torch.Tensor | None = None, *, name: str,
                 xflip: bool = False, normalize: str = "auto", target_std: float = 0.5,
                 value_range: tuple[float, float] | None = None, source: str | None = None,
                 concat: torch.Tensor | None = None, context: torch.Tensor | None = None,
                 cond_normalize: str | None = None, class_names: list[str] | None = None,
                 normalizer: Normalizer | None = None) -> None:
        source = source or name
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            images = TensorStore(images)
        if not isinstance(images, ImageStore):
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise DataError(f"{source}: images must be a [N, C, H, W] tensor, got {got}")
        if images.dtype not in (torch.uint8, torch.float32):
            raise DataError(f"{source}: images must be uint8 or float32, got {images.dtype}")
        if images.shape[0] == 0 or 0 in images.shape:
            raise DataError(f"{source}: no images (shape {tuple(images.shape)})")
        images.check_finite(source)
        if labels is not None:
            if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
                got = f"{getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}"
                raise DataError(f"{source}: labels must be an int64 tensor of shape [{images.shape[0]}], got {got}")
            if bool((labels < 0).any()):
                raise DataError(f"{source}: labels must be >= 0, found {int(labels.min())}")
        if not isinstance(xflip, bool):
            raise DataError(f"{source}: xflip={xflip!r} must be true or false")
        _check_conditions(images.shape, concat, context, source)
        if class_names is not None and labels is not None and int(labels.max()) >= len(class_names):
            raise DataError(f"{source}: {len(class_names)} class names but a label {int(labels.max())}")
        self.store: ImageStore = images
        self._span: tuple[float, float] | None = None  # (min, max) of the stored values once known
        self.source: str = source
        self.labels: torch.Tensor | None = labels
        self.name: str = name
        self.xflip: bool = xflip
        if normalizer is not None and normalizer.channels != images.shape[1]:
            raise DataError(f"{source}: the given normalizer has {normalizer.channels} channels but the images "
                            f"{images.shape[1]}")
        self.normalizer: Normalizer = normalizer or Normalizer.fit(self._fit_source(), normalize, target_std=target_std,
                                                                   value_range=value_range, source=source)
        self.class_names: list[str] | None = None if class_names is None else list(class_names)
        self.concat: torch.Tensor | None = None if concat is None else concat.contiguous()
        self.context: torch.Tensor | None = context
        self.cond_normalizer: Normalizer | None = None
        if concat is not None:
            self.cond_normalizer = Normalizer.fit(self.concat, normalize if cond_normalize is None else cond_normalize,
                                                  target_std=target_std, value_range=value_range,
                                                  source=f"{source} (condition)")

    def _fit_source(self) -> torch.Tensor | ImageStore:
        return self.store if self.store.streamed else self.store.tensor

    @property
    def images(self) -> torch.Tensor:
        """All stored images as one ``[N, C, H, W]`` tensor. A streamed dataset reads (decodes) every item into
        memory for it (for small data, tests and tools that want everything; training never calls it)."""
        return self.store.materialize()

    @property
    def streamed(self) -> bool:
        """Whether items are read per batch (memory-mapped array, lazily decoded files) rather than held in
        memory."""
        return self.store.streamed

    @property
    def stored_dtype(self) -> torch.dtype:
        """dtype of the stored images: torch.uint8 or torch.float32."""
        return self.store.dtype

    def stored_range(self) -> tuple[float, float]:
        """(min, max) of the stored values (one chunked pass over a streamed dataset, then remembered)."""
        if self._span is None:
            low, high = float("inf"), float("-inf")
            for chunk in self.store.chunks(chunk_rows(self.store.shape), progress="value range"):
                low, high = min(low, float(chunk.min())), max(high, float(chunk.max()))
            self._span = (low, high)
        return self._span

    @property
    def num_images(self) -> int:
        """Number of stored images N (``len`` is ``2N`` with xflip)."""
        return self.store.shape[0]

    @property
    def channels(self) -> int:
        """Channels C of every image."""
        return self.store.shape[1]

    @property
    def resolution(self) -> tuple[int, int]:
        """Image size ``(H, W)``."""
        return self.store.shape[2], self.store.shape[3]

    @property
    def num_classes(self) -> int:
        """The number of class names if known, else ``max(label) + 1``; 0 when unlabeled."""
        if self.labels is None:
            return 0
        return len(self.class_names) if self.class_names is not None else int(self.labels.max()) + 1

    @property
    def cond_channels(self) -> int:
        """Channels C' of the spatial condition ``concat`` (0 when there is none)."""
        return 0 if self.concat is None else self.concat.shape[1]

    @property
    def context_shape(self) -> tuple[int, int] | None:
        """``(L, D)`` of the ``context`` token sequence, or None when there is none."""
        return None if self.context is None else (self.context.shape[1], self.context.shape[2])

    def __len__(self) -> int:
        return self.num_images * (2 if self.xflip else 1)

    def _locate(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(stored item, mirrored?) for dataset indices; IndexError when out of range."""
        indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= len(self)):
            raise IndexError(f"{self.name}: indices must lie in [0, {len(self)}), got "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        flip = indices >= self.num_images
        return torch.where(flip, indices - self.num_images, indices), flip

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``[B, C, H, W]`` float32 in model units and labels ``[B]`` int64 for dataset indices."""
        base, flip = self._locate(indices)
        images = self.normalizer.to_model(self.store.read(base))
        if self.xflip and bool(flip.any()):
            images[flip] = images[flip].flip(-1)
        return images, self._labels_of(base)

    def get_labels(self, indices: torch.Tensor) -> torch.Tensor:
        """Labels ``[B]`` int64 of dataset indices (-1 when unlabeled), without reading the images."""
        return self._labels_of(self._locate(indices)[0])

    def _labels_of(self, base: torch.Tensor) -> torch.Tensor:
        if self.labels is None:
            return torch.full((base.numel(),), -1, dtype=torch.int64)
        return self.labels[base]

    def get_conditions(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """The conditions of dataset indices, as the networks take them: ``concat`` ``[B, C', H, W]``
        float32 in model units (mirrored with its image) and/or ``context`` ``[B, L, D]`` float32;
        an empty dict when the dataset has none."""
        base, flip = self._locate(indices)
        out = {}
        if self.concat is not None:
            concat = self.cond_normalizer.to_model(self.concat[base])
            if self.xflip and bool(flip.any()):
                concat[flip] = concat[flip].flip(-1)
            out["concat"] = concat
        if self.context is not None:
            out["context"] = self.context[base]
        return out

    def get_noise(self, indices: torch.Tensor) -> torch.Tensor | None:
        """The noise paired with each item (``[B, C, H, W]``, model units), or None: training then draws fresh
        noise. Only a dataset of couplings has it (:class:`~.pairs.PairsDataset`, rectified flow's reflow)."""
        return None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}: index {index} out of range for length {len(self)}")
        images, labels = self.get_batch(torch.tensor([index]))
        return images[0], labels[0]

    def describe(self) -> str:
        """One line about the data as training sees it (printed when training starts)."""
        height, width = self.resolution
        dtype = str(self.stored_dtype).removeprefix("torch.")
        values = f"{dtype} {self.store.kind}"  # a streamed dataset's range would be a pass over all of it
        if not self.streamed or self._span is not None:
            lo, hi = self.stored_range()
            values = f"{dtype} {lo:.4g}..{hi:.4g}" + ("" if not self.streamed else f" {self.store.kind}")
        labels = "no labels"
        if self.labels is not None:
            names = self.class_names or []
            labels = f"{self.num_classes} classes" + (f" ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"
                                                      if names else "")
        extra = [f"{self.cond_channels}-channel spatial condition"] if self.concat is not None else []
        extra += [f"context tokens {self.context_shape[0]}x{self.context_shape[1]}"] if self.context is not None else []
        return (f"data: {self.num_images} images from {self.source}, {height}x{width}, {self.channels} channel"
                f"{'s' if self.channels > 1 else ''}, {values} -> model units by "
                f"{self.normalizer.mode}, {labels}" + "".join(f", {e}" for e in extra)
                + (f", mirrored copies (x2 = {len(self)})" if self.xflip else ""))

    def __repr__(self) -> str:
        height, width = self.resolution
        return (f"{type(self).__name__}(name={self.name!r}, len={len(self)}, images={self.num_images}x"
                f"{self.channels}x{height}x{width} {str(self.stored_dtype).removeprefix('torch.')}, "
                f"num_classes={self.num_classes}, xflip={self.xflip}, normalize={self.normalizer.mode!r}"
                f"{f', cond_channels={self.cond_channels}' if self.concat is not None else ''}"
                f"{f', context_shape={self.context_shape}' if self.context is not None else ''})")


def _check_conditions(shape: tuple[int, ...], concat: torch.Tensor | None, context: torch.Tensor | None,
                      source: str) -> None:
    """DataError unless ``concat`` is a finite uint8/float32 ``[N, C', H, W]`` matching the images (of ``shape``)
    and ``context`` a finite float32 ``[N, L, D]``."""
    n, _, h, w = shape
    if concat is not None:
        if not isinstance(concat, torch.Tensor) or concat.ndim != 4 or concat.shape[0] != n \
                or tuple(concat.shape[2:]) != (h, w) or concat.shape[1] < 1:
            got = tuple(concat.shape) if isinstance(concat, torch.Tensor) else type(concat).__name__
            raise DataError(f"{source}: the spatial condition must be [{n}, C, {h}, {w}] (one per image, the "
                            f"images' size), got {got}")
        if concat.dtype not in (torch.uint8, torch.float32):
            raise DataError(f"{source}: the spatial condition must be uint8 or float32, got {concat.dtype}")
        if concat.is_floating_point() and not bool(torch.isfinite(concat).all()):
            raise DataError(f"{source}: the spatial condition has non-finite values (NaN/Inf)")
    if context is not None:
        if not isinstance(context, torch.Tensor) or context.ndim != 3 or context.shape[0] != n \
                or min(context.shape[1:]) < 1 or context.dtype != torch.float32:
            got = f"{context.dtype} {tuple(context.shape)}" if isinstance(context, torch.Tensor) else type(context)
            raise DataError(f"{source}: the context must be a float32 [{n}, L, D] tensor (one token sequence "
                            f"per image), got {got}")
        if not bool(torch.isfinite(context).all()):
            raise DataError(f"{source}: the context has non-finite values (NaN/Inf)")
