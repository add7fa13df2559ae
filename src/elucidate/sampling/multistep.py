"""Multistep solvers: DPM-Solver++ (2M, 2M SDE, 3M SDE, 3M) and linear multistep (Adams-Bashforth).

They reuse past denoiser outputs, so every step costs one evaluation. Conventions as in :mod:`.solvers`.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from .registry import register_sampler
from .solvers import Callback, DenoiserFn, NoiseSampler, _denoise, _noise_fn, _report, check_sigmas

__all__ = ["dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "dpmpp_3m", "lms", "lms_coefficients", "adams_bashforth_step"]


@register_sampler(description="DPM-Solver++(2M): multistep 2nd order in lambda = -log(sigma)", order=2, sweep=True,
                 multistep=True)
@torch.no_grad()
def dpmpp_2m(D: DenoiserFn, x: torch.Tensor, sigmas, *, callback: Callback = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), multistep 2nd order in lambda = -log(sigma)."""
    t = check_sigmas(sigmas)
    old_denoised, h_last = None, None
    for i in range(len(t) - 1):
        if t[i + 1] == t[i]:
            continue
        denoised = _denoise(D, x, t[i])
        _report(callback, x, i, t[i], t[i], denoised)
        if t[i + 1] == 0:  # final step: the data prediction itself
            x = denoised
            break
        h = math.log(t[i] / t[i + 1])
        if old_denoised is None:
            D_hat = denoised  # first step: DPM-Solver++(1) = DDIM
        else:
            r = h_last / h
            D_hat = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (t[i + 1] / t[i]) * x - math.expm1(-h) * D_hat
        old_denoised, h_last = denoised, h
    return x


@register_sampler(description="DPM-Solver++(2M) SDE (eta, s_noise, solver_type midpoint|heun)", order=2,
                 stochastic=True, option_choices={"solver_type": ("midpoint", "heun")},
                 multistep=True)
@torch.no_grad()
def dpmpp_2m_sde(D: DenoiserFn, x: torch.Tensor, sigmas, *, eta: float = 1.0, s_noise: float = 1.0,
                 solver_type: str = "midpoint", generator: torch.Generator | None = None,
                 noise_sampler: NoiseSampler | None = None, callback: Callback = None) -> torch.Tensor:
    """DPM-Solver++(2M) SDE; ``solver_type`` 'midpoint' or 'heun' picks the 2nd-order correction."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    t = check_sigmas(sigmas)
    noise = _noise_fn(x, noise_sampler, generator)
    old_denoised, h_last = None, None
    for i in range(len(t) - 1):
        if t[i + 1] == t[i]:
            continue
        denoised = _denoise(D, x, t[i])
        _report(callback, x, i, t[i], t[i], denoised)
        if t[i + 1] == 0:
            x = denoised
            break
        h = math.log(t[i] / t[i + 1])
        eta_h = eta * h
        phi_1 = -math.expm1(-h - eta_h)  # 1 - exp(-(1 + eta) h)
        x = (t[i + 1] / t[i] * math.exp(-eta_h)) * x + phi_1 * denoised
        if old_denoised is not None:
            r = h_last / h
            if solver_type == "heun":
                coeff = (phi_1 / (-h - eta_h) + 1) / r
            else:
                coeff = 0.5 * phi_1 / r
            x = x + coeff * (denoised - old_denoised)
        if eta:
            x = x + noise(t[i], t[i + 1]) * (t[i + 1] * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise)
        old_denoised, h_last = denoised, h
    return x


@register_sampler(description="DPM-Solver++(3M) SDE (eta = 0: the 3rd-order multistep ODE solver)", order=3,
                 stochastic=True,
                 multistep=True)
@torch.no_grad()
def dpmpp_3m_sde(D: DenoiserFn, x: torch.Tensor, sigmas, *, eta: float = 1.0, s_noise: float = 1.0,
                 generator: torch.Generator | None = None, noise_sampler: NoiseSampler | None = None,
                 callback: Callback = None) -> torch.Tensor:
    """DPM-Solver++(3M) SDE (eta = 0 gives the deterministic 3rd-order multistep ODE solver)."""
    t = check_sigmas(sigmas)
    noise = _noise_fn(x, noise_sampler, generator)
    history: list[tuple[torch.Tensor, float]] = []  # (denoised, h) of the last two steps, newest first
    for i in range(len(t) - 1):
        if t[i + 1] == t[i]:
            continue
        denoised = _denoise(D, x, t[i])
        _report(callback, x, i, t[i], t[i], denoised)
        if t[i + 1] == 0:
            x = denoised
            break
        h = math.log(t[i] / t[i + 1])
        h_eta = h * (eta + 1)
        x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
        phi_2 = math.expm1(-h_eta) / h_eta + 1
        if len(history) == 2:
            (den_1, h_1), (den_2, h_2) = history
            r0, r1 = h_1 / h, h_2 / h
            d1_0 = (denoised - den_1) / r0
            d1_1 = (den_1 - den_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_3 = phi_2 / h_eta - 0.5
            x = x + phi_2 * d1 - phi_3 * d2
        elif len(history) == 1:
            den_1, h_1 = history[0]
            x = x + (phi_2 * h / h_1) * (denoised - den_1)
        if eta:
            x = x + noise(t[i], t[i + 1]) * (t[i + 1] * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise)
        history = [(denoised, h)] + history[:1]
    return x


@register_sampler(description="DPM-Solver++(3M): the deterministic 3rd-order multistep ODE solver", order=3,
                 sweep=True,
                 multistep=True)
def dpmpp_3m(D: DenoiserFn, x: torch.Tensor, sigmas, *, callback: Callback = None) -> torch.Tensor:
    """DPM-Solver++(3M) ODE solver: :func:`dpmpp_3m_sde` with eta = 0."""
    return dpmpp_3m_sde(D, x, sigmas, eta=0.0, callback=callback)


@functools.lru_cache(maxsize=8)
def _gauss_legendre(n: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x, w = np.polynomial.legendre.leggauss(n)
    return tuple(x.tolist()), tuple(w.tolist())


def lms_coefficients(t: list[float], i: int, order: int) -> list[float]:
    """Adams-Bashforth weights: the integral over [t_i, t_{i+1}] of each Lagrange basis polynomial
    through t_i, t_{i-1}, ..., t_{i-order+1}, by Gauss-Legendre quadrature (exact for this degree)."""
    nodes = [t[i - k] for k in range(order)]
    gx, gw = _gauss_legendre(max(1, (order + 1) // 2))  # n points integrate degree 2n - 1 exactly
    half, mid = (t[i + 1] - t[i]) / 2, (t[i + 1] + t[i]) / 2
    points = [mid + half * x for x in gx]
    weights = []
    for j in range(order):
        total = 0.0
        for x, w in zip(points, gw):
            basis = 1.0
            for k in range(order):
                if k != j:
                    basis *= (x - nodes[k]) / (nodes[j] - nodes[k])
            total += w * basis
        weights.append(total * half)
    return weights


def adams_bashforth_step(x: torch.Tensor, slopes: list[tuple[float, torch.Tensor]], sigma_next: float) -> torch.Tensor:
    """x at ``sigma_next`` from x at the newest level of ``slopes`` ((sigma, dx/dsigma), newest first): the
    integral of the polynomial in sigma through the slopes (:func:`lms_coefficients`)."""
    nodes = [s for s, _ in reversed(slopes)] + [sigma_next]
    for coeff, (_, d) in zip(lms_coefficients(nodes, len(slopes) - 1, len(slopes)), slopes):
        x = x + coeff * d
    return x


@register_sampler(description="linear multistep (Adams-Bashforth in sigma) of the given order", order=4, sweep=True,
                 multistep=True)
@torch.no_grad()
def lms(D: DenoiserFn, x: torch.Tensor, sigmas, *, order: int = 4, callback: Callback = None) -> torch.Tensor:
    """Linear multistep (Adams-Bashforth in sigma) of the given order, ramping up from order 1."""
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ValueError(f"order must be an integer >= 1, got {order!r}")
    t = check_sigmas(sigmas)
    slopes: list[tuple[float, torch.Tensor]] = []  # (sigma, dx/dsigma) of the last steps taken, newest first
    for i in range(len(t) - 1):
        if t[i + 1] == t[i]:
            continue
        denoised = _denoise(D, x, t[i])
        _report(callback, x, i, t[i], t[i], denoised)
        slopes = [(t[i], (x - denoised) / t[i])] + slopes[: order - 1]
        x = adams_bashforth_step(x, slopes, t[i + 1])
    return x
