"""ODE/SDE solvers: plain functions ``(D, x, sigmas, **options) -> x`` over a denoiser D(x, sigma).

Conventions (shared with k-diffusion): ``x`` is already at the scale of ``sigmas[0]``; ``sigmas`` is a
non-increasing 1-D sequence that ends in 0, and the result is x at ``sigmas[-1]``. Inside a solver the
time steps are ``t`` (t_i = sigma_i, the paper's sigma(t) = t). A repeated value is a zero-length step:
it costs no evaluation and leaves x unchanged (except for churn, which raises the level first). Step
coefficients are computed in float64 from the schedule and applied in x's dtype, so float64 in gives
float64 out. ``callback(info)`` receives ``{x, i, sigma, sigma_hat, denoised}`` once per step.
Stochastic solvers draw noise from ``noise_sampler(sigma, sigma_next)`` if given, else from
``generator``. Each solver is declared once with ``@register_sampler`` (see :mod:`.registry`).
This module holds the single-step solvers and the shared plumbing; :mod:`.multistep` the multistep ones.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .registry import register_sampler

__all__ = ["euler", "heun", "euler_ancestral", "ddim", "ddpm", "ancestral_step", "check_sigmas", "num_steps"]

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


@register_sampler(description="Euler steps of EDM Algorithm 2 (first order; accepts churn)", order=1, sweep=True)
@torch.no_grad()
def euler(D: DenoiserFn, x: torch.Tensor, sigmas, *, s_churn: float = 0.0, s_tmin: float = 0.0,
          s_tmax: float = float("inf"), s_noise: float = 1.0, generator: torch.Generator | None = None,
          noise_sampler: NoiseSampler | None = None, callback: Callback = None,
          round_sigma: RoundSigma = None) -> torch.Tensor:
    """EDM Algorithm 2 with Euler steps only (first order, NFE = N)."""
    return _euler_or_heun(D, x, sigmas, False, s_churn, s_tmin, s_tmax, s_noise, generator,
                          noise_sampler, callback, round_sigma)


@register_sampler(description="EDM Algorithm 2: Heun's 2nd-order method with optional stochastic churn", order=2,
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


@register_sampler(description="ancestral sampling with Euler steps (eta = 1 DDPM-like, 0 = Euler)", order=1,
                 stochastic=True)
@torch.no_grad()
def euler_ancestral(D: DenoiserFn, x: torch.Tensor, sigmas, *, eta: float = 1.0, s_noise: float = 1.0,
                    generator: torch.Generator | None = None, noise_sampler: NoiseSampler | None = None,
                    callback: Callback = None) -> torch.Tensor:
    """Ancestral sampling with Euler steps (eta = 1 is DDPM-like, eta = 0 is the Euler ODE solver)."""
    return _ancestral(D, x, sigmas, lambda s, s_next: ancestral_step(s, s_next, eta), s_noise,
                      _noise_fn(x, noise_sampler, generator), callback)


def _ancestral(D, x, sigmas, step: Callable[[float, float], tuple[float, float]], s_noise: float,
               noise: NoiseSampler, callback: Callback) -> torch.Tensor:
    """Steps x <- x + (sigma_down - sigma) d + sigma_up z with (sigma_down, sigma_up) = step(sigma, sigma_next)."""
    t = check_sigmas(sigmas)
    for i in range(len(t) - 1):
        if t[i + 1] == t[i]:
            continue
        denoised = _denoise(D, x, t[i])
        _report(callback, x, i, t[i], t[i], denoised)
        sigma_down, sigma_up = step(t[i], t[i + 1])
        x = x + (sigma_down - t[i]) * ((x - denoised) / t[i])
        if t[i + 1] > 0 and sigma_up > 0:
            x = x + noise(t[i], t[i + 1]) * (s_noise * sigma_up)
    return x


@register_sampler(description="DDIM (Song et al. 2021): eta = 0 deterministic (Euler in sigma), eta = 1 DDPM-like",
                 order=1)
@torch.no_grad()
def ddim(D: DenoiserFn, x: torch.Tensor, sigmas, *, eta: float = 0.0, generator: torch.Generator | None = None,
         noise_sampler: NoiseSampler | None = None, callback: Callback = None) -> torch.Tensor:
    """DDIM(eta) in sigma-space. With alpha_bar = 1 / (1 + sigma^2), DDIM's
    x_{t-1} = sqrt(alpha_bar') x0 + sqrt(1 - alpha_bar' - s^2) eps + s z, divided by sqrt(alpha_bar'), is
    exactly the ancestral step with sigma_up = eta sqrt(sigma'^2 (sigma^2 - sigma'^2) / sigma^2)."""
    return _ancestral(D, x, sigmas, lambda s, s_next: ancestral_step(s, s_next, eta), 1.0,
                      _noise_fn(x, noise_sampler, generator), callback)


def _ddpm_large(sigma: float, sigma_next: float) -> tuple[float, float]:
    # mean of q(x_t' | x_t, x0) (the eta = 1 step), noise variance beta = 1 - alpha_bar_t / alpha_bar_t'
    # instead of beta_tilde; in VE units sigma_up^2 = beta / alpha_bar_t'
    sigma_down, _ = ancestral_step(sigma, sigma_next, 1.0)
    return sigma_down, math.sqrt((sigma ** 2 - sigma_next ** 2) * (1 + sigma_next ** 2) / (1 + sigma ** 2))


@register_sampler(description="DDPM ancestral sampling (Ho et al. 2020): posterior mean + fixed small/large noise",
                 order=1, stochastic=True, option_choices={"variance": ("small", "large")},
                 option_docs={"variance": "small: the posterior variance beta_tilde (= DDIM eta 1); "
                                          "large: beta (DDPM's other fixed choice)"})
@torch.no_grad()
def ddpm(D: DenoiserFn, x: torch.Tensor, sigmas, *, variance: str = "small", generator: torch.Generator | None = None,
         noise_sampler: NoiseSampler | None = None, callback: Callback = None) -> torch.Tensor:
    """DDPM ancestral steps between any two levels: x' = mean of q(x' | x, x0_hat) + noise of variance
    beta_tilde ('small') or beta ('large'), with beta = 1 - alpha_bar / alpha_bar' of the step; no noise
    on the final step into sigma = 0."""
    if variance not in ("small", "large"):
        raise ValueError(f"variance must be 'small' or 'large', got {variance!r}")
    step = (lambda s, s_next: ancestral_step(s, s_next, 1.0)) if variance == "small" else _ddpm_large
    return _ancestral(D, x, sigmas, step, 1.0, _noise_fn(x, noise_sampler, generator), callback)
