"""Adapters between elucidate and other diffusion libraries: diffusers models in, DDPM runs out."""
from .diffusers import ddpm_from_scheduler, from_diffusers, load_diffusers, scheduler_config
from .diffusers_export import export_diffusers

__all__ = ["from_diffusers", "ddpm_from_scheduler", "scheduler_config", "load_diffusers", "export_diffusers"]
