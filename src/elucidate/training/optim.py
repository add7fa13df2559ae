"""The optimizers of a training run and the learning-rate schedule every loop applies."""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch

__all__ = ["make_optimizer", "OptimizerGroup", "lr_factor"]


def make_optimizer(params: torch.nn.Module | Iterable[torch.Tensor], t, *, lr: float | None = None
                   ) -> torch.optim.Optimizer:
    """Adam/AdamW over ``params`` (a module's parameters, or a list) with the ``training`` section ``t``'s
    hyper-parameters (``lr`` overrides ``t.lr``); the fused kernel where this torch and device support it
    (about 3x faster than the default on CPU), else the default implementation."""
    opt_cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    kwargs = dict(lr=t.lr if lr is None else lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay)
    params = list(params.parameters() if isinstance(params, torch.nn.Module) else params)
    try:
        return opt_cls(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return opt_cls(params, **kwargs)


def lr_factor(t, step: int) -> float:
    """The fraction of its base learning rate each optimizer uses at step ``step`` (0-based) of the ``training``
    section ``t``: a linear ramp-up over ``t.lr_rampup`` images (edm's ``lr_rampup_kimg``; 0 = none) times the decay
    of ``t.lr_schedule`` (null = constant). A function of the step only, so a resumed run continues bit-exactly."""
    ramp = min((step + 1) * t.batch_size / max(t.lr_rampup, 1e-8), 1.0)  # images seen after this step, as before
    schedule = t.lr_schedule
    if schedule is None:
        return ramp
    # t = images seen before this step / batch = the 0-based step: edm2's learning_rate_schedule evaluates cur_nimg
    # before the step, and its cur_nimg / (ref_batches * batch_size) is t / t_ref in steps.
    if schedule["kind"] == "inv_sqrt":
        return ramp / math.sqrt(max(step / schedule["ref_batches"], 1.0))  # EDM2 Eq. 67 (edm2's ref_batches)
    if schedule["kind"] == "cosine":  # cosine from 1 at the end of the ramp-up to min_lr at training.steps
        start = t.lr_rampup / t.batch_size  # the ramp-up in steps
        progress = min(max((step - start) / max(t.steps - start, 1e-8), 0.0), 1.0)
        low = schedule["min_lr"]
        return ramp * (low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress)))
    raise ValueError(f"training.lr_schedule.kind = {schedule['kind']!r}: expected inv_sqrt, cosine or constant")


class OptimizerGroup:
    """Several optimizers seen as one state dict (the ids of each shifted past the previous ones'), so one
    checkpoint holds them all in its optimizer slot. With one optimizer it is exactly that optimizer's."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def _offsets(self) -> list[int]:
        offsets, n = [], 0
        for opt in self.optimizers:
            offsets.append(n)
            n += sum(len(g["params"]) for g in opt.param_groups)
        return offsets

    def state_dict(self) -> dict:
        state, groups = {}, []
        for opt, n in zip(self.optimizers, self._offsets()):
            own = opt.state_dict()
            state.update({pid + n: value for pid, value in own["state"].items()})
            groups += [dict(g, params=[p + n for p in g["params"]]) for g in own["param_groups"]]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state: dict) -> None:
        offsets = self._offsets() + [None]
        start = 0
        for i, opt in enumerate(self.optimizers):
            lo, hi = offsets[i], offsets[i + 1]
            groups = state["param_groups"][start:start + len(opt.param_groups)]
            start += len(opt.param_groups)
            own = {p - lo: v for p, v in state["state"].items() if p >= lo and (hi is None or p < hi)}
            opt.load_state_dict({"state": own, "param_groups": [dict(g, params=[p - lo for p in g["params"]])
                                                                  for g in groups]})
