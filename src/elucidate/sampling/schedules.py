"""Noise-level discretizations: ``num_steps + 1`` decreasing sigmas that end in 0.

Step sizes are computed in float64 (as NVlabs/edm does) and cast to ``dtype`` at the end. A *named*
schedule is declared once with ``@register_schedule``: its function takes ``(num_steps, sigma_min, sigma_max)``
and keyword options with defaults (e.g. ``rho``), so every caller (``sample(schedule=...)``, the
``sampling.schedule`` config key, ``--schedule``, the sandbox sweep, tuning) calls it the same way.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "karras_sigmas",
    "exponential_sigmas",
    "vp_sigmas",
    "vp_betas_for_range",
    "vp_range_sigmas",
    "ve_sigmas",
    "iddpm_sigmas",
    "iddpm_u",
    "linear_sigmas",
    "SCHEDULES",
    "ScheduleSpec",
    "register_schedule",
    "get_schedule",
    "parse_schedule",
]


@dataclass(frozen=True)
class ScheduleSpec:
    """A named schedule: ``spec(num_steps, sigma_min, sigma_max, **options)`` -> float64 sigmas ending in 0."""

    name: str
    fn: Callable[..., torch.Tensor]
    description: str
    option_docs: dict[str, str] = field(default_factory=dict)

    def __call__(self, num_steps: int, sigma_min: float, sigma_max: float, **options) -> torch.Tensor:
        unknown = sorted(set(options) - set(self.options) - {"device", "dtype"})
        if unknown:
            raise ValueError(f"schedule {self.name!r} does not take {unknown}; "
                             f"it takes {sorted(self.options) or 'no options'}")
        return self.fn(num_steps, sigma_min, sigma_max, **options)

    @property
    def options(self) -> dict[str, Any]:
        """Its options (the parameters after the range, besides device and dtype) and their defaults."""
        params = list(inspect.signature(self.fn).parameters.values())[3:]
        return {p.name: p.default for p in params if p.name not in ("device", "dtype")}


#: name -> ScheduleSpec, in declaration order. Filled by :func:`register_schedule`.
SCHEDULES: dict[str, ScheduleSpec] = {}


def register_schedule(*, description: str, name: str | None = None, option_docs: dict[str, str] | None = None):
    """Declare ``fn(num_steps, sigma_min, sigma_max, *options, device=None, dtype=torch.float64)`` as a named
    schedule (every option with a default); returns ``fn`` unchanged."""

    def decorate(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        spec = ScheduleSpec(name or fn.__name__.removesuffix("_sigmas"), fn, description, dict(option_docs or {}))
        params = list(inspect.signature(fn).parameters.values())
        if [p.name for p in params[:3]] != ["num_steps", "sigma_min", "sigma_max"]:
            raise TypeError(f"schedule {spec.name}: signature must start (num_steps, sigma_min, sigma_max)")
        if any(p.default is p.empty for p in params[3:]):
            raise TypeError(f"schedule {spec.name}: every option needs a default")
        SCHEDULES[spec.name] = spec
        return fn

    return decorate



def check_steps(num_steps: int) -> None:
    """Raise ValueError unless ``num_steps`` is an integer >= 1."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")


def check_positive(**values: float) -> None:
    """Raise ValueError naming the first argument that is not a finite number > 0."""
    for name, value in values.items():
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_range(sigma_min: float, sigma_max: float) -> None:
    """Validate a noise-level range ``0 < sigma_min < sigma_max``."""
    check_positive(sigma_min=sigma_min, sigma_max=sigma_max)
    if sigma_min >= sigma_max:
        raise ValueError(f"sigma_min ({sigma_min}) must be smaller than sigma_max ({sigma_max})")


def _ramp(num_steps: int) -> torch.Tensor:
    """i / (N - 1) for i = 0..N-1 in float64; a single step sits at 0 (sigma_max)."""
    if num_steps == 1:
        return torch.zeros(1, dtype=torch.float64)
    return torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1)


def _finish(sigmas: torch.Tensor, device, dtype) -> torch.Tensor:
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    return sigmas.to(device=device, dtype=dtype)


@register_schedule(description="EDM eq. 5: uniform in sigma^(1/rho) (rho = 7: more steps near sigma_min)",
                   option_docs={"rho": "exponent (1 = linear in sigma, infinity = exponential)"})
def karras_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                  rho: float = 7.0, *, device=None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """EDM time steps (eq. 5): (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
    check_steps(num_steps)
    check_range(sigma_min, sigma_max)
    check_positive(rho=rho)
    ramp = _ramp(num_steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _finish((hi + ramp * (lo - hi)) ** rho, device, dtype)


@register_schedule(description="uniform in log(sigma) (the rho -> infinity limit of eq. 5)")
def exponential_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, *,
                       device=None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Sigmas evenly spaced in log(sigma) (the rho -> infinity limit of eq. 5)."""
    check_steps(num_steps)
    check_range(sigma_min, sigma_max)
    ramp = _ramp(num_steps)
    return _finish(torch.exp(math.log(sigma_max) + ramp * (math.log(sigma_min) - math.log(sigma_max))),
                   device, dtype)


@register_schedule(description="uniform in sigma (the naive choice)")
def linear_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, *,
                  device=None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Sigmas evenly spaced in sigma (the naive choice the EDM explainer warns about)."""
    check_steps(num_steps)
    check_range(sigma_min, sigma_max)
    ramp = _ramp(num_steps)
    return _finish(sigma_max + ramp * (sigma_min - sigma_max), device, dtype)


def vp_sigmas(num_steps: int, beta_d: float = 19.9, beta_min: float = 0.1, epsilon_s: float = 1e-3, *,
              device=None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """VP discretization (Table 1): sigma(t_i) with t_i = 1 + i/(N-1) (epsilon_s - 1)."""
    check_steps(num_steps)
    check_positive(beta_d=beta_d, epsilon_s=epsilon_s)
    if epsilon_s >= 1:
        raise ValueError(f"epsilon_s must be in (0, 1), got {epsilon_s!r}")
    if not math.isfinite(beta_min) or beta_min + beta_d * epsilon_s <= 0:  # sigma(t) must increase on [eps_s, 1]
        raise ValueError(f"beta_min must satisfy beta_min + beta_d * epsilon_s > 0, got {beta_min!r}")
    t = 1 + _ramp(num_steps) * (epsilon_s - 1)
    return _finish(torch.sqrt(torch.expm1(0.5 * beta_d * t ** 2 + beta_min * t)), device, dtype)


def vp_betas_for_range(sigma_min: float, sigma_max: float, epsilon_s: float = 1e-3) -> tuple[float, float]:
    """(beta_d, beta_min) of the VP sigma(t) with sigma(epsilon_s) = sigma_min and sigma(1) = sigma_max."""
    L0, L1 = math.log1p(sigma_min ** 2), math.log1p(sigma_max ** 2)  # ln(sigma^2 + 1) = beta_d t^2/2 + beta_min t
    beta_d = 2 * (L0 / epsilon_s - L1) / (epsilon_s - 1)
    return beta_d, L1 - 0.5 * beta_d


@register_schedule(name="vp", description="VP (Table 1): t uniform in [epsilon_s, 1], sigma(t) fitted to the range",
                   option_docs={"epsilon_s": "last sampling time"})
def vp_range_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, epsilon_s: float = 1e-3, *,
                    device=None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The VP discretization (t uniform in [epsilon_s, 1]) of a VP sigma(t) fitted to [sigma_min, sigma_max]: the
    ln(sigma^2 + 1) = beta_d t^2 / 2 + beta_min t through both ends (ValueError if that sigma(t) does not increase
    over [epsilon_s, 1], as when sigma_min is large and the range narrow)."""
    check_steps(num_steps)
    check_range(sigma_min, sigma_max)
    check_positive(epsilon_s=epsilon_s)
    if epsilon_s >= 1:
        raise ValueError(f"epsilon_s must be in (0, 1), got {epsilon_s!r}")
    beta_d, beta_min = vp_betas_for_range(sigma_min, sigma_max, epsilon_s)
    if min(beta_min + beta_d * epsilon_s, beta_min + beta_d) <= 0:  # beta(t) = sigma(t)'s growth rate, in ln
        raise ValueError(f"the vp schedule cannot span [{sigma_min:g}, {sigma_max:g}] with epsilon_s = {epsilon_s:g}: "
                         f"a VP sigma(t) through both ends does not increase over [epsilon_s, 1]; use a wider range, "
                         f"a smaller epsilon_s or another schedule")
    t = 1 + _ramp(num_steps) * (epsilon_s - 1)
    return _finish(torch.sqrt(torch.expm1(0.5 * beta_d * t ** 2 + beta_min * t)), device, dtype)


@register_schedule(description="VE (Table 1): geometric in sigma, default range 0.02..100")
def ve_sigmas(num_steps: int, sigma_min: float = 0.02, sigma_max: float = 100.0, *,
              device=None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """VE discretization (Table 1): sigma(t_i) = sqrt(t_i), t_i = sigma_max^2 (sigma_min^2/sigma_max^2)^(i/(N-1))."""
    check_steps(num_steps)
    check_range(sigma_min, sigma_max)
    t = sigma_max ** 2 * (sigma_min ** 2 / sigma_max ** 2) ** _ramp(num_steps)
    return _finish(t.sqrt(), device, dtype)


def iddpm_u(C_1: float = 0.001, C_2: float = 0.008, M: int = 1000) -> torch.Tensor:
    """The iDDPM noise levels u_0 > ... > u_{M-1} (Table 1), float64, with u_M = 0 implied."""
    check_positive(C_1=C_1, C_2=C_2)
    if isinstance(M, bool) or not isinstance(M, int) or M < 2:
        raise ValueError(f"M must be an integer >= 2, got {M!r}")

    def alpha_bar(j: int) -> float:
        return math.sin(0.5 * math.pi * j / M / (C_2 + 1)) ** 2

    u = [0.0] * (M + 1)
    for j in range(M, 0, -1):  # u_{j-1} = sqrt((u_j^2 + 1) / max(alpha_bar(j-1)/alpha_bar(j), C_1) - 1)
        u[j - 1] = math.sqrt((u[j] ** 2 + 1) / max(alpha_bar(j - 1) / alpha_bar(j), C_1) - 1)
    return torch.tensor(u[:M], dtype=torch.float64)


@register_schedule(description="iDDPM (Table 1): a subsequence of the cosine schedule's M noise levels in the range",
                   option_docs={"C_1": "clip of the noise-level recursion", "C_2": "cosine offset",
                                "M": "number of noise levels"})
def iddpm_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 81.0, C_1: float = 0.001,
                 C_2: float = 0.008, M: int = 1000, *, device=None,
                 dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """iDDPM discretization (Table 1): u_floor(j0 + (M-1-j0)/(N-1) i + 1/2) over the u_j in [sigma_min, sigma_max]."""
    check_steps(num_steps)
    check_range(sigma_min, sigma_max)
    u = iddpm_u(C_1, C_2, M)
    inside = torch.nonzero((u >= sigma_min) & (u <= sigma_max)).flatten()
    if len(inside) == 0:
        raise ValueError(f"no iDDPM noise level lies in [sigma_min={sigma_min}, sigma_max={sigma_max}]")
    j0, j1 = int(inside[0]), int(inside[-1])
    index = torch.floor(j0 + (j1 - j0) * _ramp(num_steps) + 0.5).long()
    return _finish(u[index], device, dtype)


def get_schedule(name: str) -> ScheduleSpec:
    """A named schedule (ValueError listing the choices): ``get_schedule("karras")(10, 0.002, 80, rho=7)``."""
    try:
        return SCHEDULES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown schedule {name!r}; expected one of {sorted(SCHEDULES)}") from None


def parse_schedule(text: str) -> tuple[ScheduleSpec, dict[str, Any]]:
    """``"karras"`` or ``"karras:rho=3"`` (options after a colon, comma-separated) -> (spec, options)."""
    name, _, rest = str(text).partition(":")
    spec, options = get_schedule(name.strip()), {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in spec.options:
            raise ValueError(f"schedule {text!r}: expected {name}:key=value with key one of {sorted(spec.options)}")
        integer = isinstance(spec.options[key], int) and not isinstance(spec.options[key], bool)
        try:
            options[key] = int(value) if integer else float(value)
        except ValueError:
            raise ValueError(f"schedule {text!r}: {key} = {value!r} is not {'an integer' if integer else 'a number'}"
                             ) from None
    return spec, options
