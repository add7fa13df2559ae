"""The optimizer of a training run."""
from __future__ import annotations

import torch

__all__ = ["make_optimizer"]


def make_optimizer(net: torch.nn.Module, t) -> torch.optim.Optimizer:
    """Adam/AdamW with the config's hyper-parameters; the fused kernel where this torch and device
    support it (about 3x faster than the default on CPU), else the default implementation."""
    opt_cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    kwargs = dict(lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay)
    try:
        return opt_cls(net.parameters(), fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return opt_cls(net.parameters(), **kwargs)
