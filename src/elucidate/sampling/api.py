"""``sample()``: seeds -> initial noise -> sampler -> samples, with per-sample reproducibility."""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch

from ..errors import UserError
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
           batch_size: int | None = None, precision: str = "fp32", init: torch.Tensor | None = None,
           strength: float | None = None, **sampler_kwargs) -> torch.Tensor:
    """Generate ``shape[0]`` samples of shape ``shape[1:]`` with the named sampler: the one function that samples.

    The noise levels are ``sigmas`` if given, else the named ``schedule`` (a registered one, see
    :data:`SCHEDULES`, options after a colon: ``"karras:rho=3"``) with ``steps`` steps over ``[sigma_min,
    sigma_max]`` (``rho`` goes to schedules that take it). Sample i's initial noise and all its stochastic noise
    come from ``seeds[i]`` alone (default ``seeds = range(shape[0])``), so ``batch_size`` (samples per denoiser
    batch; default all at once) never changes a result. ``cond`` holds keyword arguments for the denoiser (e.g.
    ``class_labels``, one row per sample); ``precision`` is ``fp32``, ``bf16`` (autocast) or ``auto``; remaining
    keyword arguments go to the sampler (``s_churn``, ``eta``, ...). A denoiser with a ``round_sigma`` method (a
    network trained on a discrete sigma grid) gets its raised churn levels snapped to that grid.

    Image-to-image (SDEdit, Meng et al. 2022): with ``init`` (``shape``, or one sample of ``shape[1:]`` for all)
    and ``strength`` s in [0, 1], sampling starts at step ``N - ceil(s N)`` of the N-step schedule from
    ``init + sigma_start n`` (n: the seed's initial noise) and runs the remaining steps (diffusers' img2img
    convention): strength 1 starts from sigma_max, strength 0 returns ``init`` unchanged.
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
    sigmas = schedule_sigmas(sigmas, steps=steps, schedule=schedule, sigma_min=sigma_min, sigma_max=sigma_max,
                             rho=rho)
    if init is not None or strength is not None:
        init = check_init(init, shape, strength)
        first = img2img_start(len(sigmas) - 1, strength)
        if first == len(sigmas) - 1:  # strength 0: nothing to run
            return init.clone()
        sampler_kwargs = churn_for_slice(spec, sampler_kwargs, len(sigmas) - 1, len(sigmas) - 1 - first)
        sigmas = sigmas[first:]
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
            if init is not None:  # SDEdit: x = init + sigma_start n
                x = _rows(init, start, len(chunk), len(seeds)).to(device, dtype) + x
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


def schedule_sigmas(sigmas=None, *, steps: int = 18, schedule: str = "karras", sigma_min: float = 0.002,
                    sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """``sigmas`` as float64, else the named ``schedule``'s ``steps`` levels over [sigma_min, sigma_max]."""
    if sigmas is None:
        named, options = parse_schedule(schedule)
        if "rho" in named.options:
            options.setdefault("rho", rho)
        sigmas = named(steps, sigma_min, sigma_max, **options)
    return torch.as_tensor(sigmas, dtype=torch.float64)


def check_init(init, shape: tuple, strength) -> torch.Tensor:
    """``init`` as a tensor of ``shape`` (or ``shape[1:]``, shared by all samples), strength in [0, 1]."""
    if init is None or strength is None:
        raise UserError("image-to-image needs both init= (the input images) and strength= (0 to 1)")
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
        raise UserError(f"strength must be a number in [0, 1] (0 returns the input, 1 ignores it), got {strength!r}")
    init = torch.as_tensor(init)
    if tuple(init.shape) not in (shape, shape[1:]):
        raise UserError(f"init has shape {list(init.shape)} but the samples have shape {list(shape)} "
                        f"(or give one {list(shape[1:])} for all)")
    if not torch.is_floating_point(init) or not torch.isfinite(init).all():
        raise UserError("init must be finite floating-point values")
    return init if init.ndim == len(shape) else init[None].expand(shape)


def img2img_start(num_steps: int, strength: float) -> int:
    """The step SDEdit starts at: ``N - ceil(strength N)`` (diffusers' img2img; 1 = sigma_max, 0 = the end)."""
    return num_steps - math.ceil(strength * num_steps - 1e-9)  # tolerance: 0.3 * 10 = 3.0000000000000004


def churn_for_slice(spec, kwargs: dict, total: int, part: int) -> dict:
    """Sampler options for ``part`` of ``total`` steps: S_churn scaled so gamma_i = S_churn / N stays the
    full schedule's (EDM Algorithm 2 divides by the steps it is given)."""
    if kwargs.get("s_churn") and spec.takes("s_churn") and part != total:
        return {**kwargs, "s_churn": kwargs["s_churn"] * part / total}
    return kwargs


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
