"""One YAML file -> a validated ``Config`` (sections data, network, diffusion, training, sampling).

Every key is checked: unknown keys are errors with a "did you mean", values are type- and
range-checked with messages that name the key, the value and what was expected (from the fields'
declarations, see :mod:`elucidate.params`). ``--set section.key=value`` overrides are applied first.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .augment_config import check_augment
from .ema_config import check_power_ema
from .errors import ConfigError
from .formulations import FORMULATIONS, Formulation, Shifted
from .latent_config import LatentConfig, check_latent
from .params import check_value, describe, did_you_mean, param, unknown_key, validate_fields
from .precision import PRECISIONS

__all__ = ["Config", "TrainingConfig", "SamplingConfig", "ConfigWarning", "load_config", "parse_config",
           "apply_overrides", "dump_config", "diffusion_keys", "SCHEDULE_KEYS"]

SECTIONS = ("data", "network", "diffusion", "training", "sampling", "latent")
#: diffusion keys every type accepts: the sampling schedule's range and curvature (seed config schema).
SCHEDULE_KEYS = ("sigma_min", "sigma_max", "rho")


class ConfigWarning(UserWarning):
    """A config key that is accepted but has no effect (the CLI prints it as one line)."""


def diffusion_keys(name: str) -> tuple[str, ...]:
    """The parameters of the formulation ``name`` (its declared fields)."""
    return tuple(p.name for p in describe(FORMULATIONS[name]))


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


def _validate(obj: Any, section: str) -> None:
    try:
        validate_fields(obj, prefix=section + ".")
    except ValueError as e:
        raise ConfigError(str(e)) from None


@dataclass
class TrainingConfig:
    """Optimization and bookkeeping (images = training examples seen, as in edm's kimg)."""

    steps: int = param(2000, "optimizer steps (may be raised when resuming)", minimum=1)
    batch_size: int = param(64, "global batch over all processes", minimum=1)
    lr: float = param(1e-3, "learning rate after the ramp-up", minimum=0, exclusive=True)
    lr_rampup: int = param(10_000, "images over which lr ramps up linearly from 0", minimum=0)
    ema_halflife: int = param(20_000, "EMA half-life in images (edm: ema_halflife_kimg x 1000)", minimum=0)
    ema_rampup: float | None = param(0.05, "half-life <= ratio x images seen (edm's ema_rampup_ratio); null = off",
                                     minimum=0, exclusive=True)
    grad_clip: float | None = param(None, "max global gradient norm; null = off (as NVlabs/edm; see docs/training.md)",
                                    minimum=0, exclusive=True)
    precision: str = param("fp32", "fp32, bf16 autocast, or auto (bf16 where the device has bf16 hardware, "
                                     "else fp32; emulated bf16 is many times slower)", choices=PRECISIONS)
    seed: int = param(0, "all randomness of the run derives from it", minimum=0)
    checkpoint_every: int = param(500, "steps between checkpoints", minimum=1)
    sample_every: int = param(500, "steps between sample grids; 0 = only at the end", minimum=0)
    log_every: int = param(50, "steps between metrics.jsonl lines", minimum=1)
    keep_checkpoints: int = param(2, "most recent checkpoints kept; 0 = keep all", minimum=0)
    optimizer: str = param("adam", "adam or adamw", choices=("adam", "adamw"))
    weight_decay: float = param(0.0, "weight decay (decoupled for adamw)", minimum=0)
    betas: tuple = param(None, "Adam's (beta1, beta2)", default_factory=lambda: (0.9, 0.999))
    eps: float = param(1e-8, "Adam's epsilon", minimum=0, exclusive=True)
    grad_accumulation: int = param(1, "micro-batches per step (per process)", minimum=1)
    channels_last: bool = param(False, "NHWC memory format for the network")
    num_sample_images: int = param(64, "images in the periodic sample grid", minimum=1)
    cond_drop_prob: float = param(0.0, "probability of training a sample without its conditions (labels, "
                                       "concat, context): makes the model usable for classifier-free guidance",
                                  minimum=0, maximum=1)
    max_bad_steps: int | None = param(100, "non-finite steps in a row (each skipped) before training stops; "
                                           "null = never", minimum=1)
    ema: dict | None = param(None, "post-hoc (power-function) EMA next to the half-life one: {type: power, "
                                   "stds: [0.05, 0.10], snapshot_every: steps (default checkpoint_every)}; "
                                   "null = off (see docs/training.md)")
    augment: dict | None = param(None, "EDM's non-leaky augmentation of the training images, e.g. {p: 0.12, xflip: "
                                       "1, translate: 1, scale: 1, rotate: 1, aniso: 1}: its parameters reach the "
                                       "network as augment_labels (zero when sampling); null = off (see "
                                       "training.augment below and docs/training.md)")
    tensorboard: bool = param(False, "also write the metrics and sample grids as TensorBoard event files in "
                                     "RUN/tensorboard (needs: pip install 'elucidate[tensorboard]')")

    def validate(self) -> None:
        _validate(self, "training")
        if self.tensorboard:
            import importlib.util
            if importlib.util.find_spec("tensorboard") is None:
                raise ConfigError("training.tensorboard = true needs the tensorboard package: "
                                  "pip install 'elucidate[tensorboard]' (or set it to false)")
        if self.ema is not None:
            self.ema = check_power_ema(self.ema, self.checkpoint_every)
        if self.augment is not None:
            self.augment = check_augment(self.augment)
        betas = self.betas
        if not isinstance(betas, (list, tuple)) or len(betas) != 2 or not all(
                isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas):
            raise ConfigError(f"training.betas = {betas!r}: expected two numbers in [0, 1)")
        self.betas = tuple(float(b) for b in betas)
        if self.batch_size % self.grad_accumulation:
            raise ConfigError(f"training.batch_size = {self.batch_size} is not divisible by "
                              f"training.grad_accumulation = {self.grad_accumulation}")


@dataclass
class SamplingConfig:
    """Default sampler settings (the schema of the framework config page, plus a few extras)."""

    steps: int = param(18, "number of steps N (Heun: NFE = 2N - 1)", minimum=1)
    sampler: str = param("heun", "a registered solver (elucidate train --help-config lists them)")
    s_churn: float = param(0.0, "EDM Algorithm 2 stochasticity", symbol="S_churn", minimum=0)
    s_min: float = param(0.0, "churn only for sigma >= s_min", symbol="S_tmin", minimum=0, allow_inf=True)
    s_max: float = param(float("inf"), "churn only for sigma <= s_max", symbol="S_tmax", minimum=0, allow_inf=True)
    s_noise: float = param(1.0, "scale of the churn / ancestral noise", symbol="S_noise", minimum=0, exclusive=True)
    schedule: str = param("auto", "auto = the formulation's own discretization; or a named schedule "
                                  "(karras, exponential, vp, ve, iddpm, linear)")
    sigma_min: float | None = param(None, "lowest sigma of a named schedule (default 0.002, clipped to the "
                                          "model's range)", minimum=0, exclusive=True)
    sigma_max: float | None = param(None, "highest sigma of a named schedule (default 80, clipped to the "
                                          "model's range)", minimum=0, exclusive=True)
    rho: float | None = param(None, "Karras schedule exponent (default: the formulation's, else 7)", symbol="rho",
                              minimum=0, exclusive=True)
    eta: float | None = param(None, "noise of ancestral / SDE / DDIM samplers (null = the solver's default)",
                              symbol="eta", minimum=0)
    options: dict = param(None, "other options of the chosen solver, e.g. {order: 3} for lms",
                          default_factory=dict)
    guidance: float = param(1.0, "classifier-free guidance weight: D_uncond + w (D_cond - D_uncond); 1 = off, "
                                 "0 = unconditional", symbol="w", minimum=0)
    sigmas: list | None = param(None, "explicit noise levels from sigma_max down to 0 (a tuned schedule, see "
                                      "elucidate tune); overrides schedule, steps and the sigma range")

    def validate(self) -> None:
        from .sampling import SCHEDULES, SOLVERS, check_options

        _validate(self, "sampling")
        if self.sampler not in SOLVERS:
            raise ConfigError(f"sampling.sampler = {self.sampler!r}{did_you_mean(self.sampler, SOLVERS)}: "
                              f"expected one of {sorted(SOLVERS)}")
        if self.schedule != "auto" and self.schedule not in SCHEDULES:
            raise ConfigError(f"sampling.schedule = {self.schedule!r}: expected 'auto' or one of {sorted(SCHEDULES)}")
        if self.s_min > self.s_max:
            raise ConfigError(f"sampling.s_min = {self.s_min} must not exceed sampling.s_max = {self.s_max}")
        if not isinstance(self.options, dict):
            raise ConfigError(f"sampling.options = {self.options!r}: expected a mapping of solver options")
        if self.sigmas is not None:
            self._check_sigmas()
        try:
            check_options(self.sampler, self.options)
        except ValueError as e:
            raise ConfigError(f"sampling.options: {e}") from None

    def _check_sigmas(self) -> None:
        from .sampling import check_sigmas, num_steps

        ok = isinstance(self.sigmas, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.sigmas)
        try:
            if not ok:
                raise ValueError("expected a list of numbers")
            check_sigmas(self.sigmas)
        except ValueError as e:
            raise ConfigError(f"sampling.sigmas: {e}") from None
        self.sigmas = [float(v) for v in self.sigmas]
        self.steps = num_steps(self.sigmas)

    def solver_kwargs(self) -> dict:
        """Keyword arguments for the chosen solver: the config values it takes (see
        ``sampling.CONFIG_OPTIONS`` for the config-name -> argument-name map), then ``options``."""
        from .sampling import CONFIG_OPTIONS, get_solver

        spec = get_solver(self.sampler)
        kwargs = {arg: getattr(self, key) for key, arg in CONFIG_OPTIONS.items()
                  if arg in spec.options and getattr(self, key) is not None}
        kwargs.update(self.options)
        return kwargs


@dataclass
class Config:
    """A whole run: ``data`` and ``network`` are passed to their factories; the rest is typed here."""

    data: dict = field(default_factory=lambda: {"dataset": "digits"})
    network: dict = field(default_factory=lambda: {"arch": "unet"})
    diffusion: dict = field(default_factory=lambda: {"type": "EDM"})
    training: TrainingConfig = field(default_factory=TrainingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    latent: LatentConfig | None = None  # diffusion in a VAE's latent space (docs/latent.md)

    def formulation(self) -> Formulation:
        """The diffusion formulation the ``diffusion`` section describes."""
        return _formulation(self.diffusion)[0]

    def to_dict(self) -> dict:
        out = asdict(self)
        out["training"]["betas"] = list(self.training.betas)
        if out["latent"] is None:  # pixel runs: their configs look as before the section existed
            del out["latent"]
        return out


def _formulation_class(kind: Any) -> type[Formulation]:
    by_lower = {k.lower(): v for k, v in FORMULATIONS.items()}
    cls = by_lower.get(str(kind).lower())
    if cls is None:
        raise ConfigError(f"diffusion.type = {kind!r}{did_you_mean(kind, FORMULATIONS)}: "
                          f"expected one of {list(FORMULATIONS)}")
    return cls


def _formulation(section: dict) -> tuple[Formulation, dict]:
    """The formulation, and the schedule keys (sigma_min, sigma_max, rho) that are not its parameters
    (they drive the sampling schedule). Keys of other formulations give a ConfigWarning."""
    section = dict(section)
    cls = _formulation_class(section.pop("type", "EDM"))
    shift = 1.0
    for key in [k for k in section if str(k).lower() == "shift"]:
        shift = _check_number(f"diffusion.{key}", section.pop(key), minimum=0, exclusive=True)
    declared = {p.name.lower(): p for p in describe(cls)}
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
                      ConfigWarning, stacklevel=3)
    try:
        formulation = cls(**params)
        return (Shifted(formulation, shift) if shift != 1 else formulation), schedule
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
            raise unknown_key(name, key, names)
    obj = cls(**raw)
    obj.validate()
    return obj


def _check_data(section: dict) -> dict:
    from .data import CONFIG_KEYS as DATA_KEYS

    if not isinstance(section, dict):
        raise ConfigError(f"section 'data' must be a mapping, got {type(section).__name__}")
    for key in section:
        if key not in DATA_KEYS:
            raise unknown_key("data", key, DATA_KEYS)
    if "dataset" not in section:
        raise ConfigError("data.dataset is required (e.g. digits, folder, zip, npz)")
    return dict(section)


def _check_network(section: dict) -> dict:
    from .nets import NETWORKS

    if not isinstance(section, dict):
        raise ConfigError(f"section 'network' must be a mapping, got {type(section).__name__}")
    arch = section.get("arch", "unet")
    if arch not in NETWORKS:
        raise ConfigError(f"network.arch = {arch!r}{did_you_mean(arch, NETWORKS)}: expected one of {list(NETWORKS)}")
    return {"arch": arch, **{k: v for k, v in section.items() if k != "arch"}}


def parse_config(raw: dict | None) -> Config:
    """Validate a config mapping (e.g. from YAML) into a ``Config``; missing sections take defaults."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    for key in raw:
        if key not in SECTIONS:
            raise unknown_key("config", key, SECTIONS)
    defaults = Config()
    diffusion = raw.get("diffusion") or defaults.diffusion
    if not isinstance(diffusion, dict):
        raise ConfigError(f"section 'diffusion' must be a mapping, got {type(diffusion).__name__}")
    formulation, schedule = _formulation(diffusion)
    sampling = raw.get("sampling")
    if schedule:  # the seed schema's diffusion.sigma_min/sigma_max/rho drive the sampling schedule
        if sampling is not None and not isinstance(sampling, dict):
            raise ConfigError(f"section 'sampling' must be a mapping, got {type(sampling).__name__}")
        sampling = {**schedule, **(sampling or {})}
    config = Config(
        data=_check_data(raw.get("data") or defaults.data),
        network=_check_network(raw.get("network") or defaults.network),
        diffusion={},
        training=_typed_section(TrainingConfig, "training", raw.get("training")),
        sampling=_typed_section(SamplingConfig, "sampling", sampling),
        latent=check_latent(raw.get("latent")),
    )
    if config.latent is not None and config.training.augment is not None:
        raise ConfigError("training.augment is not supported with latent diffusion (it would transform latents, "
                          "not images); remove one of them")
    resolved = formulation.to_config()  # explicit per-type defaults, seed-schema spelling
    config.diffusion = {SEED_SPELLING.get(k, k): v for k, v in resolved.items()}
    return config


#: Field name -> the seed config's spelling, used in resolved configs.
SEED_SPELLING = {"P_mean": "p_mean", "P_std": "p_std"}


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...], sections=SECTIONS) -> dict:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a raw config mapping whose
    top-level sections are ``sections``."""
    raw = copy.deepcopy(raw or {})
    for item in overrides:
        path, sep, text = str(item).partition("=")
        keys = path.strip().split(".")
        if not sep or len(keys) < 2 or not all(keys):
            raise ConfigError(f"override {item!r}: expected section.key=value (e.g. training.steps=200)")
        if keys[0] not in sections:
            raise unknown_key("config", keys[0], sections)
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


def read_config_file(path: str | Path, empty_hint: str) -> dict:
    """The mapping in a YAML config file (ConfigError if missing, unreadable or empty: ``empty_hint``
    says what to start from)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if raw is None:
        raise ConfigError(f"config file {path} is empty; {empty_hint}")
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config file, apply overrides and validate."""
    raw = read_config_file(path, "start from configs/digits-edm.yaml (or write 'data: {dataset: digits}' to "
                                 "train with every other default)")
    try:
        return parse_config(apply_overrides(raw, overrides or []))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def dump_config(config: Config) -> str:
    """The resolved config as YAML (what a run directory's config.yaml holds)."""
    data = config.to_dict()
    for key in ("s_min", "s_max"):
        if data["sampling"][key] == math.inf:
            data["sampling"][key] = "inf"
    return yaml.safe_dump(data, sort_keys=False)
