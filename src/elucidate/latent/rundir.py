"""Run-directory bookkeeping with the diffusion loop's rules (resume only with the same config, redo
metrics.jsonl lines written after the checkpoint). Candidates for sharing with ``training/loop.py``."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from ..fileio import atomic_write_text
from .config import RESUMABLE_KEYS, VAEConfig

__all__ = ["check_same_run", "truncate_metrics", "append_metrics"]


def check_same_run(saved: VAEConfig, config: VAEConfig, run_dir: Path, ckpt: Path) -> None:
    """Refuse to resume ``run_dir`` with a config that differs in a key that affects the weights."""
    old, new = saved.to_dict(), config.to_dict()
    for section in old:
        for key in sorted(set(old[section]) | set(new[section])):
            if section == "training" and key in RESUMABLE_KEYS:
                continue
            if old[section].get(key) != new[section].get(key):
                raise UserError(f"{run_dir} holds a run with {section}.{key} = {old[section].get(key)!r} "
                                f"(in {ckpt.name}) but the config says {new[section].get(key)!r}; "
                                f"use a new --out directory or the same config")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics.jsonl lines written after ``step`` (they will be redone)."""
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
    """Append one JSON line to metrics.jsonl."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
