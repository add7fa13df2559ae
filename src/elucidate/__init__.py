"""elucidate: diffusion models on the EDM design space (Karras et al. 2022)."""
from . import nets, sampling
from .analytic import EmpiricalDenoiser, GaussianMixture
from .denoiser import Denoiser
from .formulations import DDPM, EDM, FORMULATIONS, IDDPM, VE, VP, Formulation, Preconditioning, make_formulation
from .interop import from_diffusers
from .likelihood import log_likelihood
from .losses import denoising_loss
from .nets import NETWORKS, DhariwalUNet, SongUNet, UNet, build_network
from .sampling import sample
from .seed_api import ElucidatedDiffusion, Unet

__version__ = "0.1.0"

__all__ = [
    "nets", "NETWORKS", "DhariwalUNet", "SongUNet", "UNet", "build_network", "sampling", "EmpiricalDenoiser",
    "GaussianMixture", "Denoiser", "DDPM", "EDM", "IDDPM", "VE", "VP", "FORMULATIONS", "Formulation", "Preconditioning",
    "make_formulation", "denoising_loss", "sample", "log_likelihood", "from_diffusers", "Unet", "ElucidatedDiffusion",
    "__version__",
]
