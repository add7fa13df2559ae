"""Evaluate a trained run: sample with per-sample seeds, extract features, compare with the dataset
statistics of real data (FD / FID, KID, precision-recall), and sweep samplers over NFE. Metrics are declared
once (:func:`register_metric`); the CLI's choices and help follow, and so does which data a domain metric fits
(``datasets=``): :func:`choose_metric` defaults to it only for that data and otherwise names what works.

A result (:func:`evaluate`) records every setting that made it in ``result["settings"]``; :func:`result_path` names
its file after all of them, so no later evaluation with other settings overwrites it."""
from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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
from ..metrics.inception import FID_WEIGHTS_FILENAME, FID_WEIGHTS_URL
from ..run.model import LoadedRun
from ..run.outputs import check_finite
from ..run.rundir import RunDir
from ..runtime.distributed import map_batches, world
from ..sampling import get_sampler, num_steps, steps_for_nfe

__all__ = ["METRICS", "Metric", "register_metric", "get_metric", "DatasetStats", "feature_name", "load_dataset_stats",
           "sample_features", "compute_metric", "evaluate", "sweep", "feature_extractor", "sampler_nfe",
           "recognizability", "domain_metric", "choose_metric", "no_domain_metric", "OUTCOMES", "result_settings",
           "result_prefix", "result_path", "checkpoint_label"]


@dataclasses.dataclass(frozen=True)
class Metric:
    """A sample-quality metric: its feature network (None = chosen per run, see :func:`feature_name`),
    whether it needs reference features (not just statistics), how it compares two sets, and the data its
    feature network was trained on (``datasets``: a domain metric, the default only for that data)."""

    name: str
    description: str
    features: str | None
    compute: Callable[..., dict]
    needs_features: bool = False
    datasets: tuple[str, ...] = ()


#: name -> Metric; ``register_metric`` adds one (CLI choices and docs follow).
METRICS: dict[str, Metric] = {}
#: ``--features`` names -> feature extractor names.
FEATURE_ALIASES = {"digits": "fd_digits", "mnist": "fd_mnist", "inception": "inception"}


class _DatasetFeatures(Mapping):
    """dataset -> the feature network of the metric declared for it (``datasets=``), read live from METRICS:
    the default features of kid/pr on that data (Inception otherwise)."""

    def _table(self) -> dict[str, str]:
        return {d: m.features for m in METRICS.values() if m.features for d in m.datasets}

    def __getitem__(self, dataset: str) -> str:
        return self._table()[dataset]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())

    def __repr__(self) -> str:
        return repr(self._table())


#: The default feature network of kid/pr per dataset (Inception otherwise), derived from the metrics' ``datasets``.
DATASET_FEATURES: Mapping[str, str] = _DatasetFeatures()


def register_metric(name: str, description: str, *, features: str | None = None, needs_features: bool = False,
                    datasets: Iterable[str] = ()):
    """Declare ``compute(stats, ref) -> {"value": ..., ...}`` as the metric ``name``; ``datasets`` names the data
    its feature network was trained on (it is then the default metric for that data, and only for it)."""
    def decorate(fn):
        METRICS[name] = Metric(name, description, features, fn, needs_features, tuple(datasets))
        return fn
    return decorate


def _frechet(stats, ref) -> dict:
    if stats.mean.shape != ref.mu.shape:
        raise UserError(f"reference {ref.source} has {ref.mu.shape[0]}-d features but the extractor gives "
                        f"{stats.mean.shape[0]}-d; use statistics computed with the same feature network")
    return {"value": frechet_distance(stats.mean, stats.cov, ref.mu, ref.sigma)}


register_metric("fd_digits", "Frechet distance in the bundled digits classifier's features (offline)",
                features="fd_digits", datasets=("digits",))(_frechet)
register_metric("fd_mnist", "Frechet distance in the bundled 28x28 MNIST classifier's features (offline)",
                features="fd_mnist", datasets=("mnist",))(_frechet)
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


def domain_metric(dataset: str | None, choices: Iterable[str] | None = None) -> str | None:
    """The metric declared for ``dataset`` (``datasets=`` of :func:`register_metric`; among ``choices``), or None."""
    names = list(METRICS) if choices is None else list(choices)
    return next((n for n in names if dataset is not None and dataset in METRICS[n].datasets), None)


def no_domain_metric(subject: str, choices: Iterable[str] | None = None) -> str:
    """The one-line refusal for data no domain metric fits: ``subject`` and every way that works, from the
    registry (Inception metrics with the weights file and where it comes from, metrics with a choice of
    features, and the domain metrics that can still be asked for explicitly)."""
    specs = [METRICS[n] for n in (list(METRICS) if choices is None else choices)]
    inception = [m.name for m in specs if m.features == "inception"]
    free = [m.name for m in specs if m.features is None]
    domain = [m for m in specs if m.datasets]
    ways = []
    if inception:
        ways.append(f"--metric {' or '.join(inception)} --inception FILE ({FID_WEIGHTS_FILENAME}, from "
                    f"{FID_WEIGHTS_URL}; see docs/metrics.md)")
    if free:
        others = "|".join(a for a, f in FEATURE_ALIASES.items() if f != "inception")
        ways.append(f"--metric {' or '.join(free)} with the same --inception FILE (or --features {others})")
    if domain:
        ways.append("an explicit " + " or ".join(f"--metric {m.name} ({'/'.join(m.datasets)} classifier)"
                                                 for m in domain) + " to use it anyway")
    return f"{subject}; no domain metric fits it: pass " + ", or ".join(ways)


def choose_metric(metric: str | None, dataset: str | None, subject: str, *,
                  choices: Iterable[str] | None = None) -> str:
    """The metric to use on data of kind ``dataset`` (``subject`` describes it for the messages): ``metric`` if
    given (with a one-line warning when it is a domain metric of other data), else the domain metric declared
    for that data, else a UserError naming what works (:func:`no_domain_metric`)."""
    if metric is None:
        found = domain_metric(dataset, choices)
        if found is None:
            raise UserError(no_domain_metric(subject, choices))
        return found
    spec = get_metric(metric)
    if spec.datasets and dataset not in spec.datasets:
        warnings.warn(f"{metric} measures in the features of a classifier trained on {'/'.join(spec.datasets)}, "
                      f"but {subject}", stacklevel=2)
    return metric


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


#: Keys of a result that are measured rather than set; everything else (and all of ``result["settings"]``) is a
#: setting, and the settings name the file.
OUTCOMES = ("value", "values", "min", "mean", "std", "sem", "precision", "recall", "seconds")


def _plain(value):
    """JSON-safe settings: non-finite floats as strings ('inf'), tuples as lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def checkpoint_label(checkpoint: str | Path) -> str:
    """A checkpoint as ``folder/file`` (``checkpoints/ckpt-00001000.safetensors``, ``phema/ema-0.050.safetensors``):
    the same however the run directory was spelled on the command line."""
    path = Path(checkpoint)
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def result_settings(result: Mapping) -> dict:
    """Every setting of a result: its ``settings`` when it has them (what this version writes), else each key that
    is not an outcome (results of earlier versions and of other tools)."""
    if isinstance(result.get("settings"), Mapping):
        return dict(result["settings"])
    return {k: v for k, v in result.items() if k not in OUTCOMES}


def result_prefix(result: Mapping) -> str:
    """The readable start of a result's file name: metric, tuned / post-hoc EMA / raw weights, sampler and steps,
    samples, training step (``fd_digits-heun-18steps-10000-step4000``); likelihood: ``likelihood-NUM-TRACE-stepS``."""
    s = result_settings(result)
    metric = str(result.get("metric", s.get("metric", "eval")))
    if metric == "bits_per_dim":
        return f"likelihood-{s.get('num', result.get('num'))}-{s.get('trace')}-step{s.get('step')}"
    tag = f"tuned-nfe{s['tuned_nfe']}-" if s.get("tuned_nfe") else ""
    tag += f"ema{float(s['ema_std']):.3f}-" if s.get("ema_std") is not None else ""
    tag += "noema-" if s.get("ema") is False else ""
    return f"{metric}-{tag}{s.get('sampler')}-{s.get('steps')}steps-{s.get('num')}-step{s.get('step')}"


def result_path(run_dir: str | Path, result: Mapping) -> Path:
    """Where ``result`` is stored in ``run_dir``: ``eval/`` + :func:`result_prefix` + a digest of *all* its
    settings (:meth:`RunDir.eval_result`)."""
    return RunDir.of(run_dir).eval_result(result_prefix(result), result_settings(result))


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
                    batch_size: int = 250, device=None, progress: bool = False, precision: str = "fp32"):
    """Generate ``len(seeds)`` samples and return their FeatureStats (features kept)."""
    stats = FeatureStats(keep_features=True)
    seeds = list(seeds)
    show = progress and world()[0] == 0
    done = 0

    def features(b: range) -> torch.Tensor:  # under torchrun each rank computes its own batches
        nonlocal done
        chunk = seeds[b.start:b.stop]
        labels = torch.tensor(chunk) % run.label_dim if run.label_dim else None
        x = run.sample(chunk, cfg, class_labels=labels, batch_size=batch_size, device=device, precision=precision)
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
             repeats: int = 1, batch_size: int = 250, device=None, progress: bool = False, precision: str = "fp32",
             settings: Mapping | None = None) -> dict:
    """The metric over ``repeats`` disjoint seed ranges (0..num-1, num..2num-1, ...): each value,
    their mean and min (the EDM paper reports the min of three). ``result["settings"]`` records every setting
    (metric, features, reference, samples, repeats, checkpoint, step, precision, the whole sampling config and
    ``settings``, e.g. ``{"ema": True}``); the flat keys next to it are copies for readers of earlier results."""
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
    recorded = {"metric": metric, "features": extractor.name, "reference": ref.source, "num": num,
                "repeats": repeats, "seeds": f"0-{num * repeats - 1}", "checkpoint": checkpoint_label(run.checkpoint),
                "step": run.step, "sampling_precision": precision, "nfe": sampler_nfe(cfg, run.denoiser.formulation),
                **dataclasses.asdict(cfg), **dict(settings or {})}
    out = {"metric": metric, "value": float(np.mean(values)), "values": values, "min": float(np.min(values)),
           "mean": float(np.mean(values))}
    for key in extras[0]:  # what the metric measures besides its value (std, precision, recall ...)
        out[key] = float(np.mean([e[key] for e in extras]))
    out.update({k: recorded[k] for k in ("num", "repeats", "sampler", "steps", "nfe", "schedule", "s_churn",
                                         "features", "reference", "step", "checkpoint")})
    out["seconds"] = round(time.perf_counter() - t0, 2)
    out["settings"] = _plain(recorded)
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
