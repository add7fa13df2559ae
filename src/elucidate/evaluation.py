"""Evaluate a trained run: sample with per-sample seeds, extract features, compare with reference
data or statistics (FD / FID, KID, precision-recall), and sweep samplers over NFE."""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from .config import SamplingConfig
from .errors import UserError
from .generate import check_finite, generate
from .metrics.features import feature_extractor
from .model import LoadedRun
from .pixels import to_pixels
from .sampling.registry import get_solver, steps_for_nfe
from .sampling.solvers import num_steps

__all__ = ["METRICS", "Metric", "register_metric", "get_metric", "Reference", "feature_name", "load_reference",
           "sample_features", "compute_metric", "evaluate", "sweep", "feature_extractor", "solver_nfe"]

@dataclasses.dataclass(frozen=True)
class Metric:
    """A sample-quality metric: its feature network (None = chosen per run, see :func:`feature_name`),
    whether it needs reference features (not just statistics), and how it compares two sets."""

    name: str
    description: str
    features: str | None
    compute: Callable[..., dict]
    needs_features: bool = False


#: name -> Metric; ``register_metric`` adds one (CLI choices and docs follow).
METRICS: dict[str, Metric] = {}
#: The default feature network of kid/pr per dataset (Inception otherwise).
DATASET_FEATURES = {"digits": "fd_digits", "mnist": "fd_mnist"}
#: ``--features`` names -> feature extractor names.
FEATURE_ALIASES = {"digits": "fd_digits", "mnist": "fd_mnist", "inception": "inception"}


def register_metric(name: str, description: str, *, features: str | None = None, needs_features: bool = False):
    """Declare ``compute(stats, ref) -> {"value": ..., ...}`` as the metric ``name``."""
    def decorate(fn):
        METRICS[name] = Metric(name, description, features, fn, needs_features)
        return fn
    return decorate


def _frechet(stats, ref) -> dict:
    from .metrics import frechet_distance

    if stats.mean.shape != ref.mu.shape:
        raise UserError(f"reference {ref.source} has {ref.mu.shape[0]}-d features but the extractor gives "
                        f"{stats.mean.shape[0]}-d; use statistics computed with the same feature network")
    return {"value": frechet_distance(stats.mean, stats.cov, ref.mu, ref.sigma)}


register_metric("fd_digits", "Frechet distance in the bundled digits classifier's features (offline)",
                features="fd_digits")(_frechet)
register_metric("fd_mnist", "Frechet distance in the bundled 28x28 MNIST classifier's features (offline)",
                features="fd_mnist")(_frechet)
register_metric("fid", "FID: Frechet distance in Inception-v3 features (weights from a local file)",
                features="inception")(_frechet)


@register_metric("kid", "Kernel Inception Distance (unbiased; digits or Inception features)", needs_features=True)
def _kid(stats, ref) -> dict:
    from .metrics import kid

    mean, std = kid(stats.features, ref.features, subset_size=min(1000, len(stats.features), len(ref.features)))
    return {"value": float(mean), "std": float(std)}


@register_metric("pr", "improved precision and recall (value = precision)", needs_features=True)
def _precision_recall(stats, ref) -> dict:
    from .metrics import precision_recall

    precision, recall = precision_recall(ref.features, stats.features)
    return {"value": float(precision), "precision": float(precision), "recall": float(recall)}


def get_metric(name: str) -> Metric:
    """A registered metric by name (UserError listing the choices)."""
    if name not in METRICS:
        raise UserError(f"unknown metric {name!r}; expected one of {list(METRICS)}")
    return METRICS[name]


def feature_name(metric: str, features: str | None, run_dataset: str | None = None) -> str:
    """The feature network a metric uses: its own if it has one, else ``features`` (``--features``),
    else the dataset's default (digits -> the digits classifier), else Inception."""
    spec = get_metric(metric)
    if spec.features is not None:
        return spec.features
    if features is not None:
        if features not in FEATURE_ALIASES:
            raise UserError(f"--features {features!r}: expected one of {list(FEATURE_ALIASES)}")
        return FEATURE_ALIASES[features]
    return DATASET_FEATURES.get(run_dataset, "inception")


@dataclasses.dataclass
class Reference:
    """Reference side of a comparison: statistics, and features when KID / PR need them."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None
    source: str


def _dataset_from_spec(spec: str):
    from .data import build_dataset, data_section_for

    section = data_section_for(spec)
    if section is not None:
        return build_dataset(section)
    raise UserError(f"reference {spec!r}: expected 'digits', 'mnist', an image folder, a .zip, an .npz/.npy array "
                    f"or an .npz of statistics (mu, sigma)")


def _pixels(dataset) -> torch.Tensor:
    """All images of a dataset as float [N, C, H, W] in 0..255 (no x-flip copies)."""
    n = getattr(dataset, "num_images", len(dataset))
    x, _ = dataset.get_batch(torch.arange(n))
    return to_pixels(x, dataset.normalizer)


def load_reference(spec: str | Path, extractor_name: str, *, inception: str | None = None, device=None,
                   need_features: bool = False) -> Reference:
    """Reference statistics from an ``.npz`` with ``mu``/``sigma`` (optionally ``features``) or
    from a dataset spec (``digits``, a folder, a zip, an array file)."""
    spec = str(spec)
    if spec.endswith(".npz") and Path(spec).is_file():
        with np.load(spec, allow_pickle=False) as data:
            if "mu" in data.files and "sigma" in data.files:
                feats = data["features"] if "features" in data.files else None
                if need_features and feats is None:
                    raise UserError(f"{spec} holds statistics only; KID / precision-recall need features "
                                    f"(write them with `elucidate ref ... --keep-features`) or the data itself")
                return Reference(data["mu"].astype(np.float64), data["sigma"].astype(np.float64), feats, spec)
    from .metrics import compute_stats

    stats = compute_stats(feature_extractor(extractor_name, inception, device), _pixels(_dataset_from_spec(spec)),
                          keep_features=True)
    return Reference(stats.mean, stats.cov, stats.features, spec)


def solver_nfe(cfg: SamplingConfig, formulation) -> int:
    """Denoiser evaluations per image of ``cfg`` on this formulation (from the schedule actually used:
    levels merged by rounding to a discrete grid cost nothing)."""
    from .generate import schedule_for

    return get_solver(cfg.sampler).nfe(num_steps(schedule_for(cfg, formulation)))


def sample_features(run: LoadedRun, extractor, seeds: Sequence[int], cfg: SamplingConfig, *,
                    batch_size: int = 250, device=None, progress: bool = False):
    """Generate ``len(seeds)`` samples and return their FeatureStats (features kept)."""
    from .distributed_sampling import map_batches, world
    from .metrics import FeatureStats

    stats = FeatureStats(keep_features=True)
    label_dim = int(getattr(run.denoiser.net, "label_dim", 0) or 0)
    seeds = list(seeds)
    show = progress and world()[0] == 0
    done = 0

    def features(b: range) -> torch.Tensor:  # under torchrun each rank computes its own batches
        nonlocal done
        chunk = seeds[b.start:b.stop]
        labels = torch.tensor(chunk) % label_dim if label_dim else None
        x = generate(run.denoiser, run.denoiser.formulation, run.shape, chunk, cfg, batch_size=batch_size,
                     device=device, class_labels=labels)
        check_finite(x, chunk)  # a diverged model must not get a metric
        x = run.images(x)  # a latent run is measured on its decoded images
        done += len(chunk)
        if show:
            print(f"\r  sampled {done}/{len(seeds)} (this process)", end="", flush=True)
        return extractor(to_pixels(x, run.normalizer))

    for batch in map_batches(features, len(seeds), batch_size):  # gathered in seed order: stats as one process
        stats.update(batch)
    if show:
        print()
    return stats


def compute_metric(metric: str, stats, ref: Reference) -> dict:
    """The metric's value(s) for generated ``stats`` against ``ref``."""
    return get_metric(metric).compute(stats, ref)


def evaluate(run: LoadedRun, metric: str, *, num: int, ref: Reference, extractor, cfg: SamplingConfig,
             repeats: int = 1, batch_size: int = 250, device=None, progress: bool = False) -> dict:
    """The metric over ``repeats`` disjoint seed ranges (0..num-1, num..2num-1, ...): each value,
    their mean and min (the EDM paper reports the min of three)."""
    if num < 2:
        raise UserError(f"--num must be >= 2, got {num}")
    values, extras = [], []
    t0 = time.perf_counter()
    for r in range(repeats):
        stats = sample_features(run, extractor, range(r * num, (r + 1) * num), cfg, batch_size=batch_size,
                                device=device, progress=progress)
        result = compute_metric(metric, stats, ref)
        values.append(result.pop("value"))
        extras.append(result)
    out = {"metric": metric, "value": float(np.mean(values)), "values": values, "min": float(np.min(values)),
           "mean": float(np.mean(values)), "num": num, "repeats": repeats, "sampler": cfg.sampler,
           "steps": cfg.steps, "nfe": solver_nfe(cfg, run.denoiser.formulation), "schedule": cfg.schedule,
           "s_churn": cfg.s_churn, "features": extractor.name, "reference": ref.source, "step": run.step,
           "checkpoint": str(run.checkpoint), "seconds": round(time.perf_counter() - t0, 2)}
    for key in ("precision", "recall", "std"):
        if key in extras[0]:
            out[key] = float(np.mean([e[key] for e in extras]))
    return out


def sweep(run: LoadedRun, metric: str, *, samplers: Sequence[str], nfes: Sequence[int], num: int, ref: Reference,
          extractor, base: SamplingConfig, batch_size: int = 250, device=None, progress: bool = False) -> list[dict]:
    """Quality vs NFE: rows ``{sampler, steps, nfe, value, ...}`` for each sampler and NFE target."""
    rows, seen = [], set()
    for sampler in samplers:
        SamplingConfig.validate(dataclasses.replace(base, sampler=sampler))  # a named error for a bad sampler
        for target in nfes:
            steps = steps_for_nfe(sampler, int(target))
            if (sampler, steps) in seen:
                continue
            seen.add((sampler, steps))
            cfg = dataclasses.replace(base, sampler=sampler, steps=steps)
            result = evaluate(run, metric, num=num, ref=ref, extractor=extractor, cfg=cfg, batch_size=batch_size,
                              device=device)
            row = {"sampler": sampler, "steps": steps, "nfe": result["nfe"], "value": result["value"]}
            row.update({k: result[k] for k in ("precision", "recall", "std") if k in result})
            rows.append(row)
            if progress:
                print(f"  {sampler:<16} steps {steps:>3}  NFE {row['nfe']:>3}  {metric} {row['value']:.4g}")
    return rows

