"""torch.distributed under torchrun (nccl on GPUs, gloo on CPU; a no-op for one process): joining the
process group, reductions, and sampling / evaluation with seed batches sharded over ranks.

Sharding is by *batch*: the seeds are cut into batches of ``batch_size`` exactly as one process cuts
them, and batch ``i`` goes to rank ``i % world_size`` (strided over batches). Every batch is therefore
computed with the same inputs and the same batch composition as in one process, so the gathered images
and features are bitwise the ones one process computes (on the same kind of device); a metric computed
from them on every rank equals the one-process figure exactly.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "pick_device", "init_distributed", "shutdown_distributed", "process_group", "all_reduce_sum",
           "barrier", "init_sampling", "world", "is_main_process", "shard_batches", "gather_batches", "map_batches"]


@dataclass(frozen=True)
class DistInfo:
    """Rank, world size and the device this process should use."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(requested: str | None = None, local_rank: int = 0) -> torch.device:
    """The device a command runs on: ``requested`` (``cuda`` means this process's GPU), else the local GPU when
    there is one, else the CPU (the same default for every command)."""
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")



def init_distributed(device: str | None = None) -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE > 1), else run as a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = pick_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if chosen.type == "cuda":
            torch.cuda.set_device(chosen)
        dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
    return DistInfo(rank, world_size, local_rank, chosen)


def shutdown_distributed() -> None:
    """Leave the process group if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device: str | None = None, *, sampling: bool = False) -> Iterator[DistInfo]:
    """The process group for a ``with`` block (``init_sampling`` if ``sampling``, else ``init_distributed``): left
    at the end only if the block joined it, so commands run one after another in one torchrun launch share one."""
    joined = dist.is_available() and dist.is_initialized()
    try:
        yield init_sampling(device) if sampling else init_distributed(device)
    finally:
        if not joined:
            shutdown_distributed()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over processes in place (identity for one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Maximum of ``tensor`` over processes in place (identity for one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def barrier() -> None:
    """Wait for all processes (no-op for one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()

# ------------------------------------------------------------------------------------ sampling under torchrun
def world() -> tuple[int, int]:
    """(rank, world_size) of the joined process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Whether this process is rank 0: of the joined process group, else of torchrun's environment (``RANK``), so
    that it still holds after a command has left the group (one process: True)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def init_sampling(device: str | None = None) -> DistInfo:
    """Join torchrun's process group (gloo on CPU, nccl on GPU) when WORLD_SIZE > 1; a no-op otherwise.

    With several processes and no ``device`` given, each rank uses its own GPU (``cuda:LOCAL_RANK``) if
    there is one, else the CPU.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistInfo(0, 1, 0, torch.device(device) if device else torch.device("cpu"))
    return init_distributed(device)


def shard_batches(num: int, batch_size: int, rank: int, world_size: int) -> list[range]:
    """The index ranges of the batches of ``num`` items that ``rank`` computes (batch i -> rank i % world)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    starts = range(0, num, batch_size)
    return [range(s, min(s + batch_size, num)) for i, s in enumerate(starts) if i % world_size == rank]


def gather_batches(local: Sequence[torch.Tensor], num: int, batch_size: int) -> list[torch.Tensor]:
    """All batches of all ranks, in batch order, on every rank (``local``: this rank's batches in order).

    Identity for one process. Values travel as float64 (exact for float32/float16 inputs) and come
    back in float64; every batch must have the same trailing shape.
    """
    rank, world_size = world()
    if world_size == 1:
        return list(local)
    mine = shard_batches(num, batch_size, rank, world_size)
    if len(local) != len(mine):
        raise ValueError(f"rank {rank} has {len(local)} batches, expected {len(mine)}")
    # trailing shape: ranks without a batch learn it from the others (max over ranks, up to 6 dims)
    tail = torch.zeros(7, dtype=torch.int64)
    if local:
        shape = local[0].shape[1:]
        tail[0] = len(shape)
        tail[1:1 + len(shape)] = torch.tensor(shape, dtype=torch.int64)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    tail = tail.to(device)
    dist.all_reduce(tail, op=dist.ReduceOp.MAX)
    shape = tuple(int(v) for v in tail[1:1 + int(tail[0])].tolist())
    per_rank = [shard_batches(num, batch_size, r, world_size) for r in range(world_size)]
    longest = max(sum(len(b) for b in batches) for batches in per_rank)
    buf = torch.zeros((longest, *shape), dtype=torch.float64, device=device)
    if local:
        flat = torch.cat([t.to(device=device, dtype=torch.float64) for t in local])
        buf[:len(flat)] = flat
    received = [torch.empty_like(buf) for _ in range(world_size)]
    dist.all_gather(received, buf)
    ordered: list[torch.Tensor | None] = [None] * len(range(0, num, batch_size))
    for r, batches in enumerate(per_rank):
        offset = 0
        for b in batches:
            ordered[b.start // batch_size] = received[r][offset:offset + len(b)].cpu()
            offset += len(b)
    return ordered  # type: ignore[return-value]


def map_batches(fn: Callable[[range], torch.Tensor], num: int, batch_size: int) -> list[torch.Tensor]:
    """``[fn(batch) for batch in batches]`` with the batches sharded over ranks and gathered back in order
    (float64 tensors on every rank when distributed; ``fn``'s own outputs in one process)."""
    rank, world_size = world()
    local = [fn(b) for b in shard_batches(num, batch_size, rank, world_size)]
    return gather_batches(local, num, batch_size)
