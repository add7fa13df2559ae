"""Training batches read ahead in DataLoader worker processes: for a streamed dataset (memory-mapped array,
lazily decoded files), the batches of the next steps are read and transformed while the current step trains.

The sampler yields, per upcoming step, that step's index list (the process's slice of the global batch of
:func:`~elucidate.runtime.rng.batch_indices`), so a batch stays a function of (seed, step): resuming at any step,
after a kill, and DDP (each rank reads its own slice) give the batches of an in-process read. ``workers = 0``, or
an in-memory dataset, reads in the main process.
"""
from __future__ import annotations

import functools
import os
import signal
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .errors import DataError

__all__ = ["default_workers", "check_workers", "BatchPrefetcher"]

#: how many steps ahead each worker reads (the DataLoader's prefetch_factor)
AHEAD = 2


def default_workers() -> int:
    """``data.workers`` when unset: one core stays with the training process, at most 4 workers, 0 on one core."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def check_workers(value: object, source: str = "data config") -> int | None:
    """``value`` if None or an int >= 0, else a DataError."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    raise DataError(f"{source}: workers={value!r} must be an int >= 0 (0 = read batches in the main process)")


class _Steps(Sampler):
    """(step, indices) of steps ``start``, ``start + 1``, ... ``end - 1``."""

    def __init__(self, indices_of: Callable[[int], torch.Tensor], start: int, end: int) -> None:
        self.indices_of, self.start, self.end = indices_of, start, end

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        return ((step, self.indices_of(step)) for step in range(self.start, self.end))

    def __len__(self) -> int:
        return max(0, self.end - self.start)


class _Batches(Dataset):
    """A step's batch, read in a worker: (step, indices, images, labels) or (step, indices, DataError message)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __getitem__(self, item: tuple[int, torch.Tensor]):
        step, indices = item
        try:
            return (step, indices, *self.dataset.get_batch(indices))
        except DataError as e:  # re-raised as one line in the main process (not a worker traceback)
            return step, indices, str(e)


def _worker_init(release: Callable[[], None] | None, _: int) -> None:
    # Ctrl-C / SIGTERM reach the whole process group: the main process finishes its step and checkpoints, then
    # stops the workers; a worker dying on the signal would end training with a DataLoader error instead
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if release is not None:
        release()


class BatchPrefetcher:
    """``get(step, indices)`` -> (images, labels) of ``dataset.get_batch(indices)``, read ahead in ``workers``
    processes for steps up to ``end`` when the dataset is streamed (else read when asked).

    ``indices_of(step)`` must give the indices ``get`` will be asked for at that step; a step out of sequence (or
    other indices) restarts the read-ahead there. ``release`` runs in each forked worker first: it drops what the
    worker must not hold, e.g. the run directory's lock (a worker that outlived a killed trainer for a few seconds
    would otherwise keep the run locked).
    """

    def __init__(self, dataset, indices_of: Callable[[int], torch.Tensor], end: int, workers: int,
                 release: Callable[[], None] | None = None) -> None:
        self.dataset, self.indices_of, self.end, self.release = dataset, indices_of, end, release
        self.workers = workers if getattr(dataset, "streamed", False) else 0
        self._iter, self._next = None, None

    def get(self, step: int, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.workers == 0 or step >= self.end:
            return self.dataset.get_batch(indices)
        if self._iter is None or self._next != step:
            self._start(step)
        got_step, got_indices, *batch = next(self._iter)
        self._next = step + 1
        if got_step != step or not torch.equal(got_indices, indices):
            self.close()  # someone asked out of sequence: read this one here, restart next time
            return self.dataset.get_batch(indices)
        if len(batch) == 1:
            raise DataError(batch[0])
        return batch[0], batch[1]

    def _start(self, step: int) -> None:
        self.close()
        loader = DataLoader(_Batches(self.dataset), sampler=_Steps(self.indices_of, step, self.end), batch_size=None,
                            num_workers=self.workers, prefetch_factor=AHEAD,
                            worker_init_fn=functools.partial(_worker_init, self.release))
        self._iter, self._next = iter(loader), step

    def close(self) -> None:
        """Stop the workers (they are started again when needed)."""
        if self._iter is not None:
            shutdown = getattr(self._iter, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        self._iter, self._next = None, None

    def __del__(self) -> None:
        self.close()
