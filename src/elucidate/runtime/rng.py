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


# Datasets up to this size draw each epoch's order as a stored torch.randperm; larger ones use a keyed
# permutation computed only at the requested positions (O(batch) memory, no tensor of size N).
STORED_PERMUTATION_MAX = 2 ** 24
FEISTEL_ROUNDS = 8
_MASK32 = (1 << 32) - 1


@functools.lru_cache(maxsize=2)  # a batch spans at most two epochs when batch_size <= dataset_size
def _permutation(seed: int, epoch: int, size: int) -> torch.Tensor:
    # int32 draws the same order as the int64 default for the same generator state (tested), at half the memory
    return torch.randperm(size, generator=derived_generator(seed, "data", epoch), dtype=torch.int32)


def _feistel_keys(seed: int, epoch: int) -> list[int]:
    """The 32-bit round keys of epoch ``epoch``'s keyed permutation."""
    generator = derived_generator(seed, "data", epoch)
    return torch.randint(0, 1 << 32, (FEISTEL_ROUNDS,), dtype=torch.long, generator=generator).tolist()


def _round(r: torch.Tensor, key: int, mask: int) -> torch.Tensor:
    """Feistel round function: a 32-bit multiply-xorshift hash of (r + key), ``mask``-ed to a half."""
    # multipliers < 2**31 keep every product of 32-bit values below 2**63 (no int64 overflow)
    h = (r + key) & _MASK32
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & _MASK32
    h = h ^ (h >> 15)
    h = (h * 0x46CA68B5) & _MASK32
    h = h ^ (h >> 16)
    return h & mask


def _feistel(x: torch.Tensor, keys: list[int], half: int) -> torch.Tensor:
    """A keyed bijection of [0, 4**half): a balanced Feistel network on two ``half``-bit halves."""
    mask = (1 << half) - 1
    left, right = x >> half, x & mask
    for key in keys:
        left, right = right, left ^ _round(right, key, mask)
    return (left << half) | right


def _keyed_permutation(seed: int, epoch: int, size: int, positions: torch.Tensor) -> torch.Tensor:
    """Entries ``positions`` of a keyed pseudo-random permutation of [0, size), without storing it."""
    if size > 1 << 62:
        raise ValueError(f"dataset of {size} items is too large for int64 indices")
    half = ((size - 1).bit_length() + 1) // 2  # 4**half is the smallest power of 4 >= size, so < 4 * size
    keys = _feistel_keys(seed, epoch)
    out = _feistel(positions.long(), keys, half)
    todo = (out >= size).nonzero().squeeze(1)
    while todo.numel():  # cycle-walking: re-apply until inside [0, size) (a bijection of [0, size) too)
        out[todo] = _feistel(out[todo], keys, half)
        todo = todo[out[todo] >= size]
    return out


def _epoch_order(seed: int, epoch: int, size: int, positions: torch.Tensor) -> torch.Tensor:
    """Entries ``positions`` of epoch ``epoch``'s order of the dataset."""
    if size <= STORED_PERMUTATION_MAX:
        return _permutation(seed, epoch, size)[positions]
    return _keyed_permutation(seed, epoch, size, positions)


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
        out[mask] = _epoch_order(seed, epoch, dataset_size, positions[mask]).long()
    return out
