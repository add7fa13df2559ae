"""The autoencoder's YAML config: sections ``data``, ``model``, ``loss``, ``training``.

``data`` is passed to :func:`elucidate.data.build_dataset` (as in diffusion configs), ``model`` holds
:class:`~elucidate.latent.AutoencoderKL` keyword arguments (channels and resolution come from the
data), ``loss`` the :class:`~elucidate.latent.VAELoss` settings and ``training`` the optimization and
bookkeeping. Every key is checked; errors are one line naming the key.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from ..params import override, param
from .schema import (
    apply_overrides,
    check_data,
    check_number,
    check_sections,
    parse_with_overrides,
    read_config_file,
    typed_section,
    validate_section,
)
from .training import LoopConfig

__all__ = ["VAEConfig", "VAEModelConfig", "VAELossConfig", "VAETrainingConfig", "parse_vae_config",
           "load_vae_config", "dump_vae_config", "apply_vae_overrides", "VAE_SECTIONS", "VAE_SECTION_TYPES"]

VAE_SECTIONS = ("data", "model", "loss", "training")


def _int_list(where: str, value: Any, *, minimum: int, allow_empty: bool) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or (not value and not allow_empty):
        raise ConfigError(f"{where} = {value!r}: expected a {'' if allow_empty else 'non-empty '}list of integers")
    for v in value:
        check_number(where, v, integer=True, minimum=minimum)
    return tuple(value)


@dataclass
class VAEModelConfig:
    """AutoencoderKL architecture (``in_channels`` and ``img_resolution`` come from the data)."""

    ch: int = param(64, "channels of the first level", minimum=1)
    ch_mult: tuple = param(None, "channel multiplier per level; len(ch_mult) - 1 downsamplings by 2",
                           default_factory=lambda: (1, 2, 4))
    num_res_blocks: int = param(2, "ResNet blocks per level (the decoder has one more)", minimum=1)
    attn_resolutions: tuple = param(None, "levels (by their smaller side) with self-attention besides the middle",
                                    default_factory=tuple)
    z_channels: int = param(4, "channels of the encoder output / decoder input", minimum=1)
    double_z: bool = param(True, "predict mean and log-variance (false: a deterministic autoencoder, KL = 0)")
    embed_dim: int = param(4, "latent channels", minimum=1)
    dropout: float = param(0.0, "dropout in the ResNet blocks", minimum=0, maximum=0.99)

    def validate(self) -> None:
        validate_section(self, "model")
        self.ch_mult = _int_list("model.ch_mult", self.ch_mult, minimum=1, allow_empty=False)
        self.attn_resolutions = _int_list("model.attn_resolutions", self.attn_resolutions, minimum=1,
                                          allow_empty=True)

    def kwargs(self) -> dict:
        """Keyword arguments for ``AutoencoderKL`` (without channels and resolution)."""
        return asdict(self)


@dataclass
class VAELossConfig:
    """Loss weights and the discriminator (see ``elucidate.latent.vae_loss``)."""

    kl_weight: float = param(1e-6, "weight of KL(q(z|x) || N(0, I)) (summed over latent elements)", minimum=0)
    perceptual: str | None = param(None, "feature network: digits, a path to a .safetensors file, or null")
    perceptual_weight: float | None = param(None, "weight of the perceptual distance (default: 1 with a "
                                                  "perceptual network, else 0)", minimum=0)
    disc_weight: float = param(0.5, "multiplies the adaptive GAN weight; 0 = no GAN", minimum=0)
    disc_start: int = param(0, "first step with the adversarial terms", minimum=0)
    disc_loss: str = param("hinge", "discriminator loss", choices=("hinge", "vanilla"))
    disc_layers: int = param(3, "stride-2 convolutions of the PatchGAN discriminator", minimum=1, maximum=6)
    disc_channels: int = param(64, "channels of the discriminator's first layer", minimum=1)
    logvar_init: float = param(0.0, "initial value of the learned log-variance s")

    def validate(self) -> None:
        validate_section(self, "loss")
        p = self.perceptual
        if p is not None and p != "digits" and not p.endswith(".safetensors"):
            raise ConfigError(f"loss.perceptual = {p!r}: expected 'digits', a path to a .safetensors feature "
                              f"network, or null")
        if self.perceptual_weight is None:
            self.perceptual_weight = 1.0 if p is not None else 0.0
        if self.perceptual_weight > 0 and p is None:
            raise ConfigError(f"loss.perceptual_weight = {self.perceptual_weight} needs loss.perceptual "
                              f"('digits' or a .safetensors feature network)")


@dataclass
class VAETrainingConfig(LoopConfig):
    """The loop's options (Adam for the autoencoder + log-variance, Adam for the discriminator), the held-out
    split and its periodic evaluation."""

    batch_size: int = override(LoopConfig, "batch_size", 32)
    lr: float = override(LoopConfig, "lr", 1e-4, doc="learning rate of the autoencoder and the log-variance")
    lr_rampup: int = override(LoopConfig, "lr_rampup", 0)
    betas: tuple = override(LoopConfig, "betas", doc="Adam's (beta1, beta2) for both optimizers",
                            default_factory=lambda: (0.5, 0.9))
    sample_every: int = override(LoopConfig, "sample_every", 500,
                                 doc="steps between reconstruction grids; 0 = only at the end")
    num_sample_images: int = override(LoopConfig, "num_sample_images", 16,
                                      doc="held-out images in the reconstruction grid")
    disc_lr: float | None = param(None, "learning rate of the discriminator (default: lr)", minimum=0,
                                  exclusive=True)
    holdout: float = param(0.1, "held-out split for evaluation: a fraction in (0, 1) or a count of images",
                           minimum=0, exclusive=True)
    eval_every: int = param(500, "steps between held-out PSNR / Frechet distance; 0 = only at the end", minimum=0,
                            resumable=True)
    fd_features: str = param("auto", "features of the Frechet distance: auto (fd_digits for digits), fd_digits, "
                                     "none, or a path to the Inception weights (.pth)", resumable=True)

    def validate(self) -> None:
        super().validate()
        if self.disc_lr is None:
            self.disc_lr = self.lr
        h = self.holdout
        if isinstance(h, float) and h >= 1 and not h.is_integer():
            raise ConfigError(f"training.holdout = {h!r}: expected a fraction in (0, 1) or a count >= 1")
        if isinstance(h, float) and h >= 1:
            self.holdout = int(h)
        f = self.fd_features
        if not (f in ("auto", "fd_digits", "none") or f.endswith(".pth")):
            raise ConfigError(f"training.fd_features = {f!r}: expected auto, fd_digits, none or a path to the "
                              f"Inception weights (.pth)")


@dataclass
class VAEConfig:
    """A whole autoencoder run."""

    data: dict = field(default_factory=lambda: {"dataset": "digits"})
    model: VAEModelConfig = field(default_factory=VAEModelConfig)
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    training: VAETrainingConfig = field(default_factory=VAETrainingConfig)

    def to_dict(self) -> dict:
        out = asdict(self)
        for section, key in (("model", "ch_mult"), ("model", "attn_resolutions"), ("training", "betas")):
            out[section][key] = list(out[section][key])
        return out


#: The typed sections' classes; parse_vae_config builds each from its declarations.
VAE_SECTION_TYPES = {"model": VAEModelConfig, "loss": VAELossConfig, "training": VAETrainingConfig}


def parse_vae_config(raw: dict | None) -> VAEConfig:
    """Validate a config mapping (e.g. from YAML) into a ``VAEConfig``; missing sections take defaults."""
    raw = check_sections(raw, VAE_SECTIONS)
    return VAEConfig(data=check_data(raw.get("data") or VAEConfig().data),
                     **{name: typed_section(cls, name, raw.get(name)) for name, cls in VAE_SECTION_TYPES.items()})


def apply_vae_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a raw VAE config mapping."""
    return apply_overrides(raw, overrides, VAE_SECTIONS)


def load_vae_config(source: str | Path | dict, overrides: list[str] | tuple[str, ...] = ()) -> VAEConfig:
    """A validated ``VAEConfig`` from a YAML file path or a mapping, with ``section.key=value`` overrides."""
    if isinstance(source, dict):
        return parse_vae_config(apply_vae_overrides(source, overrides))
    raw = read_config_file(source, "start from configs/digits-vae.yaml")
    return parse_with_overrides(raw, overrides, parse_vae_config, VAE_SECTIONS, source=Path(source))


def dump_vae_config(config: VAEConfig) -> str:
    """The resolved config as YAML (a run directory's config.yaml)."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
