"""What a logging interval reports, summed over processes: the diffusion loss, its mean per sigma bin (EDM
Fig. 5a), the mean learned uncertainty u(sigma) if the run has one (EDM2 eq. 21) and the throughput
(:class:`IntervalStats`), or the means of named per-step values (:class:`MeanStats`)."""
from __future__ import annotations

import time

import torch

__all__ = ["SIGMA_EDGES", "IntervalStats", "MeanStats"]

#: Loss-by-sigma bins (log-spaced, two per decade from 1e-3 to 1e3; values outside go to the end bins).
SIGMA_EDGES = [10 ** (e / 2) for e in range(-6, 7)]


class IntervalStats:
    """Accumulates per-sample losses and their sigmas (non-finite ones left out) between log lines; with
    ``uncertainty``, also each sample's u(sigma) (``training.loss_weighting: uncertainty``). The losses are the
    fixed-weight lambda(sigma) ||D - y||^2 either way, so runs with and without the head compare directly."""

    def __init__(self, images_per_step: int, *, uncertainty: bool = False):
        self.edges = torch.tensor(SIGMA_EDGES, dtype=torch.float32)
        self.K = len(SIGMA_EDGES) - 1
        self.uncertainty = uncertainty
        # sum, count, per-bin sums, per-bin counts (then, with uncertainty: sum of u, per-bin sums of u)
        self.acc = torch.zeros(2 + 2 * self.K + (1 + self.K if uncertainty else 0), dtype=torch.float64)
        self.images_per_step = images_per_step
        self.start, self.images = time.perf_counter(), 0

    def add(self, step: tuple) -> None:
        """One step's (per-sample losses, their sigmas) or, with uncertainty, (losses, sigmas, their u(sigma))."""
        losses, sigma, u = (*step, None)[:3]
        if self.uncertainty and u is None:
            raise ValueError("these statistics report u(sigma) but the step gave none")
        self.images += self.images_per_step
        finite = torch.isfinite(losses) if u is None else torch.isfinite(losses) & torch.isfinite(u)
        if finite.any():
            K, l64, s = self.K, losses[finite].double().cpu(), sigma.detach()[finite].float().cpu()
            bins = (torch.bucketize(s, self.edges) - 1).clamp(0, K - 1)
            self.acc[0] += l64.sum()
            self.acc[1] += l64.numel()
            self.acc[2:2 + K] += torch.zeros(K, dtype=torch.float64).index_add_(0, bins, l64)
            self.acc[2 + K:2 + 2 * K] += torch.bincount(bins, minlength=K).double()
            if self.uncertainty:
                u64 = u.detach()[finite].double().cpu()
                self.acc[2 + 2 * K] += u64.sum()
                self.acc[3 + 2 * K:] += torch.zeros(K, dtype=torch.float64).index_add_(0, bins, u64)

    def take(self, reduce=None) -> dict:
        """The interval's ``loss``, ``images_per_sec``, ``sigma_edges``, ``loss_by_sigma`` and
        ``count_by_sigma``, with uncertainty also ``uncertainty`` (the mean u) and ``uncertainty_by_sigma`` (after
        ``reduce``, e.g. an all-reduce sum over processes); then starts anew."""
        acc = self.acc if reduce is None else reduce(self.acc)
        K, counts = self.K, acc[2 + self.K:2 + 2 * self.K]
        record = {"loss": float(acc[0] / acc[1]) if acc[1] > 0 else None,
                  "images_per_sec": self.images / max(time.perf_counter() - self.start, 1e-9),
                  "sigma_edges": SIGMA_EDGES,
                  "loss_by_sigma": [float(acc[2 + i] / counts[i]) if counts[i] > 0 else None for i in range(K)],
                  "count_by_sigma": [int(c) for c in counts]}
        if self.uncertainty:
            record["uncertainty"] = float(acc[2 + 2 * K] / acc[1]) if acc[1] > 0 else None
            record["uncertainty_by_sigma"] = [float(acc[3 + 2 * K + i] / counts[i]) if counts[i] > 0 else None
                                              for i in range(K)]
        self.acc.zero_()
        self.start, self.images = time.perf_counter(), 0
        return record


class MeanStats:
    """Accumulates named per-step scalars (``{key: 0-d tensor}``) and reports their means between log lines."""

    def __init__(self, keys: tuple[str, ...], images_per_step: int):
        self.keys, self.images_per_step = keys, images_per_step
        self.acc = torch.zeros(len(keys) + 1, dtype=torch.float64)  # per-key sums, step count
        self.start, self.images = time.perf_counter(), 0

    def add(self, logs: dict[str, torch.Tensor]) -> None:
        self.images += self.images_per_step
        self.acc[:-1] += torch.stack([logs[k].detach().double().cpu() for k in self.keys])
        self.acc[-1] += 1

    def take(self, reduce=None) -> dict:
        """The interval's mean of every key and ``images_per_sec`` (after ``reduce``); then starts anew."""
        acc = self.acc if reduce is None else reduce(self.acc)
        record = {k: float(acc[i] / acc[-1]) if acc[-1] > 0 else None for i, k in enumerate(self.keys)}
        record["images_per_sec"] = self.images / max(time.perf_counter() - self.start, 1e-9)
        self.acc.zero_()
        self.start, self.images = time.perf_counter(), 0
        return record
