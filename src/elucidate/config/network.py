"""The ``network`` section sized for the data: what the network needs to know about the data
(:class:`DataInfo`: channels, resolution, conditions) and :func:`build_network_for`, which turns the section's
``arch`` and keys into a network whose shapes and conditions fit the data.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError
from ..nets import build_network
from ..nets.layers import parse_resolution
from .training import AUGMENT_LABEL_DIM

__all__ = ["DataInfo", "CONDITIONING_KINDS", "build_network_for"]


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


def build_network_for(config, info: DataInfo) -> nn.Module:
    """The ``network`` section's architecture, sized for the data (channels, resolution, conditions).

    ``network.conditioning`` (none, adm, concat, crossattn, hybrid) turns on the conditions the data
    provide: ``label_dim`` (adm = class labels), ``cond_channels`` (concat) and ``context_dim``
    (crossattn; hybrid = concat + crossattn), each sized from the data; the others are 0. Without
    it, each of those keys works on its own (``auto`` = the data's size, default 0). Shape keys given
    explicitly must agree with the data. With ``training.augment``, ``augment_dim`` is the size of its
    labels (``AUGMENT_LABEL_DIM``).
    """
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
