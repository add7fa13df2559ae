"""Run-directory bookkeeping shared by every loop that writes a run (diffusion training, train-vae):
resume only with the same config, and redo the metrics.jsonl lines written after the checkpoint."""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from .errors import UserError
from .fileio import append_text, atomic_write_text

__all__ = ["check_same_run", "truncate_metrics", "append_metrics"]


def check_same_run(old: dict, new: dict, run_dir: Path, ckpt: Path, *, sections: Iterable[str] | None = None,
                   resumable: Iterable[str] = ()) -> None:
    """Refuse to resume ``run_dir`` (whose checkpoint ``ckpt`` was written with config dict ``old``)
    with config dict ``new`` if they differ in a key that affects the weights: any key of ``sections``
    (default: all of ``old``'s) except the ``training`` keys named in ``resumable``."""
    resumable = set(resumable)
    for section in (old if sections is None else sections):
        before, after = old.get(section, {}), new.get(section, {})
        for key in sorted(set(before) | set(after)):
            if section == "training" and key in resumable:
                continue
            if before.get(key) != after.get(key):
                raise UserError(f"{run_dir} holds a run with {section}.{key} = {before.get(key)!r} "
                                f"(in {ckpt.name}) but the config says {after.get(key)!r}; "
                                f"use a new --out directory or the same config")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the metrics.jsonl lines written after ``step`` (they will be redone) and any broken line."""
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
    """Append one JSON line to metrics.jsonl (never a partial line)."""
    append_text(path, json.dumps(record) + "\n")
