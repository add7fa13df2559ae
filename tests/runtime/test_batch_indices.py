"""batch_indices: bit-identical to the stored int64 randperm up to STORED_PERMUTATION_MAX; beyond it a keyed
Feistel permutation (checked here on small sizes by lowering the threshold) that stores nothing of size N."""
import time

import pytest
import torch

from elucidate.runtime import rng
from elucidate.runtime.rng import batch_indices, derived_generator


def reference(seed: int, step: int, batch_size: int, size: int) -> torch.Tensor:
    """The old scheme: consecutive slices of an int64 torch.randperm per epoch."""
    j = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs = (j // size).unique().tolist()
    perms = {e: torch.randperm(size, generator=derived_generator(seed, "data", e)) for e in epochs}
    return torch.stack([perms[int(i) // size][int(i) % size] for i in j])


@pytest.fixture
def feistel(monkeypatch):
    """Every dataset size takes the keyed (Feistel) path."""
    monkeypatch.setattr(rng, "STORED_PERMUTATION_MAX", 0)


@pytest.mark.parametrize("size", [1, 2, 7, 1000, 65_537, 3_000_001])
def test_int32_randperm_equals_the_int64_one(size):
    for seed in (0, 5):
        a = torch.randperm(size, generator=derived_generator(seed, "data", 3))
        b = torch.randperm(size, generator=derived_generator(seed, "data", 3), dtype=torch.int32)
        assert torch.equal(a, b.long())


@pytest.mark.parametrize("size,batch", [(1, 1), (1, 4), (5, 2), (20, 7), (20, 20), (20, 45), (3, 64), (1000, 64)])
def test_stored_path_is_bit_identical_to_the_old_scheme(size, batch):
    for seed in (0, 11):
        for step in range(6):
            got = batch_indices(seed, step, batch, size)
            assert got.dtype == torch.long and torch.equal(got, reference(seed, step, batch, size))


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 7, 16, 17, 1000, 4097])
def test_feistel_is_a_permutation_per_epoch(feistel, size):
    rng._permutation.cache_clear()
    positions = torch.arange(size)
    orders = {(seed, epoch): rng._epoch_order(seed, epoch, size, positions) for seed in (0, 1) for epoch in (0, 1, 2)}
    for order in orders.values():
        assert order.dtype == torch.long and torch.equal(order.sort().values, positions)
    if size >= 7:  # epochs and seeds give different orders
        assert len({tuple(o.tolist()) for o in orders.values()}) == len(orders)
    assert rng._permutation.cache_info().misses == 0  # nothing stored on this path


@pytest.mark.parametrize("size,batch", [(1, 3), (7, 3), (1000, 64), (4097, 100), (10, 25), (3, 64)])
def test_feistel_batches_cover_each_epoch_once(feistel, size, batch):
    steps = max(3, -(-3 * size // batch))  # three epochs' worth at least, batches spanning epoch boundaries
    flat = torch.cat([batch_indices(4, step, batch, size) for step in range(steps)])
    for epoch in range(3):
        chunk = flat[epoch * size:(epoch + 1) * size]
        assert chunk.dtype == torch.long and torch.equal(chunk.sort().values, torch.arange(size))
        assert torch.equal(chunk, rng._epoch_order(4, epoch, size, torch.arange(size)))
    assert torch.equal(batch_indices(4, 2, batch, size), flat[2 * batch:3 * batch])  # a pure function of the step


def test_the_two_paths_differ_only_in_the_order(feistel):
    assert not torch.equal(batch_indices(0, 0, 64, 1000), reference(0, 0, 64, 1000))


def test_batches_spanning_many_epochs_do_not_depend_on_the_cache():
    # batch 45 over 20 items spans 3 epochs while the cache holds 2; an empty or a stale cache gives the same
    rng._permutation.cache_clear()
    cold = batch_indices(3, 1, 45, 20)
    warm = batch_indices(3, 1, 45, 20)
    batch_indices(3, 9, 45, 20)  # other epochs in the cache
    assert torch.equal(cold, warm) and torch.equal(batch_indices(3, 1, 45, 20), cold)
    assert torch.equal(cold, reference(3, 1, 45, 20))
    assert rng._permutation.cache_info().maxsize == 2


def test_large_dataset_stores_nothing_of_size_n(monkeypatch):
    # torch tensors escape tracemalloc and ru_maxrss is a process-wide peak other tests may already have raised,
    # so check the mechanism instead: no randperm, no cache entry, and a speed only O(batch) work can reach
    size = 50_000_000
    assert size > rng.STORED_PERMUTATION_MAX

    def no_randperm(*args, **kwargs):
        raise AssertionError("torch.randperm called for a large dataset")

    monkeypatch.setattr(torch, "randperm", no_randperm)
    rng._permutation.cache_clear()
    start = time.perf_counter()
    batches = [batch_indices(0, step, 64, size) for step in (0, 1, 2, 781_249, 781_250, 10 ** 9)]
    spanning = batch_indices(0, 1_041_666, 48, size)  # 32 items of epoch 0, then 16 of epoch 1
    elapsed = time.perf_counter() - start
    assert rng._permutation.cache_info().currsize == 0 and rng._permutation.cache_info().misses == 0
    assert elapsed < 1.0, elapsed  # an int64 randperm of 50 M items alone takes seconds
    flat = torch.cat(batches)
    assert flat.dtype == torch.long and bool(((flat >= 0) & (flat < size)).all())
    assert len(set(torch.cat(batches[:3]).tolist())) == 192  # distinct within an epoch
    assert torch.equal(batches[0], batch_indices(0, 0, 64, size)) and not torch.equal(batches[0], batches[4])
    # 50,000,000 = 781,250 * 64: step 781,250 starts epoch 1, the same positions as step 0 in another order
    assert torch.equal(batches[4], rng._keyed_permutation(0, 1, size, torch.arange(64)))
    assert torch.equal(spanning[:32], rng._keyed_permutation(0, 0, size, torch.arange(size - 32, size)))
    assert torch.equal(spanning[32:], rng._keyed_permutation(0, 1, size, torch.arange(16)))
