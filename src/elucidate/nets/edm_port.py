"""Load networks trained with NVlabs/edm (Karras et al. 2022) into our SongUNet / DhariwalUNet.

edm publishes pickles; elucidate never unpickles. The user exports the network's tensors with
edm's own code, in edm's environment (``safetensors.torch.save_file(net.model.state_dict(), path)``,
see docs/edm.md), and :func:`load_edm_network` builds our network from that file. Our layers follow
edm's tensor layouts (q/k/v channel order, SongUNet's ``[sin, cos]`` noise embedding), so a port
only renames keys, drops edm's constant ``resample_filter`` buffers and, for iDDPM networks, the
learned-variance output channels.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError
from . import build_network
from .base import read_state_dict
from .layers import Conv2d

__all__ = ["EDM_ARCHS", "convert_edm_state_dict", "edm_network_kwargs", "load_edm_network"]

EDM_ARCHS = ("ddpmpp", "ncsnpp", "adm")  # edm's SongUNet (DDPM++, NCSN++) and DhariwalUNet (ADM)
PRECOND_BUFFERS = ("u",)  # iDDPMPrecond's sigma table, next to "model.*" when a whole Precond is exported

# edm's ModuleDict entries are "<res>x<res>_<layer>" under enc / dec (edm's training/networks.py).
_LEVEL_KEY = re.compile(r"^(enc|dec)\.(\d+)x(\d+)_(conv|down|up|in0|in1|block\d+|aux_down|aux_skip|aux_residual"
                        r"|aux_up|aux_norm|aux_conv)\.(.+)$")
_TOP_KEY = re.compile(r"^(map_noise|map_label|map_augment|map_layer0|map_layer1|out_norm|out_conv)\.")
_ATTENTION = {"norm2": "attn.norm", "qkv": "attn.qkv", "proj": "attn.proj"}  # edm UNetBlock -> our SelfAttention


@dataclass(frozen=True)
class _Entry:
    """One edm key: ``side`` enc/dec ('' for the mapping network and output layers)."""
    key: str
    side: str = ""
    res: int = 0
    layer: str = ""
    rest: str = ""

    @property
    def block(self) -> int | None:
        return int(self.layer[5:]) if self.layer.startswith("block") else None


class _EdmState:
    """An edm network state dict, parsed: resolutions, levels, blocks per level, resample filter."""

    def __init__(self, state: Mapping[str, torch.Tensor], arch: str):
        if arch not in EDM_ARCHS:
            raise UserError(f"unknown edm arch {arch!r}; choose one of {', '.join(EDM_ARCHS)}")
        self.arch, self.state, self.entries = arch, _strip_precond(state), []
        for key in self.state:
            m = _LEVEL_KEY.match(key)
            if m is None and _TOP_KEY.match(key) is None:
                raise UserError(f"unexpected key {key!r} in the edm state dict (not a SongUNet/DhariwalUNet tensor)")
            if m is not None and m[2] != m[3]:
                raise UserError(f"unexpected key {key!r} in the edm state dict (edm networks are square)")
            self.entries.append(_Entry(key, m[1], int(m[2]), m[4], m[5]) if m else _Entry(key))
        convs = [e for e in self.entries if e.side == "enc" and e.layer == "conv"]
        if not convs:
            raise UserError("missing key 'enc.<R>x<R>_conv.weight' in the edm state dict (the input convolution)")
        self.top = convs[0].res
        adm = "out_conv.weight" in self.state  # SongUNet's output layers are dec.*_aux_conv
        if adm != (arch == "adm"):
            family = "DhariwalUNet (arch 'adm')" if adm else "SongUNet (arch 'ddpmpp' or 'ncsnpp')"
            raise UserError(f"the edm state dict is a {family}, not arch {arch!r}")
        self.levels = {e.key: self._level(e) for e in self.entries if e.side}
        self.bottom = max(self.levels.values())
        self.num_blocks = 1 + max((e.block for e in self.entries if e.side == "enc" and e.block is not None),
                                  default=0)
        self.filter = None
        for e in self.entries:
            if e.key.endswith(".resample_filter"):
                f = self.state[e.key].float()
                if self.filter is not None and (f.shape != self.filter.shape or not torch.allclose(f, self.filter)):
                    raise UserError(f"edm key {e.key!r} holds a resample filter unlike the network's others")
                self.filter = f

    def _level(self, e: _Entry) -> int:
        level = round(math.log2(self.top / e.res)) if 0 < e.res <= self.top else -1
        if level < 0 or self.top >> level != e.res:
            raise UserError(f"unexpected key {e.key!r} in the edm state dict ({e.res} is not {self.top} / 2^k)")
        return level

    def rename(self, e: _Entry) -> str:
        """Our name for edm's key (edm's per-resolution names -> our per-level modules)."""
        if not e.side:
            return e.key
        level, bottom, nb = self.levels[e.key], self.bottom, self.num_blocks
        if e.layer.startswith("aux_"):
            return f"{e.side}.{level if e.side == 'enc' else bottom - level}.{e.layer}.{e.rest}"
        rest = e.rest if e.layer == "conv" else _block_name(e.rest)
        if self.arch == "adm":  # flat ModuleLists in edm's insertion order
            if e.side == "enc":
                pos = level * (nb + 1) + (0 if e.block is None else 1 + e.block)
            elif level == bottom:
                pos = {"in0": 0, "in1": 1}.get(e.layer, 2 + (e.block or 0))
            else:
                pos = (nb + 3) + (bottom - 1 - level) * (nb + 2) + (0 if e.block is None else 1 + e.block)
            return f"{e.side}.{pos}.{rest}"
        if e.side == "enc":
            name = e.layer if e.block is None else f"blocks.{e.block}"
            return f"enc.{level}.{name}.{rest}"
        name = {"in0": "mid.0", "in1": "mid.1", "up": "up"}.get(e.layer, f"blocks.{e.block}")
        return f"dec.{bottom - level}.{name}.{rest}"

    def convert(self, out_channels: int | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """(our state dict, our key -> edm key)."""
        in_channels = self.state[f"enc.{self.top}x{self.top}_conv.weight"].shape[1]
        out_channels = in_channels if out_channels is None else out_channels
        ours, origin = {}, {}
        for e in self.entries:
            value = self.state[e.key]
            if e.key.endswith(".resample_filter"):
                continue  # a constant: our Conv2d rebuilds it from the constructor's resample_filter
            final = e.key.startswith("out_conv.") or e.layer == "aux_conv"
            if final and value.shape[0] == 2 * out_channels:
                value = value[:out_channels]  # iDDPM: [mean | learned variance]; the denoiser uses the mean
            name = self.rename(e)
            ours[name], origin[name] = value, e.key
        return ours, origin


def _strip_precond(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The network's own tensors, without the Precond wrapper's ``model.`` prefix and buffers."""
    if not any(k.startswith("model.") for k in state):
        return dict(state)
    out = {}
    for key, value in state.items():
        if key.startswith("model."):
            out[key[len("model."):]] = value
        elif key not in PRECOND_BUFFERS:
            raise UserError(f"unexpected key {key!r} in the edm state dict (outside the Precond's 'model.')")
    return out


def _block_name(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_ATTENTION[head]}.{tail}" if head in _ATTENTION else rest


def convert_edm_state_dict(state: Mapping[str, torch.Tensor], arch: str, *,
                           out_channels: int | None = None) -> dict[str, torch.Tensor]:
    """edm's SongUNet (``arch`` ``ddpmpp`` / ``ncsnpp``) or DhariwalUNet (``adm``) state dict -> ours.

    ``state`` has edm's key names, with or without the Precond wrapper's ``model.`` prefix. edm's
    ``resample_filter`` buffers are dropped (ours rebuild the filter from the constructor argument).
    ``out_channels`` is our network's output channels (default: its input channels, as every edm
    Precond builds). A final convolution with exactly twice as many outputs comes from edm's
    ``iDDPMPrecond``: its network predicts ``[mean | learned variance]`` (improved DDPM's variance
    interpolation) and its denoiser uses only the first ``img_channels``, so we keep the first
    ``out_channels`` and drop the variance channels, which no EDM sampler uses. Raises UserError
    naming the first key that is not an edm network tensor.
    """
    return _EdmState(state, arch).convert(out_channels)[0]


def _taps(filt: torch.Tensor) -> tuple[float, ...]:
    """The 1-D taps (first tap 1) of edm's 2-D resample filter ``outer(f, f) / sum(f)^2``."""
    row = filt.reshape(filt.shape[-2:])[0]
    return tuple(round(float(t), 6) for t in row / row[0])


def edm_network_kwargs(state: Mapping[str, torch.Tensor], arch: str) -> dict:
    """Our constructor arguments that edm's tensors determine: resolution, channels, levels, blocks,
    attention resolutions, label/augment sizes and (SongUNet) the noise embedding, encoder, decoder
    and resample filter. Hyper-parameters without tensors (dropout, label_dropout) are left out."""
    return _network_kwargs(_EdmState(state, arch))


def _network_kwargs(s: _EdmState) -> dict:
    t, top, arch = s.state, s.top, s.arch
    for key in ("map_layer0.weight", f"enc.{top}x{top}_block0.conv0.weight"):
        if key not in t:
            raise UserError(f"missing key {key!r} in the edm state dict")
    emb, noise = t["map_layer0.weight"].shape
    in_channels, width0 = t[f"enc.{top}x{top}_conv.weight"].shape[1::-1]
    model_channels = noise if arch == "adm" else width0
    width = {e.res: t[e.key].shape[0] for e in s.entries
             if e.side == "enc" and e.block == 0 and e.rest == "conv0.weight"}
    # resolutions with attention blocks, besides edm's middle block (which always has one)
    attention = {e.res for e in s.entries if e.rest == "qkv.weight" and e.layer != "in0"}
    kw = dict(img_resolution=top, in_channels=in_channels,
              label_dim=t["map_label.weight"].shape[1] if "map_label.weight" in t else 0,
              augment_dim=t["map_augment.weight"].shape[1] if "map_augment.weight" in t else 0,
              model_channels=model_channels, channel_mult_emb=emb // model_channels, num_blocks=s.num_blocks,
              channel_mult=tuple(width[r] // model_channels for r in sorted(width, reverse=True)),
              attn_resolutions=tuple(sorted(attention, reverse=True)))
    if arch != "adm":
        layers = {e.layer for e in s.entries}
        kw.update(channel_mult_noise=noise // model_channels,
                  embedding_type="fourier" if "map_noise.freqs" in t else "positional",
                  encoder_type="skip" if "aux_skip" in layers else "residual" if "aux_residual" in layers
                  else "standard",
                  decoder_type="skip" if "aux_up" in layers else "standard")
        if s.filter is not None:
            kw["resample_filter"] = _taps(s.filter)
    return kw



def load_edm_network(path: str | os.PathLike, arch: str, *, allow_torch_load: bool = False,
                     **net_kwargs) -> nn.Module:
    """Our network (``arch`` ``ddpmpp``, ``ncsnpp`` or ``adm``) holding the edm network tensors in ``path``.

    ``path`` is a ``.safetensors`` file of edm's network state dict (exported with edm's own code;
    see docs/edm.md). With ``allow_torch_load=True`` it may instead be a ``torch.save``'d state dict,
    read with ``torch.load(weights_only=True)`` (never a pickle of edm's classes). The constructor
    arguments are ``arch``'s preset, updated by :func:`edm_network_kwargs` (read off the tensors),
    updated by ``net_kwargs``. Returned in eval mode on the CPU. Raises UserError naming the first
    missing, unexpected or mis-shaped key.
    """
    state = read_state_dict(path, allow_torch_load=allow_torch_load, origin="edm", export="net.model.state_dict()")
    parsed = _EdmState(state, arch)
    net = build_network(arch, **{**_network_kwargs(parsed), **net_kwargs})
    ours, origin = parsed.convert(net.out_channels)
    expected = net.state_dict()
    for key in ours:
        if key not in expected:
            raise UserError(f"unexpected key {origin[key]!r} in {path}: the {arch} network built from these "
                            f"arguments has no {key!r}")
    for key, want in expected.items():  # in the network's order: the mapping network first
        if key not in ours:
            raise UserError(f"missing key in {path}: the {arch} network built from these arguments has {key!r}, "
                            "the edm state has no tensor for it")
        if ours[key].shape != want.shape:
            raise UserError(f"edm key {origin[key]!r} in {path} has shape {list(ours[key].shape)} but the {arch} "
                            f"network built from these arguments expects {list(want.shape)} ({key!r})")
    filters = [m.resample_filter for m in net.modules() if isinstance(m, Conv2d) and m.resample_filter is not None]
    if parsed.filter is not None and filters and (filters[0].shape != parsed.filter.shape
                                                  or not torch.allclose(filters[0], parsed.filter)):
        raise UserError(f"{path} resamples with the filter {list(_taps(parsed.filter))} but the network was "
                        "built with another resample_filter")
    net.load_state_dict(ours)
    return net.eval()
