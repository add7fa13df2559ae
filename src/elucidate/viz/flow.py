"""1-D flow pictures (EDM explainer Figures 3-6) from a two-mode Gaussian mixture's exact denoiser.

The horizontal axis is the noise level sigma with sigma(t) = t (so it is also time; data on the
left, noise on the right), either linear (the explainer's view) or logarithmic (resolves the
low-noise end where the flow lines turn into the modes). The background is the density
p(x; sigma) of data + sigma-noise, normalized per column so that every noise level uses the full
shade range. Paths are coloured by the mixture component they end in (``ode``, ``sde``) or start
from (``forward``):

* ``forward``: noising random walks from data samples, x(sigma) = y + W(sigma^2), i.e.
  x_{k+1} = x_k + sqrt(sigma_{k+1}^2 - sigma_k^2) n_k (the SDE dx = sqrt(2 sigma) dw in sigma).
* ``sde``: the reverse SDE dx = -2 sigma grad log p(x; sigma) dsigma + sqrt(2 sigma) dw, the exact
  time reversal of ``forward``, integrated with the ancestral Euler solver (``euler_ancestral``,
  eta = 1) on many small steps; it starts from exact draws of p(x; sigma_max).
* ``ode``: the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma (EDM eq. 4 with
  sigma(t) = t) solved with ``heun`` on many small steps. In 1-D this flow is monotone transport,
  so paths started at evenly spaced quantiles of p(x; sigma_max) stay on those quantiles at every
  sigma: the flow lines split the probability mass into equal slices.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.colors import LinearSegmentedColormap
from matplotlib.figure import Figure

from ..analytic import GaussianMixture
from ..sampling import euler_ancestral, heun
from ..sampling.schedules import exponential_sigmas, linear_sigmas
from .common import new_figure, styled
from .trajectory import TrajectoryRecorder

__all__ = ["default_mixture", "flow_paths", "plot_flow", "plot_flow_comparison"]

Kind = Literal["ode", "sde", "forward"]
KINDS = ("forward", "sde", "ode")
_TITLES = {
    "forward": "Forward noising: random walks  (data → noise)",
    "sde": "Reverse SDE: random walks pulled to the data  (noise → data)",
    "ode": "Probability-flow ODE: smooth flow lines  (noise → data)",
}
_SHORT_TITLES = {"forward": "Forward noising (Fig. 3–4)", "sde": "Reverse SDE (Fig. 5)",
                 "ode": "Probability-flow ODE (Fig. 6)"}
_DENSITY_CMAP = LinearSegmentedColormap.from_list("elucidate_density", ["#ffffff", "#c6dbef", "#4a7fb0"])
_PATH_COLORS = ["#D55E00", "#1b1b3a", "#009E73", "#CC79A7", "#E69F00"]


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run tiny-tensor solves on one intra-op thread (restored afterwards): on a busy 2-core box,
    waking the OpenMP pool for ``torch.softmax`` on a [B, 2] tensor costs ~10 ms per call."""
    previous = torch.get_num_threads()
    if previous != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if previous != 1:
            torch.set_num_threads(previous)


def default_mixture() -> GaussianMixture:
    """The two-mode 1-D mixture of the pictures ("cats and dogs"): unequal widths and weights."""
    return GaussianMixture([[-0.9], [0.75]], [0.15, 0.25], [0.45, 0.55])


def _check_1d(mixture: GaussianMixture) -> None:
    if mixture.dim != 1:
        raise ValueError(f"flow plots need a 1-D mixture (d = 1), got d = {mixture.dim}")


def _sigma_grid(sigma_min: float, sigma_max: float, n: int, log: bool) -> np.ndarray:
    if log:
        return np.geomspace(sigma_min, sigma_max, n)
    return np.linspace(0.0, sigma_max, n)


def _quantiles(mixture: GaussianMixture, sigma: float, n: int) -> torch.Tensor:
    """x at the evenly spaced quantiles (k + 1/2) / n of p(x; sigma), as ``[n, 1]`` float64."""
    means, stds, w = mixture.means[:, 0], mixture.stds[:, 0], mixture.weights
    spread = torch.sqrt(stds ** 2 + sigma ** 2)
    lo = float((means - 8 * spread).min())
    hi = float((means + 8 * spread).max())
    grid = torch.linspace(lo, hi, 20001, dtype=torch.float64)
    cdf = (w * torch.special.ndtr((grid[:, None] - means) / spread)).sum(1)
    q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return torch.from_numpy(np.interp(q.numpy(), cdf.numpy(), grid.numpy()))[:, None]


def flow_paths(mixture: GaussianMixture, kind: Kind, num_paths: int, seed: int = 0, *,
               sigma_max: float = 2.5, sigma_min: float = 0.0, num_steps: int = 256,
               log: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(sigmas [S], paths [S, num_paths], labels [num_paths])`` for one kind of path.

    ``sigmas`` is increasing (data first). ``labels`` is each path's mixture component at the data
    end. For ``log=True`` the paths stop at ``sigma_min`` > 0 instead of reaching sigma = 0.
    """
    _check_1d(mixture)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    g = torch.Generator().manual_seed(seed)
    if kind == "forward":
        y, labels = mixture.sample(num_paths, generator=g, return_labels=True)
        sigmas = _sigma_grid(max(sigma_min, 1e-3) if log else 0.0, sigma_max, num_steps + 1, log)
        var_steps = np.diff(np.concatenate([[0.0], sigmas ** 2]))
        noise = torch.randn(len(sigmas), num_paths, generator=g, dtype=torch.float64).numpy()
        paths = y[:, 0].numpy()[None] + np.cumsum(np.sqrt(var_steps)[:, None] * noise, axis=0)
        return sigmas, paths, labels.numpy()
    floor = max(sigma_min, 1e-3)
    schedule = (exponential_sigmas if log else linear_sigmas)(num_steps, floor, sigma_max)
    if log:
        schedule = schedule[:-1]  # stop at sigma_min: no final jump to 0 on a log axis
        schedule = torch.cat([schedule, schedule.new_zeros(1)])
    recorder = TrajectoryRecorder(max_images=None)
    with _one_thread():
        if kind == "ode":
            x = _quantiles(mixture, sigma_max, num_paths)
            out = heun(mixture, x, schedule, callback=recorder)
        else:
            x = mixture.sample(num_paths, generator=g) + sigma_max * torch.randn(
                num_paths, 1, generator=g, dtype=torch.float64)
            out = euler_ancestral(mixture, x, schedule, eta=1.0, generator=g, callback=recorder)
    recorder.finish(out)
    sigmas = np.asarray(recorder.sigmas)
    paths = torch.stack(recorder.xs)[:, :, 0].numpy()
    if log:  # drop the last (sigma = 0) point; the path ends at sigma_min
        sigmas, paths = sigmas[:-1], paths[:-1]
        labels = mixture.classify(torch.as_tensor(paths[-1:].T, dtype=torch.float64))
    else:
        labels = mixture.classify(out)
    return sigmas[::-1].copy(), paths[::-1].copy(), labels.numpy()


def _x_range(mixture: GaussianMixture, sigma_max: float, log: bool) -> tuple[float, float]:
    """Data +- 3 std, widened to +-1.25 sigma_max (capped at sigma = 2 on a log axis)."""
    if log:
        sigma_max = min(sigma_max, 2.0)
    means, stds = mixture.means[:, 0], mixture.stds[:, 0]
    lo, hi = float((means - 3 * stds).min()), float((means + 3 * stds).max())
    center, noise = float((mixture.weights * means).sum()), 1.25 * sigma_max
    return min(lo, center - noise), max(hi, center + noise)


def _density(mixture: GaussianMixture, sigmas: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """p(x; sigma) on the grid ``[len(xs), len(sigmas)]``, each column divided by its maximum."""
    S, X = np.meshgrid(sigmas, xs)
    logp = mixture.log_prob(torch.from_numpy(X.reshape(-1, 1)), torch.from_numpy(S.reshape(-1)))
    p = logp.reshape(X.shape).exp().numpy()
    return p / p.max(axis=0, keepdims=True)


def _draw_flow(ax: Axes, mixture: GaussianMixture, kind: Kind, num_paths: int, seed: int,
               sigma_max: float, sigma_min: float, log: bool, num_steps: int,
               x_range: tuple[float, float]) -> None:
    grid_sigmas = _sigma_grid(max(sigma_min, 1e-3) if log else 0.0, sigma_max, 320, log)
    xs = np.linspace(x_range[0], x_range[1], 260)
    ax.pcolormesh(grid_sigmas, xs, _density(mixture, grid_sigmas, xs), cmap=_DENSITY_CMAP,
                  shading="gouraud", vmin=0.0, vmax=1.0, rasterized=True)
    sigmas, paths, labels = flow_paths(mixture, kind, num_paths, seed, sigma_max=sigma_max,
                                       sigma_min=sigma_min, num_steps=num_steps, log=log)
    width = 1.3 if kind == "ode" else 0.9
    for k in range(paths.shape[1]):
        color = _PATH_COLORS[int(labels[k]) % len(_PATH_COLORS)]
        ax.plot(sigmas, paths[:, k], color=color, lw=width, alpha=0.9, solid_capstyle="round")
    start = paths[0 if kind == "forward" else -1]  # mark where each path starts
    inside = start[(start >= x_range[0]) & (start <= x_range[1])]
    edge = sigmas[0 if kind == "forward" else -1]
    ax.scatter(np.full(len(inside), edge), inside, s=10, color="#333333", zorder=3, clip_on=False,
               linewidths=0)
    if log:
        ax.set_xscale("log")
    ax.set_xlim(sigmas[0], sigmas[-1])
    ax.set_ylim(*x_range)
    ax.grid(False)
    ax.tick_params(axis="y", left=False)
    ax.set_xlabel(r"noise level $\sigma$  ( = t )" + ("  [log]" if log else ""))


def _edge_panel(ax: Axes, mixture: GaussianMixture, sigma: float, xs: np.ndarray, label: str,
                flip: bool) -> None:
    """p(x; sigma) as a sideways filled curve, one colour per component."""
    x = torch.from_numpy(xs[:, None])
    total = mixture.log_prob(x, sigma).exp().numpy()
    resp = mixture.responsibilities(x, sigma).numpy()
    base = np.zeros_like(total)
    for k in range(resp.shape[1]):
        part = total * resp[:, k]
        ax.fill_betweenx(xs, base, base + part, color=_PATH_COLORS[k % len(_PATH_COLORS)], alpha=0.55,
                         lw=0)
        base = base + part
    ax.plot(total, xs, color="#333333", lw=0.8)
    ax.set_xlim(0, total.max() * 1.08)
    if flip:
        ax.invert_xaxis()
    ax.set_ylim(xs[0], xs[-1])
    ax.set_xticks([])
    ax.tick_params(left=flip, labelleft=flip)
    ax.grid(False)
    for side in ("top", "right", "left", "bottom"):
        ax.spines[side].set_visible(False)
    ax.set_title(label, fontsize=9, fontweight="normal")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


@styled
def plot_flow(mixture: GaussianMixture | None = None, kind: Kind = "ode", num_paths: int | None = None,
              seed: int = 0, *, sigma_max: float = 2.5, sigma_min: float = 0.01,
              sigma_axis: Literal["linear", "log"] = "linear", num_steps: int = 256,
              x_range: tuple[float, float] | None = None) -> Figure:
    """One flow picture over p(x; sigma), with p(x; 0) (data) and p(x; sigma_max) (noise) at the sides.

    ``kind`` is ``"ode"``, ``"sde"`` or ``"forward"`` (module docstring). ``num_paths`` defaults to
    24 for the ODE and 14 otherwise. ``sigma_min`` is only used on the log axis (the linear axis
    starts at sigma = 0). ``mixture`` defaults to :func:`default_mixture` and must be 1-D.
    """
    _check_kind(kind)
    if sigma_axis not in ("linear", "log"):
        raise ValueError(f"sigma_axis must be 'linear' or 'log', got {sigma_axis!r}")
    mixture = default_mixture() if mixture is None else mixture
    _check_1d(mixture)
    num_paths = (24 if kind == "ode" else 14) if num_paths is None else num_paths
    log = sigma_axis == "log"
    x_range = _x_range(mixture, sigma_max, log) if x_range is None else x_range
    fig = new_figure(10.0, 4.6)
    grid = fig.add_gridspec(1, 3, width_ratios=[1.1, 9, 1.1], wspace=0.03)
    ax_data, ax, ax_noise = (fig.add_subplot(grid[0, i]) for i in range(3))
    _draw_flow(ax, mixture, kind, num_paths, seed, sigma_max, sigma_min, log, num_steps, x_range)
    ax.tick_params(labelleft=False)
    ax.set_title(_TITLES[kind])
    xs = np.linspace(x_range[0], x_range[1], 400)
    lo = sigma_min if log else 0.0
    _edge_panel(ax_data, mixture, lo, xs, "data\n" + (rf"$\sigma$ = {lo:g}" if lo else r"$\sigma$ = 0"), True)
    _edge_panel(ax_noise, mixture, sigma_max, xs, f"noise\nσ = {sigma_max:g}", False)
    ax_data.set_ylabel("x")
    return fig


@styled
def plot_flow_comparison(mixture: GaussianMixture | None = None, seed: int = 0, *,
                         sigma_max: float = 2.5, sigma_min: float = 0.01,
                         sigma_axis: Literal["linear", "log"] = "linear", num_steps: int = 256,
                         num_paths: int | None = None) -> Figure:
    """``forward``, ``sde`` and ``ode`` pictures side by side on a shared x axis."""
    if sigma_axis not in ("linear", "log"):
        raise ValueError(f"sigma_axis must be 'linear' or 'log', got {sigma_axis!r}")
    mixture = default_mixture() if mixture is None else mixture
    _check_1d(mixture)
    x_range = _x_range(mixture, sigma_max, sigma_axis == "log")
    fig = new_figure(15.0, 4.4)
    axes = fig.subplots(1, 3, sharey=True, gridspec_kw={"wspace": 0.1})
    for ax, kind in zip(axes, KINDS):
        n = num_paths if num_paths is not None else (20 if kind == "ode" else 12)
        _draw_flow(ax, mixture, kind, n, seed, sigma_max, sigma_min, sigma_axis == "log", num_steps,
                   x_range)
        ax.set_title(_SHORT_TITLES[kind])
    axes[0].set_ylabel("x")
    return fig

