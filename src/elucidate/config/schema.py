"""How a config file becomes typed sections: reading the YAML, ``--set section.key=value`` overrides, and a
section built from its declared fields (unknown keys named with a "did you mean", every value checked).

The section classes themselves live next to this module, one per section (:mod:`.training`,
:mod:`.sampling`, :mod:`.latent`, :mod:`.vae`), and the run config that holds them in the package
``__init__``.
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from ..data import CONFIG_KEYS as DATA_KEYS
from ..errors import ConfigError
from ..nets import NETWORKS
from ..params import did_you_mean, unknown_key, validate_fields

__all__ = ["SECTIONS", "ConfigWarning", "check_sections", "check_number", "validate_section", "typed_section",
           "apply_overrides", "parse_with_overrides", "read_config_file", "check_data", "check_network", "load_yaml"]


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading numbers as YAML 1.2 (and Python) do: ``2e-4`` and ``1E3`` are floats (YAML 1.1,
    which PyYAML implements, wants a dot, ``2.0e-4``, and would read a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


def load_yaml(text: str):
    """``yaml.safe_load`` with YAML 1.2 floats (:class:`_Loader`): what config files, ``--set`` and ``--option``
    values are read with."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


#: The sections of a run's config (the autoencoder's have their own: config.vae.VAE_SECTIONS).
SECTIONS = ("data", "network", "diffusion", "training", "sampling", "latent", "distill")


class ConfigWarning(UserWarning):
    """A config key that is accepted but has no effect (the CLI prints it as one line)."""


def check_sections(raw, sections) -> dict:
    """A raw config (None = empty) as a mapping whose top-level keys are all in ``sections``."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    for key in raw:
        if key not in sections:
            raise unknown_key("config", key, sections)
    return raw


def check_number(where: str, value: Any, *, integer: bool = False, minimum: float | None = None,
                 exclusive: bool = False, maximum: float | None = None) -> Any:
    """``value`` if it is a finite number (an integer if asked) in range, else a ConfigError naming ``where``."""
    kind = "an integer" if integer else "a number"
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or (not integer and not math.isfinite(value)):
        raise ConfigError(f"{where} = {value!r}: expected {kind}")
    if minimum is not None and (value <= minimum if exclusive else value < minimum):
        raise ConfigError(f"{where} = {value!r}: expected {kind} {'>' if exclusive else '>='} {minimum}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{where} = {value!r}: expected {kind} <= {maximum}")
    return value


def validate_section(obj: Any, section: str) -> None:
    """Check every declared field of a section object (ConfigError naming ``section.key``)."""
    try:
        validate_fields(obj, prefix=section + ".")
    except ValueError as e:
        raise ConfigError(str(e)) from None


def typed_section(cls, name: str, raw: Any):
    """The section ``name`` as an instance of ``cls`` (a dataclass with ``validate()``), from a mapping or None."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"section {name!r} must be a mapping, got {type(raw).__name__}")
    names = [f.name for f in fields(cls)]
    for key in raw:
        if key not in names:
            raise unknown_key(name, key, names)
    obj = cls(**raw)
    obj.validate()
    return obj


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...], sections=SECTIONS) -> dict:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a raw config mapping whose
    top-level sections are ``sections``. Errors name the override as the command line spells it (``--set ...``)."""
    raw = copy.deepcopy(raw or {})
    for item in overrides:
        path, sep, text = str(item).partition("=")
        keys = path.strip().split(".")
        where = f"--set {item}" if str(item).isprintable() else f"--set {item!r}"  # one line, whatever it holds
        if not sep or len(keys) < 2 or not all(keys):
            raise ConfigError(f"{where}: expected section.key=value (e.g. training.steps=200)")
        if keys[0] not in sections:
            raise ConfigError(f"{where}: {unknown_key('config', keys[0], sections)}")
        try:
            value = load_yaml(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: value is not valid YAML ({e.__class__.__name__})") from None
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{where}: {key} is not a section")
        node[keys[-1]] = value
    return raw


def parse_with_overrides(raw: dict, overrides, parse, sections=SECTIONS, *, source: str | Path | None = None):
    """``parse(apply_overrides(raw, overrides, sections))`` with an error blamed on what caused it: the override
    (``--set training.stpes=100: unknown key training.stpes ...``) or else the config itself (``source: ...``, e.g.
    its file). The culprit is the first override after which the config fails with the final error."""
    overrides = list(overrides or [])
    overridden = apply_overrides(raw, overrides, sections)  # its own errors name the override
    try:
        return parse(overridden)
    except ConfigError as e:
        final = str(e)
    failed: list[tuple[int, str]] = []  # (overrides applied, the error) of each prefix that does not parse
    for k in range(len(overrides)):
        try:
            parse(apply_overrides(raw, overrides[:k], sections))
        except ConfigError as e:
            failed.append((k, str(e)))
    k, message = next(((k, m) for k, m in failed if m == final), (len(overrides), final))
    if k == 0:  # the config fails on its own
        raise ConfigError(f"{source}: {message}" if source is not None else message) from None
    item = overrides[k - 1]
    raise ConfigError(f"--set {item if str(item).isprintable() else repr(item)}: {message}") from None


def read_config_file(path: str | Path, empty_hint: str) -> dict:
    """The mapping in a YAML config file (ConfigError if missing, unreadable or empty: ``empty_hint``
    says what to start from)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = load_yaml(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if raw is None:
        raise ConfigError(f"config file {path} is empty; {empty_hint}")
    return raw


def check_data(section: Any) -> dict:
    """The ``data`` section: its keys are those :func:`elucidate.data.build_dataset` accepts."""
    if not isinstance(section, dict):
        raise ConfigError(f"section 'data' must be a mapping, got {type(section).__name__}")
    for key in section:
        if key not in DATA_KEYS:
            raise unknown_key("data", key, DATA_KEYS)
    if "dataset" not in section:
        raise ConfigError("data.dataset is required (e.g. digits, folder, zip, npz)")
    return dict(section)


def check_network(section: Any) -> dict:
    """The ``network`` section: a registered ``arch`` (default unet) and its constructor arguments."""
    if not isinstance(section, dict):
        raise ConfigError(f"section 'network' must be a mapping, got {type(section).__name__}")
    arch = section.get("arch", "unet")
    if arch not in NETWORKS:
        raise ConfigError(f"network.arch = {arch!r}{did_you_mean(arch, NETWORKS)}: expected one of {list(NETWORKS)}")
    return {"arch": arch, **{k: v for k, v in section.items() if k != "arch"}}
