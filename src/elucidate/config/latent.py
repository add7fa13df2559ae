"""The ``latent`` section of a diffusion config: train and sample in the latent space of a VAE
trained with ``elucidate train-vae`` or of a diffusers ``AutoencoderKL`` (see docs/latent.md)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..params import param
from .schema import typed_section, validate_section

__all__ = ["LatentConfig", "check_latent"]


@dataclass
class LatentConfig:
    """Diffusion on ``z = scale_factor * E(x)``; samples are decoded with ``D(z / scale_factor)``."""

    vae: str = param("", "the autoencoder: a train-vae run directory (newest checkpoint) or checkpoint file, or a "
                         "diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors, e.g. a "
                         "Stable Diffusion VAE; its shift_factor is applied); copied into the run, so sampling "
                         "does not need it afterwards")
    scale_factor: Any = param("auto", "latents are multiplied by it; auto = a diffusers VAE's scaling_factor, else "
                                      "sigma_data / std of the posterior means over the data (sigma_data of the "
                                      "formulation, 0.5 if it has none)")
    encoded: str | None = param(None, "a file written by `elucidate encode` (posterior mean and std of every "
                                      "training image) instead of encoding the data when training starts")
    sample_posterior: bool = param(True, "draw z ~ N(mean, std^2) each time an image is used (edm2); false = "
                                         "always the posterior mean")

    def validate(self) -> None:
        validate_section(self, "latent")
        if not self.vae:
            raise ConfigError("latent.vae is required: the run directory (or checkpoint) of a VAE trained with "
                              "`elucidate train-vae`, or a diffusers AutoencoderKL folder")
        s = self.scale_factor
        if s != "auto" and (isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0):
            raise ConfigError(f"latent.scale_factor = {s!r}: expected 'auto' or a number > 0")
        if s != "auto":
            self.scale_factor = float(s)


def check_latent(raw: Any) -> LatentConfig | None:
    """The validated ``latent`` section (None when absent or null)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"section 'latent' must be a mapping {{vae: RUN, scale_factor: auto}}, got "
                          f"{type(raw).__name__}")
    return typed_section(LatentConfig, "latent", raw)
