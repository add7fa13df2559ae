"""Training curves from a run's ``metrics.jsonl``: the loss over time and the loss per noise level.

Training lines look like ``{"step", "kimg", "loss", "lr", "images_per_sec", "seconds",
"sigma_edges" [K+1], "loss_by_sigma" [K, entries may be null], "count_by_sigma" [K],
"skipped_steps"}`` (``skipped_steps`` is the run's running total of skipped non-finite updates,
as the trainer logs it); any other line (``{"event": ...}``, non-objects) is ignored.
``plot_loss_by_sigma`` is EDM Fig. 5a: the (weighted) loss against sigma on a log axis, one curve
per training stage, over the shaded training noise-level distribution p_train(sigma).
"""
from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import matplotlib.ticker
import numpy as np
from matplotlib.figure import Figure

from .common import PALETTE, new_figure, plain_log_labels, styled

__all__ = ["read_metrics", "smooth", "plot_loss", "plot_loss_by_sigma", "loss_by_sigma_stages"]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The training records of a ``metrics.jsonl`` in file order, with steps strictly increasing.

    Lines that are not JSON objects with a numeric ``step`` and a ``loss`` key, or that have an
    ``event`` key, are skipped. A truncated last line (the trainer is mid-write) is skipped
    silently, a corrupt line elsewhere with a warning. After a resume, a record whose step is <=
    the previous one supersedes the earlier records from that step on (the resumed run's history
    wins), so the result never goes back in time.
    """
    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    nonblank = [n for n, line in enumerate(lines) if line.strip()]
    last = nonblank[-1] if nonblank else -1
    records: list[dict] = []
    for n in nonblank:
        try:
            obj = json.loads(lines[n])
        except json.JSONDecodeError:
            if n != last:
                warnings.warn(f"{path}:{n + 1}: skipping a line that is not valid JSON", stacklevel=2)
            continue
        if not isinstance(obj, dict) or "event" in obj or "loss" not in obj or not _is_number(obj.get("step")):
            continue
        while records and records[-1]["step"] >= obj["step"]:
            records.pop()
        records.append(obj)
    return records


def smooth(values: Sequence[float], span: float) -> np.ndarray:
    """Debiased exponential moving average with ``alpha = 2 / (span + 1)`` (TensorBoard-style)."""
    values = np.asarray(values, dtype=np.float64)
    alpha = 2.0 / (max(span, 1.0) + 1.0)
    out = np.empty_like(values)
    acc, weight = 0.0, 0.0
    for k, v in enumerate(values):
        acc = (1 - alpha) * acc + alpha * v
        weight = (1 - alpha) * weight + alpha
        out[k] = acc / weight
    return out


def _series(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pairs = [(r["step"], r[key]) for r in records if _is_number(r.get(key)) and _is_number(r.get("step"))]
    if not pairs:
        return np.zeros(0), np.zeros(0)
    steps, values = np.asarray(pairs, dtype=np.float64).T
    return steps, values


@styled
def plot_loss(records: Sequence[dict], *, span: float | None = None) -> Figure:
    """Loss vs step on a log y axis: raw values (faint) and a smoothed curve (EMA of log loss).

    ``span`` is the EMA span in records (default: a twentieth of the run, at least 5). A top axis
    shows kimg when the records carry it, red crosses mark intervals in which the running total
    ``skipped_steps`` grew, and a small panel below shows the learning rate when it changes.
    """
    steps, loss = _series(records, "loss")
    keep = loss > 0
    steps, loss = steps[keep], loss[keep]
    if len(steps) == 0:
        raise ValueError("no training records with a positive, finite loss to plot")
    lr_steps, lr = _series(records, "lr")
    show_lr = len(lr) > 1 and np.ptp(lr) > 0
    fig = new_figure(8.0, 5.0 if show_lr else 4.0)
    if show_lr:
        ax, ax_lr = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3.2, 1], "hspace": 0.08})
    else:
        ax, ax_lr = fig.subplots(1, 1), None
    span = max(5.0, len(loss) / 20) if span is None else span
    smoothed = np.exp(smooth(np.log(loss), span))
    ax.plot(steps, loss, color=PALETTE[0], lw=0.8, alpha=0.3, label="loss")
    ax.plot(steps, smoothed, color=PALETTE[0], lw=2.0, label=f"smoothed (EMA, span {span:.0f})")
    ax.set_yscale("log")
    plain_log_labels(ax.yaxis, loss)
    ax.set_ylabel("loss")
    skipped, total_skipped, previous = [], 0, 0
    for r in records:  # skipped_steps is the run's running total: mark where it grew
        count = r.get("skipped_steps")
        if not _is_number(count):
            continue
        if count > previous and _is_number(r.get("loss")) and r["loss"] > 0:
            skipped.append((r["step"], r["loss"]))
        previous = total_skipped = count
    if skipped:
        ax.plot(*np.asarray(skipped, dtype=np.float64).T, "x", color="#cc0000", ms=6, mew=1.5,
                label="interval with skipped updates")
    title = f"Training loss: step {steps[-1]:g}, smoothed loss {smoothed[-1]:.3g}"
    ax.set_title(title + (f", {total_skipped:g} skipped updates" if total_skipped else ""))
    ax.legend(loc="upper right")
    kimg_steps, kimg = _series(records, "kimg")
    if len(kimg) > 1 and np.all(np.diff(kimg_steps) > 0) and np.all(np.diff(kimg) > 0):
        top = ax.secondary_xaxis("top", functions=(lambda s: np.interp(s, kimg_steps, kimg),
                                                   lambda k: np.interp(k, kimg, kimg_steps)))
        top.set_xlabel("kimg", fontsize=9)
        top.tick_params(labelsize=8)
    if ax_lr is not None:
        ax_lr.plot(lr_steps, lr, color=PALETTE[1], lw=1.4)
        ax_lr.set_ylabel("lr")
        ax_lr.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:.2g}"))
        ax_lr.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(3))
        ax_lr.set_xlabel("step")
    else:
        ax.set_xlabel("step")
    return fig


def _bin_centers(edges: np.ndarray) -> np.ndarray:
    """Geometric bin centres; open-ended bins (edge 0 or inf) reuse their neighbour's log width."""
    lo, hi = edges[:-1].astype(np.float64), edges[1:].astype(np.float64)
    ok = (lo > 0) & np.isfinite(hi) & np.isfinite(lo)
    centers = np.where(ok, np.sqrt(np.where(ok, lo * hi, 1.0)), np.nan)
    width = np.nanmedian(np.log(hi[ok] / lo[ok])) if ok.any() else 1.0
    centers = np.where(~ok & (lo > 0) & np.isfinite(lo), lo * np.exp(width / 2), centers)
    centers = np.where(~ok & (hi > 0) & np.isfinite(hi), hi * np.exp(-width / 2), centers)
    return centers


def loss_by_sigma_stages(records: Sequence[dict], num_stages: int = 3
                         ) -> tuple[np.ndarray, list[tuple[str, np.ndarray]], np.ndarray]:
    """``(edges [K+1], [(label, mean loss [K])] per stage, total counts [K])``.

    Records carrying per-bin losses are split into ``num_stages`` consecutive groups of equal size;
    each bin's stage loss is the count-weighted mean sum(loss_k n_k) / sum(n_k) over the group
    (NaN where the bin was never hit).
    """
    usable = []
    for r in records:
        edges, losses, counts = r.get("sigma_edges"), r.get("loss_by_sigma"), r.get("count_by_sigma")
        if isinstance(edges, list) and isinstance(losses, list) and isinstance(counts, list) \
                and len(edges) == len(losses) + 1 == len(counts) + 1 and len(losses) > 0:
            usable.append(r)
    if not usable:
        raise ValueError("no records with sigma_edges, loss_by_sigma and count_by_sigma")
    edges = np.asarray(usable[-1]["sigma_edges"], dtype=np.float64)
    usable = [r for r in usable if len(r["sigma_edges"]) == len(edges)]
    num_stages = max(1, min(num_stages, len(usable)))
    names = ["early", "middle", "late"] if num_stages == 3 else [f"stage {k + 1}" for k in range(num_stages)]
    stages, total = [], np.zeros(len(edges) - 1)
    for name, group in zip(names, np.array_split(np.arange(len(usable)), num_stages)):
        weighted, count = np.zeros(len(edges) - 1), np.zeros(len(edges) - 1)
        for r in (usable[i] for i in group):
            for k, (loss, n) in enumerate(zip(r["loss_by_sigma"], r["count_by_sigma"])):
                if _is_number(loss) and _is_number(n) and n > 0:
                    weighted[k] += loss * n
                    count[k] += n
        total += count
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(count > 0, weighted / count, np.nan)
        first, last = usable[group[0]]["step"], usable[group[-1]]["step"]
        span = f"step {first:g}" if first == last else f"steps {first:g}–{last:g}"
        stages.append((f"{name} ({span})", mean))
    return edges, stages, total


@styled
def plot_loss_by_sigma(records: Sequence[dict], num_stages: int = 3) -> Figure:
    """EDM Fig. 5a: loss vs sigma (log x), one curve per training stage (early/middle/late).

    The grey shading is how often each sigma bin was trained on (p_train, scaled to fit).
    """
    edges, stages, total = loss_by_sigma_stages(records, num_stages)
    centers = _bin_centers(edges)
    fig = new_figure(9.5, 4.2)
    ax = fig.subplots(1, 1)
    ax_count = ax.twinx()
    finite = np.isfinite(centers)
    if total.sum() > 0:
        style = {"color": "#bbbbbb", "alpha": 0.45, "lw": 0, "label": r"training $\sigma$ counts"}
        if np.all(np.isfinite(edges)) and np.all(edges > 0):
            ax_count.stairs(total / total.max(), edges, fill=True, **style)
        else:  # open-ended bins: shade between the bin centres instead
            ax_count.fill_between(centers[finite], total[finite] / total.max(), **style)
    ax_count.set_ylim(0, 2.6)
    ax_count.set_yticks([])
    ax_count.spines["right"].set_visible(False)
    ax_count.grid(False)
    ax.set_zorder(ax_count.get_zorder() + 1)
    ax.patch.set_visible(False)
    colors = matplotlib.colormaps["viridis"](np.linspace(0.78, 0.05, len(stages)))
    for (label, mean), color in zip(stages, colors):
        ok = finite & np.isfinite(mean)
        ax.plot(centers[ok], mean[ok], "-o", color=color, lw=2.0, ms=3.5, label=label)
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel(r"noise level $\sigma$")
    ax.set_ylabel(r"loss  $\lambda(\sigma)\,\|D(y + n; \sigma) - y\|^2$")
    ax.set_title("Loss by noise level across training")
    handles, labels = ax.get_legend_handles_labels()
    count_handles, count_labels = ax_count.get_legend_handles_labels()
    ax.legend(handles + count_handles, labels + count_labels, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig
