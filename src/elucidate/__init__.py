"""elucidate: diffusion models on the EDM design space (Karras et al. 2022).

The public API: formulations, the denoiser, the loss, ``sample()`` and ``inpaint()``, networks, exact denoisers, the
log-likelihood, ``from_diffusers`` and the lucidrains-style ``Unet`` / ``ElucidatedDiffusion``. The packages:
formulations, sampling, nets, data, latent, metrics, viz (the core, which knows nothing of runs); config; run;
training, evaluation, tuning, interop; cli. Each package's ``__init__`` says what it may import.

May import: formulations, sampling, nets, analytic, denoiser, losses, likelihood, interop.
"""
import warnings

from . import nets, sampling
from .analytic import EmpiricalDenoiser, GaussianMixture
from .denoiser import Clipped, Denoiser, Guided, Thresholded
from .formulations import DDPM, EDM, FORMULATIONS, IDDPM, VE, VP, Flow, Formulation, Preconditioning, make_formulation
from .interop import ElucidatedDiffusion, Unet, from_diffusers
from .likelihood import log_likelihood
from .losses import denoising_loss
from .nets import NETWORKS, DhariwalUNet, SongUNet, build_network
from .sampling import inpaint, sample

__version__ = "0.1.0"

__all__ = [
    "nets", "NETWORKS", "DhariwalUNet", "SongUNet", "build_network", "sampling", "EmpiricalDenoiser",
    "GaussianMixture", "Denoiser", "Guided", "Clipped", "Thresholded", "DDPM", "EDM", "IDDPM", "VE", "VP", "Flow",
    "FORMULATIONS", "Formulation", "Preconditioning",
    "make_formulation", "denoising_loss", "sample", "inpaint", "log_likelihood", "from_diffusers", "Unet",
    "ElucidatedDiffusion",
    "__version__",
]


def __getattr__(name: str):
    """``elucidate.UNet`` (the network class, which differs from the lucidrains-style ``elucidate.Unet`` only in
    case) still works, with a warning: it is ``elucidate.nets.UNet``."""
    if name == "UNet":
        warnings.warn("elucidate.UNet is elucidate.nets.UNet (elucidate.Unet is the lucidrains-style network)",
                      DeprecationWarning, stacklevel=2)
        return nets.UNet
    raise AttributeError(f"module 'elucidate' has no attribute {name!r}")
