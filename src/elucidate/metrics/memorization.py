"""Are generated images copies of training images? Nearest-neighbour distances of samples to the
training set, against the same distances among the training images themselves (real vs real)."""
from __future__ import annotations

import torch

__all__ = ["nearest_neighbors", "copy_check"]


def nearest_neighbors(queries: torch.Tensor, reference: torch.Tensor, *, exclude_self: bool = False,
                      k: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(distances ``[N, k]``, indices ``[N, k]``) of each query's ``k`` nearest reference images in L2
    (images flattened, float64); ``exclude_self`` for queries that are the reference itself."""
    q = queries.reshape(queries.shape[0], -1).double()
    r = reference.reshape(reference.shape[0], -1).double()
    d = torch.cdist(q, r)
    if exclude_self:
        d.fill_diagonal_(float("inf"))
    k = min(k, r.shape[0] - (1 if exclude_self else 0))
    values, indices = d.topk(k, dim=1, largest=False)
    return values, indices


def copy_check(samples: torch.Tensor, training: torch.Tensor, *, ratio: float = 1 / 3) -> dict:
    """Nearest-neighbour statistics of ``samples`` against ``training`` (same value range):

    * ``sample_nn_median`` and ``real_nn_median``: median distance of a sample to its nearest
      training image, and of a training image to its nearest *other* training image;
    * ``closer_than_any_real``: fraction of samples nearer to a training image than the closest
      pair of distinct training images (an exact or near copy);
    * ``ratio_below``: fraction of samples whose nearest / second-nearest distance ratio is below
      ``ratio`` (1/3: the memorization test of Yoon et al. 2023), and the same for the training set
      (``real_ratio_below``) as the baseline.
    """
    s_d, _ = nearest_neighbors(samples, training)
    r_d, _ = nearest_neighbors(training, training, exclude_self=True)
    s_ratio = s_d[:, 0] / s_d[:, 1].clamp_min(1e-12)
    r_ratio = r_d[:, 0] / r_d[:, 1].clamp_min(1e-12)
    return {"num_samples": int(samples.shape[0]), "num_training": int(training.shape[0]),
            "sample_nn_median": float(s_d[:, 0].median()), "real_nn_median": float(r_d[:, 0].median()),
            "real_nn_min": float(r_d[:, 0].min()),
            "closer_than_any_real": float((s_d[:, 0] < r_d[:, 0].min()).double().mean()),
            "ratio": ratio, "ratio_below": float((s_ratio < ratio).double().mean()),
            "real_ratio_below": float((r_ratio < ratio).double().mean())}
