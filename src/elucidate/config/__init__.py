"""Configuration: one YAML file -> a validated ``Config`` with sections ``data``, ``network``, ``diffusion``,
``training``, ``sampling`` (and ``latent``); the autoencoder's config (:mod:`.vae`); the generated config docs.

Every key is checked: unknown keys are errors with a "did you mean", values are type- and range-checked with
messages that name the key, the value and what was expected (from the fields' declarations, see
:mod:`elucidate.params`). ``--set section.key=value`` overrides are applied first. One module per section.

May import: formulations, sampling, nets, data, denoiser, params, runtime, errors.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from ..errors import ConfigError
from ..formulations import Formulation
from .diffusion import SCHEDULE_KEYS, diffusion_keys, parse_diffusion, resolved
from .distill import DistillConfig, check_distill
from .latent import LatentConfig, check_latent
from .network import DataInfo, build_network_for
from .sampling import SamplingConfig, schedule_for
from .schema import (
    SECTIONS,
    ConfigWarning,
    apply_overrides,
    check_data,
    check_network,
    check_sections,
    parse_with_overrides,
    read_config_file,
    typed_section,
)
from .training import LoopConfig, TrainingConfig
from .vae import VAEConfig, dump_vae_config, load_vae_config, parse_vae_config

__all__ = ["Config", "TrainingConfig", "LoopConfig", "SamplingConfig", "LatentConfig", "DistillConfig", "VAEConfig",
           "ConfigWarning",
           "ConfigError", "load_config", "parse_config", "apply_overrides", "dump_config", "read_config_file",
           "diffusion_keys", "SCHEDULE_KEYS", "SECTIONS", "SECTION_TYPES", "DataInfo", "build_network_for",
           "schedule_for", "parse_vae_config", "load_vae_config", "dump_vae_config"]

#: The typed sections' classes (the others are checked mappings); parse_config builds each from its declarations.
SECTION_TYPES = {"training": TrainingConfig, "sampling": SamplingConfig}


@dataclass
class Config:
    """A whole run: ``data`` and ``network`` are passed to their factories; the rest is typed here."""

    data: dict = field(default_factory=lambda: {"dataset": "digits"})
    network: dict = field(default_factory=lambda: {"arch": "unet"})
    diffusion: dict = field(default_factory=lambda: {"type": "EDM"})
    training: TrainingConfig = field(default_factory=TrainingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    latent: LatentConfig | None = None  # diffusion in a VAE's latent space (docs/latent.md)
    distill: DistillConfig | None = None  # a distilled run: method and teacher (docs/distillation.md)

    def formulation(self) -> Formulation:
        """The diffusion formulation the ``diffusion`` section describes."""
        return parse_diffusion(self.diffusion)[0]

    def to_dict(self) -> dict:
        out = asdict(self)
        out["training"]["betas"] = list(self.training.betas)
        if out["latent"] is None:  # pixel runs: their configs look as before the section existed
            del out["latent"]
        if out["distill"] is None:  # likewise for runs that are not distilled
            del out["distill"]
        return out


def parse_config(raw: dict | None) -> Config:
    """Validate a config mapping (e.g. from YAML) into a ``Config``; missing sections take defaults."""
    raw = check_sections(raw, SECTIONS)
    defaults = Config()
    diffusion = raw.get("diffusion") or defaults.diffusion
    if not isinstance(diffusion, dict):
        raise ConfigError(f"section 'diffusion' must be a mapping, got {type(diffusion).__name__}")
    formulation, schedule = parse_diffusion(diffusion)
    sampling = raw.get("sampling")
    if schedule:  # the schema's diffusion.sigma_min/sigma_max/rho drive the sampling schedule
        if sampling is not None and not isinstance(sampling, dict):
            raise ConfigError(f"section 'sampling' must be a mapping, got {type(sampling).__name__}")
        sampling = {**schedule, **(sampling or {})}
    config = Config(
        data=check_data(raw.get("data") or defaults.data),
        network=check_network(raw.get("network") or defaults.network),
        diffusion={},
        training=typed_section(SECTION_TYPES["training"], "training", raw.get("training")),
        sampling=typed_section(SECTION_TYPES["sampling"], "sampling", sampling),
        latent=check_latent(raw.get("latent")),
        distill=check_distill(raw.get("distill")),
    )
    if config.latent is not None and config.training.augment is not None:
        raise ConfigError("training.augment is not supported with latent diffusion (it would transform latents, "
                          "not images); remove one of them")
    config.diffusion = resolved(formulation)  # explicit per-type defaults, the schema's spelling
    return config


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config file, apply overrides and validate."""
    raw = read_config_file(path, "start from configs/digits-edm.yaml (or write 'data: {dataset: digits}' to "
                                 "train with every other default)")
    return parse_with_overrides(raw, overrides or [], parse_config, SECTIONS, source=path)  # errors name their cause


def dump_config(config: Config) -> str:
    """The resolved config as YAML (what a run directory's config.yaml holds)."""
    data = config.to_dict()
    for key in ("s_min", "s_max"):
        if data["sampling"][key] == math.inf:
            data["sampling"][key] = "inf"
    return yaml.safe_dump(data, sort_keys=False)
