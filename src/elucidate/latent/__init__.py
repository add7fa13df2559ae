"""Latent diffusion's first stage: the KL-regularized autoencoder (Rombach et al. 2022).

* :class:`AutoencoderKL` -- ``encode(x) -> DiagonalGaussianDistribution``, ``decode(z) -> x``,
  ``forward(x, sample_posterior=True) -> (reconstruction, posterior)``;
* :class:`VAELoss` -- L1 (+ perceptual) reconstruction under a learned log-variance, KL, and a
  PatchGAN term with the adaptive weight (:func:`adaptive_weight`), on after ``disc_start``;
* :func:`train_vae` -- a training run (run directory, exact resume, DDP), :func:`load_vae` -- the
  trained autoencoder of a run, for encoding and decoding.

See ``docs/latent.md``.
"""
from .autoencoder import AutoencoderKL, Decoder, Encoder, ResnetBlock
from .build import OptimizerPair, build_autoencoder, build_vae_loss, load_vae, load_vae_checkpoint
from .config import (
    VAEConfig,
    VAELossConfig,
    VAEModelConfig,
    VAETrainingConfig,
    dump_vae_config,
    load_vae_config,
    parse_vae_config,
)
from .discriminator import PatchDiscriminator, generator_loss, hinge_d_loss, vanilla_d_loss
from .distribution import DiagonalGaussianDistribution
from .evaluate import evaluate_reconstructions, psnr, reconstruct, save_reconstruction_grid
from .perceptual import DigitsFeatures, PerceptualLoss, VGGFeatures, load_feature_network
from .train import VAETrainer, holdout_split, train_vae
from .vae_loss import VAELoss, adaptive_weight

__all__ = [
    "AutoencoderKL", "Encoder", "Decoder", "ResnetBlock", "DiagonalGaussianDistribution",
    "VAELoss", "adaptive_weight", "PatchDiscriminator", "hinge_d_loss", "vanilla_d_loss", "generator_loss",
    "PerceptualLoss", "DigitsFeatures", "VGGFeatures", "load_feature_network",
    "VAEConfig", "VAEModelConfig", "VAELossConfig", "VAETrainingConfig", "parse_vae_config", "load_vae_config",
    "dump_vae_config", "VAETrainer", "train_vae", "holdout_split", "load_vae", "load_vae_checkpoint",
    "build_autoencoder", "build_vae_loss", "OptimizerPair",
    "reconstruct", "psnr", "evaluate_reconstructions", "save_reconstruction_grid",
]
