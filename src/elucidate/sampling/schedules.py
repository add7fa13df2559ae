"""Noise-level discretizations: ``num_steps + 1`` decreasing sigmas that end in 0.

Step sizes are computed in float64 (as NVlabs/edm does) and cast to ``dtype`` at the end.
"""
from __future__ import annotations

import math

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
    "get_schedule",
]


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


def karras_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                  rho: float = 7.0, *, device=None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """EDM time steps (eq. 5): (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
    check_steps(num_steps)
    check_range(sigma_min, sigma_max)
    check_positive(rho=rho)
    ramp = _ramp(num_steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _finish((hi + ramp * (lo - hi)) ** rho, device, dtype)


def exponential_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, *,
                       device=None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Sigmas evenly spaced in log(sigma) (the rho -> infinity limit of eq. 5)."""
    check_steps(num_steps)
    check_range(sigma_min, sigma_max)
    ramp = _ramp(num_steps)
    return _finish(torch.exp(math.log(sigma_max) + ramp * (math.log(sigma_min) - math.log(sigma_max))),
                   device, dtype)


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


def vp_range_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, epsilon_s: float = 1e-3, *,
                    device=None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The VP discretization (t uniform in [epsilon_s, 1]) of a VP sigma(t) fitted to [sigma_min, sigma_max]."""
    check_range(sigma_min, sigma_max)
    beta_d, beta_min = vp_betas_for_range(sigma_min, sigma_max, epsilon_s)
    return vp_sigmas(num_steps, beta_d, beta_min, epsilon_s, device=device, dtype=dtype)


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


SCHEDULES = {
    "karras": karras_sigmas,
    "exponential": exponential_sigmas,
    "linear": linear_sigmas,
    "vp": vp_sigmas,
    "ve": ve_sigmas,
    "iddpm": iddpm_sigmas,
}


def get_schedule(name: str):
    """Look up a discretization by name (ValueError listing the choices if unknown)."""
    try:
        return SCHEDULES[name]
    except KeyError:
        raise ValueError(f"unknown schedule {name!r}; expected one of {sorted(SCHEDULES)}") from None
