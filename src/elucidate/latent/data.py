"""Data in a VAE's latent space: the latents of a pixel dataset (a posterior sample drawn per use), their
scale factor, and decoding latents back to images.

The run-directory side (the run's copy of its autoencoder, ``latent.json``) is in
:mod:`elucidate.training.latent` (training) and :mod:`elucidate.run.model` (loading a latent run's decoder).
"""
from __future__ import annotations

import torch

from ..errors import ConfigError, UserError
from .autoencoder import AutoencoderKL

__all__ = ["LatentDataset", "scale_for", "LatentDecoder"]


class LatentDataset:
    """Scaled VAE posteriors of a pixel dataset, with its labels and conditions: ``get_batch`` gives the
    posterior means, ``draw_batch(indices, generator)`` a sample ``s (mean + std n)``, n ~ N(0, I)."""

    def __init__(self, pixels, mean: torch.Tensor, std: torch.Tensor, scale_factor: float, *,
                 sample_posterior: bool = True, decode: LatentDecoder | None = None):
        if len(pixels) != mean.shape[0]:
            raise ConfigError(f"the encoded latents hold {mean.shape[0]} items but the data section gives "
                              f"{len(pixels)} images; encode the same data (same xflip, max_size)")
        if getattr(pixels, "cond_channels", 0):
            raise ConfigError("a spatial (concat) condition is not supported in latent space; use class labels or "
                              "a context")
        self.pixels, self.mean, self.std = pixels, mean.float(), std.float()
        self.scale_factor, self.sample_posterior = float(scale_factor), sample_posterior
        self.normalizer = getattr(pixels, "normalizer", None)  # of the decoded images
        self.decode = decode  # latents -> images (the run's VAE), for the training loop's sample grids

    def __len__(self) -> int:
        return self.mean.shape[0]

    channels = property(lambda self: int(self.mean.shape[1]))
    resolution = property(lambda self: (int(self.mean.shape[2]), int(self.mean.shape[3])))
    num_classes = property(lambda self: int(self.pixels.num_classes))
    cond_channels = property(lambda self: 0)
    context_shape = property(lambda self: getattr(self.pixels, "context_shape", None))

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scaled posterior means, labels) of ``indices``."""
        return self.mean[indices] * self.scale_factor, self.pixels.get_labels(indices)

    def draw_batch(self, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A scaled posterior sample for each index (the mean with ``sample_posterior: false``)."""
        mean = self.mean[indices]
        if not self.sample_posterior:
            return mean * self.scale_factor
        noise = torch.randn(mean.shape, generator=generator)
        return (mean + self.std[indices] * noise) * self.scale_factor

    def get_conditions(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.pixels.get_conditions(indices).items() if k != "concat"}


def scale_for(mean: torch.Tensor, sigma_data: float, chunk: int = 4096) -> float:
    """``sigma_data / std`` of all posterior-mean elements (so latents have the formulation's sigma_data), in
    float64 over chunks of rows (a memory-mapped ``mean`` is never copied whole)."""
    count = mean.numel()
    total = sum(float(mean[i:i + chunk].double().sum()) for i in range(0, mean.shape[0], chunk))
    center = total / max(count, 1)
    squares = sum(float((mean[i:i + chunk].double() - center).square().sum()) for i in range(0, mean.shape[0], chunk))
    std = (squares / max(count - 1, 1)) ** 0.5
    if not std > 0:
        raise UserError("the VAE's latents of this data are constant (std 0): cannot scale them")
    return sigma_data / std


class LatentDecoder:
    """``z -> D(z / scale_factor)`` in batches, float32 images in the VAE's model range, on ``z``'s device."""

    def __init__(self, vae: AutoencoderKL, scale_factor: float, batch_size: int = 256):
        self.vae, self.scale_factor, self.batch_size = vae, float(scale_factor), batch_size

    @torch.no_grad()
    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        device = next(self.vae.parameters()).device
        out = [self.vae.decode(z[i:i + self.batch_size].to(device, torch.float32) / self.scale_factor)
               for i in range(0, z.shape[0], self.batch_size)]
        return torch.cat(out).float().to(z.device)
