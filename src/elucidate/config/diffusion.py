"""The ``diffusion`` section: ``type`` (a registered formulation) and that formulation's declared parameters,
plus ``shift`` and the schedule keys every type accepts (the framework config schema's sigma_min, sigma_max, rho).
"""
from __future__ import annotations

import warnings
from typing import Any

from ..errors import ConfigError
from ..formulations import FORMULATIONS, Formulation, Shifted
from ..params import check_value, describe, did_you_mean
from .schema import ConfigWarning, check_number

__all__ = ["SCHEDULE_KEYS", "SCHEMA_SPELLING", "diffusion_keys", "formulation_class", "parse_diffusion", "resolved"]

#: diffusion keys every type accepts: the sampling schedule's range and curvature (framework config schema).
SCHEDULE_KEYS = ("sigma_min", "sigma_max", "rho")
#: Field name -> the framework config schema's spelling, used in resolved configs.
SCHEMA_SPELLING = {"P_mean": "p_mean", "P_std": "p_std"}


def diffusion_keys(name: str) -> tuple[str, ...]:
    """The parameters of the formulation ``name`` (its declared fields)."""
    return tuple(p.name for p in describe(FORMULATIONS[name]))


def formulation_class(kind: Any) -> type[Formulation]:
    """The registered formulation named ``kind`` (case-insensitive; ConfigError with the choices)."""
    by_lower = {k.lower(): v for k, v in FORMULATIONS.items()}
    cls = by_lower.get(str(kind).lower())
    if cls is None:
        raise ConfigError(f"diffusion.type = {kind!r}{did_you_mean(kind, FORMULATIONS)}: "
                          f"expected one of {list(FORMULATIONS)}")
    return cls


def parse_diffusion(section: dict) -> tuple[Formulation, dict]:
    """The formulation, and the schedule keys (sigma_min, sigma_max, rho) that are not its parameters
    (they drive the sampling schedule). Keys of other formulations give a ConfigWarning."""
    section = dict(section)
    cls = formulation_class(section.pop("type", "EDM"))
    declared = {p.name.lower(): p for p in describe(cls)}
    shift = 1.0
    for key in [k for k in section if str(k).lower() == "shift" and "shift" not in declared]:  # Flow declares its own
        shift = check_number(f"diffusion.{key}", section.pop(key), minimum=0, exclusive=True)
    elsewhere = {p.name.lower() for other in FORMULATIONS.values() for p in describe(other)}
    params, schedule, ignored = {}, {}, []
    for key, value in section.items():
        lower = str(key).lower()
        if lower in declared:
            try:
                params[declared[lower].name] = check_value(f"diffusion.{key}", value, declared[lower])
            except ValueError as e:
                raise ConfigError(str(e)) from None
        elif lower in SCHEDULE_KEYS:
            schedule[lower] = value
        elif lower in elsewhere:
            ignored.append(str(key))
        else:
            choices = sorted(set(declared) | set(SCHEDULE_KEYS) | {"shift"})
            raise ConfigError(f"unknown key diffusion.{key} for type {cls.name}{did_you_mean(lower, choices)}; "
                              f"expected one of {choices}")
    if ignored:
        warnings.warn(f"diffusion keys {', '.join(ignored)} are not parameters of type {cls.name}; ignored",
                      ConfigWarning, stacklevel=4)
    try:
        formulation = cls(**params)
        return (Shifted(formulation, shift) if shift != 1 else formulation), schedule
    except ValueError as e:
        raise ConfigError(f"diffusion: {e}") from None


def resolved(formulation: Formulation) -> dict:
    """The section as a resolved config holds it: every parameter explicit, in the schema's spelling."""
    return {SCHEMA_SPELLING.get(k, k): v for k, v in formulation.to_config().items()}
