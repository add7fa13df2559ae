"""Declared parameters: a dataclass field with a one-line description, its paper symbol and its valid
range. Formulations and config sections declare their fields with :func:`param`; validation, config
keys, command-line flags, ``elucidate train --help-config`` and the tables in the docs are all derived from it.

May import: errors.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

__all__ = ["param", "override", "ParamDoc", "describe", "check_value", "validate_fields", "did_you_mean",
           "unknown_key"]


def param(default: Any, doc: str, *, symbol: str = "", minimum: float | None = None, maximum: float | None = None,
          exclusive: bool = False, choices: tuple | None = None, allow_inf: bool = False,
          default_factory: Any = None, resumable: bool = False, flag: bool = False) -> Any:
    """A dataclass field carrying its description, paper symbol and valid range (``exclusive``: the
    minimum itself is not allowed). ``resumable``: a training option that may change when a run is resumed
    (it does not affect the weights); ``flag``: also a command-line flag (``--name-with-dashes``)."""
    meta = {"doc": doc, "symbol": symbol, "minimum": minimum, "maximum": maximum, "exclusive": exclusive,
            "choices": choices, "allow_inf": allow_inf, "resumable": resumable, "flag": flag}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def override(cls: type, name: str, default: Any = dataclasses.MISSING, *, doc: str | None = None,
             default_factory: Any = None) -> Any:
    """The declaration of field ``name`` of the dataclass ``cls`` with another default (and description):
    a subclass that shares an option but not its default, e.g. ``batch_size: int = override(LoopConfig,
    "batch_size", 32)``."""
    base = {f.name: f for f in dataclasses.fields(cls)}[name]
    meta = dict(base.metadata, **({"doc": doc} if doc else {}))
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class ParamDoc:
    """What a declared field means: name, kind (int, float, str, bool, ...), default, symbol, range."""

    name: str
    kind: str
    nullable: bool
    default: Any
    doc: str
    symbol: str
    minimum: float | None
    maximum: float | None
    exclusive: bool
    choices: tuple | None
    allow_inf: bool
    resumable: bool = False
    flag: bool = False

    def range_text(self) -> str:
        """The valid values in words, e.g. '> 0', 'in [0, 1]', 'one of heun, euler'."""
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        parts = []
        if self.minimum is not None:
            parts.append(f"{'>' if self.exclusive else '>='} {self.minimum:g}")
        if self.maximum is not None:
            parts.append(f"<= {self.maximum:g}")
        return " and ".join(parts)


def _kind(hint: Any) -> tuple[str, bool]:
    args = typing.get_args(hint)
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    nullable = union and type(None) in args
    base = [a for a in args if a is not type(None)] if union else [hint]
    target = base[0] if len(base) == 1 else hint
    origin = typing.get_origin(target) or target
    names = {int: "int", float: "float", str: "str", bool: "bool", tuple: "list", list: "list", dict: "mapping"}
    return names.get(origin, getattr(origin, "__name__", str(origin))), nullable


def describe(cls: type) -> list[ParamDoc]:
    """The declared fields of a dataclass (those made with :func:`param`), in order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if "doc" not in f.metadata:
            continue
        kind, nullable = _kind(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        m = f.metadata
        out.append(ParamDoc(f.name, kind, nullable, default, m["doc"], m["symbol"], m["minimum"], m["maximum"],
                            m["exclusive"], m["choices"], m["allow_inf"], m.get("resumable", False),
                            m.get("flag", False)))
    return out


def check_value(where: str, value: Any, p: ParamDoc) -> Any:
    """``value`` checked against ``p`` (ValueError naming ``where``); returns it (ints stay ints)."""
    if value is None and p.nullable:
        return value
    if p.choices is not None:
        if value not in p.choices:
            raise ValueError(f"{where} = {value!r}: expected one of {list(p.choices)}")
        return value
    if p.kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{where} = {value!r}: expected true or false")
        return value
    if p.kind == "str":
        if not isinstance(value, str):
            raise ValueError(f"{where} = {value!r}: expected a string")
        return value
    if p.kind in ("int", "float"):
        integer = p.kind == "int"
        what = "an integer" if integer else "a number"
        if p.allow_inf and isinstance(value, str) and value.lower() in ("inf", ".inf", "infinity"):
            value = math.inf
        ok = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok or (not integer and math.isnan(value)) or (
                not integer and math.isinf(value) and not p.allow_inf):
            raise ValueError(f"{where} = {value!r}: expected {what}" + (" (or inf)" if p.allow_inf else ""))
        if p.minimum is not None and (value <= p.minimum if p.exclusive else value < p.minimum):
            raise ValueError(f"{where} = {value!r}: expected {what} {p.range_text()}")
        if p.maximum is not None and value > p.maximum:
            raise ValueError(f"{where} = {value!r}: expected {what} {p.range_text()}")
        return value
    return value


def validate_fields(obj: Any, prefix: str = "") -> None:
    """Check every declared field of a dataclass instance (ValueError naming the first bad one)."""
    for p in describe(type(obj)):
        value = check_value(prefix + p.name, getattr(obj, p.name), p)
        if value is not getattr(obj, p.name):
            object.__setattr__(obj, p.name, value)


def did_you_mean(key: Any, choices) -> str:
    """`` (did you mean 'x'?)`` for the choice closest to ``key``, or "" when none is close."""
    close = difflib.get_close_matches(str(key), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_key(section: str, key: Any, choices) -> ConfigError:
    """The one-line error for a key of ``section`` that is not one of ``choices``."""
    return ConfigError(f"unknown key {section}.{key}{did_you_mean(key, choices)}; expected one of {sorted(choices)}")
