"""Build a run's network from its config and data shape, and load trained runs back for sampling."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .augment_config import AUGMENT_LABEL_DIM
from .checkpoint import check_fits, check_run_checkpoint, load_checkpoint
from .config import Config, ConfigError, parse_config
from .denoiser import Denoiser
from .runfiles import DataInfo, first_usable, resolve_checkpoint

__all__ = ["DataInfo", "build_network_for", "LoadedRun", "load_run", "resolve_checkpoint"]


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
    """A trained model ready to sample: denoiser (in eval mode), config, data info (of what the model
    generates: latents for a latent run), normalizer (of the images) and ``decode`` (latents -> images
    for a latent run, else None)."""

    denoiser: Denoiser
    config: Config
    info: DataInfo
    normalizer: object | None
    step: int
    checkpoint: Path
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """The shape the sampler generates (latents for a latent run)."""
        return (self.info.channels, *self.info.resolution)

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """Generated samples as images in model range: decoded for a latent run, else ``x`` itself."""
        return x if self.decode is None else self.decode(x)


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

    ckpt, layout, tensors, meta = first_usable(Path(path), attempt)
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
    decode = None
    if meta.get("latent") is not None:
        from .latent.diffusion import load_latent_decoder
        decode = load_latent_decoder(ckpt, meta["latent"], device)
    return LoadedRun(denoiser, config, info, normalizer, int(meta["step"]), ckpt, decode)
