"""Sampling: noise schedules, ODE/SDE solvers over a denoiser D(x, sigma), EDM Algorithm 1, sample().

Every registered solver is available as ``elucidate.sampling.<name>`` (e.g. ``sampling.heun``), so a
stored choice ``(sampler, sigmas, options)`` replays as
``getattr(sampling, sampler)(D, x, sigmas, **options)``.
"""
from . import highorder as _highorder  # noqa: F401  (registers iPNDM and UniPC)
from . import multistep as _multistep  # noqa: F401  (registers the built-in multistep solvers)
from . import solvers as _solvers  # noqa: F401  (registers the built-in single-step solvers)
from .ablation import ablation
from .api import SeededNoise, get_sampler, sample
from .boundary import ReferenceCache
from .multistep import lms_coefficients
from .registry import (
    CONFIG_OPTIONS,
    SOLVERS,
    SolverSpec,
    check_options,
    get_solver,
    nfe,
    ode_solvers,
    register_solver,
    steps_for_nfe,
    stochastic_solvers,
    sweep_solvers,
)
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
from .solvers import ancestral_step, check_sigmas, num_steps
from .tuned import TunedSchedule, load_tuned, tuned_config
from .tuning import tune

__all__ = [
    "ablation", "SeededNoise", "get_sampler", "sample", "CONFIG_OPTIONS", "SOLVERS", "SolverSpec", "check_options",
    "get_solver",
    "nfe", "ode_solvers", "register_solver", "steps_for_nfe", "stochastic_solvers", "sweep_solvers", "SCHEDULES",
    "exponential_sigmas", "get_schedule", "iddpm_sigmas", "karras_sigmas", "linear_sigmas", "ve_sigmas",
    "vp_betas_for_range", "vp_range_sigmas", "vp_sigmas", "ancestral_step", "check_sigmas", "lms_coefficients",
    "num_steps", "tune", "ReferenceCache", "TunedSchedule", "load_tuned", "tuned_config", *SOLVERS,
]


def __getattr__(name: str):
    """Registered solvers by name, including ones registered after import."""
    spec = SOLVERS.get(name)
    if spec is None:
        raise AttributeError(f"module 'elucidate.sampling' has no attribute {name!r}")
    return spec.fn


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(SOLVERS))
