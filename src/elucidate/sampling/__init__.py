"""Sampling: noise schedules, ODE/SDE solvers over a denoiser D(x, sigma), EDM Algorithm 1, sample()."""
from .ablation import ablation
from .api import SeededNoise, get_sampler, sample
from .schedules import (
                        SCHEDULES,
                        exponential_sigmas,
                        get_schedule,
                        iddpm_sigmas,
                        karras_sigmas,
                        linear_sigmas,
                        ve_sigmas,
                        vp_betas_for_range,
                        vp_range_sigmas,
                        vp_sigmas,
)
from .solvers import (
                        SOLVERS,
                        STOCHASTIC,
                        ancestral_step,
                        dpmpp_2m,
                        dpmpp_2m_sde,
                        dpmpp_3m_sde,
                        euler,
                        euler_ancestral,
                        heun,
                        lms,
                        nfe,
                        steps_for_nfe,
)

__all__ = [
    "ablation", "vp_betas_for_range", "SeededNoise", "get_sampler", "sample", "SCHEDULES",
    "exponential_sigmas", "get_schedule", "iddpm_sigmas", "karras_sigmas", "linear_sigmas", "ve_sigmas",
    "vp_sigmas", "vp_range_sigmas", "SOLVERS", "STOCHASTIC", "ancestral_step", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde",
    "euler", "euler_ancestral", "heun", "lms", "nfe", "steps_for_nfe",
]
