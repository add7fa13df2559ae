"""Sampling a trained model with a run's ``sampling`` settings: schedule, batching, conversion."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch

from .config import SamplingConfig
from .denoiser import Guided
from .errors import UserError
from .formulations import Formulation
from .precision import resolve_precision
from .sampling import get_schedule, iddpm_sigmas, karras_sigmas, sample, vp_range_sigmas

__all__ = ["schedule_for", "generate", "parse_seeds", "autocast_for", "check_finite", "NonFiniteSamples"]


class NonFiniteSamples(UserError):
    """Sampling produced NaN/Inf (a diverged model or an unstable sampler setting)."""


def check_finite(x: torch.Tensor, seeds: Sequence[int]) -> None:
    """Raise :class:`NonFiniteSamples` naming how many samples (and which seeds) hold NaN/Inf."""
    bad = ~torch.isfinite(x.reshape(len(x), -1)).all(dim=1)
    if bool(bad.any()):
        which = [int(s) for s, b in zip(seeds, bad.tolist()) if b]
        shown = ", ".join(map(str, which[:5])) + (", ..." if len(which) > 5 else "")
        raise NonFiniteSamples(f"{len(which)} of {len(x)} samples contain NaN/Inf (seeds {shown}): the model or the "
                               f"sampler settings diverged; nothing was written")


def schedule_for(cfg: SamplingConfig, formulation: Formulation, *, device=None) -> torch.Tensor:
    """The sigmas the config asks for (float64, ending in 0): ``cfg.sigmas`` if given (a tuned schedule).

    ``schedule: auto`` with no range override is the formulation's own discretization (EDM Table 1).
    A named schedule (or ``auto`` with ``sigma_min``/``sigma_max``/``rho`` given, which means Karras)
    spans ``cfg.sigma_min``..``cfg.sigma_max`` (default: the paper's 0.002..80) clipped to the range the
    network supports, as EDM's sampler does. Levels are then snapped to the network's grid (iDDPM)
    and repeated levels dropped, so every step costs evaluations and moves.
    """
    own = cfg.schedule == "auto" and cfg.sigma_min is None and cfg.sigma_max is None and cfg.rho is None
    if cfg.sigmas is not None:  # explicit levels (a tuned schedule) override the rest
        sigmas = torch.tensor(cfg.sigmas, dtype=torch.float64)
    elif own:
        sigmas = formulation.sampling_sigmas(cfg.steps)
    else:
        lo, hi = formulation.schedule_range(cfg.sigma_min, cfg.sigma_max)
        if not lo < hi:
            raise UserError(f"sampling range [{cfg.sigma_min}, {cfg.sigma_max}] lies outside the range the "
                            f"model supports [{formulation.supported_range[0]:.4g}, "
                            f"{formulation.supported_range[1]:.4g}]")
        name = "karras" if cfg.schedule == "auto" else cfg.schedule
        if name == "karras":
            sigmas = karras_sigmas(cfg.steps, lo, hi, cfg.rho or getattr(formulation, "rho", 7.0))
        elif name == "vp":
            sigmas = vp_range_sigmas(cfg.steps, lo, hi)
        elif name == "iddpm":
            grid = {k: getattr(formulation, k) for k in ("C_1", "C_2", "M") if hasattr(formulation, k)}
            sigmas = iddpm_sigmas(cfg.steps, lo, hi, **grid)
        else:
            sigmas = get_schedule(name)(cfg.steps, lo, hi)
    sigmas = torch.cat([formulation.round_sigma(sigmas[:-1]), sigmas[-1:]])  # discrete nets: known levels only
    sigmas = torch.unique_consecutive(sigmas)  # a level repeated by rounding would be a zero-length step
    return sigmas if device is None else sigmas.to(device)


def autocast_for(precision: str, device: torch.device):
    """bf16 autocast context if ``precision`` resolves to bf16 on ``device`` (:func:`.precision.resolve_precision`:
    ``auto`` is bf16 only where the hardware has it), else a no-op."""
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def generate(denoiser: Callable[..., torch.Tensor], formulation: Formulation, shape: Sequence[int],
             seeds: Sequence[int], cfg: SamplingConfig, *, batch_size: int = 64, device=None,
             class_labels: torch.Tensor | None = None, precision: str = "fp32", progress: bool = False,
             callback: Callable[[dict], None] | None = None) -> torch.Tensor:
    """Samples ``[len(seeds), *shape]`` in model range, in batches; sample i depends on seeds[i] only."""
    seeds = list(seeds)
    sigmas = schedule_for(cfg, formulation)
    if cfg.guidance != 1:
        denoiser = Guided(denoiser, cfg.guidance)
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


#: the most seeds one range may name (a typo such as 0-10000000000 must not exhaust memory)
MAX_SEEDS = 10_000_000


def parse_seeds(text: str) -> list[int]:
    """'0-63' -> [0..63]; '1,5,9' and '0-9,20-29' also work."""
    seeds: list[int] = []
    try:
        for part in str(text).split(","):
            part = part.strip()
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, "")
                lo_i, hi_i = int(lo), int(hi)
                if hi_i < lo_i or hi_i - lo_i >= MAX_SEEDS:
                    raise ValueError
                seeds.extend(range(lo_i, hi_i + 1))
            elif part:
                seeds.append(int(part))
    except ValueError:
        raise ValueError(f"seeds {text!r}: expected e.g. 0-63 or 1,5,9 (at most {MAX_SEEDS:,} per range)") from None
    if not seeds:
        raise ValueError(f"seeds {text!r}: no seeds given")
    if min(seeds) < 0 or max(seeds) >= 2**63:
        raise ValueError(f"seeds {text!r}: seeds must be in 0..2**63-1")
    return seeds
