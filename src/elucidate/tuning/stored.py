"""A tuned schedule as data: ``(sampler, sigmas, options)`` plus how it was measured, stored as JSON
in a run (``RUN/schedules/nfe{N}.json``, :meth:`RunDir.tuned_schedule`) and looked up by
``elucidate sample/eval --nfe N``."""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..run.rundir import RunDir
from ..runtime.files import atomic_write_text
from ..sampling.registry import check_options, get_sampler
from ..sampling.solvers import check_sigmas, num_steps

__all__ = ["TunedSchedule", "FORMAT", "load_tuned", "tuned_config"]

FORMAT = "elucidate-tuned-schedule/1"


@dataclasses.dataclass
class TunedSchedule:
    """The result of :func:`elucidate.sampling.tune` (or of :func:`.consistency.tune_consistency`: the
    consistency sampler's levels, ``objective`` recording the metric, samples and seeds it was scored on): replay
    it with ``getattr(elucidate.sampling, t.sampler)(D, x, t.sigmas, **t.options)`` (or ``t(D, x)``)."""

    sampler: str
    sigmas: list[float]
    options: dict
    nfe: int
    seed: int = 0
    heldout_seed: int = 1
    num_samples: int = 0
    boundary: int = 0
    pool: int = 0
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    tuning_error: float = math.nan
    heldout_error: float = math.nan
    baselines: list[dict] = dataclasses.field(default_factory=list)
    finalists: list[dict] = dataclasses.field(default_factory=list)
    reference: dict = dataclasses.field(default_factory=dict)
    loss: str = "l4"
    evaluations: int = 0
    seconds: float = 0.0
    model: dict = dataclasses.field(default_factory=dict)
    objective: dict = dataclasses.field(default_factory=dict)
    created: str = dataclasses.field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def __post_init__(self) -> None:
        self.validate()

    @property
    def steps(self) -> int:
        """Steps of non-zero length."""
        return num_steps(self.sigmas)

    @property
    def sigmas_tensor(self) -> torch.Tensor:
        return torch.tensor(self.sigmas, dtype=torch.float64)

    def __call__(self, D, x: torch.Tensor, **plumbing) -> torch.Tensor:
        """Solve from ``x`` (at sigma_max) with the tuned solver, levels and options."""
        return get_sampler(self.sampler).fn(D, x, self.sigmas_tensor, **self.options, **plumbing)

    def validate(self) -> None:
        """ValueError naming what is wrong: unknown or stochastic sampler (but the consistency sampler), bad
        options, sigmas that do not run from sigma_max down to 0 (above the consistency boundary epsilon), or more
        evaluations than ``nfe``."""
        spec = get_sampler(self.sampler)
        if spec.stochastic and not spec.consistency:
            raise ValueError(f"sampler {self.sampler!r} draws noise; a tuned schedule needs an ODE solver (or "
                             "the consistency sampler)")
        if not isinstance(self.options, dict):
            raise ValueError(f"options must be a mapping, got {self.options!r}")
        check_options(self.sampler, self.options)
        if not isinstance(self.sigmas, (list, tuple)) or not all(
                isinstance(s, (int, float)) and not isinstance(s, bool) for s in self.sigmas):
            raise ValueError("sigmas must be a list of numbers")
        self.sigmas = [float(s) for s in self.sigmas]
        check_sigmas(self.sigmas)
        if self.sigmas[-1] != 0 or any(b >= a for a, b in zip(self.sigmas, self.sigmas[1:])):
            raise ValueError("sigmas must decrease strictly from sigma_max to exactly 0")
        epsilon = self.options.get("epsilon", 0.0) if spec.consistency else 0.0
        if any(0 < s <= epsilon for s in self.sigmas):
            raise ValueError(f"the consistency levels must lie above epsilon = {epsilon:g}")
        if not math.isclose(self.sigmas[0], self.sigma_max, rel_tol=1e-12):
            raise ValueError(f"sigmas start at {self.sigmas[0]:g}, not at sigma_max = {self.sigma_max:g}")
        if isinstance(self.nfe, bool) or not isinstance(self.nfe, int) or self.nfe < 1:
            raise ValueError(f"nfe must be an integer >= 1, got {self.nfe!r}")
        if spec.nfe(self.steps) > self.nfe:
            raise ValueError(f"{self.sampler} with {self.steps} steps spends {spec.nfe(self.steps)} evaluations, "
                             f"more than nfe = {self.nfe}")

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: Any) -> TunedSchedule:
        """Parse and validate (ValueError naming the problem)."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a tuned schedule (expected \"format\": \"{FORMAT}\")")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [k for k in ("sampler", "sigmas", "options", "nfe") if k not in data]
        if missing:
            raise ValueError(f"missing {missing}")
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except TypeError as e:
            raise ValueError(str(e)) from None

    def save(self, path: str | Path) -> Path:
        """Write the JSON atomically."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> TunedSchedule:
        """Read and validate a JSON file (UserError naming the file and the problem)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"{path} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{path} is not a readable tuned schedule: {e}") from None
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise UserError(f"{path} is not a valid tuned schedule: {e}") from None


def load_tuned(run: str | Path, nfe: int, *, shape=None, checkpoint: str | None = None) -> TunedSchedule:
    """The tuned schedule of a run for an NFE budget (UserError naming the command that makes it if
    missing, or the problem if it is broken or made for another budget or sample shape; a warning if
    it was tuned on another checkpoint file than ``checkpoint``)."""
    run = RunDir.of(run)
    path = run.tuned_schedule(nfe)
    if not path.is_file():
        raise UserError(f"no tuned schedule for NFE {nfe} in {run} (expected {path}); "
                        f"run `elucidate tune {run} --nfe {nfe}` first")
    tuned = TunedSchedule.load(path)
    if tuned.nfe != nfe:
        raise UserError(f"{path} was tuned for NFE {tuned.nfe}, not {nfe}; re-run `elucidate tune "
                        f"{run} --nfe {nfe}`")
    tuned_shape = tuned.model.get("shape")
    if shape is not None and tuned_shape is not None and list(tuned_shape) != list(shape):
        raise UserError(f"{path} was tuned for samples of shape {tuned_shape}, the run makes {list(shape)}")
    tuned_on = tuned.model.get("checkpoint")
    if checkpoint is not None and tuned_on is not None and tuned_on != checkpoint:
        warnings.warn(f"{path} was tuned on {tuned_on}, not on {checkpoint}; "
                      f"re-run `elucidate tune {run} --nfe {nfe}` to tune it for this one", stacklevel=2)
    return tuned


def tuned_config(base, run: str | Path, nfe: int, *, shape=None, checkpoint: str | None = None):
    """``base`` (a SamplingConfig) with the tuned sampler, options and explicit sigmas of the run's
    ``schedules/nfe{N}.json``; the one place ``sample/eval --nfe`` and ``sweep --tuned`` look it up."""
    tuned = load_tuned(run, nfe, shape=shape, checkpoint=checkpoint)
    cfg = dataclasses.replace(base, sampler=tuned.sampler, options=dict(tuned.options), sigmas=list(tuned.sigmas),
                              steps=tuned.steps)
    cfg.validate()
    return cfg
