"""The one place a sampler is declared: ``@register_sampler(...)`` on its function (an ODE/SDE solver
``fn(D, x, sigmas, *, options..., callback=None) -> x``).

Everything else is derived from the declaration: ``nfe``/``steps_for_nfe`` (from the evaluations per
step), the stochastic set, the options a sampler takes (its keyword-only parameters, minus the plumbing
that ``sample()`` provides), config validation of those options, CLI choices and help, sweep and
sandbox defaults, and the sampler table in the docs.

Naming: the churn bounds are ``s_min``/``s_max`` in configs and on the command line (the framework
config page's names) and ``s_tmin``/``s_tmax`` as sampler arguments (k-diffusion's); :data:`CONFIG_OPTIONS`
is the one table that maps the config names to the sampler arguments.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["SamplerSpec", "SAMPLERS", "register_sampler", "get_sampler", "nfe", "steps_for_nfe", "PLUMBING",
           "OPTION_DOCS", "CONFIG_OPTIONS", "stochastic_samplers", "ode_samplers", "sweep_samplers",
           "check_options"]

#: Arguments every sampler may take that ``sample()`` (not the user) supplies.
PLUMBING = ("generator", "noise_sampler", "callback", "round_sigma")

#: Config / CLI name -> sampler argument name (the framework config schema's churn names vs k-diffusion's).
CONFIG_OPTIONS = {"s_churn": "s_churn", "s_min": "s_tmin", "s_max": "s_tmax", "s_noise": "s_noise", "eta": "eta"}

#: One-line descriptions of options shared by several samplers (a declaration may add its own).
OPTION_DOCS = {
    "s_churn": "S_churn: total stochasticity of EDM Algorithm 2 (gamma_i = min(S_churn/N, sqrt(2) - 1))",
    "s_tmin": "S_tmin: churn only where sigma >= S_tmin (config/CLI: s_min)",
    "s_tmax": "S_tmax: churn only where sigma <= S_tmax (config/CLI: s_max)",
    "s_noise": "S_noise: scale of the fresh noise (slightly > 1 offsets detail loss; EDM uses 1.003-1.007)",
    "eta": "eta: amount of fresh noise per step (0 = deterministic ODE/DDIM step, 1 = ancestral/DDPM-like)",
    "order": "order of the multistep method (ramps up from 1 over the first steps)",
    "solver_type": "2nd-order correction of DPM-Solver++(2M) SDE: 'midpoint' or 'heun'",
}


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler: its function and what the rest of elucidate needs to know about it."""

    name: str
    fn: Callable[..., torch.Tensor]
    description: str
    order: int
    evals_per_step: int = 1
    final_step_evals: int = 1       # evaluations of the last step (into sigma = 0)
    stochastic: bool = False        # draws fresh noise with its default options
    sweep: bool = False             # part of the default sampler sweeps
    multistep: bool = False         # reuses earlier steps' predictions: it cannot restart mid-schedule (inpaint)
    consistency: bool = False       # its D is a consistency function f(x, sigma), not a denoiser (Song et al. 2023)
    option_docs: dict[str, str] = field(default_factory=dict)
    option_choices: dict[str, tuple] = field(default_factory=dict)

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return self.fn(*args, **kwargs)

    @property
    def parameters(self) -> dict[str, inspect.Parameter]:
        """The keyword-only parameters of the sampler function (options and plumbing)."""
        return {n: p for n, p in inspect.signature(self.fn).parameters.items() if p.kind is p.KEYWORD_ONLY}

    @property
    def options(self) -> dict[str, Any]:
        """User options and their defaults (keyword-only parameters that are not plumbing)."""
        return {n: p.default for n, p in self.parameters.items() if n not in PLUMBING}

    def takes(self, name: str) -> bool:
        """Whether the sampler function accepts the keyword argument ``name``."""
        return name in self.parameters

    def doc(self, option: str) -> str:
        """The one-line description of an option."""
        return self.option_docs.get(option) or OPTION_DOCS.get(option, "")

    def nfe(self, num_steps: int) -> int:
        """Denoiser evaluations spent on ``num_steps`` steps ending in sigma = 0."""
        _check_count("num_steps", num_steps)
        return self.evals_per_step * (num_steps - 1) + self.final_step_evals

    def steps_for_nfe(self, budget: int) -> int:
        """The most steps whose NFE does not exceed ``budget`` (at least 1)."""
        _check_count("NFE budget", budget)
        return max(1, 1 + (budget - self.final_step_evals) // self.evals_per_step)


def _check_count(what: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {value!r}")


#: name -> SamplerSpec, in declaration order. Filled by :func:`register_sampler`.
SAMPLERS: dict[str, SamplerSpec] = {}


def register_sampler(*, description: str, order: int, evals_per_step: int = 1, final_step_evals: int = 1,
                    stochastic: bool = False, sweep: bool = False, name: str | None = None,
                    option_docs: dict[str, str] | None = None, option_choices: dict[str, tuple] | None = None,
                    multistep: bool = False, consistency: bool = False):
    """Declare a sampler ``fn(D, x, sigmas, *, options..., callback=None) -> x``; returns ``fn`` unchanged.
    ``consistency=True``: ``D`` is meant to be a consistency model's f(x, sigma) (it maps any level to the data), so
    the exact-denoiser contracts of ODE/SDE samplers (convergence, sampling a mixture from its denoiser) do not
    apply to it; it is still a plain function of any ``D``."""

    def decorate(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        spec = SamplerSpec(name or fn.__name__, fn, description, order, evals_per_step, final_step_evals,
                          stochastic, sweep, multistep, consistency, dict(option_docs or {}),
                          dict(option_choices or {}))
        positional = [p for p in inspect.signature(fn).parameters.values() if p.kind is not p.KEYWORD_ONLY]
        if [p.name for p in positional] != ["D", "x", "sigmas"]:
            raise TypeError(f"sampler {spec.name}: signature must be (D, x, sigmas, *, options...)")
        if "callback" not in spec.parameters:
            raise TypeError(f"sampler {spec.name}: must take a keyword-only 'callback'")
        undocumented = [o for o in spec.options if not spec.doc(o)]
        if undocumented:
            raise TypeError(f"sampler {spec.name}: options {undocumented} need a one-line description "
                            f"(option_docs= or OPTION_DOCS)")
        SAMPLERS[spec.name] = spec
        return fn

    return decorate


def get_sampler(name: str) -> SamplerSpec:
    """A registered sampler by name (ValueError listing the choices if unknown); the spec is callable like
    its function: ``get_sampler("heun")(D, x, sigmas)``."""
    try:
        return SAMPLERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown sampler {name!r}; expected one of {sorted(SAMPLERS)}") from None


def nfe(sampler: str, num_steps: int) -> int:
    """Denoiser evaluations the named sampler spends on ``num_steps`` steps ending in sigma = 0."""
    return get_sampler(sampler).nfe(num_steps)


def steps_for_nfe(sampler: str, budget: int) -> int:
    """The most steps of the named sampler whose NFE does not exceed ``budget``."""
    return get_sampler(sampler).steps_for_nfe(budget)


def stochastic_samplers() -> list[str]:
    """Samplers that draw fresh noise with their default options."""
    return [n for n, s in SAMPLERS.items() if s.stochastic]


def ode_samplers() -> list[str]:
    """Deterministic samplers (an ODE solution is defined for these)."""
    return [n for n, s in SAMPLERS.items() if not s.stochastic]


def sweep_samplers(*, deterministic: bool = False) -> list[str]:
    """The default samplers of a sweep (only the deterministic ones if asked)."""
    return [n for n, s in SAMPLERS.items() if s.sweep and not (deterministic and s.stochastic)]


def check_options(sampler: str, options: dict[str, Any]) -> None:
    """ValueError naming the first option the sampler does not take or whose value has the wrong kind."""
    spec = get_sampler(sampler)
    for key, value in options.items():
        if key not in spec.options:
            raise ValueError(f"sampler {sampler!r} does not take option {key!r}; "
                             f"it takes {sorted(spec.options) or 'no options'}")
        choices = spec.option_choices.get(key)
        if choices is not None and value not in choices:
            raise ValueError(f"sampler {sampler!r}: {key} = {value!r}, expected one of {list(choices)}")
        default = spec.options[key]
        if isinstance(default, bool) or default is None:
            continue
        if isinstance(default, int) and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"sampler {sampler!r}: {key} = {value!r}, expected an integer")
        if isinstance(default, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"sampler {sampler!r}: {key} = {value!r}, expected a number")
        if isinstance(default, str) and not isinstance(value, str):
            raise ValueError(f"sampler {sampler!r}: {key} = {value!r}, expected a string")
