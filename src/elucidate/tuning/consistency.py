"""The intermediate levels of multistep consistency sampling (Song et al. 2023, Algorithm 1), tuned per NFE budget.

NFE k means k levels: sigma_max, then k - 1 re-noise levels. Each re-noise draws fresh noise, so after the first
step a sample no longer corresponds to an ODE solution from its noise: the objective is distributional, a
``score(sigmas, seeds)`` of the whole set of samples (``elucidate tune`` passes the Frechet distance in the run's
metric features). Every candidate is scored on the same seeds, i.e. the same initial noise and re-noise draws
(common random numbers: ``sample()`` draws both from each image's own seed).

The levels are a Karras ramp (EDM eq. 5) from sigma_max down to sigma_last: a grid over log sigma_last, then
golden-section search between the grid neighbours of the best point; with k >= 3 also a grid over rho, then
sigma_last refined again. The chosen levels and the default ones are scored on held-out seeds too.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

from ..sampling.schedules import karras_sigmas
from .stored import TunedSchedule

__all__ = ["consistency_levels", "consistency_seeds", "golden_section", "search_consistency", "tune_consistency",
           "SEED_OFFSET", "RHOS"]

#: Tuning seeds for ``seed`` s are ``SEED_OFFSET + s * SEED_STRIDE + i``: seeds no ``sample/eval`` range reaches.
SEED_OFFSET = 0x7E5E_0000
SEED_STRIDE = 1 << 20
#: rho values tried for k >= 3 (the default levels use the formulation's, 7).
RHOS = (1.0, 3.0, 7.0, 15.0, 40.0)
#: The golden ratio's conjugate, (sqrt 5 - 1) / 2.
_INV_PHI = (math.sqrt(5) - 1) / 2


def consistency_levels(nfe: int, sigma_last: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    """``[sigma_max, ..., sigma_last, 0]``: nfe levels on a Karras ramp (``[sigma_max, 0]`` for nfe 1)."""
    if nfe == 1:
        return [float(sigma_max), 0.0]
    levels = [float(s) for s in karras_sigmas(nfe, sigma_last, sigma_max, rho)]
    return [float(sigma_max), *levels[1:]]  # exactly sigma_max (sigma_max^(1/rho)^rho rounds)


def consistency_seeds(seed: int, num: int) -> list[int]:
    """The ``num`` per-image seeds of tuning seed ``seed`` (held out: ``seed + 1``)."""
    start = SEED_OFFSET + int(seed) * SEED_STRIDE
    return list(range(start, start + num))


def golden_section(f: Callable[[float], float], a: float, b: float, iters: int) -> tuple[float, float]:
    """Minimize a unimodal ``f`` on [a, b] with ``iters`` golden-section steps (one evaluation each after the
    first two); returns the best point evaluated and its value."""
    c, d = b - _INV_PHI * (b - a), a + _INV_PHI * (b - a)
    fc, fd = f(c), f(d)
    best = min((fc, c), (fd, d))
    for _ in range(iters):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - _INV_PHI * (b - a)
            fc = f(c)
            best = min(best, (fc, c))
        else:
            a, c, fc = c, d, fd
            d = a + _INV_PHI * (b - a)
            fd = f(d)
            best = min(best, (fd, d))
    return best[1], best[0]


def search_consistency(score: Callable[[list[float]], float], nfe: int, sigma_max: float, lo: float, hi: float, *,
                       grid: int = 9, refine: int = 8, rhos: Sequence[float] = RHOS) -> tuple[list[float], float, dict]:
    """Minimize ``score(sigmas)`` over :func:`consistency_levels` of ``nfe``: ``grid`` values of log sigma_last
    evenly in [log lo, log hi], golden-section (``refine`` steps) between the best one's neighbours; for nfe >= 3
    then rho over ``rhos`` and sigma_last again (``refine - 2`` steps, half a grid cell either side). Returns the
    levels, their score and ``{"sigma_last", "rho", "evaluations", "trials"}`` (every distinct candidate scored)."""
    if nfe == 1:
        sigmas = consistency_levels(1, sigma_max, sigma_max)
        return sigmas, score(sigmas), {"sigma_last": sigma_max, "rho": None, "evaluations": 1, "trials": []}
    memo: dict[tuple, float] = {}

    def f(log_last: float, rho: float) -> float:
        sigmas = consistency_levels(nfe, math.exp(log_last), sigma_max, rho)
        key = tuple(round(s, 12) for s in sigmas)
        if key not in memo:
            memo[key] = score(sigmas)
        return memo[key]

    rho = 7.0
    a, b = math.log(lo), math.log(hi)
    points = [a + i * (b - a) / (grid - 1) for i in range(grid)]
    values = [f(u, rho) for u in points]
    i = min(range(grid), key=values.__getitem__)
    cell = (b - a) / (grid - 1)
    u, best = golden_section(lambda v: f(v, rho), max(a, points[i] - cell), min(b, points[i] + cell), refine)
    if values[i] < best:
        u, best = points[i], values[i]
    if nfe >= 3:
        rho = min(rhos, key=lambda r: f(u, r))
        v, err = golden_section(lambda v: f(v, rho), max(a, u - cell / 2), min(b, u + cell / 2), max(refine - 2, 1))
        u, best = (v, err) if err < f(u, rho) else (u, f(u, rho))
    trials = [{"sigmas": list(k), "score": s} for k, s in memo.items()]
    return consistency_levels(nfe, math.exp(u), sigma_max, rho), best, {
        "sigma_last": math.exp(u), "rho": rho, "evaluations": len(memo), "trials": trials}


def tune_consistency(score: Callable[[list[float], list[int]], float], nfe: int, *, sigma_max: float, lo: float,
                     hi: float | None = None, default: Sequence[float], options: dict | None = None, num: int = 500,
                     seed: int = 0, objective: dict | None = None, **search) -> TunedSchedule:
    """Consistency-sampler levels for ``nfe`` minimizing ``score(sigmas, seeds)`` (lower is better, e.g. a Frechet
    distance) on :func:`consistency_seeds` ``(seed, num)``; the result and the ``default`` levels are then scored on
    the held-out seeds ``(seed + 1, num)``. ``lo``/``hi``: the range of sigma_last (default hi = sigma_max / 2);
    ``options`` the sampler's (its ``epsilon``); ``objective`` is recorded (metric, features, reference)."""
    t0 = time.perf_counter()
    seeds, held = consistency_seeds(seed, num), consistency_seeds(seed + 1, num)
    epsilon = float((options or {}).get("epsilon", 0.0))
    if not 0 < lo < (hi or sigma_max / 2) < sigma_max or lo <= epsilon:
        raise ValueError(f"the intermediate levels' range {lo:g}..{hi or sigma_max / 2:g} must lie above epsilon = "
                         f"{epsilon:g} and below sigma_max = {sigma_max:g}")
    sigmas, err, found = search_consistency(lambda s: score(s, seeds), nfe, sigma_max, lo, hi or sigma_max / 2,
                                            **search)
    default = [float(s) for s in default]
    default_err = score(default, seeds)
    tuned_held, default_held = score(sigmas, held), score(default, held)
    record = {**(objective or {}), "num": num, "seeds": f"{seeds[0]}-{seeds[-1]}",
              "heldout_seeds": f"{held[0]}-{held[-1]}",
              "sigma_last": found["sigma_last"], "rho": found["rho"], "trials": found["trials"]}
    baseline = {"sampler": "consistency", "schedule": "default", "options": dict(options or {}), "sigmas": default,
                "tuning_error": default_err, "heldout_error": default_held}
    return TunedSchedule(sampler="consistency", sigmas=sigmas, options=dict(options or {}), nfe=nfe, seed=seed,
                         heldout_seed=seed + 1, num_samples=num, sigma_min=lo, sigma_max=sigma_max,
                         tuning_error=err, heldout_error=tuned_held, baselines=[baseline],
                         loss=str((objective or {}).get("metric", "score")), evaluations=found["evaluations"] + 3,
                         seconds=round(time.perf_counter() - t0, 2), objective=record)
