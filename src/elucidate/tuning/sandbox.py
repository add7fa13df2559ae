"""Sampler accuracy without a network: solve the exact probability-flow ODE of a Gaussian mixture
with every sampler x schedule and measure the RMSE to a converged solution (the analogue of
EDM Fig. 2, where the error is "distance to the true ODE solution" instead of FID)."""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from ..analytic import GaussianMixture
from ..data.bundled import load_digits_arrays
from ..sampling.registry import SAMPLERS, ode_samplers, sweep_samplers
from ..sampling.schedules import karras_sigmas, parse_schedule

__all__ = ["digits_mixture", "class_mixture", "sandbox_sweep"]


def digits_mixture(min_std: float = 0.02) -> GaussianMixture:
    """A 10-component diagonal Gaussian mixture fitted to the real 8x8 ``digits`` (one component per
    class, pixel range [-1, 1]): an image-like distribution whose exact denoiser is known."""
    images, labels = load_digits_arrays()
    x = torch.tensor(images, dtype=torch.float64).reshape(-1, 64) / 8.0 - 1.0
    return class_mixture(x, torch.tensor(labels), min_std)


def class_mixture(x: torch.Tensor, labels: torch.Tensor, min_std: float = 0.02) -> GaussianMixture:
    """One diagonal Gaussian per class of the rows of ``x`` (pixel means, stds floored at ``min_std``),
    weighted by class frequency."""
    classes = int(labels.max()) + 1
    means = torch.stack([x[labels == k].mean(0) for k in range(classes)])
    stds = torch.stack([x[labels == k].std(0) for k in range(classes)]).clamp_min(min_std)
    return GaussianMixture(means, stds, torch.bincount(labels, minlength=classes).double())


def sandbox_sweep(mixture: GaussianMixture | None = None, *, samplers: Sequence[str] | None = None,
                  schedules: Sequence[str] = ("karras", "exponential", "vp"),
                  nfes: Iterable[int] = (5, 10, 20, 35, 50, 100),
                  num_samples: int = 256, sigma_min: float = 0.002, sigma_max: float = 80.0,
                  reference_steps: int = 1000, seed: int = 0, progress: bool = False) -> list[dict]:
    """RMSE (per element) of each sampler x schedule at each NFE to the converged solution.

    ``schedules`` are registered names, optionally with options (``"karras:rho=3"``), all over one common
    range [sigma_min, sigma_max] so they share one exact solution: Heun with ``reference_steps`` Karras
    steps on the same ODE and initial noise. Returns rows ``{sampler, schedule, target_nfe, steps, nfe,
    rmse}`` (Heun's NFE is odd, so an even target uses one evaluation less).
    """
    samplers = sweep_samplers(deterministic=True) if samplers is None else list(samplers)
    for name in samplers:
        if name not in ode_samplers():
            raise ValueError(f"unknown or stochastic sampler {name!r}; the sandbox takes the deterministic "
                             f"samplers {ode_samplers()}")
    parsed = {name: parse_schedule(name) for name in schedules}
    mixture = mixture or digits_mixture()
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(num_samples, mixture.dim, generator=g, dtype=torch.float64) * sigma_max
    reference = SAMPLERS["heun"](mixture.denoise, x_T, karras_sigmas(reference_steps, sigma_min, sigma_max))
    jobs = [(sv, sc, n) for sv in samplers for sc in schedules for n in nfes]
    rows, done = [], set()
    iterator = jobs
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(jobs, desc="sandbox sweep", unit="run")
    for sampler, schedule, target in iterator:
        spec = SAMPLERS[sampler]
        steps = spec.steps_for_nfe(target)
        if (sampler, schedule, steps) in done:
            continue
        done.add((sampler, schedule, steps))
        named, options = parsed[schedule]
        x = spec(mixture.denoise, x_T, named(steps, sigma_min, sigma_max, **options))
        rmse = (x - reference).pow(2).mean().sqrt().item()
        rows.append({"sampler": sampler, "schedule": schedule, "target_nfe": target, "steps": steps,
                     "nfe": spec.nfe(steps), "rmse": rmse if math.isfinite(rmse) else float("inf")})
    return rows
