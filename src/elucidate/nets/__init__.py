"""Denoiser networks ``F(x, c_noise, **conditions)`` for the EDM preconditioning (eq. 7).

Architectures (``build_network(arch, ...)``):

* ``unet``   -- :class:`UNet`, a small fast U-Net; its defaults are the 8x8 digits preset.
* ``ddpmpp`` -- :class:`SongUNet` as DDPM++ (EDM ``--arch=ddpmpp``).
* ``ncsnpp`` -- :class:`SongUNet` as NCSN++ (EDM ``--arch=ncsnpp``).
* ``adm``    -- :class:`DhariwalUNet`, ADM (EDM ``--arch=adm``).
* ``diffusers_unet2d`` -- a diffusers ``UNet2DModel`` (:mod:`.diffusers_unet`; needs diffusers).
* ``dit``    -- :class:`DiT`, a transformer with adaLN-Zero (keys ``patch_size, hidden_size, depth, num_heads``).
* ``edm2``   -- :class:`EDM2UNet`, EDM2's magnitude-preserving U-Net (Karras et al. 2024; NVlabs/edm2's ``UNet``).

All share the constructor keys ``img_resolution`` (int or ``(H, W)``), ``in_channels``,
``out_channels`` (default: ``in_channels``), ``model_channels``, ``channel_mult``, ``num_blocks``,
``attn_resolutions`` (matched against the smaller side of each level's feature map), ``dropout``,
``label_dim`` (0 = unconditional), ``label_dropout``, ``augment_dim``, ``cond_channels`` (a spatial
condition concatenated to x) and ``context_dim`` (a token context for cross-attention), and the call
``forward(x, c_noise, class_labels=None, augment_labels=None, concat=None, context=None)
-> [B, out_channels, H, W]`` (the contract: :class:`~.base.DiffusionNet`; docs/conditioning.md).

``ddpmpp``, ``ncsnpp`` and ``adm`` use NVlabs/edm's tensor layouts and constructor argument names;
:func:`elucidate.nets.edm_port.load_edm_network` loads weights exported from edm (docs/edm.md). ``edm2`` uses
NVlabs/edm2's parameter names and arguments; :func:`load_edm2_network` loads weights exported from edm2.

May import: errors.
"""
from __future__ import annotations

import inspect
from types import MappingProxyType

from torch import nn

from .base import DiffusionNet
from .dhariwal_unet import DhariwalUNet
from .diffusers_unet import DiffusersUNet2D
from .dit import DiT
from .edm2 import EDM2UNet, load_edm2_network
from .song_unet import SongUNet
from .unet import UNet

__all__ = ["UNet", "SongUNet", "DhariwalUNet", "EDM2UNet", "DiffusionNet", "NETWORKS", "PRESETS",
           "UnknownArgumentError", "build_network", "count_parameters", "load_edm2_network"]

# arch -> (class, preset keyword arguments); explicit keyword arguments override the preset.
PRESETS = MappingProxyType({
    "unet": (UNet, MappingProxyType({})),
    "ddpmpp": (SongUNet, MappingProxyType(dict(
        model_channels=128, channel_mult=(2, 2, 2), embedding_type="positional", channel_mult_noise=1,
        encoder_type="standard", decoder_type="standard", resample_filter=(1, 1)))),
    "ncsnpp": (SongUNet, MappingProxyType(dict(
        model_channels=128, channel_mult=(2, 2, 2), embedding_type="fourier", channel_mult_noise=2,
        encoder_type="residual", decoder_type="standard", resample_filter=(1, 3, 3, 1)))),
    "adm": (DhariwalUNet, MappingProxyType(dict(model_channels=192, channel_mult=(1, 2, 3, 4)))),
    "diffusers_unet2d": (DiffusersUNet2D, MappingProxyType({})),
    "dit": (DiT, MappingProxyType({})),
    "edm2": (EDM2UNet, MappingProxyType({})),
})
NETWORKS: tuple[str, ...] = tuple(PRESETS)


class UnknownArgumentError(TypeError, ValueError):
    """An unknown keyword argument for a network (catchable as TypeError or ValueError)."""


def build_network(arch: str, **kwargs) -> nn.Module:
    """Build the network ``arch`` (one of :data:`NETWORKS`) from its preset updated by ``kwargs``.

    ``img_resolution`` and ``in_channels`` are required; e.g. the digits network is
    ``build_network("unet", img_resolution=8, in_channels=1, out_channels=1)``.
    """
    if arch not in PRESETS:
        raise ValueError(f"unknown network arch {arch!r}; choose one of {', '.join(NETWORKS)}")
    cls, preset = PRESETS[arch]
    accepted = [name for name in inspect.signature(cls).parameters if name != "self"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise UnknownArgumentError(f"unknown argument(s) {', '.join(unknown)} for arch {arch!r} "
                                   f"({cls.__name__}); accepted: {', '.join(accepted)}")
    return cls(**{**preset, **kwargs})


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable, by default) parameter elements in ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
