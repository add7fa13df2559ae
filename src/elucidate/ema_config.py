"""Validation of ``training.ema`` (the post-hoc power EMA of :mod:`elucidate.training.phema`)."""
from __future__ import annotations

import math
from typing import Any

from .errors import ConfigError

__all__ = ["MAX_SIGMA_REL", "check_power_ema"]

#: widest power EMA profile (relative std of a plain running mean, EDM2 eq. 123 at gamma = 0); equals
#: training.phema.MAX_SIGMA_REL (not imported: training imports config).
MAX_SIGMA_REL = 1.0 / math.sqrt(12.0)


def check_power_ema(ema: Any, checkpoint_every: int) -> dict:
    """training.ema, validated and completed: {type: power, stds: [...], snapshot_every: N}."""
    if not isinstance(ema, dict):
        raise ConfigError(f"training.ema = {ema!r}: expected a mapping {{type: power, stds: [...], snapshot_every: N}}")
    for key in ema:
        if key not in ("type", "stds", "snapshot_every"):
            raise ConfigError(f"unknown key training.ema.{key}; expected type, stds or snapshot_every")
    if ema.get("type", "power") != "power":
        raise ConfigError(f"training.ema.type = {ema.get('type')!r}: expected 'power'")
    stds = ema.get("stds", [0.05, 0.10])
    if not isinstance(stds, (list, tuple)) or not stds or any(
            isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s < MAX_SIGMA_REL for s in stds):
        raise ConfigError(f"training.ema.stds = {stds!r}: expected a non-empty list of relative stds in "
                          f"(0, {MAX_SIGMA_REL:.4f})")
    if len(set(stds)) != len(stds):
        raise ConfigError(f"training.ema.stds = {stds!r}: has duplicates")
    every = ema.get("snapshot_every", checkpoint_every)
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ConfigError(f"training.ema.snapshot_every = {every!r}: expected an integer >= 1")
    return {"type": "power", "stds": [float(s) for s in stds], "snapshot_every": every}
