"""Sampling a trained model with a run's ``sampling`` settings: schedule, batching, conversion."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch

from .config import SamplingConfig
from .formulations import Formulation
from .sampling import get_schedule, sample, vp_range_sigmas

__all__ = ["schedule_for", "generate", "to_uint8", "to_pixels", "parse_seeds", "autocast_for"]


def schedule_for(cfg: SamplingConfig, formulation: Formulation, *, device=None) -> torch.Tensor:
    """The sigmas the config asks for: the formulation's own discretization (``schedule: auto``)
    or a named one over the formulation's (or the config's) sigma range."""
    lo = cfg.sigma_min if cfg.sigma_min is not None else formulation.sigma_min
    hi = cfg.sigma_max if cfg.sigma_max is not None else formulation.sigma_max
    if cfg.schedule == "auto" and cfg.sigma_min is None and cfg.sigma_max is None and cfg.rho is None:
        sigmas = formulation.sampling_sigmas(cfg.steps)
    elif cfg.schedule in ("auto", "karras"):
        sigmas = get_schedule("karras")(cfg.steps, lo, hi, cfg.rho or getattr(formulation, "rho", 7.0))
    elif cfg.schedule == "vp":
        sigmas = vp_range_sigmas(cfg.steps, lo, hi)
    else:
        sigmas = get_schedule(cfg.schedule)(cfg.steps, lo, hi)
    sigmas = torch.cat([formulation.round_sigma(sigmas[:-1]), sigmas[-1:]])  # discrete nets: known levels only
    return sigmas if device is None else sigmas.to(device)


def autocast_for(precision: str, device: torch.device):
    """bf16 autocast context for ``precision == 'bf16'``, else a no-op."""
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def generate(denoiser: Callable[..., torch.Tensor], formulation: Formulation, shape: Sequence[int],
             seeds: Sequence[int], cfg: SamplingConfig, *, batch_size: int = 64, device=None,
             class_labels: torch.Tensor | None = None, precision: str = "fp32", progress: bool = False,
             callback: Callable[[dict], None] | None = None) -> torch.Tensor:
    """Samples ``[len(seeds), *shape]`` in model range, in batches; sample i depends on seeds[i] only."""
    seeds = list(seeds)
    sigmas = schedule_for(cfg, formulation)
    device = torch.device(device) if device is not None else torch.device("cpu")
    out = []
    batches = range(0, len(seeds), batch_size)
    bar = None
    if progress and len(batches) > 1:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(seeds), desc="sampling", unit="img")
    for start in batches:
        chunk = seeds[start:start + batch_size]
        cond = {}
        if class_labels is not None:
            cond["class_labels"] = class_labels[start:start + batch_size].to(device)
        with autocast_for(precision, device):
            x = sample(denoiser, (len(chunk), *shape), sampler=cfg.sampler, sigmas=sigmas, seeds=chunk,
                       device=device, cond=cond or None, progress=progress and bar is None,
                       callback=callback, **cfg.solver_kwargs())
        out.append(x.float().cpu())
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return torch.cat(out)


def to_uint8(x: torch.Tensor, normalizer=None) -> torch.Tensor:
    """Model-range images ``[N, C, H, W]`` -> uint8 ``[N, H, W, C]`` (through the dataset's normalizer
    when it knows the stored value range, else assuming [-1, 1])."""
    if normalizer is not None and normalizer.value_range is not None:
        pixels = normalizer.to_uint8(x)
    else:
        pixels = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous()


def to_pixels(x: torch.Tensor, normalizer=None) -> torch.Tensor:
    """Model-range images ``[N, C, H, W]`` -> float ``[N, C, H, W]`` pixel values 0..255 (what the
    feature networks take), quantized exactly like the PNGs and ``.npz`` files we write."""
    return to_uint8(x, normalizer).permute(0, 3, 1, 2).float()


def parse_seeds(text: str) -> list[int]:
    """'0-63' -> [0..63]; '1,5,9' and '0-9,20-29' also work."""
    seeds: list[int] = []
    try:
        for part in str(text).split(","):
            part = part.strip()
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, "")
                lo_i, hi_i = int(lo), int(hi)
                if hi_i < lo_i:
                    raise ValueError
                seeds.extend(range(lo_i, hi_i + 1))
            elif part:
                seeds.append(int(part))
    except ValueError:
        raise ValueError(f"seeds {text!r}: expected e.g. 0-63 or 1,5,9") from None
    if not seeds:
        raise ValueError(f"seeds {text!r}: no seeds given")
    return seeds
