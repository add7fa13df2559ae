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
        self._tensors: tuple | None = None  # (source net id, tensor lists): module traversal is slow

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
        if self._tensors is None or self._tensors[0] != id(net):
            self._tensors = (id(net), list(self.module.parameters()), [p.detach() for p in net.parameters()],
                             list(self.module.buffers()), list(net.buffers()))
        _, averaged, current, ema_buffers, buffers = self._tensors
        if averaged:
            torch._foreach_lerp_(averaged, [p.to(q.dtype) for p, q in zip(current, averaged)], 1 - beta)
        for b_ema, b in zip(ema_buffers, buffers):
            b_ema.copy_(b)
