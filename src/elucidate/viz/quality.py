"""Sample quality against sampling cost: one line per sampler over the number of denoiser calls (NFE)."""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
from matplotlib.figure import Figure

from ..sampling.registry import SAMPLERS
from ..sampling.registry import nfe as solver_nfe
from .common import PALETTE, new_figure, plain_log_labels, styled

__all__ = ["quality_series", "plot_quality_vs_nfe"]

_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def _number(value) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def quality_series(table: Iterable[Mapping]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{sampler: (nfe, value)}`` sorted by NFE from rows with ``sampler``, ``nfe`` and ``value``.

    Values may be strings (CSV rows). A row without ``nfe`` but with ``steps`` gets the solver's
    NFE for that many steps (2N - 1 for heun, N otherwise); rows without a usable NFE or value are
    skipped. Repeated (sampler, nfe) pairs keep the last row.
    """
    points: dict[str, dict[float, float]] = {}
    for row in table:
        sampler = str(row.get("sampler", "") or "?")
        value = _number(row.get("value"))
        cost = _number(row.get("nfe"))
        steps = _number(row.get("steps"))
        if cost is None and steps is not None and steps >= 1:
            cost = float(solver_nfe(sampler, int(steps))) if sampler in SAMPLERS else steps
        if value is None or cost is None or cost <= 0:
            continue
        points.setdefault(sampler, {})[cost] = value
    return {name: (np.asarray(sorted(p)), np.asarray([p[k] for k in sorted(p)]))
            for name, p in points.items()}


@styled
def plot_quality_vs_nfe(table: Iterable[Mapping], metric_name: str = "value", *,
                        title: str | None = None, lower_is_better: bool = True) -> Figure:
    """Quality metric vs NFE on log-log axes, one line per sampler (linear y if any value <= 0).

    ``table`` rows are dicts with ``sampler``, ``nfe`` (or ``steps``) and ``value``. The best
    point of each sampler (lowest, or highest with ``lower_is_better=False``) is ringed.
    """
    series = quality_series(table)
    if not series:
        raise ValueError("no rows with a sampler, a positive nfe (or steps) and a finite value")
    fig = new_figure(7.5, 4.6)
    ax = fig.subplots(1, 1)
    all_values = np.concatenate([v for _, v in series.values()])
    for k, (name, (cost, value)) in enumerate(series.items()):
        color = PALETTE[k % len(PALETTE)]
        ax.plot(cost, value, "-", marker=_MARKERS[k % len(_MARKERS)], color=color, lw=1.8, ms=5,
                label=name)
        best = int(np.argmin(value) if lower_is_better else np.argmax(value))
        ax.plot(cost[best], value[best], "o", ms=12, mfc="none", mec=color, mew=1.2)
    ax.set_xscale("log")
    if np.all(all_values > 0):
        ax.set_yscale("log")
    plain_log_labels(ax.xaxis, np.concatenate([c for c, _ in series.values()]))
    if np.all(all_values > 0):
        plain_log_labels(ax.yaxis, all_values)
    ax.set_xlabel("NFE (denoiser evaluations per sample)")
    ax.set_ylabel(metric_name + ("  (lower is better)" if lower_is_better else "  (higher is better)"))
    ax.set_title(title or f"{metric_name} vs sampling cost")
    ax.grid(True, which="both", alpha=0.6)
    ax.legend(loc="best")
    return fig
