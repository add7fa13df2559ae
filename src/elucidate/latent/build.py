"""From a VAE config to modules, and trained autoencoders back from run directories."""
from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import load_checkpoint
from ..errors import ConfigError, UserError
from ..runfiles import resolve_checkpoint
from .autoencoder import AutoencoderKL
from .config import VAEConfig, parse_vae_config
from .vae_loss import VAELoss

__all__ = ["build_autoencoder", "build_vae_loss", "load_vae", "load_vae_checkpoint", "OptimizerPair", "CHECKPOINT_KIND"]

#: ``meta["kind"]`` of an autoencoder checkpoint (diffusion checkpoints have none).
CHECKPOINT_KIND = "vae"


def build_autoencoder(config: VAEConfig, channels: int, resolution: tuple[int, int]) -> AutoencoderKL:
    """The config's AutoencoderKL for data with ``channels`` and ``(H, W)`` resolution."""
    H, W = resolution
    try:
        return AutoencoderKL(img_resolution=(H, W), in_channels=channels, **config.model.kwargs())
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


def build_vae_loss(config: VAEConfig, channels: int, *, device: torch.device | str | None = None) -> VAELoss:
    """The config's VAELoss (discriminator, log-variance and, if asked for, the perceptual network)."""
    from .perceptual import load_feature_network

    c = config.loss
    perceptual = None
    if c.perceptual is not None and c.perceptual_weight > 0:
        try:
            perceptual = load_feature_network(c.perceptual, device=device)
        except UserError as e:
            raise ConfigError(f"loss.perceptual: {e}") from None
    return VAELoss(channels, kl_weight=c.kl_weight, perceptual_weight=c.perceptual_weight, perceptual=perceptual,
                   disc_weight=c.disc_weight, disc_start=c.disc_start, disc_loss=c.disc_loss,
                   disc_layers=c.disc_layers, disc_channels=c.disc_channels, logvar_init=c.logvar_init)


def load_vae_checkpoint(run_or_checkpoint: str | Path) -> tuple[dict, dict, Path]:
    """(tensors, metadata, checkpoint path) of an autoencoder run directory's latest checkpoint or a
    checkpoint file; a diffusion checkpoint is refused."""
    ckpt = resolve_checkpoint(Path(run_or_checkpoint))
    tensors, meta = load_checkpoint(ckpt)
    if meta.get("kind") != CHECKPOINT_KIND:
        raise UserError(f"{ckpt} is not an autoencoder checkpoint (written by `elucidate train`, not train-vae)")
    return tensors, meta, ckpt


def load_vae(run_or_checkpoint: str | Path, device: torch.device | str | None = None) -> AutoencoderKL:
    """The trained AutoencoderKL of a VAE run directory (latest checkpoint) or checkpoint file, in
    eval mode without gradients, on ``device`` (default CPU)."""
    tensors, meta, ckpt = load_vae_checkpoint(run_or_checkpoint)
    config = parse_vae_config(meta["config"])
    data = meta["data"]
    vae = build_autoencoder(config, int(data["channels"]), tuple(int(v) for v in data["resolution"]))
    state = {k[len("net.vae."):]: v for k, v in tensors.items() if k.startswith("net.vae.")}
    missing, unexpected = vae.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"checkpoint {ckpt} does not match its model config "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    vae.eval().requires_grad_(False)
    return vae.to(device) if device is not None else vae


class OptimizerPair:
    """Two optimizers seen as one state dict (ids of the second shifted past the first's), so one
    checkpoint holds both through :func:`elucidate.checkpoint.save_checkpoint`'s optimizer slot."""

    def __init__(self, first: torch.optim.Optimizer, second: torch.optim.Optimizer):
        self.first, self.second = first, second

    def _count(self) -> int:
        return sum(len(g["params"]) for g in self.first.param_groups)

    def state_dict(self) -> dict:
        a, b = self.first.state_dict(), self.second.state_dict()
        n = self._count()
        state = dict(a["state"])
        state.update({pid + n: value for pid, value in b["state"].items()})
        groups = a["param_groups"] + [dict(g, params=[p + n for p in g["params"]]) for g in b["param_groups"]]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state: dict) -> None:
        k, n = len(self.first.param_groups), self._count()
        groups_a, groups_b = state["param_groups"][:k], state["param_groups"][k:]
        self.first.load_state_dict({"state": {p: v for p, v in state["state"].items() if p < n},
                                    "param_groups": groups_a})
        self.second.load_state_dict({"state": {p - n: v for p, v in state["state"].items() if p >= n},
                                     "param_groups": [dict(g, params=[p - n for p in g["params"]]) for g in groups_b]})
