"""Exponential moving average of the weights with a half-life in images (edm's ema_halflife_kimg)."""
from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    """Keeps ``module``, an averaged copy of a network.

    Each update uses beta = 0.5 ** (batch_size / halflife), where the half-life (in images) is
    optionally ramped up as ``min(halflife, rampup * images_seen)`` so early weights fade fast.
    """

    def __init__(self, net: nn.Module, halflife: float, rampup: float | None = 0.05):
        self.module = copy.deepcopy(net).eval().requires_grad_(False)
        self.halflife = float(halflife)
        self.rampup = rampup

    def beta(self, images_seen: int, batch_size: int) -> float:
        """The decay used after ``images_seen`` images with this batch size."""
        halflife = self.halflife
        if self.rampup is not None:
            halflife = min(halflife, images_seen * self.rampup)
        return 0.5 ** (batch_size / max(halflife, 1e-8))

    @torch.no_grad()
    def update(self, net: nn.Module, images_seen: int, batch_size: int) -> None:
        """Move the average towards ``net``'s current weights (buffers are copied)."""
        beta = self.beta(images_seen, batch_size)
        for p_ema, p in zip(self.module.parameters(), net.parameters()):
            p_ema.lerp_(p.detach().to(p_ema.dtype), 1 - beta)
        for b_ema, b in zip(self.module.buffers(), net.buffers()):
            b_ema.copy_(b)
