"""The run directory: every path of a run, in one class, and the bookkeeping every writer shares.

A run directory holds (a writer creates what it needs; readers never write)::

    RUN/config.yaml                 the resolved config
    RUN/metrics.jsonl               one JSON line per logging interval (and events: resume, eval, stopped)
    RUN/checkpoints/ckpt-*.safetensors   network, EMA and optimizer tensors; everything else as JSON metadata
    RUN/checkpoints/damaged/        checkpoints a resumed run found damaged (never deleted)
    RUN/samples/step-*.png          periodic sample (or reconstruction) grids
    RUN/phema/                      post-hoc EMA snapshots and reconstructions (training.ema: power)
    RUN/schedules/nfeN.json         tuned schedules (elucidate tune)
    RUN/eval/ RUN/sweep/ RUN/plots/ RUN/report.html     what eval, sweep, plot and report write
    RUN/eval/PREFIX-DIGEST.json     one file per evaluation setting (the digest hashes every setting)
    RUN/vae.safetensors RUN/latent.json   a latent run's copy of its autoencoder and its latent record
    RUN/tensorboard/                TensorBoard event files (training.tensorboard)
    RUN/samples.png RUN/trajectory.png RUN/demo.json    what `elucidate demo` writes
    RUN/.lock                       held by the one writer (run.lock)

No other module spells these names: they ask a :class:`RunDir`.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from ..errors import UserError
from ..runtime.files import append_text, atomic_write_text
from .checkpoint import DAMAGED_DIR, checkpoint_name, list_checkpoints

__all__ = ["RunDir", "check_same_run", "truncate_metrics", "append_metrics", "tuned_schedule_name", "eval_result_name",
           "settings_digest"]


class RunDir:
    """The paths of the run directory ``path`` (nothing is created until a writer writes)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @classmethod
    def of(cls, path: str | os.PathLike) -> RunDir:
        """The run directory of a run directory or of a file in it (``RUN/checkpoints/...``, ``RUN/phema/...``)."""
        path = Path(path)
        if path.is_dir():
            return cls(path)
        above = cls(path.parent.parent)
        return above if path.parent in (above.checkpoints, above.phema) else cls(path.parent)

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ---------------------------------------------------------------------------------------- files
    config = property(lambda self: self.path / "config.yaml")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    checkpoints = property(lambda self: self.path / "checkpoints")
    damaged = property(lambda self: self.checkpoints / DAMAGED_DIR)
    samples = property(lambda self: self.path / "samples")
    phema = property(lambda self: self.path / "phema")
    schedules = property(lambda self: self.path / "schedules")
    eval = property(lambda self: self.path / "eval")
    sweep = property(lambda self: self.path / "sweep")
    plots = property(lambda self: self.path / "plots")
    report = property(lambda self: self.path / "report.html")
    vae = property(lambda self: self.path / "vae.safetensors")
    latent = property(lambda self: self.path / "latent.json")
    tensorboard = property(lambda self: self.path / "tensorboard")
    final_samples = property(lambda self: self.path / "samples.png")  # what `elucidate demo` writes
    trajectory = property(lambda self: self.path / "trajectory.png")
    demo_report = property(lambda self: self.path / "demo.json")
    lock = property(lambda self: self.path / ".lock")

    def checkpoint(self, step: int) -> Path:
        """The checkpoint file after ``step`` steps."""
        return self.checkpoints / checkpoint_name(step)

    def list_checkpoints(self) -> list[Path]:
        """The run's checkpoints, oldest first."""
        return list_checkpoints(self.checkpoints)

    def latest_checkpoint(self) -> Path | None:
        """The newest checkpoint, or None."""
        found = self.list_checkpoints()
        return found[-1] if found else None

    def sample_grid(self, step: int) -> Path:
        """The periodic sample grid after ``step`` steps."""
        return self.samples / f"step-{step:08d}.png"

    def tuned_schedule(self, nfe: int) -> Path:
        """Where ``elucidate tune RUN --nfe N`` stores its schedule."""
        return self.schedules / tuned_schedule_name(nfe)

    def eval_result(self, prefix: str, settings: Mapping) -> Path:
        """Where an evaluation result goes: ``eval/{prefix}-{digest}.json`` (:func:`eval_result_name`), so results
        that differ in any setting never share a file and the same settings replace their own file."""
        return self.eval / eval_result_name(prefix, settings)

    def eval_results(self) -> list[Path]:
        """Every evaluation result file (``eval/*.json``, also those of earlier versions), sorted by name."""
        return sorted(self.eval.glob("*.json"))

    def ema_checkpoint(self, std: float, step: int | None = None) -> Path:
        """The post-hoc EMA of relative std ``std`` as a checkpoint (``elucidate ema``, ``--ema-std``); at training
        step ``step`` (``elucidate ema --step``) instead of the last snapshot."""
        at = "" if step is None else f"-step{step:08d}"
        return self.phema / f"ema-{std:.3f}{at}.safetensors"

    def is_run(self) -> bool:
        """Whether the folder looks like a run directory (config, metrics or checkpoints)."""
        return self.path.is_dir() and any(p.exists() for p in (self.config, self.metrics, self.checkpoints))

    # ---------------------------------------------------------------------------------------- writing
    def write_config(self, text: str) -> Path:
        """Write ``config.yaml`` atomically."""
        return atomic_write_text(self.config, text)

    def append_metrics(self, record: dict) -> None:
        """Append one JSON line to ``metrics.jsonl`` (never a partial line)."""
        append_metrics(self.metrics, record)

    def truncate_metrics(self, step: int) -> None:
        """Drop the metrics lines written after ``step`` (a resumed run redoes them)."""
        truncate_metrics(self.metrics, step)


def tuned_schedule_name(nfe: int) -> str:
    """The file name of the schedule tuned for ``nfe`` evaluations (in a run's schedules folder, or ``--out``)."""
    return f"nfe{int(nfe)}.json"


def _canonical(value):
    """``value`` as plain JSON data: non-finite floats as strings, tuples as lists, other objects as ``str``."""
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def settings_digest(settings: Mapping, length: int = 10) -> str:
    """A short hash of the canonical JSON (sorted keys, no spaces) of ``settings``: equal settings give equal
    digests, settings that differ in anything (a key added, a value changed) give different ones."""
    text = json.dumps(_canonical(settings), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def eval_result_name(prefix: str, settings: Mapping) -> str:
    """``{prefix}-{digest}.json``: a readable ``prefix`` (characters other than letters, digits, ``._-`` become
    ``_``) and the :func:`settings_digest` of *all* the settings of the result."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", prefix).strip("_.-") or "eval"
    return f"{readable}-{settings_digest(settings)}.json"


def check_same_run(old: dict, new: dict, run_dir: Path, ckpt: Path, *, sections: Iterable[str] | None = None,
                   resumable: Iterable[str] = ()) -> None:
    """Refuse to resume ``run_dir`` (whose checkpoint ``ckpt`` was written with config dict ``old``)
    with config dict ``new`` if they differ in a key that affects the weights: any key of ``sections``
    (default: all of ``old``'s) except those named in ``resumable`` (``training`` keys by name, others as
    ``section.key``, e.g. ``data.workers``)."""
    resumable = set(resumable)
    for section in (old if sections is None else sections):
        before, after = old.get(section, {}), new.get(section, {})
        for key in sorted(set(before) | set(after)):
            if (section == "training" and key in resumable) or f"{section}.{key}" in resumable:
                continue
            if before.get(key) != after.get(key):
                raise UserError(f"{run_dir} holds a run with {section}.{key} = {before.get(key)!r} "
                                f"(in {ckpt.name}) but the config says {after.get(key)!r}; "
                                f"use a new --out directory or the same config")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines of a metrics file written after ``step`` (they will be redone) and any broken line."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def append_metrics(path: Path, record: dict) -> None:
    """Append one JSON line to a metrics file (never a partial line)."""
    append_text(path, json.dumps(record) + "\n")
