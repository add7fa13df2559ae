"""The search behind :func:`elucidate.sampling.tune`: where the interior levels of one solver's schedule go.

Coarse-to-fine in log-sigma: a pattern search over the knots of a piecewise-linear warp of the step index
(all steps move together), then over every level on its own (each move keeps the levels decreasing).
"""
from __future__ import annotations

from collections.abc import Callable

__all__ = ["resample", "pattern_search", "search_levels"]


def resample(u: list[float], hi: float, m: int) -> list[float]:
    """A decreasing curve given by its values at step fractions 0 (``hi``), 1/n, ..., 1 (``u``), read
    piecewise-linearly at 1/m, ..., 1: the ``m`` knots of a schedule, or the levels of ``m`` steps."""
    full, n = [hi, *u], len(u)
    if m == n:
        return list(u)
    out = []
    for j in range(1, m + 1):
        pos = j / m * n
        k = min(int(pos), n - 1)
        out.append(full[k] + (pos - k) * (full[k + 1] - full[k]))
    return out


def pattern_search(f: Callable[[list[float]], float], v: list[float], lo: float, hi: float, *,
                   max_evals: int, tol: float = 0.02, step0: float = 0.25) -> tuple[list[float], float, int]:
    """Minimize ``f`` over decreasing ``v`` in (lo, hi) by moving one coordinate at a time (last first,
    so the replayed prefix stays the same), with a step per coordinate that grows on success and halves
    on failure; stops when every step is below ``tol`` (in log-sigma) or after ``max_evals``."""
    v, best, evals = list(v), f(v), 1
    step = [step0] * len(v)
    direction = [1.0] * len(v)
    while evals < max_evals and max(step, default=0) >= tol:
        for k in reversed(range(len(v))):
            if step[k] < tol:
                continue
            upper = hi if k == 0 else v[k - 1]
            lower = lo if k == len(v) - 1 else v[k + 1]
            margin = 0.02 * (upper - lower)
            moved = False
            for sign in (direction[k], -direction[k]):
                value = min(max(v[k] + sign * step[k], lower + margin), upper - margin)
                if abs(value - v[k]) < 1e-9:
                    continue
                trial = v[:k] + [value] + v[k + 1:]
                err = f(trial)
                evals += 1
                if err < best:
                    v, best, moved, direction[k] = trial, err, True, sign
                    step[k] = min(step[k] * 1.5, 1.0)
                    break
            if not moved:
                step[k] *= 0.5
            if evals >= max_evals:
                break
    return v, best, evals


def search_levels(problem, u: list[float], lo: float, hi: float, max_evals: int, coarse: int = 6):
    """Coarse-to-fine: first ``coarse`` knots of a piecewise-linear warp (all steps move together, so
    the search cannot trap two neighbouring levels), then every level on its own. Returns every stage
    as ``(name, u, loss)``: the start, the warp's best and the levels' best."""
    n = len(u)
    stages = [("start", list(u), problem(u))]
    best_u, best = stages[0][1:]
    if n > coarse + 2:
        v, err, used = pattern_search(lambda v: problem(resample(v, hi, n)), resample(u, hi, coarse), lo, hi,
                                      max_evals=max_evals // 2)
        if err < best:
            best_u, best = resample(v, hi, n), err
            stages.append(("warp", best_u, best))
        max_evals -= used
    v, err, _ = pattern_search(problem, best_u, lo, hi, max_evals=max_evals)
    if err < best:
        stages.append(("levels", v, err))
    return stages
