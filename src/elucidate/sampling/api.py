"""``sample()``: seeds -> initial noise -> solver -> samples, with per-sample reproducibility."""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from .registry import PLUMBING, get_solver
from .schedules import karras_sigmas
from .solvers import num_steps

__all__ = ["sample", "get_sampler", "SeededNoise"]


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    """A solver function by name (ValueError listing the choices if unknown)."""
    return get_solver(name).fn


class SeededNoise:
    """Standard normal draws where row i always comes from its own generator seeded with seeds[i].

    Calling it (as a solver's ``noise_sampler``) returns the next ``[B, *shape]`` draw, so every
    sample's initial and stochastic noise depend on its seed only, never on the batch it is in. Draws
    are made in float32 and cast (as NVlabs/edm does), so float32 and float64 sampling of a seed start
    from the same noise.
    """

    def __init__(self, seeds: Sequence[int], shape: Sequence[int], *, device=None,
                 dtype: torch.dtype = torch.float32):
        self.shape = tuple(shape)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.generators = [torch.Generator(self.device).manual_seed(int(seed)) for seed in seeds]

    def __call__(self, sigma=None, sigma_next=None) -> torch.Tensor:
        draw = torch.float32 if self.dtype in (torch.float32, torch.float64) else self.dtype
        return torch.stack([torch.randn(self.shape, generator=g, device=self.device, dtype=draw)
                            for g in self.generators]).to(self.dtype)


def sample(denoiser: Callable[..., torch.Tensor], shape: Sequence[int], *, sampler: str = "heun",
           steps: int = 18, sigmas: torch.Tensor | None = None, sigma_min: float = 0.002,
           sigma_max: float = 80.0, rho: float = 7.0, seeds: Sequence[int] | None = None,
           dtype: torch.dtype = torch.float32, device=None, progress: bool = False,
           cond: dict | None = None, callback: Callable[[dict], None] | None = None,
           **solver_kwargs) -> torch.Tensor:
    """Generate ``shape[0]`` samples of shape ``shape[1:]`` with the named solver.

    The schedule is ``sigmas`` if given, else ``karras_sigmas(steps, sigma_min, sigma_max, rho)``.
    Sample i's initial noise and all its stochastic noise come from ``seeds[i]`` alone (default
    ``seeds = range(shape[0])``). ``cond`` holds keyword arguments for the denoiser (e.g.
    ``class_labels``); remaining keyword arguments go to the solver (``s_churn``, ``eta``, ...). A
    denoiser with a ``round_sigma`` method (a network trained on a discrete sigma grid) gets its raised
    churn levels snapped to that grid.
    """
    spec = get_solver(sampler)
    shape = tuple(int(n) for n in shape)
    if len(shape) < 2 or any(n < 1 for n in shape):
        raise ValueError(f"shape must be [batch, *sample_shape] with positive sizes, got {shape}")
    seeds = list(range(shape[0])) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != shape[0]:
        raise ValueError(f"seeds has {len(seeds)} entries but shape asks for a batch of {shape[0]}")
    unknown = [k for k in solver_kwargs if not spec.takes(k)]
    if unknown:
        raise ValueError(f"sampler {sampler!r} does not take {unknown}; it takes {sorted(spec.options)} "
                         f"(and {[p for p in PLUMBING if spec.takes(p)]})")
    if device is None:
        device = _module_device(denoiser)
    if sigmas is None:
        sigmas = karras_sigmas(steps, sigma_min, sigma_max, rho)
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    total = num_steps(sigmas)

    noise = SeededNoise(seeds, shape[1:], device=device, dtype=dtype)
    x = noise() * float(sigmas[0])
    if spec.takes("noise_sampler") and "noise_sampler" not in solver_kwargs:
        solver_kwargs["noise_sampler"] = noise
    if spec.takes("round_sigma") and "round_sigma" not in solver_kwargs:
        solver_kwargs["round_sigma"] = getattr(denoiser, "round_sigma", None)
    D = functools.partial(denoiser, **cond) if cond else denoiser

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc=f"sampling ({sampler})", unit="step", leave=False)

    def on_step(info: dict) -> None:
        if bar is not None:
            bar.update(1)
        if callback is not None:
            callback(info)

    try:
        return spec.fn(D, x, sigmas, callback=on_step, **solver_kwargs)
    finally:
        if bar is not None:
            bar.close()


def _module_device(denoiser) -> torch.device:
    if isinstance(denoiser, torch.nn.Module):
        for p in denoiser.parameters():
            return p.device
    return torch.device("cpu")
