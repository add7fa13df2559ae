"""The denoising score-matching loss lambda(sigma) ||D(y + sigma n; sigma) - y||^2 (EDM eq. 2 and 8), and EDM2's
learned uncertainty weighting of it: lambda / e^u(sigma) ||D - y||^2 + u(sigma) (EDM2 eq. 21) with its small
u(sigma) head (:class:`UncertaintyHead`).

May import: denoiser, formulations.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .denoiser import Denoiser
from .formulations import Formulation

__all__ = ["denoising_loss", "UncertaintyHead", "uncertainty_weighted"]


def denoising_loss(denoiser: Denoiser, y: torch.Tensor, *, sigma: torch.Tensor | None = None,
                   noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                   formulation: Formulation | None = None, uncertainty: UncertaintyHead | None = None,
                   **cond) -> torch.Tensor:
    """Per-sample weighted loss ``[B]``: the mean over elements of lambda(sigma) (D(y + sigma n) - y)^2
    (the formulation's ``pointwise_loss``; e.g. DDPM with ``loss_type: l1`` uses |target - F|).
    With an ``uncertainty`` head u(sigma), EDM2's eq. 21 instead: the mean over elements of
    lambda(sigma) / e^u(sigma) (D - y)^2 + u(sigma) (:func:`uncertainty_weighted`).

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
    loss = formulation.pointwise_loss(D_yn, y, sigma).flatten(1).mean(dim=1)
    return loss if uncertainty is None else uncertainty_weighted(loss, uncertainty(sigma))


def uncertainty_weighted(loss: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """EDM2's eq. 21 per sample from the fixed-weight per-sample loss ``[B]`` (the mean over elements of
    lambda (D - y)^2) and u(sigma) ``[B]``: the mean over elements of lambda / e^u (D - y)^2 + u (u is per sample)."""
    u = u.to(loss.dtype)
    return loss * torch.exp(-u) + u  # EDM2 eq. 21


class UncertaintyHead(nn.Module):
    """u(sigma) of EDM2 eq. 21, the log of the expected weighted loss at sigma: magnitude-preserving Fourier features
    (EDM2 eq. 75) of ln(sigma) / 4 followed by a weight-normalized linear layer to one value (EDM2 eq. 47, 66), in
    float32. The input is EDM's c_noise for every formulation: sigma is what they share, while their own c_noise
    spans 0..1000 for VP, iDDPM, DDPM and Flow, where Fourier features of unit bandwidth would be noise across sigma.
    Trained beside the network (the sampler never sees it)."""

    def __init__(self, channels: int = 128):
        super().__init__()
        self.channels = channels
        self.register_buffer("freqs", 2 * math.pi * torch.randn(channels))  # EDM2 eq. 75: f_i ~ N(0, 1)
        self.register_buffer("phases", 2 * math.pi * torch.rand(channels))  # phi_i ~ U(0, 1)
        self.weight = nn.Parameter(torch.randn(1, channels))

    def features(self, sigma: torch.Tensor) -> torch.Tensor:
        """``[B, channels]``: sqrt(2) cos(2 pi (f c + phi)) of c = ln(sigma) / 4 (EDM2 eq. 75, unit variance)."""
        c = torch.as_tensor(sigma).reshape(-1).to(self.freqs.device, torch.float32).log() / 4  # EDM Table 1 c_noise
        return math.sqrt(2) * torch.cos(torch.outer(c, self.freqs.float()) + self.phases.float())

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        """u(sigma) ``[B]`` (float32)."""
        if self.training:  # forced weight normalization (EDM2 eq. 66): the stored weight back to norm sqrt(channels)
            with torch.no_grad():
                self.weight.mul_(math.sqrt(self.channels) / torch.linalg.vector_norm(self.weight).clamp_min(1e-12))
        w = self.weight.float() / torch.linalg.vector_norm(self.weight.float()).clamp_min(1e-12)  # EDM2 eq. 66, 47
        return (self.features(sigma) * w).sum(dim=1)  # a sum, not a matmul: float32 under autocast too
