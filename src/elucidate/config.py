"""One YAML file -> a validated ``Config`` (sections data, network, diffusion, training, sampling).

Every key is checked: unknown keys are errors with a "did you mean", values are type- and
range-checked with messages that name the key, the value and what was expected.
``--set section.key=value`` overrides are applied before validation.
"""
from __future__ import annotations

import copy
import difflib
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .formulations import FORMULATIONS, Formulation, make_formulation

__all__ = ["Config", "TrainingConfig", "SamplingConfig", "load_config", "parse_config", "apply_overrides",
           "dump_config", "DIFFUSION_KEYS"]

SECTIONS = ("data", "network", "diffusion", "training", "sampling")

#: Keys each diffusion type accepts (matched case-insensitively to the formulation's fields).
DIFFUSION_KEYS: dict[str, tuple[str, ...]] = {
    name: tuple(f.name for f in fields(cls)) for name, cls in FORMULATIONS.items()  # type: ignore[arg-type]
}


def _suggest(key: str, choices) -> str:
    close = difflib.get_close_matches(str(key), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown(section: str, key: str, choices) -> ConfigError:
    return ConfigError(f"unknown key {section}.{key}{_suggest(key, choices)}; expected one of {sorted(choices)}")


def _check_number(where: str, value: Any, *, integer: bool = False, minimum: float | None = None,
                  exclusive: bool = False, maximum: float | None = None) -> Any:
    kind = "an integer" if integer else "a number"
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or (not integer and not math.isfinite(value)):
        raise ConfigError(f"{where} = {value!r}: expected {kind}")
    if minimum is not None and (value <= minimum if exclusive else value < minimum):
        raise ConfigError(f"{where} = {value!r}: expected {kind} {'>' if exclusive else '>='} {minimum}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{where} = {value!r}: expected {kind} <= {maximum}")
    return value


@dataclass
class TrainingConfig:
    """Optimization and bookkeeping (images = training examples seen, as in edm's kimg)."""

    steps: int = 2000
    batch_size: int = 64            # global batch, over all processes
    lr: float = 1e-3
    lr_rampup: int = 10_000         # images over which lr ramps up linearly from 0
    ema_halflife: int = 20_000      # EMA half-life in images (edm: ema_halflife_kimg * 1000)
    ema_rampup: float | None = 0.05 # half-life <= ratio * images seen (edm's ema_rampup_ratio); null = off
    grad_clip: float | None = 1.0   # max global gradient norm; null = off
    precision: str = "fp32"         # fp32 | bf16 (autocast)
    seed: int = 0
    checkpoint_every: int = 500     # steps
    sample_every: int = 500         # steps; 0 = only at the end
    log_every: int = 50             # steps between metrics.jsonl lines
    keep_checkpoints: int = 2       # most recent checkpoints kept; 0 = keep all
    optimizer: str = "adam"         # adam | adamw
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    grad_accumulation: int = 1      # micro-batches per step (per process)
    channels_last: bool = False
    num_sample_images: int = 64     # images in the periodic sample grid
    max_bad_steps: int | None = 100 # non-finite steps in a row (each skipped) before training stops; null = never

    def validate(self) -> None:
        w = "training."
        for key in ("steps", "batch_size", "checkpoint_every", "log_every", "grad_accumulation", "num_sample_images"):
            _check_number(w + key, getattr(self, key), integer=True, minimum=1)
        for key in ("lr_rampup", "ema_halflife", "sample_every", "keep_checkpoints", "seed"):
            _check_number(w + key, getattr(self, key), integer=True, minimum=0)
        _check_number(w + "lr", self.lr, minimum=0, exclusive=True)
        _check_number(w + "weight_decay", self.weight_decay, minimum=0)
        _check_number(w + "eps", self.eps, minimum=0, exclusive=True)
        if self.ema_rampup is not None:
            _check_number(w + "ema_rampup", self.ema_rampup, minimum=0, exclusive=True)
        if self.grad_clip is not None:
            _check_number(w + "grad_clip", self.grad_clip, minimum=0, exclusive=True)
        if self.max_bad_steps is not None:
            _check_number(w + "max_bad_steps", self.max_bad_steps, integer=True, minimum=1)
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"training.precision = {self.precision!r}: expected 'fp32' or 'bf16'")
        if self.optimizer not in ("adam", "adamw"):
            raise ConfigError(f"training.optimizer = {self.optimizer!r}: expected 'adam' or 'adamw'")
        if not isinstance(self.channels_last, bool):
            raise ConfigError(f"training.channels_last = {self.channels_last!r}: expected true or false")
        betas = self.betas
        if not isinstance(betas, (list, tuple)) or len(betas) != 2 or not all(
                isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise ConfigError(f"training.betas = {betas!r}: expected two numbers in [0, 1)")
        self.betas = tuple(float(b) for b in betas)
        if self.batch_size % self.grad_accumulation:
            raise ConfigError(f"training.batch_size = {self.batch_size} is not divisible by "
                              f"training.grad_accumulation = {self.grad_accumulation}")


@dataclass
class SamplingConfig:
    """Default sampler settings (the schema of the framework config page, plus a few extras)."""

    steps: int = 18
    sampler: str = "heun"
    s_churn: float = 0.0
    s_min: float = 0.0
    s_max: float = float("inf")
    s_noise: float = 1.0
    schedule: str = "auto"          # auto = the formulation's own discretization; or karras|exponential|vp|ve|iddpm
    sigma_min: float | None = None  # override the schedule's range (default: the formulation's)
    sigma_max: float | None = None
    rho: float | None = None
    eta: float | None = None        # for ancestral / SDE samplers

    def validate(self) -> None:
        from .sampling import SCHEDULES, SOLVERS

        _check_number("sampling.steps", self.steps, integer=True, minimum=1)
        if self.sampler not in SOLVERS:
            raise ConfigError(f"sampling.sampler = {self.sampler!r}{_suggest(self.sampler, SOLVERS)}: "
                              f"expected one of {sorted(SOLVERS)}")
        if self.schedule != "auto" and self.schedule not in SCHEDULES:
            raise ConfigError(f"sampling.schedule = {self.schedule!r}: expected 'auto' or one of {sorted(SCHEDULES)}")
        _check_number("sampling.s_churn", self.s_churn, minimum=0)
        _check_number("sampling.s_noise", self.s_noise, minimum=0, exclusive=True)
        for key in ("s_min", "s_max"):
            value = getattr(self, key)
            if isinstance(value, str) and value.lower() in ("inf", ".inf", "infinity"):
                setattr(self, key, float("inf"))
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"sampling.{key} = {value!r}: expected a number >= 0 (or inf)")
        if self.s_min > self.s_max:
            raise ConfigError(f"sampling.s_min = {self.s_min} must not exceed sampling.s_max = {self.s_max}")
        for key in ("sigma_min", "sigma_max", "rho"):
            if getattr(self, key) is not None:
                _check_number(f"sampling.{key}", getattr(self, key), minimum=0, exclusive=True)
        if self.eta is not None:
            _check_number("sampling.eta", self.eta, minimum=0)

    def solver_kwargs(self) -> dict:
        """Keyword arguments for the chosen solver (only those it takes)."""
        kwargs = {}
        if self.sampler in ("heun", "euler"):
            if self.s_churn > 0:
                kwargs.update(s_churn=self.s_churn, s_tmin=self.s_min, s_tmax=self.s_max, s_noise=self.s_noise)
        elif self.sampler in ("euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde"):
            kwargs["s_noise"] = self.s_noise
            if self.eta is not None:
                kwargs["eta"] = self.eta
        return kwargs


@dataclass
class Config:
    """A whole run: ``data`` and ``network`` are passed to their factories; the rest is typed here."""

    data: dict = field(default_factory=lambda: {"dataset": "digits"})
    network: dict = field(default_factory=lambda: {"arch": "unet"})
    diffusion: dict = field(default_factory=lambda: {"type": "EDM"})
    training: TrainingConfig = field(default_factory=TrainingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def formulation(self) -> Formulation:
        """The diffusion formulation the ``diffusion`` section describes."""
        return _formulation(self.diffusion)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["training"]["betas"] = list(self.training.betas)
        return out


def _formulation(section: dict) -> Formulation:
    section = dict(section)
    kind = section.pop("type", "EDM")
    by_lower = {k.lower(): k for k in FORMULATIONS}
    if str(kind).lower() not in by_lower:
        raise ConfigError(f"diffusion.type = {kind!r}{_suggest(kind, FORMULATIONS)}: expected one of {list(FORMULATIONS)}")
    name = by_lower[str(kind).lower()]
    allowed = {k.lower(): k for k in DIFFUSION_KEYS[name]}
    params = {}
    for key, value in section.items():
        if str(key).lower() not in allowed:
            raise ConfigError(f"unknown key diffusion.{key} for type {name}{_suggest(str(key).lower(), allowed)}; "
                              f"expected one of {sorted(allowed)}")
        _check_number(f"diffusion.{key}", value, integer=allowed[str(key).lower()] == "M")
        params[allowed[str(key).lower()]] = value
    try:
        return make_formulation(name, **params)
    except ValueError as e:
        raise ConfigError(f"diffusion: {e}") from None


def _typed_section(cls, name: str, raw: Any):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"section {name!r} must be a mapping, got {type(raw).__name__}")
    names = [f.name for f in fields(cls)]
    for key in raw:
        if key not in names:
            raise _unknown(name, key, names)
    obj = cls(**raw)
    obj.validate()
    return obj


def _check_data(section: dict) -> dict:
    from .data import CONFIG_KEYS as DATA_KEYS

    if not isinstance(section, dict):
        raise ConfigError(f"section 'data' must be a mapping, got {type(section).__name__}")
    for key in section:
        if key not in DATA_KEYS:
            raise _unknown("data", key, DATA_KEYS)
    if "dataset" not in section:
        raise ConfigError("data.dataset is required (e.g. digits, folder, zip, npz)")
    return dict(section)


def _check_network(section: dict) -> dict:
    from .nets import NETWORKS

    if not isinstance(section, dict):
        raise ConfigError(f"section 'network' must be a mapping, got {type(section).__name__}")
    arch = section.get("arch", "unet")
    if arch not in NETWORKS:
        raise ConfigError(f"network.arch = {arch!r}{_suggest(arch, NETWORKS)}: expected one of {list(NETWORKS)}")
    return {"arch": arch, **{k: v for k, v in section.items() if k != "arch"}}


def parse_config(raw: dict | None) -> Config:
    """Validate a config mapping (e.g. from YAML) into a ``Config``; missing sections take defaults."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    for key in raw:
        if key not in SECTIONS:
            raise _unknown("config", key, SECTIONS)
    defaults = Config()
    diffusion = raw.get("diffusion") or defaults.diffusion
    if not isinstance(diffusion, dict):
        raise ConfigError(f"section 'diffusion' must be a mapping, got {type(diffusion).__name__}")
    config = Config(
        data=_check_data(raw.get("data") or defaults.data),
        network=_check_network(raw.get("network") or defaults.network),
        diffusion=dict(diffusion),
        training=_typed_section(TrainingConfig, "training", raw.get("training")),
        sampling=_typed_section(SamplingConfig, "sampling", raw.get("sampling")),
    )
    resolved = config.formulation().to_config()  # explicit per-type defaults, seed-schema spelling
    config.diffusion = {("p_mean" if k == "P_mean" else "p_std" if k == "P_std" else k): v for k, v in resolved.items()}
    return config


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a raw config mapping."""
    raw = copy.deepcopy(raw or {})
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        path, text = item.split("=", 1)
        keys = path.strip().split(".")
        if len(keys) < 2 or not all(keys):
            raise ConfigError(f"override {item!r}: expected section.key=value (e.g. training.steps=200)")
        if keys[0] not in SECTIONS:
            raise _unknown("config", keys[0], SECTIONS)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e.__class__.__name__})") from None
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {key} is not a section")
        node[keys[-1]] = value
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config file, apply overrides and validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from None
    try:
        return parse_config(apply_overrides(raw or {}, overrides or []))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def dump_config(config: Config) -> str:
    """The resolved config as YAML (what a run directory's config.yaml holds)."""
    data = config.to_dict()
    for key in ("s_min", "s_max"):
        if data["sampling"][key] == float("inf"):
            data["sampling"][key] = "inf"
    return yaml.safe_dump(data, sort_keys=False)
