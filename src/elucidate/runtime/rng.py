"""Counter-based randomness: every draw derives from (seed, stream, step, ...), so training needs no
hidden RNG state to resume exactly and any number of processes draw the same global batch."""
from __future__ import annotations

import functools
import hashlib

import torch

__all__ = ["derive_seed", "derived_generator", "batch_indices"]


def derive_seed(*parts: object) -> int:
    """A 63-bit seed that depends on all ``parts`` (stable across runs, platforms and processes)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def derived_generator(*parts: object, device=None) -> torch.Generator:
    """A torch.Generator seeded with ``derive_seed(*parts)`` on ``device``."""
    return torch.Generator(device=device or "cpu").manual_seed(derive_seed(*parts))


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, size: int) -> torch.Tensor:
    return torch.randperm(size, generator=derived_generator(seed, "data", epoch))


def batch_indices(seed: int, step: int, batch_size: int, dataset_size: int) -> torch.Tensor:
    """Dataset indices of the global batch at ``step``: consecutive slices of a fresh permutation
    per epoch, so the data position is a pure function of the step."""
    if dataset_size < 1:
        raise ValueError("the dataset is empty")
    j = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs, positions = j // dataset_size, j % dataset_size
    out = torch.empty(batch_size, dtype=torch.long)
    for epoch in epochs.unique().tolist():
        mask = epochs == epoch
        out[mask] = _permutation(seed, epoch, dataset_size)[positions[mask]]
    return out
