"""Latent diffusion's first stage, the model side: the KL-regularized autoencoder (Rombach et al. 2022), its
loss (L1 + perceptual under a learned log-variance, KL, PatchGAN with the adaptive weight), encoding datasets
to latents and decoding them back, and reconstruction quality (PSNR, Frechet distance).

* :class:`AutoencoderKL` -- ``encode(x) -> DiagonalGaussianDistribution``, ``decode(z) -> x``,
  ``forward(x, sample_posterior=True) -> (reconstruction, posterior)``;
* :class:`VAELoss` -- on after ``disc_start`` (:func:`adaptive_weight`);
* training it (``train_vae``, ``VAETrainer``: :mod:`elucidate.training.vae`), loading a trained one
  (``load_vae``: :mod:`elucidate.run.model`) and its config (``VAEConfig``: :mod:`elucidate.config.vae`) are
  importable from here too, as before (loaded on first use). See ``docs/latent.md``.

May import: nets, data, metrics, viz, runtime, errors (and lazily, to re-export them: config, run, training).
"""
from .autoencoder import AutoencoderKL, Decoder, Encoder, ResnetBlock
from .data import LatentDataset, LatentDecoder, scale_for
from .discriminator import PatchDiscriminator, generator_loss, hinge_d_loss, vanilla_d_loss
from .distribution import DiagonalGaussianDistribution
from .encode import encode_posteriors, read_encoded, write_encoded
from .evaluate import evaluate_reconstructions, psnr, reconstruct, save_reconstruction_grid
from .perceptual import DigitsFeatures, PerceptualLoss, VGGFeatures, load_feature_network
from .vae_loss import VAELoss, adaptive_weight

#: Names that live in the layers above: the autoencoder's config, loading it from a run, training it.
_CONFIG = ("VAEConfig", "VAEModelConfig", "VAELossConfig", "VAETrainingConfig", "parse_vae_config", "load_vae_config",
           "dump_vae_config")
_RUN = ("load_vae", "load_vae_checkpoint", "build_autoencoder")
_TRAINING = ("VAETrainer", "train_vae", "holdout_split", "build_vae_loss", "OptimizerPair")

__all__ = [
    "AutoencoderKL", "Encoder", "Decoder", "ResnetBlock", "DiagonalGaussianDistribution",
    "VAELoss", "adaptive_weight", "PatchDiscriminator", "hinge_d_loss", "vanilla_d_loss", "generator_loss",
    "PerceptualLoss", "DigitsFeatures", "VGGFeatures", "load_feature_network", "LatentDataset", "LatentDecoder",
    "scale_for", "encode_posteriors", "read_encoded", "write_encoded",
    "reconstruct", "psnr", "evaluate_reconstructions", "save_reconstruction_grid", *_CONFIG, *_RUN, *_TRAINING,
]


def __getattr__(name: str):
    """The names of the layers above, imported from their homes on first use."""
    if name in _CONFIG:
        from ..config import vae as home
    elif name in _RUN:
        from ..run import model as home
    elif name == "OptimizerPair":  # train-vae's two optimizers, now the loop's OptimizerGroup
        from ..training.optim import OptimizerGroup
        return OptimizerGroup
    elif name in _TRAINING:
        from ..training import vae as home
    else:
        raise AttributeError(f"module 'elucidate.latent' has no attribute {name!r}")
    return getattr(home, name)
