"""Sampling: samplers (ODE/SDE solvers over a denoiser D(x, sigma)), named noise schedules, EDM Algorithm 1
(``ablation``) and ``sample()``, the one function that samples (also image-to-image with ``init=``/``strength=``);
``inpaint()`` completes images where a mask is 0 (RePaint).

Every registered sampler is available as ``elucidate.sampling.<name>`` (e.g. ``sampling.heun``), so a stored
choice ``(sampler, sigmas, options)`` replays as ``getattr(sampling, sampler)(D, x, sigmas, **options)``.
Schedule tuning lives in :mod:`elucidate.tuning`; ``sampling.tune`` (and the tuned-schedule names) reach it
lazily, so ``import elucidate.sampling`` does not load it.

May import: runtime, errors (and lazily, to re-export them: tuning).
"""
import warnings

from . import consistency as _consistency  # noqa: F401  (registers consistency sampling, Song et al. 2023)
from . import highorder as _highorder  # noqa: F401  (registers iPNDM and UniPC)
from . import multistep as _multistep  # noqa: F401  (registers the built-in multistep samplers)
from . import solvers as _solvers  # noqa: F401  (registers the built-in single-step samplers)
from .ablation import ablation
from .api import SeededNoise, sample
from .inpaint import inpaint, stepwise_samplers
from .multistep import lms_coefficients
from .registry import (
    CONFIG_OPTIONS,
    SAMPLERS,
    SamplerSpec,
    check_options,
    get_sampler,
    nfe,
    ode_samplers,
    register_sampler,
    steps_for_nfe,
    stochastic_samplers,
    sweep_samplers,
)
from .schedules import (
    SCHEDULES,
    ScheduleSpec,
    exponential_sigmas,
    get_schedule,
    iddpm_sigmas,
    karras_sigmas,
    linear_sigmas,
    parse_schedule,
    register_schedule,
    ve_sigmas,
    vp_betas_for_range,
    vp_range_sigmas,
    vp_sigmas,
)
from .solvers import ancestral_step, check_sigmas, num_steps

#: Schedule tuning's entry points, importable from here as before (loaded on first use).
_TUNING = ("tune", "ReferenceCache", "TunedSchedule", "load_tuned", "tuned_config")
#: Names from before samplers and solvers became one word ("sampler"): they still work, with a warning.
_RENAMED = {"SOLVERS": "SAMPLERS", "SolverSpec": "SamplerSpec", "register_solver": "register_sampler",
            "get_solver": "get_sampler", "ode_solvers": "ode_samplers", "stochastic_solvers": "stochastic_samplers",
            "sweep_solvers": "sweep_samplers"}

__all__ = [
    "ablation", "SeededNoise", "sample", "inpaint", "stepwise_samplers", "CONFIG_OPTIONS", "SAMPLERS", "SamplerSpec",
    "check_options", "get_sampler",
    "nfe", "ode_samplers", "register_sampler", "steps_for_nfe", "stochastic_samplers", "sweep_samplers", "SCHEDULES",
    "ScheduleSpec", "register_schedule", "get_schedule", "parse_schedule", "exponential_sigmas", "iddpm_sigmas",
    "karras_sigmas", "linear_sigmas", "ve_sigmas", "vp_betas_for_range", "vp_range_sigmas", "vp_sigmas",
    "ancestral_step", "check_sigmas", "lms_coefficients", "num_steps", *_TUNING, *SAMPLERS,
]


def __getattr__(name: str):
    """Registered samplers by name (including ones registered after import), tuning's entry points, renamed names."""
    spec = SAMPLERS.get(name)
    if spec is not None:
        return spec.fn
    if name in _TUNING:
        from .. import tuning
        return getattr(tuning, name)
    if name in _RENAMED:
        warnings.warn(f"elucidate.sampling.{name} is now {_RENAMED[name]}", DeprecationWarning, stacklevel=2)
        return globals()[_RENAMED[name]]
    raise AttributeError(f"module 'elucidate.sampling' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(SAMPLERS) | set(_TUNING))
