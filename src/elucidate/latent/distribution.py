"""The autoencoder's posterior q(z | x) = N(mean, diag(exp(logvar))) over latent feature maps."""
from __future__ import annotations

import math

import torch

__all__ = ["DiagonalGaussianDistribution"]

#: log-variance clamp (as in latent-diffusion), keeping exp(logvar) finite in float32.
LOGVAR_RANGE = (-30.0, 20.0)


class DiagonalGaussianDistribution:
    """A diagonal Gaussian over ``[B, C, H, W]`` latents.

    ``parameters`` is ``[B, 2C, H, W]``: mean and log-variance stacked along channels (the
    encoder's output). With ``deterministic=True`` the variance is 0: ``sample()`` is the mean and
    ``kl()`` / ``nll()`` are 0 (a plain autoencoder). Reductions (``kl``, ``nll``) sum over every
    non-batch dimension and return ``[B]``.
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        if parameters.ndim < 2 or parameters.shape[1] % 2:
            raise ValueError(f"parameters must be [B, 2C, ...] (mean and logvar), got {list(parameters.shape)}")
        self.parameters = parameters
        self.mean, logvar = parameters.chunk(2, dim=1)
        self.logvar = logvar.clamp(*LOGVAR_RANGE)
        self.deterministic = bool(deterministic)
        if self.deterministic:
            self.var = self.std = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    @classmethod
    def from_mean(cls, mean: torch.Tensor) -> DiagonalGaussianDistribution:
        """A deterministic (zero-variance) posterior at ``mean``."""
        return cls(torch.cat([mean, torch.zeros_like(mean)], dim=1), deterministic=True)

    def sample(self, generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """z = mean + std * n with n ~ N(0, I) drawn from ``generator`` (or the given ``noise``)."""
        if noise is None:
            noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype,
                                device=generator.device if generator is not None else self.mean.device)
        if tuple(noise.shape) != tuple(self.mean.shape):
            raise ValueError(f"noise has shape {list(noise.shape)}, expected {list(self.mean.shape)}")
        return self.mean + self.std * noise.to(device=self.mean.device, dtype=self.mean.dtype)

    def mode(self) -> torch.Tensor:
        """The most likely latent: the mean."""
        return self.mean

    def _dims(self) -> list[int]:
        return list(range(1, self.mean.ndim))

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL(self || other) per sample ``[B]``; ``other=None`` means the standard normal N(0, I):
        KL = 1/2 sum(mean^2 + var - 1 - logvar)."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], dtype=self.mean.dtype, device=self.mean.device)
        if other is None:
            terms = self.mean.square() + self.var - 1.0 - self.logvar
        else:
            terms = ((self.mean - other.mean).square() / other.var + self.var / other.var - 1.0
                     - self.logvar + other.logvar)
        return 0.5 * terms.sum(dim=self._dims())

    def nll(self, sample: torch.Tensor, dims: list[int] | None = None) -> torch.Tensor:
        """Negative log-likelihood of ``sample`` under this Gaussian, summed over ``dims``
        (default: all but the batch dimension): 1/2 sum(log 2 pi + logvar + (x - mean)^2 / var)."""
        dims = self._dims() if dims is None else dims
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], dtype=self.mean.dtype, device=self.mean.device)
        terms = math.log(2 * math.pi) + self.logvar + (sample - self.mean).square() / self.var
        return 0.5 * terms.sum(dim=dims)

    def __repr__(self) -> str:
        kind = "deterministic, " if self.deterministic else ""
        return f"DiagonalGaussianDistribution({kind}shape={list(self.mean.shape)})"
