"""Stratified tuning batches for :func:`elucidate.sampling.tune`: the few draws of a large pool that plain
solvers at the budget get most wrong (those near a boundary between modes, which a small error sends to
another mode) are always tuned on, and every draw counts by the share of the pool it stands for."""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch

from ..sampling.registry import SAMPLERS
from ..sampling.schedules import exponential_sigmas, karras_sigmas
from .objectives import per_sample_rms

__all__ = ["POOL_FACTOR", "POOL_SEED_OFFSET", "PICKERS", "ReferenceCache", "check_boundary", "picker_evaluations",
           "tensor_digest", "hardest_draws", "stratify", "stratify_models"]

#: The default pool holds this many draws per random tuning draw.
POOL_FACTOR = 16
#: The pool of tuning seed s is ``tuning_noise(..., s + POOL_SEED_OFFSET)``: no tuning or held-out draw of it.
POOL_SEED_OFFSET = 0x10_0000
#: The plain solvers (one evaluation per step) that pick the hard draws: a draw's error is the larger of the two.
PICKERS = (("dpmpp_2m", karras_sigmas), ("unipc", exponential_sigmas))


def check_boundary(boundary: int, pool: int | None, per: int) -> int:
    """The pool size (default :data:`POOL_FACTOR` x ``per`` random draws), or ValueError naming what is wrong
    with ``boundary`` draws of ``pool``."""
    pool = POOL_FACTOR * per if pool is None else pool
    if isinstance(boundary, bool) or not isinstance(boundary, int) or boundary < 0:
        raise ValueError(f"boundary must be an integer >= 0, got {boundary!r}")
    if boundary and not boundary < pool:
        raise ValueError(f"boundary ({boundary}) must be smaller than pool ({pool})")
    return pool


def picker_evaluations(nfe: int) -> int:
    """Evaluations of D that :data:`PICKERS` at ``nfe`` cost per draw."""
    return sum(SAMPLERS[name].nfe(SAMPLERS[name].steps_for_nfe(nfe)) for name, _ in PICKERS)


def tensor_digest(t: torch.Tensor) -> bytes:
    """16 bytes that change with any bit of ``t`` (its values, in row-major order)."""
    return hashlib.blake2b(t.detach().cpu().contiguous().numpy().tobytes(), digest_size=16).digest()


class ReferenceCache:
    """Heun reference solutions of pool draws, kept for later :func:`~elucidate.sampling.tune` calls on the
    same denoiser: the pool and its reference do not depend on the NFE, so tuning several budgets with one
    cache (and the same ``reference_steps``) solves each pool once. Keyed by the denoiser object itself (held,
    so a key is never reused; a model whose weights change in between needs a new cache) and the exact bits of
    the draws and levels; an unhashable denoiser is not cached.
    ``rows_solved`` counts the draws actually solved."""

    def __init__(self) -> None:
        self._store: dict = {}
        self.rows_solved = 0

    def solve(self, D: Callable, x: torch.Tensor, sigmas: torch.Tensor, chunk: int) -> torch.Tensor:
        """Heun on ``sigmas`` from every row of ``x`` (``chunk`` rows at once), or the stored answer."""
        key = (D, tuple(x.shape), x.dtype, str(x.device), tensor_digest(x), tensor_digest(sigmas), chunk)
        try:
            hit = self._store.get(key)
        except TypeError:  # an unhashable denoiser: solved every time
            hit, key = None, None
        if hit is None:
            hit = torch.cat([SAMPLERS["heun"].fn(D, part, sigmas) for part in x.split(chunk)])
            self.rows_solved += x.shape[0]
            if key is not None:
                self._store[key] = hit
        return hit


def hardest_draws(D: Callable, pool: torch.Tensor, nfe: int, k: int, *, sigma_min: float, sigma_max: float,
                  reference_steps: int, chunk: int, references: ReferenceCache | None = None) -> torch.Tensor:
    """Indices of the ``k`` rows of ``pool`` (noise at ``sigma_max``) with the largest error of any of
    :data:`PICKERS` at ``nfe`` evaluations to Heun on ``reference_steps`` Karras steps (``chunk`` rows at once;
    the reference from ``references`` if it holds it)."""
    references = ReferenceCache() if references is None else references
    solved = references.solve(D, pool, karras_sigmas(reference_steps, sigma_min, sigma_max), chunk)
    errors = []
    for x, ref in zip(pool.split(chunk), solved.split(chunk)):
        worst = torch.zeros(x.shape[0], dtype=torch.float64)
        for name, schedule in PICKERS:
            steps = SAMPLERS[name].steps_for_nfe(nfe)
            out = SAMPLERS[name].fn(D, x, schedule(steps, sigma_min, sigma_max))
            worst = torch.maximum(worst, per_sample_rms(out, ref).cpu().nan_to_num(torch.inf))
        errors.append(worst)
    return torch.cat(errors).topk(k).indices.sort().values


def stratify(D: Callable, x: torch.Tensor, pool: torch.Tensor, nfe: int, k: int,
             **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch ``[hardest k of pool, x]`` and its weights: 1 / |pool| for each hard draw and
    (|pool| - k) / (|x| |pool|) for each of the random draws ``x``, which stand for the rest of the pool."""
    n, m = pool.shape[0], x.shape[0]
    hard = pool[hardest_draws(D, pool, nfe, k, **kw)]
    weights = torch.cat([torch.full((k,), 1.0 / n, dtype=torch.float64),
                         torch.full((m,), (n - k) / (m * n), dtype=torch.float64)])
    return torch.cat([hard, x]), weights


def stratify_models(models: Sequence[Callable], x: torch.Tensor, pool: torch.Tensor, nfe: int, k: int,
                    **kw) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """:func:`stratify` per model, each on its own equal block of ``x`` and of ``pool``: the batch
    ``[hard 1, x 1, hard 2, x 2, ...]`` (equal blocks again, one per model) and each block's weights."""
    per, n = x.shape[0] // len(models), pool.shape[0] // len(models)
    blocks = [stratify(D, xi, pi, nfe, k, chunk=per, **kw)
              for D, xi, pi in zip(models, x.split(per), pool.split(n))]
    return torch.cat([batch for batch, _ in blocks]), [w for _, w in blocks]
