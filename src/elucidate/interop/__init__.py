"""Adapters between elucidate and other diffusion code: diffusers models in (``from_diffusers``), DDPM runs out to
diffusers pipelines, NVlabs/edm and edm2 networks in as run directories (``import_edm``; the networks themselves
load through :mod:`elucidate.nets.edm_port` and :mod:`elucidate.nets.edm2`), and the lucidrains-style ``Unet`` /
``ElucidatedDiffusion`` API.

May import: run, config, data, formulations, sampling, nets, denoiser, losses, runtime, errors.
"""
from .diffusers import (
    ddpm_from_scheduler,
    flow_from_scheduler,
    from_diffusers,
    load_diffusers,
    scheduler_clipping,
    scheduler_config,
)
from .diffusers_export import export_diffusers
from .edm import import_edm
from .lucidrains import ElucidatedDiffusion, Unet

__all__ = ["from_diffusers", "ddpm_from_scheduler", "flow_from_scheduler", "scheduler_config", "scheduler_clipping",
           "load_diffusers",
           "export_diffusers", "import_edm", "Unet",
           "ElucidatedDiffusion"]
