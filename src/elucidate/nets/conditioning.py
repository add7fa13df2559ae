"""The spatial (``concat``) and sequence (``context``) conditions of :class:`~.base.DiffusionNet`:
call-time checks, the zero "no condition" default, and the widened, zero-initialized first convolution.

Conditioning keys (latent diffusion's ``conditioning_key``): ``adm`` = class labels added to the noise
embedding (``label_dim``); ``concat`` = a ``[B, cond_channels, H, W]`` map concatenated to ``x`` on
channels before the first convolution; ``crossattn`` = a ``[B, L, context_dim]`` context attended by
cross-attention; ``hybrid`` = concat + crossattn. "No condition" is ``None`` or zeros for every key.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["CONDITIONINGS", "widen_input", "check_concat", "check_context"]

#: The values of ``network.conditioning`` in a run config.
CONDITIONINGS = ("none", "adm", "concat", "crossattn", "hybrid")


@torch.no_grad()
def widen_input(conv: nn.Module, extra_channels: int) -> nn.Module:
    """``conv`` with ``extra_channels`` more input channels whose weights are exactly zero (appended
    after the existing ones), so its output does not depend on them until trained. ``conv`` keeps its
    other weights, and the random draws that made them, unchanged."""
    if extra_channels:
        w = conv.weight
        conv.weight = nn.Parameter(torch.cat([w, w.new_zeros(w.shape[0], extra_channels, *w.shape[2:])], dim=1))
        conv.in_channels += extra_channels
    return conv


def _batch_of(value: torch.Tensor, batch: int) -> torch.Tensor:
    return value.expand(batch, *value.shape[1:]) if value.shape[0] == 1 else value


def check_concat(name: str, x: torch.Tensor, concat: torch.Tensor | None, cond_channels: int) -> torch.Tensor:
    """``x`` with the spatial condition appended on channels; ``None`` = zeros = no condition. A batch of
    one condition is broadcast. Raises ValueError naming ``concat`` and its expected shape."""
    if not cond_channels:
        if concat is not None:
            raise ValueError(f"{name} has no spatial condition (cond_channels=0) but concat was given")
        return x
    b, _, h, w = x.shape
    if concat is None:
        return torch.cat([x, x.new_zeros(b, cond_channels, h, w)], dim=1)
    if not torch.is_tensor(concat) or concat.ndim != 4 or tuple(concat.shape[1:]) != (cond_channels, h, w) \
            or concat.shape[0] not in (1, b):
        got = list(concat.shape) if torch.is_tensor(concat) else type(concat).__name__
        raise ValueError(f"concat must have shape [{b}, {cond_channels}, {h}, {w}] (batch, cond_channels, H, W), "
                         f"got {got}")
    return torch.cat([x, _batch_of(concat, b).to(x.dtype)], dim=1)


def check_context(name: str, batch: int, context: torch.Tensor | None, context_dim: int) -> torch.Tensor | None:
    """The validated context ``[batch, L, context_dim]`` (any L >= 1; a batch of one is broadcast), or
    ``None`` = no context. Raises ValueError naming ``context`` and its expected shape."""
    if context is None:
        return None
    if not context_dim:
        raise ValueError(f"{name} has no cross-attention (context_dim=0) but context was given")
    if not torch.is_tensor(context) or context.ndim != 3 or context.shape[2] != context_dim \
            or context.shape[1] < 1 or context.shape[0] not in (1, batch):
        got = list(context.shape) if torch.is_tensor(context) else type(context).__name__
        raise ValueError(f"context must have shape [{batch}, L, {context_dim}] (batch, tokens, context_dim), got {got}")
    if not context.is_floating_point():
        raise ValueError(f"context must be a float tensor, got {context.dtype}")
    return _batch_of(context, batch)
