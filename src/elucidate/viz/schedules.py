"""Noise-level discretizations (EDM Table 1, explainer Fig. 11) and DDPM-style alpha_bar curves.

``plot_schedules`` shows where each discretization spends its steps: sigma_i against the step
index on a log axis, and the step size relative to the current noise level,
(sigma_i - sigma_{i+1}) / sigma_i. ``plot_alpha_bar`` is the course chapter's ``plot_scheduler``:
the signal and noise scales sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t) of discrete schedules,
plus the EDM noise level each one corresponds to, sigma = sqrt((1 - alpha_bar) / alpha_bar).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from matplotlib.figure import Figure

from ..formulations import VP
from ..sampling import schedules as S
from .common import PALETTE, new_figure, styled

__all__ = ["schedule_table", "plot_schedules", "default_alpha_bar_curves", "shifted_alpha_bar_curves",
           "plot_alpha_bar"]

# name -> (sigmas(num_steps), line style); each at its own Table-1 range
_SCHEDULES: dict[str, tuple[Callable[[int], torch.Tensor], str]] = {
    "EDM: Karras ρ=7 [0.002, 80]": (lambda n: S.karras_sigmas(n, 0.002, 80.0, rho=7.0), "-"),
    "Karras ρ=3 [0.002, 80]": (lambda n: S.karras_sigmas(n, 0.002, 80.0, rho=3.0), "-"),
    "exponential (ρ→∞) [0.002, 80]": (lambda n: S.exponential_sigmas(n, 0.002, 80.0), "-"),
    "linear in σ [0.002, 80]": (lambda n: S.linear_sigmas(n, 0.002, 80.0), "-"),
    "VP: σ(t_i), ε_s = 1e-3": (lambda n: S.vp_sigmas(n), "--"),
    "VE: √t_i [0.02, 100]": (lambda n: S.ve_sigmas(n), "--"),
    "iDDPM: u_j [0.002, 81]": (lambda n: S.iddpm_sigmas(n), "--"),
}


def schedule_table(num_steps: int = 18) -> dict[str, np.ndarray]:
    """The ``num_steps + 1`` sigmas (ending in 0) of every discretization in :func:`plot_schedules`."""
    return {name: fn(num_steps).numpy() for name, (fn, _) in _SCHEDULES.items()}


@styled
def plot_schedules(num_steps: int = 18) -> Figure:
    """sigma_i vs step i (log axis) and relative step size for every Table-1 discretization.

    The final step to sigma_N = 0 is not drawn (log axis; its relative size is always 1).
    """
    S.check_steps(num_steps)
    table = schedule_table(num_steps)
    fig = new_figure(11.5, 4.4)
    ax_sigma, ax_step = fig.subplots(1, 2, gridspec_kw={"wspace": 0.22})
    steps = np.arange(num_steps)
    for (name, sigmas), color, (_, style) in zip(table.items(), PALETTE, _SCHEDULES.values()):
        width = 2.4 if name.startswith("EDM") else 1.4
        ax_sigma.plot(steps, sigmas[:-1], style, color=color, lw=width, marker="o", ms=3.2, label=name)
        if num_steps > 1:
            rel = (sigmas[:-2] - sigmas[1:-1]) / sigmas[:-2]
            ax_step.plot(steps[:-1], rel, style, color=color, lw=width, marker="o", ms=3.2)
    ax_sigma.set_yscale("log")
    ax_sigma.set_xlabel("step i")
    ax_sigma.set_ylabel(r"noise level $\sigma_i$")
    ax_sigma.set_title(f"Time steps, N = {num_steps} (data at the bottom)")
    ax_sigma.annotate("long steps at high noise,\nshort steps near the data", xy=(0.97, 0.96),
                      xycoords="axes fraction", ha="right", va="top", fontsize=8.5, color="#555555")
    ax_step.set_yscale("log")
    ax_step.set_xlabel(r"step i  ($\sigma_i \to \sigma_{i+1}$)")
    ax_step.set_ylabel(r"relative step $(\sigma_i - \sigma_{i+1}) / \sigma_i$")
    ax_step.set_title("Step size relative to the noise level")
    for ax in (ax_sigma, ax_step):
        ax.set_xlim(-0.5, num_steps - 0.5)
        ax.grid(True, which="major")
    fig.legend(*ax_sigma.get_legend_handles_labels(), loc="lower center", ncol=4,
               bbox_to_anchor=(0.5, -0.1), fontsize=8.5)
    return fig


def default_alpha_bar_curves(M: int = 1000) -> dict[str, np.ndarray]:
    """alpha_bar_t for t = 1..M of three schedules (each a float64 array of length ``M``).

    * DDPM linear: beta_t from 1e-4 to 0.02 (Ho et al. 2020), alpha_bar_t = prod_{s<=t} (1 - beta_s).
    * iDDPM cosine in EDM Table 1's form alpha_bar(j) = sin^2(pi/2 j / (M (C_2 + 1))), j = M - t,
      including the C_1 = 0.001 clip of alpha_bar(j-1)/alpha_bar(j) (beta_t <= 0.999), computed as
      1 / (1 + u_j^2) from :func:`elucidate.sampling.schedules.iddpm_u`. This equals the classic
      cos^2(pi/2 (t/M + s)/(1 + s)) without the division by its t = 0 value (a 1.6e-4 difference).
    * VP (continuous): alpha_bar(t) = s(t)^2 = 1 / (1 + sigma(t)^2) of :class:`elucidate.VP`
      (beta_d = 19.9, beta_min = 0.1) at t = j / M. It is the continuous-time limit of the DDPM
      linear schedule (beta_min = 1e-4 M, beta_d = (0.02 - 1e-4) M), so the two curves coincide.
    """
    betas = np.linspace(1e-4, 0.02, M, dtype=np.float64)
    u = S.iddpm_u(M=M).numpy()[::-1]  # u_{M-1}, ..., u_0: increasing noise, i.e. t = 1..M
    t = torch.arange(1, M + 1, dtype=torch.float64) / M
    return {
        "DDPM linear β (1e-4 → 0.02)": np.cumprod(1.0 - betas),
        "iDDPM cosine (C₂ = 0.008)": 1.0 / (1.0 + u ** 2),
        "VP continuous: s(t)² = 1/(1+σ(t)²)": (VP().scale(t) ** 2).numpy(),
    }


def shifted_alpha_bar_curves(shifts=(1, 2, 4, 8), beta_schedule: str = "cosine",
                             num_timesteps: int = 1000) -> dict[str, np.ndarray]:
    """alpha_bar_t of a DDPM schedule under simple diffusion's resolution shift (log-SNR - 2 log(shift),
    i.e. sigma_t x shift), e.g. shift = resolution / 64 for a schedule made for 64x64 images."""
    from ..formulations import DDPM, Shifted

    base = DDPM(num_timesteps=num_timesteps, beta_schedule=beta_schedule)
    curves = {}
    for shift in shifts:
        sigmas = Shifted(base, shift).sigma(torch.arange(num_timesteps, dtype=torch.float64)) if shift != 1 \
            else base.sigmas
        label = f"{beta_schedule}, shift {shift:g}" + (f" (e.g. {int(64 * shift)}² vs 64²)" if shift != 1 else "")
        curves[label] = (1 / (1 + sigmas ** 2)).numpy()
    return curves


@styled
def plot_alpha_bar(curves: Mapping[str, np.ndarray] | None = None) -> Figure:
    """sqrt(alpha_bar_t) (solid) and sqrt(1 - alpha_bar_t) (dashed) against t / T, and the equivalent
    EDM noise level sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) on a log axis.

    ``curves`` maps a label to alpha_bar at t = 1..T (a curve of length T is drawn at t / T, so
    schedules of different lengths share the axis); default :func:`default_alpha_bar_curves`.
    """
    curves = default_alpha_bar_curves() if curves is None else curves
    if not curves:
        raise ValueError("no curves to plot")
    fig = new_figure(11.5, 4.2)
    ax_scale, ax_sigma = fig.subplots(1, 2, gridspec_kw={"wspace": 0.22})
    for k, ((name, alpha_bar), color) in enumerate(zip(curves.items(), PALETTE)):
        a = np.clip(np.asarray(alpha_bar, dtype=np.float64).reshape(-1), 0.0, 1.0)
        t = np.arange(1, len(a) + 1) / len(a)
        width = max(1.3, 3.6 - 0.9 * k)  # later curves thinner, so coinciding ones stay visible
        ax_scale.plot(t, np.sqrt(a), "-", color=color, lw=width, label=name)
        ax_scale.plot(t, np.sqrt(1 - a), "--", color=color, lw=width)
        with np.errstate(divide="ignore"):
            sigma = np.sqrt((1 - a) / a)
        ok = np.isfinite(sigma) & (sigma > 0)
        ax_sigma.plot(t[ok], sigma[ok], "-", color=color, lw=width)
    ax_scale.set_xlabel("t / T")
    ax_scale.set_ylabel("scale")
    ax_scale.set_ylim(-0.02, 1.02)
    ax_scale.set_xlim(0, 1)
    ax_scale.set_title(r"Signal $\sqrt{\bar\alpha_t}$ (solid) and noise $\sqrt{1-\bar\alpha_t}$ (dashed)")
    ax_sigma.set_yscale("log")
    ax_sigma.set_xlim(0, 1)
    ax_sigma.set_xlabel("t / T")
    ax_sigma.set_ylabel(r"$\sigma_t = \sqrt{(1-\bar\alpha_t)/\bar\alpha_t}$")
    ax_sigma.set_title("The same schedules as EDM noise levels")
    for value, text, x, ha in ((80.0, "EDM σ_max = 80", 0.02, "left"),
                               (0.002, "EDM σ_min = 0.002", 0.98, "right")):
        ax_sigma.axhline(value, color="#888888", lw=0.8, ls=":")
        ax_sigma.text(x, value * 1.3, text, fontsize=8, color="#666666", ha=ha,
                      transform=ax_sigma.get_yaxis_transform())
    fig.legend(*ax_scale.get_legend_handles_labels(), loc="lower center", ncol=min(3, len(curves)),
               bbox_to_anchor=(0.5, -0.08), fontsize=8.5)
    return fig

