"""Evaluate a trained run: sample with per-sample seeds, extract features, compare with the dataset
statistics of real data (FD / FID, KID, precision-recall), and sweep samplers over NFE. Metrics are declared
once (:func:`register_metric`); the CLI's choices and help follow."""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..config.sampling import SamplingConfig, schedule_for
from ..data import build_dataset, data_section_for
from ..data.pixels import to_pixels
from ..errors import UserError
from ..metrics import FeatureStats, classifier_score, compute_stats, frechet_distance, kid, load_digits_classifier
from ..metrics import precision_recall as _precision_recall
from ..metrics.features import feature_extractor
from ..run.model import LoadedRun
from ..run.outputs import check_finite
from ..runtime.distributed import map_batches, world
from ..sampling import get_sampler, num_steps, steps_for_nfe

__all__ = ["METRICS", "Metric", "register_metric", "get_metric", "DatasetStats", "feature_name", "load_dataset_stats",
           "sample_features", "compute_metric", "evaluate", "sweep", "feature_extractor", "sampler_nfe",
           "recognizability"]


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
    mean, std = kid(stats.features, ref.features, subset_size=min(1000, len(stats.features), len(ref.features)))
    return {"value": float(mean), "std": float(std)}


@register_metric("pr", "improved precision and recall (value = precision)", needs_features=True)
def _pr(stats, ref) -> dict:
    precision, recall = _precision_recall(ref.features, stats.features)
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
class DatasetStats:
    """The real-data side of a comparison (``--ref``): feature statistics, and features when KID / PR need
    them; ``source`` says where they came from."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None
    source: str


def _dataset_from_spec(spec: str):
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


def load_dataset_stats(spec: str | Path, extractor_name: str, *, inception: str | None = None, device=None,
                       need_features: bool = False) -> DatasetStats:
    """Dataset statistics from an ``.npz`` with ``mu``/``sigma`` (optionally ``features``; what ``elucidate ref``
    writes) or computed from a dataset spec (``digits``, a folder, a zip, an array file)."""
    spec = str(spec)
    if spec.endswith(".npz") and Path(spec).is_file():
        with np.load(spec, allow_pickle=False) as data:
            if "mu" in data.files and "sigma" in data.files:
                feats = data["features"] if "features" in data.files else None
                if need_features and feats is None:
                    raise UserError(f"{spec} holds statistics only; KID / precision-recall need features "
                                    f"(write them with `elucidate ref ... --keep-features`) or the data itself")
                return DatasetStats(data["mu"].astype(np.float64), data["sigma"].astype(np.float64), feats, spec)
    stats = compute_stats(feature_extractor(extractor_name, inception, device), _pixels(_dataset_from_spec(spec)),
                          keep_features=True)
    return DatasetStats(stats.mean, stats.cov, stats.features, spec)


def sampler_nfe(cfg: SamplingConfig, formulation) -> int:
    """Denoiser evaluations per image of ``cfg`` on this formulation (from the schedule actually used:
    levels merged by rounding to a discrete grid cost nothing)."""
    return get_sampler(cfg.sampler).nfe(num_steps(schedule_for(cfg, formulation)))


def sample_features(run: LoadedRun, extractor, seeds: Sequence[int], cfg: SamplingConfig, *,
                    batch_size: int = 250, device=None, progress: bool = False):
    """Generate ``len(seeds)`` samples and return their FeatureStats (features kept)."""
    stats = FeatureStats(keep_features=True)
    seeds = list(seeds)
    show = progress and world()[0] == 0
    done = 0

    def features(b: range) -> torch.Tensor:  # under torchrun each rank computes its own batches
        nonlocal done
        chunk = seeds[b.start:b.stop]
        labels = torch.tensor(chunk) % run.label_dim if run.label_dim else None
        x = run.sample(chunk, cfg, class_labels=labels, batch_size=batch_size, device=device)
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


def compute_metric(metric: str, stats, ref: DatasetStats) -> dict:
    """The metric's value(s) for generated ``stats`` against ``ref``."""
    return get_metric(metric).compute(stats, ref)


def evaluate(run: LoadedRun, metric: str, *, num: int, ref: DatasetStats, extractor, cfg: SamplingConfig,
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
           "steps": cfg.steps, "nfe": sampler_nfe(cfg, run.denoiser.formulation), "schedule": cfg.schedule,
           "s_churn": cfg.s_churn, "features": extractor.name, "reference": ref.source, "step": run.step,
           "checkpoint": str(run.checkpoint), "seconds": round(time.perf_counter() - t0, 2)}
    for key in ("precision", "recall", "std"):
        if key in extras[0]:
            out[key] = float(np.mean([e[key] for e in extras]))
    return out


def sweep(run: LoadedRun, metric: str, *, samplers: Sequence[str], nfes: Sequence[int], num: int, ref: DatasetStats,
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


def recognizability(images: torch.Tensor, normalizer=None, threshold: float = 0.8) -> dict:
    """How many generated digits (model range, ``[N, 1, H, W]``; ``normalizer`` maps them to pixels,
    default [-1, 1]) the bundled classifier recognizes with confidence >= ``threshold``, and which
    classes appear."""
    classifier = load_digits_classifier()
    with torch.no_grad():
        probabilities = classifier.predict_proba(to_pixels(images, normalizer))
    score = classifier_score(probabilities, threshold=threshold)
    return {"num": int(images.shape[0]), "threshold": threshold, "confident_fraction": float(score.confident_fraction),
            "classes_present": int((score.histogram > 0).sum()), "class_counts": score.histogram.tolist(),
            "mean_confidence": float(score.mean_confidence)}
