"""Build a run's network from its config and data shape, and load trained runs back for sampling."""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .augment_config import AUGMENT_LABEL_DIM
from .checkpoint import (
    CheckpointDamaged,
    CheckpointWarning,
    check_fits,
    check_run_checkpoint,
    list_checkpoints,
    load_checkpoint,
    newest_usable,
)
from .config import Config, ConfigError, parse_config
from .denoiser import Denoiser
from .errors import UserError

__all__ = ["DataInfo", "build_network_for", "LoadedRun", "load_run", "resolve_checkpoint"]


@dataclass(frozen=True)
class DataInfo:
    """What the network needs to know about the data: channels, (H, W), number of classes, channels
    of the spatial condition (0 = none) and ``(L, D)`` of the context tokens (None = none)."""

    channels: int
    resolution: tuple[int, int]
    num_classes: int = 0
    cond_channels: int = 0
    context_shape: tuple[int, int] | None = None

    def to_dict(self) -> dict:
        return {"channels": self.channels, "resolution": list(self.resolution), "num_classes": self.num_classes,
                "cond_channels": self.cond_channels,
                "context_shape": None if self.context_shape is None else list(self.context_shape)}

    @classmethod
    def from_dict(cls, d: dict) -> DataInfo:
        """Inverse of :meth:`to_dict`; metadata written before conditions existed loads as unconditioned."""
        context = d.get("context_shape")
        return cls(int(d["channels"]), tuple(int(v) for v in d["resolution"]), int(d.get("num_classes", 0)),
                   int(d.get("cond_channels", 0)), None if context is None else tuple(int(v) for v in context))

    @classmethod
    def from_dataset(cls, dataset) -> DataInfo:
        """The info of an :class:`elucidate.data.ImageDataset` (conditions included)."""
        context = getattr(dataset, "context_shape", None)
        return cls(int(dataset.channels), tuple(dataset.resolution), int(dataset.num_classes),
                   int(getattr(dataset, "cond_channels", 0)), None if context is None else tuple(context))


#: network.conditioning -> the condition kinds it turns on (latent diffusion's conditioning_key).
CONDITIONING_KINDS = {"none": (), "adm": ("labels",), "concat": ("concat",), "crossattn": ("context",),
                      "hybrid": ("concat", "context")}
_SIZE_KEYS = {"labels": "label_dim", "concat": "cond_channels", "context": "context_dim"}


def _data_size(kind: str, info: DataInfo) -> int:
    if kind == "labels":
        return info.num_classes
    if kind == "concat":
        return info.cond_channels
    return 0 if info.context_shape is None else info.context_shape[1]


_MISSING = {"labels": "class labels (folder labels / dataset.json, npz labels_key, digits)",
            "concat": "a spatial condition (npz cond_key, digits condition: lowres)",
            "context": "a context (npz context_key, digits condition: class_tokens)"}


def _condition_sizes(network: dict, info: DataInfo) -> dict[str, int]:
    """label_dim, cond_channels and context_dim from ``network.conditioning`` and/or explicit keys."""
    conditioning = network.get("conditioning")
    if conditioning is not None and conditioning not in CONDITIONING_KINDS:
        raise ConfigError(f"network.conditioning = {conditioning!r}: expected one of {', '.join(CONDITIONING_KINDS)}")
    sizes = {}
    for kind, key in _SIZE_KEYS.items():
        given, data = network.get(key), _data_size(kind, info)
        if given not in (None, "auto") and (isinstance(given, bool) or not isinstance(given, int) or given < 0):
            raise ConfigError(f"network.{key} = {given!r}: expected 'auto' or an integer >= 0")
        on = kind in CONDITIONING_KINDS[conditioning] if conditioning is not None else given not in (None, 0)
        if conditioning is not None and not on and given not in (None, 0):
            raise ConfigError(f"network.{key} = {given!r} contradicts network.conditioning = {conditioning} "
                              f"(which sets it to 0)")
        if not on or (conditioning is None and given == "auto" and not data):  # auto: 0 when the data have none
            sizes[key] = 0
            continue
        if not data:
            why = f"network.conditioning = {conditioning}" if conditioning is not None else f"network.{key} = {given!r}"
            raise ConfigError(f"{why} needs {_MISSING[kind]} but the dataset has none")
        value = data if given in (None, "auto") else given
        if (kind != "labels" and value != data) or value < data:  # labels: more classes than the data are allowed
            raise ConfigError(f"network.{key} = {given!r} does not match the data ({data}); use auto")
        sizes[key] = value
    return sizes


def build_network_for(config: Config, info: DataInfo) -> nn.Module:
    """The ``network`` section's architecture, sized for the data (channels, resolution, conditions).

    ``network.conditioning`` (none, adm, concat, crossattn, hybrid) turns on the conditions the data
    provide: ``label_dim`` (adm = class labels), ``cond_channels`` (concat) and ``context_dim``
    (crossattn; hybrid = concat + crossattn), each sized from the data; the others are 0. Without
    it, each of those keys works on its own (``auto`` = the data's size, default 0). Shape keys given
    explicitly must agree with the data. With ``training.augment``, ``augment_dim`` is the size of its
    labels (``AUGMENT_LABEL_DIM``).
    """
    from .nets import build_network
    from .nets.layers import parse_resolution

    kwargs = {k: v for k, v in config.network.items() if k not in ("arch", "conditioning")}
    H, W = info.resolution
    checks = {"img_resolution": (lambda v: parse_resolution(v) == (H, W), H if H == W else [H, W]),
              "in_channels": (lambda v: v == info.channels, info.channels),
              "out_channels": (lambda v: v == info.channels, info.channels)}
    for key, (matches, value) in checks.items():
        given = kwargs.get(key)
        try:
            ok = given is None or matches(given)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(f"network.{key} = {given!r} does not match the data ({value!r}); "
                              f"remove it to use the data's")
        kwargs[key] = value
    # a condition size of 0 is every network's default: pass it only when set, so networks without
    # that kind of condition (e.g. diffusers_unet2d has no concat/crossattn) still build
    kwargs.update({k: v for k, v in _condition_sizes(config.network, info).items() if v or k in config.network})
    if config.training.augment is not None:  # the augment labels' size (given explicitly, it must agree)
        if kwargs.get("augment_dim", AUGMENT_LABEL_DIM) != AUGMENT_LABEL_DIM:
            raise ConfigError(f"network.augment_dim = {kwargs['augment_dim']!r} does not match training.augment's "
                              f"labels ({AUGMENT_LABEL_DIM}); remove it to use theirs")
        kwargs["augment_dim"] = AUGMENT_LABEL_DIM
    try:
        return build_network(config.network.get("arch", "unet"), **kwargs)
    except (TypeError, ValueError) as e:
        why = " (training.augment needs it)" if "augment_dim" in str(e) and config.training.augment else ""
        raise ConfigError(f"network: {e}{why}") from None


@dataclass
class LoadedRun:
    """A trained model ready to sample: denoiser (in eval mode), config, data info, normalizer."""

    denoiser: Denoiser
    config: Config
    info: DataInfo
    normalizer: object | None
    step: int
    checkpoint: Path

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.info.channels, *self.info.resolution)


def _candidates(path: Path) -> tuple[list[Path], bool]:
    """(checkpoints to try, newest first; whether ``path`` is a run directory)."""
    if path.is_dir():
        found = list_checkpoints(path / "checkpoints") or list_checkpoints(path)
        if not found:
            raise UserError(f"{path} has no checkpoints (expected {path}/checkpoints/ckpt-*.safetensors)")
        return found[::-1], True
    if not path.exists():
        raise UserError(f"{path} does not exist (expected a run directory or a checkpoint file)")
    return [path], False


def _first_usable(path: Path, attempt: Callable[[Path], tuple]) -> tuple:
    """``attempt(ckpt)`` (a tuple ending in the metadata) on the newest checkpoint of ``path`` that
    is not damaged. In a run directory a damaged one is skipped with a :class:`CheckpointWarning`
    (and left in place: readers never move files); a damaged file named explicitly is an error."""
    candidates, is_run = _candidates(path)
    damaged: list[CheckpointDamaged] = []

    def on_damaged(error: CheckpointDamaged) -> None:
        if not is_run:
            raise error
        damaged.append(error)

    found = newest_usable(candidates, attempt, on_damaged)
    if found is None:
        raise UserError(f"{path} has no usable checkpoint: {damaged[0] if damaged else 'they all vanished'}"
                        + (f" (and {len(damaged) - 1} older ones are damaged too)" if len(damaged) > 1 else ""))
    ckpt, result = found
    if damaged:  # warn_explicit without a source line: the warning prints as one line
        warnings.warn_explicit(f"{'; '.join(str(e) for e in damaged)}; using {ckpt.name} (step "
                               f"{result[-1]['step']}), the newest usable checkpoint", CheckpointWarning,
                               "elucidate", 0)
    return result


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint file from a run directory (its newest undamaged one, see ``load_run``) or a
    checkpoint path (checked to be a readable checkpoint)."""
    return _first_usable(Path(path), lambda c: (c, check_run_checkpoint(c)[1]))[0]


def load_run(path: Path, *, ema: bool = True, device: torch.device | str | None = None) -> LoadedRun:
    """Load a run directory or checkpoint for sampling (EMA weights by default).

    In a run directory whose newest checkpoint is damaged (truncated, unreadable, bad metadata,
    data not matching its checksum) the newest usable one is loaded with a
    :class:`~elucidate.checkpoint.CheckpointWarning` naming both; the files are left as they are.
    A checkpoint whose tensors do not fit the configured network is a one-line ``UserError``."""
    def attempt(ckpt: Path):
        layout, _ = check_run_checkpoint(ckpt)
        tensors, meta = load_checkpoint(ckpt)
        return ckpt, layout, tensors, meta

    ckpt, layout, tensors, meta = _first_usable(Path(path), attempt)
    device = torch.device(device) if device is not None else torch.device("cpu")
    config = parse_config(meta["config"])
    info = DataInfo.from_dict(meta["data"])
    net = build_network_for(config, info)
    prefix = "ema." if ema and any(k.startswith("ema.") for k in tensors) else "net."
    check_fits(ckpt, layout, meta, {prefix: net})
    net.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    normalizer = None
    if meta.get("normalizer") is not None:
        from .data import Normalizer
        normalizer = Normalizer.from_config(meta["normalizer"])
    denoiser = Denoiser(net, config.formulation()).to(device).eval().requires_grad_(False)
    return LoadedRun(denoiser, config, info, normalizer, int(meta["step"]), ckpt)
