"""Tuned schedules: their noise levels against Karras rho = 7, and their error against NFE next to the
classic schedules' (from the measurements :func:`elucidate.sampling.tune` stores with each result)."""
from __future__ import annotations

from collections.abc import Sequence

import matplotlib.ticker
import numpy as np
from matplotlib.figure import Figure

from ..sampling.schedules import karras_sigmas
from .common import PALETTE, new_figure, plain_log_labels, styled

__all__ = ["plot_tuned_schedules", "tuned_error_series"]


def tuned_error_series(tuned: Sequence) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{label: (nfe, held-out error)}``: the tuned schedules, the best solver on Karras rho = 7 and on
    the exponential schedule (each NFE's best), and DPM-Solver++(2M) on Karras."""
    series: dict[str, dict[int, float]] = {"tuned": {}, "best solver, Karras rho=7": {},
                                           "best solver, exponential": {}, "dpmpp_2m, Karras rho=7": {}}
    for t in tuned:
        series["tuned"][t.nfe] = t.heldout_error
        for b in t.baselines:
            key = "best solver, Karras rho=7" if b["schedule"] == "karras" else "best solver, exponential"
            series[key][t.nfe] = min(series[key].get(t.nfe, np.inf), b["heldout_error"])
            if b["sampler"] == "dpmpp_2m" and b["schedule"] == "karras" and not b["options"]:
                series["dpmpp_2m, Karras rho=7"][t.nfe] = b["heldout_error"]
    return {k: (np.array(sorted(v), dtype=float), np.array([v[n] for n in sorted(v)], dtype=float))
            for k, v in series.items() if v}


@styled
def plot_tuned_schedules(tuned: Sequence, *, title: str | None = None) -> Figure:
    """Left: each tuned schedule's sigmas (log axis) against the step, with Karras rho = 7 over the same
    range and number of steps dashed; right: held-out RMSE to the reference solution against NFE for
    the tuned schedules and the classic ones (:func:`tuned_error_series`)."""
    tuned = sorted(tuned, key=lambda t: t.nfe)
    if not tuned:
        raise ValueError("no tuned schedules to plot")
    fig = new_figure(11.0, 4.4)
    left, right = fig.subplots(1, 2)
    for k, t in enumerate(tuned):
        color = PALETTE[k % len(PALETTE)]
        sigmas = np.asarray(t.sigmas[:-1])
        steps = np.arange(len(sigmas))
        options = " ".join(f"{k}={v}" for k, v in t.options.items())
        left.plot(steps, sigmas, "-o", color=color, ms=4, lw=1.6, label=f"NFE {t.nfe}: {t.sampler} {options}".strip())
        karras = karras_sigmas(len(sigmas), t.sigma_min, t.sigma_max).numpy()[:-1]
        left.plot(steps, karras, "--", color=color, lw=1.0, alpha=0.8)
    left.set_yscale("log")
    plain_log_labels(left.yaxis, np.concatenate([np.asarray(t.sigmas[:-1]) for t in tuned]))
    left.set_xlabel("step i (dashed: Karras rho = 7, same steps)")
    left.set_ylabel("sigma_i (the last step goes to 0)")
    left.set_title("tuned noise levels")
    left.legend(loc="upper right")
    markers = ["o", "s", "^", "D", "v"]
    values = []
    for k, (label, (nfe, err)) in enumerate(tuned_error_series(tuned).items()):
        ok = np.isfinite(err) & (err > 0)
        right.plot(nfe[ok], err[ok], "-", marker=markers[k % len(markers)], color=PALETTE[k % len(PALETTE)],
                   lw=2.2 if label == "tuned" else 1.4, label=label)
        values.append(err[ok])
    right.set_xscale("log")
    right.set_yscale("log")
    plain_log_labels(right.yaxis, np.concatenate(values) if values else [1.0])
    right.set_xticks([t.nfe for t in tuned], [str(t.nfe) for t in tuned])
    right.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    right.set_xlabel("NFE (denoiser evaluations per sample)")
    right.set_ylabel("RMSE to the reference, held-out noise")
    right.set_title("error vs NFE")
    right.legend(loc="best")
    fig.suptitle(title or "Schedules tuned per NFE budget")
    fig.tight_layout()
    return fig
