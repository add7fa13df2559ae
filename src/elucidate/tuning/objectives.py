"""What :func:`elucidate.sampling.tune` minimizes: the error of final samples to a reference, per
sample or over all elements, and the geometric mean of it over several models tuned at once."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

__all__ = ["rmse", "per_sample_rms", "sample_mean_error", "sample_l4_error", "LOSSES", "Models", "geometric_mean_loss",
           "weighted_loss"]


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Root mean square difference over all elements (inf if not finite)."""
    value = (a.double() - b.double()).pow(2).mean().sqrt().item()
    return value if math.isfinite(value) else math.inf


def per_sample_rms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Each sample's RMS difference, ``[B]`` (float64)."""
    return (a.double() - b.double()).flatten(1).pow(2).mean(1).sqrt()


def sample_mean_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """The mean over samples of each sample's RMS difference (inf if not finite): unlike the RMSE over
    all elements, a few samples that land in another mode do not dominate it."""
    value = per_sample_rms(a, b).mean().item()
    return value if math.isfinite(value) else math.inf


def sample_l4_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """(mean over samples of each sample's mean square difference squared)^(1/4): weighs the samples with
    large errors (those that come out malformed) more than the RMSE does."""
    per_sample = (a.double() - b.double()).flatten(1).pow(2).mean(1)
    value = per_sample.pow(2).mean().pow(0.25).item()
    return value if math.isfinite(value) else math.inf


#: What the search minimizes: ``rmse`` (over all elements), ``mean`` (:func:`sample_mean_error`) or
#: ``l4`` (:func:`sample_l4_error`).
LOSSES = {"rmse": rmse, "mean": sample_mean_error, "l4": sample_l4_error}


def weighted_loss(name: str, weights: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """``LOSSES[name]`` with sample i counted by ``weights[i]`` (summing to 1) instead of 1/B: the loss over
    the population a stratified batch stands for (``rmse``: the square root of the weighted mean of each
    sample's mean square; ``mean``: the weighted mean of each sample's RMS; ``l4``: the fourth root of the
    weighted mean of each sample's mean square squared). Equal weights give ``LOSSES[name]`` itself."""
    if name not in LOSSES:
        raise ValueError(f"loss must be one of {list(LOSSES)}, got {name!r}")
    w = weights.detach().double().cpu()
    power, root = {"rmse": (1.0, 0.5), "mean": (0.5, 1.0), "l4": (2.0, 0.25)}[name]

    def loss(a: torch.Tensor, b: torch.Tensor) -> float:
        per_sample = (a.double() - b.double()).flatten(1).pow(2).mean(1).cpu()
        value = (w * per_sample.pow(power)).sum().pow(root).item()
        return value if math.isfinite(value) else math.inf

    return loss


class Models:
    """Several denoisers as one: sample block ``i`` (``per`` rows) goes to ``models[i]``."""

    def __init__(self, models: Sequence[Callable], per: int):
        self.models, self.per = list(models), per

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        blocks = [slice(i * self.per, (i + 1) * self.per) for i in range(len(self.models))]
        return torch.cat([D(x[b], sigma[b]) for D, b in zip(self.models, blocks)])


def geometric_mean_loss(loss: Callable | Sequence[Callable], groups: int) -> Callable:
    """The geometric mean of ``loss`` (or of ``loss[i]`` on block i) over ``groups`` equal blocks of the
    batch: every model counts by its relative error, however large its errors are next to the others'."""
    losses = list(loss) if isinstance(loss, (list, tuple)) else [loss] * groups
    if len(losses) != groups:
        raise ValueError(f"need one loss per group ({groups}), got {len(losses)}")
    if groups == 1:
        return losses[0]

    def geometric(a: torch.Tensor, b: torch.Tensor) -> float:
        per = a.shape[0] // groups
        values = [f(a[i * per:(i + 1) * per], b[i * per:(i + 1) * per]) for i, f in enumerate(losses)]
        if math.inf in values:  # a model whose samples did not come out finite fails the schedule
            return math.inf
        if 0.0 in values:  # one model solved exactly: the product, and so the mean, is 0
            return 0.0
        return math.exp(sum(map(math.log, values)) / groups)

    return geometric
