"""``inpaint()``: fill the unknown part of images with a denoiser trained on whole images (RePaint).

RePaint (Lugmayr et al. 2022, Algorithm 1) in EDM's sigma space (scale s(t) = 1, which is what samplers see):
each step sigma_i -> sigma_{i+1} of any single-step sampler is followed by replacing the kept region with
``known + sigma_{i+1} n``, and is repeated ``resample`` times by re-noising the result back to sigma_i,
x_i = x_{i+1} + sqrt(sigma_i^2 - sigma_{i+1}^2) n, which lets the generated part agree with the kept part.
``resample = 1`` is the plain replacement method (latent diffusion's DDIM ``mask``/``x0``).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch

from ..errors import UserError
from ..runtime.precision import autocast_for
from .api import SeededNoise, _module_device, _rows, churn_for_slice, schedule_sigmas
from .registry import PLUMBING, SAMPLERS, get_sampler
from .solvers import check_sigmas

__all__ = ["inpaint", "stepwise_samplers"]

def stepwise_samplers() -> tuple[str, ...]:
    """The registered samplers whose step from sigma_i to sigma_{i+1} depends on x_i alone, so running them one step
    at a time (as RePaint's restarts do) is the same sampler. Multistep samplers (declared ``multistep=True``:
    dpmpp_2m, lms, ipndm, unipc, ...) keep a history of earlier denoiser outputs, which every replacement and
    re-noising would make stale."""
    return tuple(name for name, spec in SAMPLERS.items() if not spec.multistep)


def inpaint(denoiser: Callable[..., torch.Tensor], known: torch.Tensor, mask: torch.Tensor, *, sampler: str = "heun",
            steps: int = 50, resample: int = 10, seeds: Sequence[int] | None = None, cond: dict | None = None,
            sigmas: torch.Tensor | None = None, schedule: str = "karras", sigma_min: float = 0.002,
            sigma_max: float = 80.0, rho: float = 7.0, dtype: torch.dtype = torch.float32, device=None,
            callback: Callable[[dict], None] | None = None, batch_size: int | None = None, precision: str = "fp32",
            **options) -> torch.Tensor:
    """Complete ``known`` ([B, *shape]) where ``mask`` is 0, keeping it exactly where ``mask`` is 1.

    ``mask`` broadcasts against ``known`` (e.g. [H, W], [1, 1, H, W] or [B, C, H, W]; values in [0, 1]). The noise
    levels are ``sigmas`` or the named ``schedule`` as in :func:`~elucidate.sampling.sample`; ``resample`` is
    RePaint's U (jumps of length 1), so the sampler runs ``resample`` times per step (but once on the final step
    into sigma = 0, as in RePaint). Sample i's noise comes from ``seeds[i]`` alone (default ``range(B)``), so
    ``batch_size`` (images per denoiser batch) never changes a result; ``cond`` has one row per image.
    ``sampler`` is one of :func:`stepwise_samplers`; ``options`` go to it (``s_churn``, ``eta``, ...).
    """
    if get_sampler(sampler).multistep:  # (an unknown name: the usual error listing the choices)
        raise UserError(f"inpainting restarts the sampler at every step, which {sampler!r} (a multistep sampler) "
                        f"does not allow; use one of {', '.join(stepwise_samplers())}")
    spec = get_sampler(sampler)
    unknown = [k for k in options if not spec.takes(k) or k in PLUMBING]
    if unknown:
        raise UserError(f"sampler {sampler!r} does not take {unknown}; it takes {sorted(spec.options)}")
    if isinstance(resample, bool) or not isinstance(resample, int) or resample < 1:
        raise UserError(f"resample must be an integer >= 1 (1 = plain replacement), got {resample!r}")
    known = torch.as_tensor(known)
    if known.ndim < 2 or not torch.is_floating_point(known) or not torch.isfinite(known).all():
        raise UserError(f"known must be finite floating-point images [batch, ...], got shape {list(known.shape)}")
    mask = _check_mask(mask, known)
    seeds = list(range(known.shape[0])) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != known.shape[0]:
        raise UserError(f"seeds has {len(seeds)} entries but known has {known.shape[0]} images")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise UserError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    device = _module_device(denoiser) if device is None else torch.device(device)
    t = check_sigmas(schedule_sigmas(sigmas, steps=steps, schedule=schedule, sigma_min=sigma_min,
                                     sigma_max=sigma_max, rho=rho))
    options = churn_for_slice(spec, options, len(t) - 1, 1)
    known = known.to(device, dtype)
    mask = mask.to(device, dtype).expand(known.shape)
    batch, out = batch_size or len(seeds), []
    for start in range(0, len(seeds), batch):  # sample i's noise comes from seeds[i]: batches change nothing
        rows = slice(start, start + batch)
        part = {k: _rows(v, start, len(seeds[rows]), len(seeds)) for k, v in (cond or {}).items()}
        D = functools.partial(denoiser, **part) if part else denoiser
        with autocast_for(precision, device):
            out.append(_repaint(spec, D, known[rows], mask[rows], t, resample, seeds[rows], options, callback,
                                getattr(denoiser, "round_sigma", None)))
    return out[0] if len(out) == 1 else torch.cat(out)


def _repaint(spec, D, known, mask, t: list[float], resample: int, seeds: list[int], options: dict, callback,
             round_sigma) -> torch.Tensor:
    """RePaint (Lugmayr et al. 2022, Algorithm 1, jumps of length 1) over the levels ``t`` for one batch."""
    noise = SeededNoise(seeds, known.shape[1:], device=known.device, dtype=known.dtype)
    options = dict(options)
    if spec.takes("noise_sampler"):
        options["noise_sampler"] = noise
    if spec.takes("round_sigma"):
        options["round_sigma"] = round_sigma

    def keep(x: torch.Tensor, sigma: float) -> torch.Tensor:
        # RePaint eq. 8: x_known ~ q(x_sigma | x0) = known + sigma n; x = m x_known + (1 - m) x_unknown
        if sigma == 0:
            return torch.where(mask == 1, known, mask * known + (1 - mask) * x)
        return mask * (known + sigma * noise()) + (1 - mask) * x

    x = keep(noise() * t[0], t[0])
    for i in range(len(t) - 1):
        if t[i + 1] == t[i]:  # zero-length step
            continue
        repeats = resample if t[i + 1] > 0 else 1  # RePaint: no resampling of the last step (t = 1)
        for u in range(repeats):
            x = keep(spec.fn(D, x, torch.tensor(t[i:i + 2], dtype=torch.float64), **options), t[i + 1])
            if callback is not None:
                callback({"x": x, "i": i, "u": u, "sigma": t[i + 1]})
            if u < repeats - 1:  # RePaint Algorithm 1 line 10: back from sigma_{i+1} to sigma_i
                x = x + math.sqrt(t[i] ** 2 - t[i + 1] ** 2) * noise()
    return x


def _check_mask(mask, known: torch.Tensor) -> torch.Tensor:
    """``mask`` as a float tensor that broadcasts to ``known``'s shape with values in [0, 1]."""
    mask = torch.as_tensor(mask)
    mask = mask.float() if mask.dtype == torch.bool or not torch.is_floating_point(mask) else mask
    try:
        torch.broadcast_shapes(mask.shape, known.shape)
        if torch.broadcast_shapes(mask.shape, known.shape) != known.shape:
            raise RuntimeError
    except RuntimeError:
        raise UserError(f"mask has shape {list(mask.shape)}, which does not broadcast to the images' "
                        f"{list(known.shape)} (give [H, W], [1, 1, H, W] or one per image)") from None
    if not torch.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
        raise UserError("mask values must be in [0, 1] (1 = keep the known pixel, 0 = fill it in)")
    return mask
