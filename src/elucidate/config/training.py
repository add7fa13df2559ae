"""The ``training`` section: the options every training loop reads (:class:`LoopConfig`, shared by diffusion
training and train-vae), the diffusion trainer's (:class:`TrainingConfig`), and its sub-sections
``training.ema`` (post-hoc power EMA) and ``training.augment`` (EDM's non-leaky augmentation).

A training option is one declaration here (``param(...)``; ``resumable=True`` if it may change when a run is
resumed) plus its use in the loop: validation, ``--set``, ``--help-config``, the docs and the resume check
follow from the declaration.
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..errors import ConfigError
from ..params import check_value, describe, param, unknown_key
from ..runtime.precision import PRECISIONS
from .schema import validate_section

__all__ = ["LoopConfig", "TrainingConfig", "resumable_keys", "AugmentSettings", "LABEL_LAYOUT", "AUGMENT_LABEL_DIM",
           "check_augment", "MAX_SIGMA_REL", "check_power_ema", "LRScheduleSettings", "LR_SCHEDULE_KEYS",
           "check_lr_schedule"]

#: widest post-hoc (power) EMA profile: the relative std of a plain running mean (EDM2 eq. 123 at gamma = 0).
MAX_SIGMA_REL = 1.0 / math.sqrt(12.0)


# ------------------------------------------------------------------------------------------------ training.lr_schedule
#: the kinds of training.lr_schedule and the keys each takes besides ``kind``
LR_SCHEDULE_KEYS = {"inv_sqrt": ("ref_batches",), "cosine": ("min_lr",), "constant": ()}


@dataclass
class LRScheduleSettings:
    """``training.lr_schedule``: the factor on ``training.lr`` after the ramp-up, a function of the step only."""

    kind: str = param("constant", "inv_sqrt (EDM2: lr / sqrt(max(t / t_ref, 1)), t = steps done), cosine (from 1 at "
                                  "the end of the ramp-up to min_lr at training.steps) or constant",
                      choices=tuple(LR_SCHEDULE_KEYS))
    ref_batches: float | None = param(None, "inv_sqrt (required): t_ref, in steps (edm2's ref_batches)",
                                      symbol="t_ref", minimum=0, exclusive=True)
    min_lr: float = param(0.0, "cosine: the factor reached at training.steps (a fraction of training.lr)", minimum=0,
                          maximum=1)


#: training.lr_schedule's description, its keys' from :class:`LRScheduleSettings`
LR_SCHEDULE_DOC = ("lr decay after the ramp-up, a function of the step only, e.g. {kind: inv_sqrt, ref_batches: "
                   "70000}; null = constant. Keys: "
                   + "; ".join(f"{p.name}: {p.doc}" + (f" ({p.range_text()})" if p.minimum is not None else "")
                               for p in describe(LRScheduleSettings)) + " (see docs/training.md)")


def check_lr_schedule(raw: Any) -> dict | None:
    """``training.lr_schedule`` validated and completed: None (constant; ``{kind: constant}`` is the same run),
    ``{kind: inv_sqrt, ref_batches: N}`` or ``{kind: cosine, min_lr: r}``."""
    if raw is None:
        return None
    kinds = " or ".join([", ".join(tuple(LR_SCHEDULE_KEYS)[:-1]), tuple(LR_SCHEDULE_KEYS)[-1]])
    if not isinstance(raw, dict):
        raise ConfigError(f"training.lr_schedule = {raw!r}: expected a mapping {{kind: inv_sqrt, ref_batches: N}}, "
                          f"{{kind: cosine}} or {{kind: constant}} (or null = constant)")
    names = [f.name for f in fields(LRScheduleSettings)]
    for key in raw:
        if key not in names:
            raise unknown_key("training.lr_schedule", key, names)
    if "kind" not in raw:
        raise ConfigError(f"training.lr_schedule.kind is missing: expected {kinds}")
    kind = raw["kind"]
    if kind not in LR_SCHEDULE_KEYS:
        raise ConfigError(f"training.lr_schedule.kind = {kind!r}: expected {kinds}")
    for key in raw:
        if key != "kind" and key not in LR_SCHEDULE_KEYS[kind]:
            takes = ", ".join(LR_SCHEDULE_KEYS[kind]) or "no other key"
            raise ConfigError(f"training.lr_schedule.{key} does not apply to kind {kind} (it takes {takes})")
    if kind == "constant":
        return None
    if kind == "inv_sqrt" and raw.get("ref_batches") is None:
        raise ConfigError("training.lr_schedule.ref_batches is missing: kind inv_sqrt needs it (t_ref, the steps "
                          "after which lr decays as 1 / sqrt(t / t_ref))")
    docs = {p.name: p for p in describe(LRScheduleSettings)}
    out = {"kind": kind}
    for name in LR_SCHEDULE_KEYS[kind]:
        try:
            value = check_value(f"training.lr_schedule.{name}", raw.get(name, docs[name].default), docs[name])
        except ValueError as e:
            raise ConfigError(str(e)) from None
        out[name] = float(value)
    return out


@dataclass
class LoopConfig:
    """What every training loop reads (images = training examples seen, as in edm's kimg)."""

    steps: int = param(2000, "optimizer steps (may be raised when resuming)", minimum=1, resumable=True)
    batch_size: int = param(64, "global batch over all processes", minimum=1)
    lr: float = param(1e-3, "learning rate after the ramp-up", minimum=0, exclusive=True)
    lr_rampup: int = param(10_000, "images over which lr ramps up linearly from 0", minimum=0)
    # not resumable: the stored config must say which lr trajectory made the weights (as lr and lr_rampup)
    lr_schedule: dict | None = param(None, LR_SCHEDULE_DOC)
    optimizer: str = param("adam", "adam or adamw", choices=("adam", "adamw"))
    betas: tuple = param(None, "Adam's (beta1, beta2)", default_factory=lambda: (0.9, 0.999))
    eps: float = param(1e-8, "Adam's epsilon", minimum=0, exclusive=True)
    weight_decay: float = param(0.0, "weight decay (decoupled for adamw)", minimum=0)
    precision: str = param("fp32", "fp32, bf16 or fp16 autocast, or auto (bf16 where the device has bf16 "
                                     "hardware, else fp32; emulated bf16 is many times slower); fp16 (with loss "
                                     "scaling) is for GPUs without bf16 (V100, T4); see docs/scale.md",
                           choices=PRECISIONS)
    seed: int = param(0, "all randomness of the run derives from it", minimum=0)
    checkpoint_every: int = param(500, "steps between checkpoints", minimum=1, resumable=True)
    sample_every: int = param(500, "steps between sample grids; 0 = only at the end", minimum=0, resumable=True)
    log_every: int = param(50, "steps between metrics.jsonl lines", minimum=1, resumable=True)
    keep_checkpoints: int = param(2, "most recent checkpoints kept; 0 = keep all", minimum=0, resumable=True)
    num_sample_images: int = param(64, "images in the periodic sample grid", minimum=1, resumable=True)
    max_bad_steps: int | None = param(100, "non-finite steps in a row (each skipped) before training stops; "
                                           "null = never", minimum=1, resumable=True)
    tensorboard: bool = param(False, "also write the metrics and sample grids as TensorBoard event files in "
                                     "RUN/tensorboard (needs: pip install 'elucidate[tensorboard]')", resumable=True)

    def validate(self) -> None:
        validate_section(self, "training")
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("training.tensorboard = true needs the tensorboard package: "
                              "pip install 'elucidate[tensorboard]' (or set it to false)")
        betas = self.betas
        if not isinstance(betas, (list, tuple)) or len(betas) != 2 or not all(
                isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas):
            raise ConfigError(f"training.betas = {betas!r}: expected two numbers in [0, 1)")
        self.betas = tuple(float(b) for b in betas)
        self.lr_schedule = check_lr_schedule(self.lr_schedule)


def resumable_keys(cls: type) -> set[str]:
    """The training keys of a section class that may change when a run is resumed (declared ``resumable``)."""
    return {p.name for p in describe(cls) if p.resumable}


@dataclass
class TrainingConfig(LoopConfig):
    """The diffusion trainer's options: the loop's, then EMA, gradients, conditions, augmentation."""

    ema_halflife: int = param(20_000, "EMA half-life in images (edm: ema_halflife_kimg x 1000)", minimum=0)
    ema_rampup: float | None = param(0.05, "half-life <= ratio x images seen (edm's ema_rampup_ratio); null = off",
                                     minimum=0, exclusive=True)
    grad_clip: float | None = param(None, "max global gradient norm; null = off (as NVlabs/edm; see docs/training.md)",
                                    minimum=0, exclusive=True)
    grad_accumulation: int = param(1, "micro-batches per step (per process)", minimum=1)
    channels_last: bool = param(False, "NHWC memory format for the network")
    compile: bool = param(False, "run the network's forward through torch.compile (eager, with one warning, where "
                                 "compilation fails); checkpoints are unchanged (see docs/scale.md)", resumable=True)
    cond_drop_prob: float = param(0.0, "probability of training a sample without its conditions (labels, "
                                       "concat, context): makes the model usable for classifier-free guidance",
                                  minimum=0, maximum=1)
    ema: dict | None = param(None, "post-hoc (power-function) EMA next to the half-life one: {type: power, "
                                   "stds: [0.05, 0.10], snapshot_every: steps (default checkpoint_every)}; "
                                   "null = off (see docs/training.md)")
    augment: dict | None = param(None, "EDM's non-leaky augmentation of the training images, e.g. {p: 0.12, xflip: "
                                       "1, translate: 1, scale: 1, rotate: 1, aniso: 1}: its parameters reach the "
                                       "network as augment_labels (zero when sampling); null = off (see "
                                       "training.augment below and docs/training.md)")
    loss_weighting: str = param("fixed", "fixed: the formulation's lambda(sigma) loss; uncertainty: EDM2's learned "
                                         "u(sigma) (Eq. 21), lambda / e^u ||D - y||^2 + u with a small u head "
                                         "trained beside the network (see docs/training.md)",
                                choices=("fixed", "uncertainty"))

    def validate(self) -> None:
        super().validate()
        if self.ema is not None:
            self.ema = check_power_ema(self.ema, self.checkpoint_every)
        if self.augment is not None:
            self.augment = check_augment(self.augment)
        if self.batch_size % self.grad_accumulation:
            raise ConfigError(f"training.batch_size = {self.batch_size} is not divisible by "
                              f"training.grad_accumulation = {self.grad_accumulation}")


# ------------------------------------------------------------------------------------------------ training.ema
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


# ------------------------------------------------------------------------------------------------ training.augment
#: The augment label vector, in order: (transform, its entries). Every entry is 0 when the transform
#: was not applied, so an all-zero vector means "not augmented" (what sampling uses).
LABEL_LAYOUT = (("xflip", 1), ("yflip", 1), ("rotate90", 3), ("translate", 2), ("scale", 1), ("rotate", 2),
                ("aniso", 2))
#: length of the augment label vector (the network's ``augment_dim`` when augmentation is on).
AUGMENT_LABEL_DIM = sum(n for _, n in LABEL_LAYOUT)


@dataclass
class AugmentSettings:
    """Per-transform probability multipliers and strengths. Each transform is applied to an image
    independently with probability ``min(1, p x multiplier)`` (a multiplier of 0 turns it off)."""

    p: float = param(0.12, "base probability of each transform", minimum=0, maximum=1)
    xflip: float = param(1.0, "multiplier for a horizontal flip", minimum=0)
    yflip: float = param(0.0, "multiplier for a vertical flip", minimum=0)
    rotate90: float = param(0.0, "multiplier for a rotation by 90, 180 or 270 degrees (square images)", minimum=0)
    translate: float = param(1.0, "multiplier for an integer translation (reflected at the borders)", minimum=0)
    scale: float = param(1.0, "multiplier for an isotropic scaling", minimum=0)
    rotate: float = param(1.0, "multiplier for a rotation by an arbitrary angle", minimum=0)
    aniso: float = param(1.0, "multiplier for an anisotropic scaling along a random axis", minimum=0)
    translate_max: float = param(0.125, "largest translation, as a fraction of the image size", minimum=0, maximum=1)
    scale_std: float = param(0.2, "std of log2 of the isotropic scale factor", minimum=0)
    rotate_max: float = param(1.0, "largest rotation as a fraction of a half turn (1 = any angle)", minimum=0,
                              maximum=1)
    aniso_std: float = param(0.2, "std of log2 of the anisotropic stretch", minimum=0)

    def probability(self, name: str) -> float:
        """The probability that transform ``name`` (a key of :data:`LABEL_LAYOUT`) is applied to an image."""
        return min(1.0, self.p * getattr(self, name))


def check_augment(raw: Any) -> dict:
    """``training.augment`` validated and completed with the defaults (every key present)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"training.augment = {raw!r}: expected a mapping such as {{p: 0.12, xflip: 1, "
                          f"rotate: 1}} (or null = off)")
    names = [f.name for f in fields(AugmentSettings)]
    for key in raw:
        if key not in names:
            raise unknown_key("training.augment", key, names)
    docs = {p.name: p for p in describe(AugmentSettings)}
    out = {}
    for name in names:
        value = raw.get(name, docs[name].default)
        if isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        try:
            out[name] = float(check_value(f"training.augment.{name}", value, docs[name]))
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return asdict(AugmentSettings(**out))
