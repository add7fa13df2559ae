"""Where a dataset's stored images come from: one ``[N, C, H, W]`` tensor in memory, or a streamed source
(a memory-mapped array, :mod:`.mapped`; image files decoded per item, :mod:`.images`) that reads the rows a
batch asks for and applies the load-time transforms (layout, dtype, crop/resize) to just those rows.

A store's rows are the dataset's items before normalization and x-flip: uint8, or float32 in the data's own
units. Every store reads the same bytes for the same row, batch by batch or all at once, so a streamed
dataset gives exactly the batches of the in-memory one.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from .errors import DataError

__all__ = ["ImageStore", "TensorStore", "STAT_CHUNK"]

#: rows per chunk of a streaming pass (statistics, value range, materializing); the normalizer's chunk too
STAT_CHUNK = 1024


class ImageStore:
    """The stored images of a dataset: ``shape`` ``(N, C, H, W)``, ``dtype`` (torch.uint8 or torch.float32),
    :meth:`read` of any rows and :meth:`chunks` (consecutive rows, for one streaming pass).

    ``streamed`` says whether rows are read on demand (then batches may be read in DataLoader worker processes);
    ``kind`` names how, for messages.
    """

    streamed = True
    kind = "streamed"

    def __init__(self, shape: tuple[int, int, int, int], dtype: torch.dtype) -> None:
        self.shape, self.dtype = tuple(int(s) for s in shape), dtype

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, rows: torch.Tensor) -> torch.Tensor:
        """Stored rows ``[B, C, H, W]`` (a new tensor) for the int64 row numbers ``rows``."""
        raise NotImplementedError

    def chunks(self, size: int = STAT_CHUNK, progress: str | None = None) -> Iterator[torch.Tensor]:
        """All rows in order, ``size`` at a time (with a tqdm bar labelled ``progress`` when given and long)."""
        bar = None
        if progress is not None and self.shape[0] > size:
            from tqdm.auto import tqdm
            bar = tqdm(total=self.shape[0], desc=progress, unit="img", leave=False)
        try:
            for start in range(0, self.shape[0], size):
                rows = torch.arange(start, min(start + size, self.shape[0]))
                yield self.read(rows)
                if bar is not None:
                    bar.update(rows.numel())
        finally:
            if bar is not None:
                bar.close()

    def check_finite(self, source: str) -> None:
        """DataError naming ``source`` if float rows hold NaN/Inf (a store that validated its data at
        construction does nothing)."""

    def materialize(self) -> torch.Tensor:
        """All rows as one tensor in memory (what the in-memory path holds)."""
        return torch.cat(list(self.chunks(progress="reading")))


class TensorStore(ImageStore):
    """Rows held in memory as one contiguous tensor (every dataset kind before streaming; small data)."""

    streamed = False
    kind = "in memory"

    def __init__(self, tensor: torch.Tensor) -> None:
        super().__init__(tuple(tensor.shape), tensor.dtype)
        self.tensor = tensor.contiguous()

    def read(self, rows: torch.Tensor) -> torch.Tensor:
        return self.tensor[rows]

    def chunks(self, size: int = STAT_CHUNK, progress: str | None = None) -> Iterator[torch.Tensor]:
        for start in range(0, self.shape[0], size):
            yield self.tensor[start:start + size]

    def check_finite(self, source: str) -> None:
        if self.tensor.is_floating_point():
            bad = ~torch.isfinite(self.tensor)
            if bool(bad.any()):
                first = int(bad.flatten(1).any(dim=1).nonzero()[0])
                raise DataError(f"{source}: {int(bad.sum())} non-finite values (NaN/Inf), first in item {first}")

    def materialize(self) -> torch.Tensor:
        return self.tensor
