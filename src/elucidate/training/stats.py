"""The training loss of a logging interval: its mean, its mean per sigma bin (EDM Fig. 5a) and the
throughput, summed over processes."""
from __future__ import annotations

import time

import torch

__all__ = ["SIGMA_EDGES", "IntervalStats"]

#: Loss-by-sigma bins (log-spaced, two per decade from 1e-3 to 1e3; values outside go to the end bins).
SIGMA_EDGES = [10 ** (e / 2) for e in range(-6, 7)]


class IntervalStats:
    """Accumulates per-sample losses and their sigmas (non-finite ones left out) between log lines."""

    def __init__(self):
        self.edges = torch.tensor(SIGMA_EDGES, dtype=torch.float32)
        self.K = len(SIGMA_EDGES) - 1
        self.acc = torch.zeros(2 + 2 * self.K, dtype=torch.float64)  # sum, count, per-bin sums, per-bin counts
        self.start, self.images = time.perf_counter(), 0

    def add(self, losses: torch.Tensor, sigma: torch.Tensor, images: int) -> None:
        self.images += images
        finite = torch.isfinite(losses)
        if finite.any():
            K, l64, s = self.K, losses[finite].double().cpu(), sigma.detach()[finite].float().cpu()
            bins = (torch.bucketize(s, self.edges) - 1).clamp(0, K - 1)
            self.acc[0] += l64.sum()
            self.acc[1] += l64.numel()
            self.acc[2:2 + K] += torch.zeros(K, dtype=torch.float64).index_add_(0, bins, l64)
            self.acc[2 + K:] += torch.bincount(bins, minlength=K).double()

    def take(self, reduce=None) -> dict:
        """The interval's ``loss``, ``images_per_sec``, ``sigma_edges``, ``loss_by_sigma`` and
        ``count_by_sigma`` (after ``reduce``, e.g. an all-reduce sum over processes); then starts anew."""
        acc = self.acc if reduce is None else reduce(self.acc)
        K, counts = self.K, acc[2 + self.K:]
        record = {"loss": float(acc[0] / acc[1]) if acc[1] > 0 else None,
                  "images_per_sec": self.images / max(time.perf_counter() - self.start, 1e-9),
                  "sigma_edges": SIGMA_EDGES,
                  "loss_by_sigma": [float(acc[2 + i] / counts[i]) if counts[i] > 0 else None for i in range(K)],
                  "count_by_sigma": [int(c) for c in counts]}
        self.acc.zero_()
        self.start, self.images = time.perf_counter(), 0
        return record
