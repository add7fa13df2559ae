"""Denoising trajectory strips: the current x_i next to the predicted x_0 = D(x_i; sigma_i).

This is the EDM explainer's Figure 1 (an image emerging from noise) with the course chapter's
"current x vs predicted denoised x" view. Record a run with :class:`TrajectoryRecorder` as the
solver ``callback``, then call :func:`plot_trajectory`::

    rec = TrajectoryRecorder(max_images=4)
    x = heun(D, x_T, sigmas, callback=rec)
    rec.finish(x)                       # optional: adds the final sigma = 0 column
    save_figure(plot_trajectory(rec), "trajectory.png")
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from .common import new_figure, styled
from .grid import _colormap_lut, to_uint8

__all__ = ["TrajectoryRecorder", "plot_trajectory", "pick_columns"]


class TrajectoryRecorder:
    """A solver ``callback`` that keeps CPU float32 copies of x_i and D(x_i) at every step.

    ``info`` dicts come from the solvers (``{x, i, sigma, sigma_hat, denoised}``). Only the first
    ``max_images`` samples of the batch are kept (``None`` keeps all). ``sigmas[k]`` is the noise
    level of ``xs[k]`` (sigma_i, before any churn) and ``sigma_hats[k]`` the level D was run at.
    ``decode`` maps what the solver sees to images (a latent run's decoder: both x_i and D(x_i) are
    decoded), default none.
    """

    def __init__(self, max_images: int | None = 8, decode=None):
        if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, int)
                                       or max_images < 1):
            raise ValueError(f"max_images must be an integer >= 1 or None, got {max_images!r}")
        self.max_images, self.decode = max_images, decode
        self.steps: list[int] = []
        self.sigmas: list[float] = []
        self.sigma_hats: list[float] = []
        self.xs: list[torch.Tensor] = []
        self.denoised: list[torch.Tensor] = []

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()[: self.max_images]
        if self.decode is not None:
            t = self.decode(t)
        return t.to("cpu", torch.float32, copy=True)

    def __call__(self, info: dict) -> None:
        self.steps.append(int(info["i"]))
        self.sigmas.append(float(info["sigma"]))
        self.sigma_hats.append(float(info.get("sigma_hat", info["sigma"])))
        self.xs.append(self._keep(info["x"]))
        self.denoised.append(self._keep(info["denoised"]))

    def finish(self, x: torch.Tensor) -> None:
        """Append the solver's result as a final step at sigma = 0 (where D(x; 0) = x)."""
        kept = self._keep(x)
        self.steps.append(self.steps[-1] + 1 if self.steps else 0)
        self.sigmas.append(0.0)
        self.sigma_hats.append(0.0)
        self.xs.append(kept)
        self.denoised.append(kept.clone())

    def __len__(self) -> int:
        return len(self.steps)

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(xs, denoised)`` as ``[steps, B, ...]`` tensors."""
        if not self.xs:
            raise ValueError("the recorder is empty: pass it as a solver's callback first")
        return torch.stack(self.xs), torch.stack(self.denoised)


def pick_columns(num_steps: int, num_columns: int) -> list[int]:
    """``num_columns`` distinct step indices spread evenly over ``0..num_steps-1`` (first and last kept)."""
    if num_steps < 1:
        raise ValueError("no steps to pick from")
    if num_columns >= num_steps:
        return list(range(num_steps))
    if num_columns <= 1:
        return [num_steps - 1]
    return sorted({round(k * (num_steps - 1) / (num_columns - 1)) for k in range(num_columns)})


def _panel(image: torch.Tensor, lut: np.ndarray) -> np.ndarray:
    """One [C, H, W] image in model range as an RGB or grey uint8 array for imshow."""
    tile = to_uint8(image[None])[0]  # [H, W, C]
    if tile.shape[-1] == 3:
        return tile
    if tile.shape[-1] == 1:
        return tile[..., 0]
    return lut[tile[..., 0]]  # multi-channel field: first channel through the colormap


def _format_sigma(sigma: float) -> str:
    if sigma == 0:
        return "σ = 0"
    if sigma >= 10:
        return f"σ = {sigma:.0f}"
    if sigma >= 0.1:
        return f"σ = {sigma:.2g}"
    return f"σ = {sigma:.1e}".replace("e-0", "e-")


@styled
def plot_trajectory(recorder: TrajectoryRecorder, num_columns: int = 8, max_images: int = 4, *,
                    normalize_x: bool = True, columns: Sequence[int] | None = None,
                    cmap: str = "viridis") -> Figure:
    """Two rows per image: the current x_i (top) and the predicted x_0 = D(x_i; sigma_i) (below).

    Columns are ``num_columns`` recorded steps spread from the first to the last (or the explicit
    step positions ``columns``), each titled with its sigma_i. With ``normalize_x`` the noisy x_i is
    shown as x_i / sqrt(1 + sigma_i^2) (the VP view, s(t) x), otherwise clipped to [-1, 1], which
    saturates to binary noise at large sigma. Images are [C, H, W] in [-1, 1]; C = 1 is grey,
    C = 3 RGB, other C show the first channel through ``cmap``.
    """
    xs, ds = recorder.stacked()
    if xs.ndim != 5:
        raise ValueError(f"plot_trajectory needs image batches [B, C, H, W]; recorded x has shape "
                         f"{tuple(xs.shape[1:])}")
    n_images = min(max_images, xs.shape[1])
    cols = list(columns) if columns is not None else pick_columns(len(recorder), num_columns)
    sigmas = [recorder.sigmas[k] for k in cols]
    lut = _colormap_lut(cmap)
    _, _, C, H, W = xs.shape
    cell_w = 0.95  # inches per panel
    cell_h = cell_w * H / W
    fig = new_figure(0.75 + cell_w * len(cols) * 1.04, 0.3 + cell_h * 2 * n_images * 1.1)
    outer = fig.add_gridspec(n_images, 1, hspace=0.12, left=0.7 / fig.get_figwidth(), right=0.995,
                             top=1 - 0.28 / fig.get_figheight(), bottom=0.01)
    kwargs = {"cmap": "gray", "vmin": 0, "vmax": 255} if C == 1 else {}
    for b in range(n_images):
        inner = outer[b].subgridspec(2, len(cols), wspace=0.04, hspace=0.04)
        for col, (k, sigma) in enumerate(zip(cols, sigmas)):
            x = xs[k, b] / math.sqrt(1.0 + sigma ** 2) if normalize_x else xs[k, b]
            for row, image in ((0, x), (1, ds[k, b])):
                ax = fig.add_subplot(inner[row, col])
                ax.imshow(_panel(image, lut), interpolation="nearest", **kwargs)
                ax.set_xticks([])
                ax.set_yticks([])
                ax.grid(False)
                for spine in ax.spines.values():
                    spine.set_visible(False)
                if b == 0 and row == 0:
                    ax.set_title(_format_sigma(sigma), fontsize=9, fontweight="normal")
                if col == 0:
                    ax.set_ylabel(r"$x_i$" if row == 0 else r"$D(x_i)$", fontsize=9, rotation=0,
                                  ha="right", va="center", labelpad=4)
    return fig
