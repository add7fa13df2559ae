"""ODE/SDE solvers: plain functions ``(D, x, sigmas, **options) -> x`` over a denoiser D(x, sigma).

Conventions (shared with k-diffusion): ``x`` is already at the scale of ``sigmas[0]``; ``sigmas`` is a
non-increasing 1-D sequence that ends in 0, and the result is x at ``sigmas[-1]``. Inside a solver the
time steps are ``t`` (t_i = sigma_i, the paper's sigma(t) = t). A repeated value is a zero-length step:
it costs no evaluation and leaves x unchanged (except for churn, which raises the level first). Step
coefficients are computed in float64 from the schedule and applied in x's dtype, so float64 in gives
float64 out. ``callback(info)`` receives ``{x, i, sigma, sigma_hat, denoised}`` once per step.
Stochastic solvers draw noise from ``noise_sampler(sigma, sigma_next)`` if given, else from
``generator``. Each solver is declared once with ``@register_solver`` (see :mod:`.registry`).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import torch

from .registry import register_solver

__all__ = ["euler", "heun", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "dpmpp_3m", "lms",
           "ancestral_step", "lms_coefficients", "check_sigmas", "num_steps"]

DenoiserFn = Callable[..., torch.Tensor]
NoiseSampler = Callable[[float, float], torch.Tensor]
Callback = Callable[[dict], None] | None
RoundSigma = Callable[[torch.Tensor], torch.Tensor] | None


def check_sigmas(sigmas) -> list[float]:
    """Validate a schedule and return it as Python floats (float64): finite, > 0 but for the last
    value (>= 0, normally 0), non-increasing (a repeated value is a zero-length step)."""
    values = torch.as_tensor(sigmas).detach().to("cpu", torch.float64)
    if values.ndim != 1 or values.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D sequence of at least 2 values, got shape {tuple(values.shape)}")
    t = values.tolist()
    if not all(math.isfinite(v) for v in t) or t[-1] < 0 or any(v <= 0 for v in t[:-1]):
        raise ValueError("sigmas must be finite, > 0, and end in a value >= 0 (normally 0)")
    if any(b > a for a, b in zip(t, t[1:])):
        raise ValueError("sigmas must be non-increasing (from sigma_max down to 0)")
    if t[0] == t[-1]:
        raise ValueError("sigmas must decrease somewhere (all steps have zero length)")
    return t


def num_steps(sigmas) -> int:
    """Steps of non-zero length in a schedule (the steps a solver spends evaluations on)."""
    t = check_sigmas(sigmas)
    return sum(1 for a, b in zip(t, t[1:]) if b < a)


def _noise_fn(x: torch.Tensor, noise_sampler: NoiseSampler | None, generator) -> NoiseSampler:
    if noise_sampler is not None:
        return noise_sampler
    return lambda sigma, sigma_next: torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _denoise(D: DenoiserFn, x: torch.Tensor, sigma: float) -> torch.Tensor:
    return D(x, x.new_full((x.shape[0],), sigma))


def _report(callback: Callback, x, i, sigma, sigma_hat, denoised) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})


def _churn(t: list[float], i: int, s_churn: float, s_tmin: float, s_tmax: float) -> float:
    # EDM Algorithm 2, line 4: gamma_i = min(S_churn / N, sqrt(2) - 1) if t_i in [S_tmin, S_tmax]
    if s_churn <= 0 or not (s_tmin <= t[i] <= s_tmax):
        return 0.0
    return min(s_churn / (len(t) - 1), math.sqrt(2) - 1)


def _euler_or_heun(D, x, sigmas, second_order: bool, s_churn, s_tmin, s_tmax, s_noise, generator,
                   noise_sampler, callback, round_sigma):
    t = check_sigmas(sigmas)
    noise = _noise_fn(x, noise_sampler, generator)
    for i in range(len(t) - 1):
        t_cur, t_next = t[i], t[i + 1]
        gamma = _churn(t, i, s_churn, s_tmin, s_tmax)
        t_hat = t_cur * (1 + gamma)
        if round_sigma is not None and gamma > 0:  # edm: t_hat = round_sigma(t_cur + gamma t_cur)
            t_hat = float(round_sigma(torch.tensor(t_hat, dtype=torch.float64)))
        if t_hat == t_next:  # zero-length step
            continue
        if t_hat > t_cur:  # lines 5-6: x_hat = x + sqrt(t_hat^2 - t^2) S_noise eps
            x = x + math.sqrt(t_hat ** 2 - t_cur ** 2) * s_noise * noise(t_cur, t_hat)
        denoised = _denoise(D, x, t_hat)
        d = (x - denoised) / t_hat  # line 7
        _report(callback, x, i, t_cur, t_hat, denoised)
        x_next = x + (t_next - t_hat) * d  # line 8: Euler step
        if second_order and t_next != 0:  # lines 9-11: Heun correction (skipped into sigma = 0)
            d_prime = (x_next - _denoise(D, x_next, t_next)) / t_next
            x_next = x + (t_next - t_hat) * (0.5 * d + 0.5 * d_prime)
        x = x_next
    return x


@register_solver(description="Euler steps of EDM Algorithm 2 (first order; accepts churn)", order=1, sweep=True)
@torch.no_grad()
def euler(D: DenoiserFn, x: torch.Tensor, sigmas, *, s_churn: float = 0.0, s_tmin: float = 0.0,
          s_tmax: float = float("inf"), s_noise: float = 1.0, generator: torch.Generator | None = None,
          noise_sampler: NoiseSampler | None = None, callback: Callback = None,
          round_sigma: RoundSigma = None) -> torch.Tensor:
    """EDM Algorithm 2 with Euler steps only (first order, NFE = N)."""
    return _euler_or_heun(D, x, sigmas, False, s_churn, s_tmin, s_tmax, s_noise, generator,
                          noise_sampler, callback, round_sigma)


@register_solver(description="EDM Algorithm 2: Heun's 2nd-order method with optional stochastic churn", order=2,
                 evals_per_step=2, sweep=True)
@torch.no_grad()
def heun(D: DenoiserFn, x: torch.Tensor, sigmas, *, s_churn: float = 0.0, s_tmin: float = 0.0,
         s_tmax: float = float("inf"), s_noise: float = 1.0, generator: torch.Generator | None = None,
         noise_sampler: NoiseSampler | None = None, callback: Callback = None,
         round_sigma: RoundSigma = None) -> torch.Tensor:
    """EDM Algorithm 2: Heun's 2nd-order method with optional stochastic churn (NFE = 2N - 1).
    ``round_sigma`` snaps the raised level t_hat to a discrete network's grid (iDDPM)."""
    return _euler_or_heun(D, x, sigmas, True, s_churn, s_tmin, s_tmax, s_noise, generator,
                          noise_sampler, callback, round_sigma)


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step: go down deterministically, then add sigma_up noise."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * math.sqrt(sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2))
    return math.sqrt(sigma_to ** 2 - sigma_up ** 2), sigma_up


@register_solver(description="ancestral sampling with Euler steps (eta = 1 DDPM-like, 0 = Euler)", order=1,
                 stochastic=True)
@torch.no_grad()
def euler_ancestral(D: DenoiserFn, x: torch.Tensor, sigmas, *, eta: float = 1.0, s_noise: float = 1.0,
                    generator: torch.Generator | None = None, noise_sampler: NoiseSampler | None = None,
                    callback: Callback = None) -> torch.Tensor:
    """Ancestral sampling with Euler steps (eta = 1 is DDPM-like, eta = 0 is the Euler ODE solver)."""
    t = check_sigmas(sigmas)
    noise = _noise_fn(x, noise_sampler, generator)
    for i in range(len(t) - 1):
        if t[i + 1] == t[i]:
            continue
        denoised = _denoise(D, x, t[i])
        _report(callback, x, i, t[i], t[i], denoised)
        sigma_down, sigma_up = ancestral_step(t[i], t[i + 1], eta)
        x = x + (sigma_down - t[i]) * ((x - denoised) / t[i])
        if t[i + 1] > 0 and sigma_up > 0:
            x = x + noise(t[i], t[i + 1]) * (s_noise * sigma_up)
    return x


@register_solver(description="DPM-Solver++(2M): multistep 2nd order in lambda = -log(sigma)", order=2, sweep=True)
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


@register_solver(description="DPM-Solver++(2M) SDE (eta, s_noise, solver_type midpoint|heun)", order=2,
                 stochastic=True, option_choices={"solver_type": ("midpoint", "heun")})
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


@register_solver(description="DPM-Solver++(3M) SDE (eta = 0: the 3rd-order multistep ODE solver)", order=3,
                 stochastic=True)
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


@register_solver(description="DPM-Solver++(3M): the deterministic 3rd-order multistep ODE solver", order=3,
                 sweep=True)
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


@register_solver(description="linear multistep (Adams-Bashforth in sigma) of the given order", order=4, sweep=True)
@torch.no_grad()
def lms(D: DenoiserFn, x: torch.Tensor, sigmas, *, order: int = 4, callback: Callback = None) -> torch.Tensor:
    """Linear multistep (Adams-Bashforth in sigma) of the given order, ramping up from order 1."""
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ValueError(f"order must be an integer >= 1, got {order!r}")
    t = check_sigmas(sigmas)
    t_used: list[float] = []  # the levels of the steps taken (zero-length steps dropped)
    ds: list[torch.Tensor] = []  # derivatives, newest first
    for i in range(len(t) - 1):
        if t[i + 1] == t[i]:
            continue
        denoised = _denoise(D, x, t[i])
        _report(callback, x, i, t[i], t[i], denoised)
        t_used.append(t[i])
        ds = [(x - denoised) / t[i]] + ds[: order - 1]
        for coeff, d in zip(lms_coefficients(t_used + [t[i + 1]], len(t_used) - 1, len(ds)), ds):
            x = x + coeff * d
    return x
