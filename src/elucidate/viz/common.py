"""Shared plotting plumbing: Agg-only figures, a house style, atomic PNG writes.

Figures are built with ``matplotlib.figure.Figure`` and an explicit Agg canvas, never through
``pyplot``, so plotting here touches no global backend or figure registry and works headless.
"""
from __future__ import annotations

import functools
import io
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import matplotlib
import matplotlib.ticker
import numpy as np
from matplotlib.axis import Axis
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..runtime.files import atomic_write_bytes

__all__ = ["new_figure", "save_figure", "figure_to_png", "atomic_write_bytes", "styled", "STYLE",
           "PALETTE", "DEFAULT_DPI", "plain_log_labels"]

DEFAULT_DPI = 150

#: Qualitative colours used across plots (colour-blind friendly, Okabe-Ito order).
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#999999"]

#: rcParams applied (temporarily, via ``rc_context``) while a figure is built.
STYLE = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.titleweight": "bold",
    "axes.labelsize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.axisbelow": True,
    "grid.color": "#dddddd",
    "grid.linewidth": 0.6,
    "axes.prop_cycle": matplotlib.cycler(color=PALETTE),
    "legend.frameon": False,
    "legend.fontsize": 9,
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
    "image.interpolation": "nearest",
}

F = TypeVar("F", bound=Callable)


def styled(fn: F) -> F:
    """Decorator: build the figure under :data:`STYLE` (rcParams are restored afterwards)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(STYLE):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def new_figure(width: float, height: float, **kwargs) -> Figure:
    """A ``Figure`` of ``width`` x ``height`` inches attached to an Agg canvas (no pyplot)."""
    fig = Figure(figsize=(width, height), **kwargs)
    FigureCanvasAgg(fig)
    return fig


def plain_log_labels(axis: Axis, values) -> None:
    """Label a log axis with plain numbers (0.3, 1, 20 instead of 3e-01), with denser ticks
    (1-2-3-5-7 or 1-2-5 per decade) when the data span at most one or two decades."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values) & (values > 0)]
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:.3g}")
    axis.set_major_formatter(plain)
    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    decades = np.log10(values.max() / values.min()) if len(values) else np.inf
    if decades <= 1.0:
        axis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 3.0, 5.0, 7.0)))
    elif decades <= 2.0:
        axis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))


def _close(fig: Figure) -> None:
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:  # only if the caller made the figure through pyplot
        pyplot.close(fig)
    fig.clear()


def _render(fig: Figure, fmt: str, dpi: int, close: bool) -> bytes:
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format=fmt, dpi=dpi, bbox_inches="tight", pad_inches=0.08)
    finally:
        if close:
            _close(fig)
    return buffer.getvalue()


def figure_to_png(fig: Figure, *, dpi: int = DEFAULT_DPI, close: bool = True) -> bytes:
    """Render ``fig`` to PNG bytes (and close it unless ``close=False``)."""
    return _render(fig, "png", dpi, close)


def save_figure(fig: Figure, path: str | os.PathLike, *, dpi: int = DEFAULT_DPI) -> Path:
    """Write ``fig`` to ``path`` atomically (temp file + rename) and close it.

    The format follows the suffix (``.png`` when there is none); returns the path.
    """
    path = Path(path)
    data = _render(fig, path.suffix.lstrip(".").lower() or "png", dpi, True)
    return atomic_write_bytes(data, path)
