"""``sample()``: seeds -> initial noise -> sampler -> samples, with per-sample reproducibility."""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from ..runtime.precision import autocast_for
from .registry import PLUMBING, get_sampler
from .schedules import parse_schedule
from .solvers import num_steps

__all__ = ["sample", "SeededNoise"]


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
           steps: int = 18, sigmas: torch.Tensor | None = None, schedule: str = "karras", sigma_min: float = 0.002,
           sigma_max: float = 80.0, rho: float = 7.0, seeds: Sequence[int] | None = None,
           dtype: torch.dtype = torch.float32, device=None, progress: bool = False,
           cond: dict | None = None, callback: Callable[[dict], None] | None = None,
           batch_size: int | None = None, precision: str = "fp32", **sampler_kwargs) -> torch.Tensor:
    """Generate ``shape[0]`` samples of shape ``shape[1:]`` with the named sampler: the one function that samples.

    The noise levels are ``sigmas`` if given, else the named ``schedule`` (a registered one, see
    :data:`SCHEDULES`, options after a colon: ``"karras:rho=3"``) with ``steps`` steps over ``[sigma_min,
    sigma_max]`` (``rho`` goes to schedules that take it). Sample i's initial noise and all its stochastic noise
    come from ``seeds[i]`` alone (default ``seeds = range(shape[0])``), so ``batch_size`` (samples per denoiser
    batch; default all at once) never changes a result. ``cond`` holds keyword arguments for the denoiser (e.g.
    ``class_labels``, one row per sample); ``precision`` is ``fp32``, ``bf16`` (autocast) or ``auto``; remaining
    keyword arguments go to the sampler (``s_churn``, ``eta``, ...). A denoiser with a ``round_sigma`` method (a
    network trained on a discrete sigma grid) gets its raised churn levels snapped to that grid.
    """
    spec = get_sampler(sampler)
    shape = tuple(int(n) for n in shape)
    if len(shape) < 2 or any(n < 1 for n in shape):
        raise ValueError(f"shape must be [batch, *sample_shape] with positive sizes, got {shape}")
    seeds = list(range(shape[0])) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != shape[0]:
        raise ValueError(f"seeds has {len(seeds)} entries but shape asks for a batch of {shape[0]}")
    unknown = [k for k in sampler_kwargs if not spec.takes(k)]
    if unknown:
        raise ValueError(f"sampler {sampler!r} does not take {unknown}; it takes {sorted(spec.options)} "
                         f"(and {[p for p in PLUMBING if spec.takes(p)]})")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if device is None:
        device = _module_device(denoiser)
    if sigmas is None:
        named, options = parse_schedule(schedule)
        if "rho" in named.options:
            options.setdefault("rho", rho)
        sigmas = named(steps, sigma_min, sigma_max, **options)
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    total = num_steps(sigmas)
    cond = cond or {}
    batch = batch_size or len(seeds)
    starts = range(0, len(seeds), batch)

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = (tqdm(total=total, desc=f"sampling ({sampler})", unit="step", leave=False) if len(starts) == 1 else
               tqdm(total=len(seeds), desc=f"sampling ({sampler})", unit="img"))

    def on_step(info: dict) -> None:
        if bar is not None and len(starts) == 1:
            bar.update(1)
        if callback is not None:
            callback(info)

    out = []
    try:
        for start in starts:
            chunk = seeds[start:start + batch]
            noise = SeededNoise(chunk, shape[1:], device=device, dtype=dtype)
            x = noise() * float(sigmas[0])
            kwargs = dict(sampler_kwargs)
            if spec.takes("noise_sampler") and "noise_sampler" not in kwargs:
                kwargs["noise_sampler"] = noise
            if spec.takes("round_sigma") and "round_sigma" not in kwargs:
                kwargs["round_sigma"] = getattr(denoiser, "round_sigma", None)
            part = {k: _rows(v, start, len(chunk), len(seeds)) for k, v in cond.items()}
            D = functools.partial(denoiser, **part) if part else denoiser
            with autocast_for(precision, device):
                out.append(spec.fn(D, x, sigmas, callback=on_step, **kwargs))
            if bar is not None and len(starts) > 1:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    return out[0] if len(out) == 1 else torch.cat(out)


def _rows(value, start: int, count: int, total: int):
    """Rows ``start:start + count`` of a per-sample condition (tensors with one row per sample); others as given."""
    if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == total:
        return value[start:start + count].to(value.device)
    return value


def _module_device(denoiser) -> torch.device:
    if isinstance(denoiser, torch.nn.Module):
        for p in denoiser.parameters():
            return p.device
    return torch.device("cpu")
