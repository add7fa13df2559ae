"""The denoising score-matching loss lambda(sigma) ||D(y + sigma n; sigma) - y||^2 (EDM eq. 2 and 8).

May import: denoiser, formulations.
"""
from __future__ import annotations

import torch

from .denoiser import Denoiser
from .formulations import Formulation

__all__ = ["denoising_loss"]


def denoising_loss(denoiser: Denoiser, y: torch.Tensor, *, sigma: torch.Tensor | None = None,
                   noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                   formulation: Formulation | None = None, **cond) -> torch.Tensor:
    """Per-sample weighted loss ``[B]``: the mean over elements of lambda(sigma) (D(y + sigma n) - y)^2
    (the formulation's ``pointwise_loss``; e.g. DDPM with ``loss_type: l1`` uses |target - F|).

    ``sigma`` defaults to draws from the denoiser's formulation and ``noise`` to standard normal
    noise (both from ``generator``); pass them explicitly for exactly reproducible batches.
    ``formulation`` defaults to ``denoiser.formulation`` (pass it when the denoiser is wrapped, e.g. DDP).
    """
    formulation = formulation or denoiser.formulation
    if sigma is None:
        sigma = formulation.training_sigma(y.shape[0], generator=generator, device=y.device, dtype=y.dtype)
    sigma = torch.as_tensor(sigma, device=y.device, dtype=y.dtype).reshape(-1)
    if sigma.shape[0] != y.shape[0]:
        raise ValueError(f"sigma has {sigma.shape[0]} values but y has batch size {y.shape[0]}")
    if noise is None:
        noise = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
    elif noise.shape != y.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} does not match y shape {tuple(y.shape)}")
    view = (-1,) + (1,) * (y.ndim - 1)
    D_yn = denoiser(y + sigma.reshape(view) * noise, sigma, **cond)
    return formulation.pointwise_loss(D_yn, y, sigma).flatten(1).mean(dim=1)
