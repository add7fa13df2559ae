"""How good is an autoencoder: PSNR and a Fréchet distance of reconstructions vs originals, and
the reconstruction grid (originals above their reconstructions)."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..data.pixels import to_pixels
from .autoencoder import AutoencoderKL

__all__ = ["reconstruct", "psnr", "evaluate_reconstructions", "save_reconstruction_grid"]


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor, *, batch_size: int = 256,
                sample_posterior: bool = False) -> torch.Tensor:
    """``decode(encode(x).mode())`` (or a posterior sample) for model-range images, float32 on ``images``'
    device, in batches (the network's train/eval mode is left as it is)."""
    device = next(vae.parameters()).device
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size].to(device)
        out.append(vae(x, sample_posterior=sample_posterior)[0].float().to(images.device))
    return torch.cat(out)


def psnr(original: torch.Tensor, reconstruction: torch.Tensor, normalizer=None) -> torch.Tensor:
    """Per-image PSNR in dB, ``10 log10(255^2 / MSE)``, on 8-bit pixels (both images quantized as
    written to PNG, through the dataset's normalizer when it knows the value range, else from [-1, 1])."""
    a, b = to_pixels(original.float(), normalizer), to_pixels(reconstruction.float(), normalizer)
    mse = (a - b).square().flatten(1).mean(dim=1).double()
    return 10 * torch.log10(255.0 ** 2 / mse.clamp_min(1e-10))


@torch.no_grad()
def evaluate_reconstructions(vae: AutoencoderKL, images: torch.Tensor, *, normalizer=None, extractor=None,
                             batch_size: int = 256) -> dict:
    """Reconstruct ``images`` (model range) from the posterior mode and measure: mean per-image
    ``psnr``, ``fd`` (Fréchet distance of ``extractor`` features of reconstructions vs originals;
    None without an extractor or with fewer than 2 images) and the latents' ``latent_mean`` /
    ``latent_std`` (over all elements, useful to scale latents for diffusion)."""
    from ..metrics import compute_stats, frechet_distance

    was_training = vae.training
    vae.eval()
    try:
        device = next(vae.parameters()).device
        recon, latents = [], []
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size].to(device)
            z = vae.encode(x).mode()
            latents.append(z.double().cpu())
            recon.append(vae.decode(z).float().cpu())
        recon_t, z_all = torch.cat(recon), torch.cat(latents)
    finally:
        vae.train(was_training)
    original = images.float().cpu()
    result = {"psnr": float(psnr(original, recon_t, normalizer).mean()), "fd": None,
              "latent_mean": float(z_all.mean()), "latent_std": float(z_all.std()), "count": int(images.shape[0])}
    if extractor is not None and images.shape[0] >= 2:
        real = compute_stats(extractor, to_pixels(original, normalizer), batch_size=batch_size)
        fake = compute_stats(extractor, to_pixels(recon_t, normalizer), batch_size=batch_size)
        result["fd"] = float(frechet_distance(real.mean, real.cov, fake.mean, fake.cov))
    if not math.isfinite(result["psnr"]):
        result["psnr"] = None
    return result


def save_reconstruction_grid(vae: AutoencoderKL, images: torch.Tensor, path: str | Path, *, columns: int = 8) -> Path:
    """A PNG with rows of ``columns`` originals, each above its row of reconstructions (posterior mode)."""
    from ..viz import save_image_grid

    was_training = vae.training
    vae.eval()
    try:
        recon = reconstruct(vae, images)
    finally:
        vae.train(was_training)
    original = images.float().cpu()
    rows = []
    for start in range(0, original.shape[0], columns):
        rows += [original[start:start + columns], recon[start:start + columns]]
    if original.shape[0] % columns:  # pad the last pair of rows so every original sits above its reconstruction
        fill = columns - original.shape[0] % columns
        pad = torch.full((fill, *original.shape[1:]), float("nan"))
        rows[-2], rows[-1] = torch.cat([rows[-2], pad]), torch.cat([rows[-1], pad])
    return save_image_grid(torch.cat(rows), path, nrow=columns)
