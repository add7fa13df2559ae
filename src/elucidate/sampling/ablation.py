"""EDM Algorithm 1 generalized (with Algorithm 2's churn): any discretization, sigma(t), s(t), solver.

This is the sampler of the paper's ablations (Fig. 2, Table 2): it integrates the probability-flow
ODE  dx = [sigma'(t)/sigma(t) + s'(t)/s(t)] x - sigma'(t) s(t)/sigma(t) D(x/s(t); sigma(t)) dt  (eq. 4)
in the time variable t of the chosen schedule, so e.g. ``schedule='vp', scaling='vp'`` reproduces
the original VP sampler and ``discretization='edm', schedule='linear', scaling='none'`` is EDM's;
``schedule='flow', scaling='flow'`` (sigma(t) = t / (1 - t), s(t) = 1 - t) is flow matching's time variable,
in which the ODE is dx_t/dt = v_hat and Heun is the flow-matching Heun step.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from . import schedules as S
from .solvers import NoiseSampler, _noise_fn, _report

__all__ = ["ablation", "DISCRETIZATIONS"]

DISCRETIZATIONS = ("vp", "ve", "iddpm", "edm")
_SCHEDULES = ("vp", "ve", "linear", "flow")
_SCALINGS = ("vp", "none", "flow")
_DEFAULT_RANGE = {"vp": None, "ve": (0.02, 100.0), "iddpm": (0.002, 81.0), "edm": (0.002, 80.0)}


def _choice(name: str, value: str, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


@torch.no_grad()
def ablation(D: Callable[..., torch.Tensor], noise: torch.Tensor, *, num_steps: int = 18,
             sigma_min: float | None = None, sigma_max: float | None = None, rho: float = 7.0,
             discretization: str = "edm", schedule: str = "linear", scaling: str = "none",
             solver: str = "heun", alpha: float = 1.0, epsilon_s: float = 1e-3, C_1: float = 0.001,
             C_2: float = 0.008, M: int = 1000, s_churn: float = 0.0, s_tmin: float = 0.0,
             s_tmax: float = float("inf"), s_noise: float = 1.0,
             round_sigma: Callable[[float], float] | None = None, generator: torch.Generator | None = None,
             noise_sampler: NoiseSampler | None = None,
             callback: Callable[[dict], None] | None = None) -> torch.Tensor:
    """Sample from unit-variance ``noise`` with EDM Algorithm 1 under the chosen design choices.

    ``discretization`` vp|ve|iddpm|edm picks the noise levels, ``schedule`` vp|ve|linear|flow the
    sigma(t), ``scaling`` vp|none|flow the s(t) (flow: s = 1 / (1 + sigma(t))), ``solver`` euler|heun
    (with ``alpha`` for the generic 2nd-order step, 1 = Heun). ``round_sigma`` snaps noise levels to a
    discrete network's grid.
    """
    _choice("discretization", discretization, DISCRETIZATIONS)
    _choice("schedule", schedule, _SCHEDULES)
    _choice("scaling", scaling, _SCALINGS)
    _choice("solver", solver, ("euler", "heun"))
    S.check_steps(num_steps)
    S.check_positive(alpha=alpha, epsilon_s=epsilon_s)
    if alpha > 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
    rnd = (lambda v: v) if round_sigma is None else (lambda v: float(round_sigma(torch.tensor(v))))

    # Default sigma range: the discretization's own (VP: sigma(epsilon_s) .. sigma(1) of beta 19.9/0.1).
    default = _DEFAULT_RANGE[discretization]
    if default is None:
        vp = S.vp_sigmas(2, epsilon_s=epsilon_s)
        default = (float(vp[1]), float(vp[0]))
    sigma_min = default[0] if sigma_min is None else sigma_min
    sigma_max = default[1] if sigma_max is None else sigma_max
    S.check_range(sigma_min, sigma_max)
    beta_d, beta_min = S.vp_betas_for_range(sigma_min, sigma_max, epsilon_s)

    # Time steps: the discretization's sigmas, mapped to t through the schedule's sigma^-1.
    if discretization == "vp":
        sigma_steps = S.vp_range_sigmas(num_steps, sigma_min, sigma_max, epsilon_s)
    elif discretization == "ve":
        sigma_steps = S.ve_sigmas(num_steps, sigma_min, sigma_max)
    elif discretization == "iddpm":
        sigma_steps = S.iddpm_sigmas(num_steps, sigma_min, sigma_max, C_1, C_2, M)
    else:
        sigma_steps = S.karras_sigmas(num_steps, sigma_min, sigma_max, rho)

    # sigma(t), sigma'(t), sigma^-1 of the schedule (Table 1 rows "schedule").
    if schedule == "vp":
        def sigma(t): return math.sqrt(math.expm1(0.5 * beta_d * t ** 2 + beta_min * t))
        def sigma_deriv(t): return 0.5 * (beta_min + beta_d * t) * (sigma(t) + 1 / sigma(t))
        def sigma_inv(s): return (math.sqrt(beta_min ** 2 + 2 * beta_d * math.log1p(s ** 2)) - beta_min) / beta_d
    elif schedule == "ve":
        def sigma(t): return math.sqrt(t)
        def sigma_deriv(t): return 0.5 / math.sqrt(t)
        def sigma_inv(s): return s ** 2
    elif schedule == "flow":  # sigma(t) = t / (1 - t): flow matching's time
        def sigma(t): return t / (1 - t)
        def sigma_deriv(t): return 1 / (1 - t) ** 2
        def sigma_inv(s): return s / (1 + s)
    else:
        def sigma(t): return t
        def sigma_deriv(t): return 1.0
        def sigma_inv(s): return s

    # s(t), s'(t) (Table 1 rows "scaling").
    if scaling == "vp":
        def scale(t): return 1 / math.sqrt(1 + sigma(t) ** 2)
        def scale_deriv(t): return -sigma(t) * sigma_deriv(t) * scale(t) ** 3
    elif scaling == "flow":  # s = 1 / (1 + sigma(t)) (= 1 - t with the flow schedule)
        def scale(t): return 1 / (1 + sigma(t))
        def scale_deriv(t): return -sigma_deriv(t) * scale(t) ** 2
    else:
        def scale(t): return 1.0
        def scale_deriv(t): return 0.0

    t_steps = [sigma_inv(rnd(v)) for v in sigma_steps[:-1].tolist()] + [0.0]
    N = num_steps
    draw = _noise_fn(noise, noise_sampler, generator)

    def ode_d(x: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        # d = (sigma'/sigma + s'/s) x - sigma' s / sigma D(x / s; sigma)   (Algorithm 1, lines 4 and 7)
        sig, sc = sigma(t), scale(t)
        denoised = D(x / sc, x.new_full((x.shape[0],), sig))
        return (sigma_deriv(t) / sig + scale_deriv(t) / sc) * x - (sigma_deriv(t) * sc / sig) * denoised, denoised

    x = noise * (sigma(t_steps[0]) * scale(t_steps[0]))  # line 1: x_0 ~ N(0, sigma(t_0)^2 s(t_0)^2 I)
    for i in range(N):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        gamma = min(s_churn / N, math.sqrt(2) - 1) if s_churn > 0 and s_tmin <= sigma(t_cur) <= s_tmax else 0.0
        # without churn t_hat = t_cur exactly (a t -> sigma -> t round trip can land an ulp above t_cur, and the
        # noise of line 6 would then be sqrt(round-off))
        t_hat = sigma_inv(rnd(sigma(t_cur) + gamma * sigma(t_cur))) if gamma > 0 else t_cur
        x_hat = (scale(t_hat) / scale(t_cur)) * x
        if t_hat > t_cur:  # Algorithm 2 lines 5-6 in scaled coordinates
            x_hat = x_hat + (math.sqrt(sigma(t_hat) ** 2 - sigma(t_cur) ** 2) * scale(t_hat) * s_noise) * draw(
                sigma(t_cur), sigma(t_hat))
        h = t_next - t_hat
        d_cur, denoised = ode_d(x_hat, t_hat)
        _report(callback, x_hat, i, sigma(t_cur), sigma(t_hat), denoised)
        if solver == "euler" or i == N - 1:  # final step into sigma = 0 is always Euler
            x = x_hat + h * d_cur
        else:  # generic 2nd-order step (Algorithm 1 lines 9-13 with alpha)
            t_prime = t_hat + alpha * h
            d_prime, _ = ode_d(x_hat + alpha * h * d_cur, t_prime)
            x = x_hat + h * ((1 - 1 / (2 * alpha)) * d_cur + (1 / (2 * alpha)) * d_prime)
    return x
