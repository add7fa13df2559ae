"""Consistency sampling (Song et al. 2023, Algorithm 1) over a consistency model f(x, sigma).

A consistency model maps a point at any noise level straight to the data: one step is x0 = f(sigma_max n,
sigma_max). Multistep sampling re-noises that estimate to each chosen intermediate level with fresh noise,
x = x0 + sqrt(sigma_i^2 - epsilon^2) z, and applies f again. The levels are the schedule's: ``sigmas`` =
[sigma_max, sigma_1, ..., sigma_{N-1}, 0] gives N steps and NFE = N. Given an ordinary denoiser D instead of f it
still runs (each step denoises, then re-noises), but that is not an ODE or SDE solver of D.
"""
from __future__ import annotations

import math

import torch

from .registry import register_sampler
from .solvers import Callback, DenoiserFn, NoiseSampler, _denoise, _noise_fn, _report, check_sigmas

__all__ = ["consistency"]


@register_sampler(description="consistency models (Song et al. 2023, Algorithm 1): x0 = f(x, sigma_i), re-noised to "
                              "the next level with fresh noise; NFE = N", order=1, stochastic=True,
                  consistency=True,
                  option_docs={"epsilon": "epsilon: the model's boundary f(x, epsilon) = x; re-noising adds "
                                          "sqrt(sigma_i^2 - epsilon^2) z (0 for an EDM-preconditioned model)"})
@torch.no_grad()
def consistency(D: DenoiserFn, x: torch.Tensor, sigmas, *, epsilon: float = 0.0,
                generator: torch.Generator | None = None, noise_sampler: NoiseSampler | None = None,
                callback: Callback = None) -> torch.Tensor:
    """Song et al. 2023, Algorithm 1 with D = f: ``x`` is at ``sigmas[0]``; each step evaluates f once and the
    result is x at ``sigmas[-1]`` (the last estimate x0 when it is 0)."""
    t = check_sigmas(sigmas)
    if epsilon < 0 or any(0 < v < epsilon for v in t):
        raise ValueError(f"consistency sampling: the levels must be >= epsilon = {epsilon:g} (the model's time "
                         f"horizon [epsilon, sigma_max])")
    noise = _noise_fn(x, noise_sampler, generator)
    for i in range(len(t) - 1):
        if t[i + 1] == t[i]:  # zero-length step: costs nothing, changes nothing
            continue
        denoised = _denoise(D, x, t[i])  # Algorithm 1, line 2 / 6: x <- f_theta(x, tau)
        _report(callback, x, i, t[i], t[i], denoised)
        if t[i + 1] > 0:  # Algorithm 1, line 5: x_tau <- x + sqrt(tau^2 - epsilon^2) z
            x = denoised + math.sqrt(t[i + 1] ** 2 - epsilon ** 2) * noise(t[i], t[i + 1])
        else:
            x = denoised
    return x
