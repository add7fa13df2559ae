"""High-order training-free multistep solvers: iPNDM (Zhang & Chen 2023) and UniPC (Zhao et al. 2023).

Both spend one evaluation per step (they reuse past denoiser outputs). Conventions as in :mod:`.solvers`.
"""
from __future__ import annotations

import math

import torch

from .multistep import adams_bashforth_step  # (imported first: the solver table keeps declaration order)
from .registry import register_sampler
from .solvers import Callback, DenoiserFn, _denoise, _report, check_sigmas

__all__ = ["ipndm", "unipc", "IPNDM_COEFFICIENTS", "unipc_coefficients"]

#: Adams-Bashforth weights for equal steps (newest derivative first), orders 1-4 (PNDM / DEIS's iPNDM).
IPNDM_COEFFICIENTS = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
                      4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def _check_order(order, highest: int) -> None:
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= highest:
        raise ValueError(f"order must be an integer in 1..{highest}, got {order!r}")


def _steps(t: list[float]) -> list[int]:
    """Indices i of the steps of non-zero length (t[i] > t[i + 1])."""
    return [i for i in range(len(t) - 1) if t[i + 1] < t[i]]


@register_sampler(description="iPNDM (DEIS): Adams-Bashforth in sigma with the fixed equal-step weights up to order 4 "
                             "(2nd order on unequal steps)", order=2, sweep=True,
                 multistep=True)
@torch.no_grad()
def ipndm(D: DenoiserFn, x: torch.Tensor, sigmas, *, order: int = 4, callback: Callback = None) -> torch.Tensor:
    """Improved PNDM (Zhang & Chen 2023, DEIS sec. 4): x' = x + (sigma' - sigma) sum_j c_j d_{i-j} on the
    probability-flow ODE dx/dsigma = d = (x - D(x; sigma)) / sigma (the eps-form in VE time), with the
    equal-step Adams-Bashforth weights c of order min(order, step + 1) (Euler, then AB2, AB3, AB4)."""
    _check_order(order, 4)
    t = check_sigmas(sigmas)
    ds: list[torch.Tensor] = []  # derivatives, newest first
    for i in _steps(t):
        denoised = _denoise(D, x, t[i])
        _report(callback, x, i, t[i], t[i], denoised)
        ds = [(x - denoised) / t[i]] + ds[: order - 1]
        step = sum(c * d for c, d in zip(IPNDM_COEFFICIENTS[len(ds)], ds))
        x = x + (t[i + 1] - t[i]) * step
    return x


def unipc_coefficients(hh: float, order: int, variant: str) -> tuple[float, float, list[float]]:
    """UniPC's (Zhao et al. 2023, Alg. 2-3) h phi_1(hh) = e^hh - 1, B(h) and the right-hand side
    b_j = h phi_{j+1}(hh) j! / B(h), j = 1..order (hh = -h for data prediction; bh1: B = hh, bh2: B = e^hh - 1)."""
    h_phi_1 = math.expm1(hh)
    B_h = hh if variant == "bh1" else h_phi_1
    h_phi_k, factorial, b = h_phi_1 / hh - 1, 1, []
    for j in range(1, order + 1):
        b.append(h_phi_k * factorial / B_h)
        factorial *= j + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, B_h, b


def _solve(rks: list[float], b: list[float]) -> list[float]:
    """rho solving sum_k rho_k r_k^(j-1) = b_j (the Vandermonde system of UniPC, float64)."""
    R = torch.tensor([[r ** j for r in rks] for j in range(len(rks))], dtype=torch.float64)
    return torch.linalg.solve(R, torch.tensor(b, dtype=torch.float64)).tolist()


def _unipc_update(x, t_from, t_to, m0, past, order, variant, m_new=None):
    """x at t_to from x at t_from: the UniP predictor (m_new None) or the UniC corrector that also uses
    m_new = D(x_pred; t_to). ``past`` holds (sigma, D) of earlier steps, newest first (data prediction, VE form)."""
    h = math.log(t_from / t_to)  # lambda = -log(sigma)
    hh = -h
    rks = [math.log(t_from / s) / h for s, _ in past[: order - 1]]  # (lambda_k - lambda_0) / h < 0
    D1s = [(m - m0) / r for r, (_, m) in zip(rks, past)]
    h_phi_1, B_h, b = unipc_coefficients(hh, order, variant)
    x_next = (t_to / t_from) * x - h_phi_1 * m0
    if m_new is None:  # UniP-p: p - 1 past differences
        if order == 2:
            rhos = [0.5]
        elif order > 2:
            rhos = _solve(rks, b[:-1])
        else:
            rhos = []
        res = sum((rho * d for rho, d in zip(rhos, D1s)), torch.zeros_like(x))
        return x_next - B_h * res
    rhos = [0.5] if order == 1 else _solve(rks + [1.0], b)  # UniC-p: also the new difference D(x_pred) - m0
    res = sum((rho * d for rho, d in zip(rhos[:-1], D1s)), torch.zeros_like(x)) + rhos[-1] * (m_new - m0)
    return x_next - B_h * res


@register_sampler(description="UniPC (bh2 / bh1): multistep data-prediction predictor with a corrector that reuses "
                             "the next evaluation", order=3, sweep=True,
                 option_choices={"variant": ("bh1", "bh2")},
                 option_docs={"order": "order p of the UniP predictor (UniC raises the accuracy to p + 1); "
                                       "ramps up over the first steps and down over the last ones",
                              "variant": "B(h) of UniPC: bh2 = e^h - 1 (default), bh1 = h (for very few steps)",
                              "final_order": "the step into sigma = 0: 1 = the data prediction itself (UniPC's); "
                                             "2-4 = Adams-Bashforth in sigma through the last derivatives"},
                 multistep=True)
@torch.no_grad()
def unipc(D: DenoiserFn, x: torch.Tensor, sigmas, *, order: int = 2, variant: str = "bh2", final_order: int = 1,
          callback: Callback = None) -> torch.Tensor:
    """UniPC (Zhao et al. 2023) in data-prediction form on lambda = -log(sigma): a UniP-p step, then at
    the next level the UniC-p correction with the evaluation made there (at the uncorrected point, which
    the history keeps), so NFE = steps. The order is min(order, steps taken + 1, steps left), as diffusers'
    UniPCMultistepScheduler (lower_order_final). The final step (into sigma = 0, where lambda is infinite)
    has no corrector: with ``final_order`` 1 it is the data prediction D itself; with k > 1 it integrates
    dx/dsigma = (x - D) / sigma from the last level to 0 by the Adams-Bashforth rule in sigma through the
    last k levels (:func:`~elucidate.sampling.multistep.adams_bashforth_step`, as ``lms``): on data with little spread
    around each mode, D at the last level still shrinks the spread it has not resolved yet, which the
    extrapolation keeps."""
    _check_order(order, 4)
    _check_order(final_order, 4)
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant must be 'bh1' or 'bh2', got {variant!r}")
    t = check_sigmas(sigmas)
    steps = _steps(t)
    past: list[tuple[float, torch.Tensor]] = []  # (sigma, D at the predicted point), newest first
    slopes: list[tuple[float, torch.Tensor]] = []  # (sigma, (x - D) / sigma) of the last final_order levels
    last = None  # (x, sigma, order) before the last predictor step
    for n, i in enumerate(steps):
        denoised = _denoise(D, x, t[i])
        if last is not None:  # UniC: correct x with the evaluation just made (no extra NFE)
            x_prev, s_prev, p = last
            x = _unipc_update(x_prev, s_prev, t[i], past[0][1], past[1:], p, variant, m_new=denoised)
        _report(callback, x, i, t[i], t[i], denoised)
        past = [(t[i], denoised)] + past[: order - 1]
        if final_order > 1 and n >= len(steps) - final_order:  # at the corrected point; only the last levels
            slopes = [(t[i], (x - denoised) / t[i])] + slopes[: final_order - 1]
        if t[i + 1] == 0:  # final step into sigma = 0
            x = denoised if final_order == 1 else adams_bashforth_step(x, slopes, 0.0)
            break
        p = min(order, n + 1, len(steps) - n)
        last = (x, t[i], p)
        x = _unipc_update(x, t[i], t[i + 1], denoised, past[1:], p, variant)
    return x
