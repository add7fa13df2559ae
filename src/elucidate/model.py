"""Build a run's network from its config and data shape, and load trained runs back for sampling."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import latest_checkpoint, load_checkpoint
from .config import Config, ConfigError, parse_config
from .denoiser import Denoiser
from .errors import UserError

__all__ = ["DataInfo", "build_network_for", "LoadedRun", "load_run", "resolve_checkpoint"]


@dataclass(frozen=True)
class DataInfo:
    """What the network needs to know about the data: channels, (H, W), number of classes."""

    channels: int
    resolution: tuple[int, int]
    num_classes: int = 0

    def to_dict(self) -> dict:
        return {"channels": self.channels, "resolution": list(self.resolution), "num_classes": self.num_classes}

    @classmethod
    def from_dict(cls, d: dict) -> DataInfo:
        return cls(int(d["channels"]), tuple(int(v) for v in d["resolution"]), int(d.get("num_classes", 0)))


def build_network_for(config: Config, info: DataInfo) -> nn.Module:
    """The ``network`` section's architecture, sized for the data (channels, resolution, labels).

    ``label_dim: auto`` means "the dataset's number of classes"; shape keys given explicitly must
    agree with the data.
    """
    from .nets import build_network
    from .nets.layers import parse_resolution

    kwargs = {k: v for k, v in config.network.items() if k != "arch"}
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
    label_dim = kwargs.get("label_dim", 0)
    if label_dim == "auto":
        label_dim = info.num_classes
    if label_dim and not info.num_classes:
        raise ConfigError(f"network.label_dim = {label_dim} but the dataset has no labels")
    kwargs["label_dim"] = int(label_dim or 0)
    try:
        return build_network(config.network.get("arch", "unet"), **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"network: {e}") from None


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


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint file from a run directory (its latest) or a checkpoint path."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path / "checkpoints") or latest_checkpoint(path)
        if found is None:
            raise UserError(f"{path} has no checkpoints (expected {path}/checkpoints/ckpt-*.safetensors)")
        return found
    if not path.exists():
        raise UserError(f"{path} does not exist (expected a run directory or a checkpoint file)")
    return path


def load_run(path: Path, *, ema: bool = True, device: torch.device | str | None = None) -> LoadedRun:
    """Load a run directory or checkpoint for sampling (EMA weights by default)."""
    ckpt = resolve_checkpoint(Path(path))
    device = torch.device(device) if device is not None else torch.device("cpu")
    tensors, meta = load_checkpoint(ckpt)
    config = parse_config(meta["config"])
    info = DataInfo.from_dict(meta["data"])
    net = build_network_for(config, info)
    prefix = "ema." if ema and any(k.startswith("ema.") for k in tensors) else "net."
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"checkpoint {ckpt} does not match its network config "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    normalizer = None
    if meta.get("normalizer") is not None:
        from .data import Normalizer
        normalizer = Normalizer.from_config(meta["normalizer"])
    denoiser = Denoiser(net, config.formulation()).to(device).eval().requires_grad_(False)
    return LoadedRun(denoiser, config, info, normalizer, int(meta["step"]), ckpt)
