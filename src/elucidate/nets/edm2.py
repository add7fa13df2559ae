"""EDM2's U-Net (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models",
config G, Figure 21) as ``arch: edm2``, and :func:`load_edm2_network` for NVlabs/edm2's weights.

Every layer preserves magnitudes: an input with unit RMS per element gives an output with unit RMS.
Convolutions and fully connected layers have no biases; their weights are normalized to unit magnitude
per output channel in every call and scaled by ``1/sqrt(fan_in)`` (Eqs. 47, 66-67), and in training mode
the stored weights are themselves overwritten by their normalized values first (forced weight
normalization, Sec. 2.3 / Eq. 66). SiLU is divided by its output magnitude for unit Gaussian inputs
(MP-SiLU, Eq. 81); residual, attention and label branches join by an MP sum ``lerp(a, b, t) /
sqrt((1-t)^2 + t^2)`` (Eq. 88) and skip connections by an MP concatenation (Eq. 103). There are no group
norms: encoder blocks pixel-normalize their input, attention is cosine attention (q, k, v pixel-normalized
per head), the input gets a constant channel of ones (so the first convolution can see position at the
borders), and the noise level ``c_noise = ln(sigma) / 4`` enters through MP Fourier features (Eq. 75).
Instead of zero-initialized layers, EDM2 starts learned scalar gains at 0: ``emb_gain`` (how much the
embedding modulates a block) and ``out_gain`` (the output), so a fresh network outputs exactly 0.

Our layouts and parameter names are edm2's (``enc.16x16_block0.conv_res0.weight``, ``emb_fourier.freqs``,
...), so edm2's ``UNet.state_dict()`` loads unchanged; a non-square ``(H, W)`` network names its levels
``HxW``. Beyond edm2 (all absent, so with their defaults the network is edm2's): ``augment_dim``,
``cond_channels``, ``context_dim`` (see :class:`EDM2UNet`) and ``label_dropout``.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .base import DiffusionNet, read_state_dict
from .layers import Checkpointed, Conv2d, recomputing

__all__ = ["normalize", "mp_silu", "mp_sum", "mp_cat", "MPFourier", "MPConv", "EDM2Block", "EDM2CrossAttention",
           "EDM2UNet", "PRECOND_KEYS", "edm2_network_kwargs", "load_edm2_network"]


def normalize(x: torch.Tensor, dim: int | Sequence[int] | None = None, eps: float = 1e-4,
              numel: int | None = None) -> torch.Tensor:
    """``x`` scaled to unit magnitude (RMS 1) over ``dim`` (default: every dim but the first), i.e.
    divided by ``eps + ||x|| / sqrt(numel)`` with ``numel`` the elements reduced over (Eq. 66)."""
    dims = list(range(1, x.ndim)) if dim is None else [dim] if isinstance(dim, int) else list(dim)
    if numel is None:
        numel = math.prod(x.shape[d] for d in dims)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    norm = torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=acc)
    return x / (eps + norm * math.sqrt(1 / numel)).to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU over its output magnitude for unit Gaussian inputs, 0.596 (Eq. 81)."""
    return F.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float | torch.Tensor = 0.5) -> torch.Tensor:
    """``(1-t) a + t b`` rescaled to unit magnitude for uncorrelated unit inputs (Eq. 88); ``t`` may be
    a learned 0-dim tensor."""
    if torch.is_tensor(t):
        t = t.to(a.dtype)
        return a.lerp(b.to(a.dtype), t) / ((1 - t) ** 2 + t ** 2).sqrt()
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Concatenation with ``a`` and ``b`` weighted ``1-t : t`` in total and unit overall magnitude (Eq. 103)."""
    na, nb = a.shape[dim], b.shape[dim]
    scale = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (scale * (1 - t) / math.sqrt(na)), b * (scale * t / math.sqrt(nb))], dim=dim)


class MPFourier(nn.Module):
    """MP Fourier features ``sqrt(2) cos(c freqs + phases)`` of the noise label ``c`` (Eq. 75), with
    ``freqs = 2 pi N(0, bandwidth^2)`` and ``phases = 2 pi U(0, 1)`` drawn once (saved buffers)."""

    def __init__(self, num_channels: int, bandwidth: float = 1.0):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        acc = torch.float64 if self.freqs.dtype == torch.float64 else torch.float32
        angle = torch.outer(c.to(acc).reshape(-1), self.freqs.to(acc)) + self.phases.to(acc)
        return (angle.cos() * math.sqrt(2)).to(c.dtype)


class MPConv(nn.Module):
    """Bias-free MP convolution (``kernel`` ``(k, k)``) or fully connected layer (``kernel`` ``()``):
    ``w / ||w||`` per output channel times ``gain / sqrt(fan_in)`` (Eq. 47), the stored weight forced to
    unit magnitude in training mode (Eq. 66). Weights start as N(0, 1).

    ``fan_in`` (default ``in_channels * prod(kernel)``) is the element count over which magnitudes are
    measured; it stays fixed when :func:`~.conditioning.widen_input` appends zero input channels, so a
    widened layer computes exactly what it computed before."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int]):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))
        self.fan_in = in_channels * math.prod(kernel)

    def forward(self, x: torch.Tensor, gain: float | torch.Tensor = 1.0) -> torch.Tensor:
        w = self.weight if self.weight.dtype == torch.float64 else self.weight.to(torch.float32)
        if self.training and not recomputing():  # (once per step: not again when a checkpointed block reruns)
            with torch.no_grad():
                self.weight.copy_(normalize(w, numel=self.fan_in))  # forced weight normalization (Eq. 66)
        w = normalize(w, numel=self.fan_in) * (gain / math.sqrt(self.fan_in))  # Eq. 47 (w re-read after the copy)
        w = w.to(x.dtype)
        if w.ndim == 2:
            return F.linear(x, w)
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cosine attention: q, k, v ``[B, heads, d, N]`` pixel-normalized over d, softmax(q.k / sqrt(d)) v."""
    q, k, v = (normalize(t, dim=2).transpose(-1, -2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(-1, -2)


class EDM2CrossAttention(nn.Module):
    """MP cross-attention from a feature map to a context ``[B, L, context_dim]`` (ours, not in edm2).

    Queries are a 1x1 MP convolution of the features, keys and values an MP linear map of the tokens,
    all pixel-normalized per head (cosine attention, as EDM2's self-attention); the result goes through
    an MP 1x1 projection and joins the features by an MP sum whose balance ``balance`` is *learned* and
    starts at 0, the way EDM2 starts its gains at 0 (a zero-initialized layer would not survive weight
    normalization). A token of all zeros is padding; a row with no real token keeps its features exactly.
    """

    def __init__(self, channels: int, context_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = MPConv(channels, channels, (1, 1))
        self.kv = MPConv(context_dim, 2 * channels, ())  # output j * C + (h * C/heads + c), j = k, v
        self.proj = MPConv(channels, channels, (1, 1))
        self.balance = nn.Parameter(torch.zeros([]))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        present = context.ne(0).any(dim=-1)  # [B, L]: real tokens
        has_context = present.any(dim=1)
        q = self.q(x).reshape(b, self.num_heads, -1, h * w)
        k, v = self.kv(context.to(x.dtype)).reshape(b, -1, 2, self.num_heads, c // self.num_heads).permute(
            2, 0, 3, 4, 1).unbind(0)  # each [B, heads, d, L]
        mask = (present | ~has_context[:, None])[:, None, None, :]
        y = self.proj(_attention(q, k, v, mask).reshape(b, c, h, w))
        return torch.where(has_context.reshape(b, 1, 1, 1), mp_sum(x, y, self.balance), x)


class EDM2Block(Checkpointed):
    """EDM2's encoder/decoder block (Figure 21): optional 2x resampling; ``enc`` blocks project the
    channels (``conv_skip``) and pixel-normalize first, ``dec`` blocks project on the skip path; the
    residual branch ``conv_res1(mp_silu(conv_res0(mp_silu(x)) * (1 + emb_gain * emb_linear(emb))))``
    joins by an MP sum with ``res_balance``; then optional cosine self-attention (``attn_balance``),
    optional MP cross-attention (``xattn``, ours) and clipping to ``+-clip_act``."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, flavor: str = "enc",
                 resample_mode: str = "keep", resample_filter: Sequence[float] = (1, 1), attention: bool = False,
                 channels_per_head: int = 64, dropout: float = 0.0, res_balance: float = 0.3,
                 attn_balance: float = 0.3, clip_act: float | None = 256):
        super().__init__()
        self.in_channels, self.out_channels, self.flavor = in_channels, out_channels, flavor
        self.dropout, self.res_balance, self.attn_balance, self.clip_act = dropout, res_balance, attn_balance, clip_act
        self.resample = None
        if resample_mode != "keep":  # a pure FIR resampling layer (no parameters, no saved buffers)
            self.resample = Conv2d(in_channels, in_channels, 0, up=resample_mode == "up",
                                   down=resample_mode == "down", resample_filter=resample_filter)
        # one head per channels_per_head channels, at least one (edm2 has none below channels_per_head)
        self.num_heads = max(1, out_channels // channels_per_head) if attention else 0
        if self.num_heads and out_channels % self.num_heads:
            raise ValueError(f"attention needs out_channels ({out_channels}) divisible by its number of heads "
                             f"({self.num_heads} = out_channels // channels_per_head)")
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, (3, 3))
        self.emb_linear = MPConv(emb_channels, out_channels, ())
        self.conv_res1 = MPConv(out_channels, out_channels, (3, 3))
        self.conv_skip = MPConv(in_channels, out_channels, (1, 1)) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, 3 * out_channels, (1, 1)) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, (1, 1)) if self.num_heads else None
        self.xattn: EDM2CrossAttention | None = None

    def add_cross_attention(self, context_dim: int) -> None:
        self.xattn = EDM2CrossAttention(self.out_channels, context_dim, self.num_heads)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.resample is not None:
            x = self.resample(x)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm
        y = self.conv_res0(mp_silu(x))
        scale = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * scale[:, :, None, None].to(y.dtype))
        if self.training and self.dropout:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, self.res_balance)
        if self.num_heads:
            b, c, h, w = x.shape
            qkv = self.attn_qkv(x).reshape(b, self.num_heads, -1, 3, h * w)  # channel (h * C/heads + c) * 3 + j
            y = _attention(*qkv.unbind(3)).reshape(b, c, h, w)
            x = mp_sum(x, self.attn_proj(y), self.attn_balance)
        if self.xattn is not None and context is not None:
            x = self.xattn(x, context)
        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x


class EDM2UNet(DiffusionNet):
    """EDM2's magnitude-preserving U-Net ``F(x, c_noise, class_labels=None)``, NVlabs/edm2's ``UNet`` (Figure 21
    of the EDM2 paper).

    Arguments are edm2's ``UNet``'s, with its defaults (``img_channels`` is accepted for ``in_channels``);
    ``channels_per_head``, ``dropout``, ``res_balance``, ``attn_balance``, ``clip_act`` and
    ``resample_filter`` are edm2's block arguments. Level ``l`` has ``model_channels * channel_mult[l]``
    channels, the noise features ``model_channels * channel_mult_noise`` (default: level 0's) and the
    embedding ``model_channels * channel_mult_emb`` (default: the widest level's). Class labels join the
    noise embedding by an MP sum weighted ``label_balance``; decoder skips by an MP concatenation weighted
    ``concat_balance``. The lowest level's first middle block always has self-attention.

    Conditions edm2 lacks, in an MP way, each exactly inert when absent or fresh: ``augment_dim``
    augmentation labels through an MP linear map scaled by a learned gain ``augment_gain`` (from 0) and
    added to the noise embedding, like EDM2's ``emb_gain``; ``cond_channels`` concatenated after the
    constant channel, with zero weights in the first convolution whose magnitude stays measured over the
    image channels (:class:`MPConv`); ``context_dim`` through :class:`EDM2CrossAttention` in every block
    with self-attention, an MP sum with a learned balance starting at 0 (cross-attention rather than a
    pooled embedding, so token order and count matter).
    """

    def __init__(self, img_resolution: int | Sequence[int], in_channels: int | None = None,
                 out_channels: int | None = None, label_dim: int = 0, augment_dim: int = 0, cond_channels: int = 0,
                 context_dim: int = 0, model_channels: int = 192, channel_mult: Sequence[int] = (1, 2, 3, 4),
                 channel_mult_noise: int | None = None, channel_mult_emb: int | None = None, num_blocks: int = 3,
                 attn_resolutions: Sequence[int] = (16, 8), label_balance: float = 0.5,
                 concat_balance: float = 0.5, dropout: float = 0.0, label_dropout: float = 0.0,
                 res_balance: float = 0.3, attn_balance: float = 0.3, clip_act: float | None = 256,
                 channels_per_head: int = 64, resample_filter: Sequence[float] = (1, 1),
                 img_channels: int | None = None, checkpointing: bool = False):
        if img_channels is not None:  # edm2's name
            if in_channels is not None and in_channels != img_channels:
                raise ValueError(f"in_channels={in_channels!r} and img_channels={img_channels!r} differ "
                                 "(img_channels is edm2's name for in_channels)")
            in_channels = img_channels
        if in_channels is None:
            raise ValueError("EDM2UNet needs in_channels (or edm2's img_channels)")
        super().__init__(img_resolution, in_channels, out_channels, channel_mult, num_blocks, attn_resolutions,
                         dropout, label_dim, label_dropout, augment_dim, cond_channels, context_dim)
        for name, value in [("model_channels", model_channels), ("channels_per_head", channels_per_head),
                            ("channel_mult_noise", channel_mult_noise), ("channel_mult_emb", channel_mult_emb)]:
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name, value in [("label_balance", label_balance), ("concat_balance", concat_balance),
                            ("res_balance", res_balance), ("attn_balance", attn_balance)]:
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
        if clip_act is not None and not clip_act > 0:
            raise ValueError(f"clip_act must be > 0 or None, got {clip_act!r}")
        if len(resample_filter) % 2 or not sum(resample_filter) > 0:
            raise ValueError(f"resample_filter must have an even number of taps with a positive sum, "
                             f"got {tuple(resample_filter)}")
        self.model_channels = model_channels
        self.label_balance, self.concat_balance = float(label_balance), float(concat_balance)
        widths = [model_channels * m for m in self.channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else widths[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(widths)
        block_kwargs = dict(resample_filter=tuple(resample_filter), channels_per_head=channels_per_head,
                            dropout=self.dropout, res_balance=res_balance, attn_balance=attn_balance,
                            clip_act=clip_act)

        def block(cin: int, cout: int, flavor: str, **kwargs) -> EDM2Block:
            return EDM2Block(cin, cout, cemb, flavor, **block_kwargs, **kwargs)

        # construction order = edm2's, so the same seed draws the same initial tensors
        self.out_gain = nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, ())
        self.emb_label = MPConv(label_dim, cemb, ()) if label_dim else None
        self.enc = nn.ModuleDict()
        cout = in_channels + 1  # the image and a constant channel of ones
        for level, width in enumerate(widths):
            name = self.level_name(level)
            if level == 0:
                self.enc[f"{name}_conv"] = MPConv(cout, width, (3, 3))
                cout = width
            else:
                self.enc[f"{name}_down"] = block(cout, cout, "enc", resample_mode="down")
            for idx in range(num_blocks):
                self.enc[f"{name}_block{idx}"] = block(cout, width, "enc", attention=self.use_attention(level))
                cout = width
        skips = [layer.out_channels for layer in self.enc.values()]
        self.dec = nn.ModuleDict()
        for level in reversed(range(len(widths))):
            name = self.level_name(level)
            if level == len(widths) - 1:
                self.dec[f"{name}_in0"] = block(cout, cout, "dec", attention=True)
                self.dec[f"{name}_in1"] = block(cout, cout, "dec")
            else:
                self.dec[f"{name}_up"] = block(cout, cout, "dec", resample_mode="up")
            for idx in range(num_blocks + 1):
                self.dec[f"{name}_block{idx}"] = block(cout + skips.pop(), widths[level], "dec",
                                                       attention=self.use_attention(level))
                cout = widths[level]
        self.out_conv = MPConv(cout, self.out_channels, (3, 3))
        # ours, after edm2's tensors were drawn
        self.widen_input(self.enc[f"{self.level_name(0)}_conv"])
        self.augment_gain = nn.Parameter(torch.zeros([])) if augment_dim else None
        self.emb_augment = MPConv(augment_dim, cemb, ()) if augment_dim else None
        if context_dim:
            for b in self.modules():
                if isinstance(b, EDM2Block) and b.num_heads:
                    b.add_cross_attention(context_dim)
        self.use_checkpointing(checkpointing)

    def level_name(self, level: int) -> str:
        """edm2's ``"<H>x<W>"`` prefix of the modules at ``level``."""
        h, w = self.level_resolution(level)
        return f"{h}x{w}"

    def embed(self, c_noise: torch.Tensor, labels: torch.Tensor | None,
              augment_labels: torch.Tensor | None) -> torch.Tensor:
        """``mp_silu(mp_sum(emb_noise(fourier(c_noise)) [+ augment], emb_label(labels sqrt(label_dim))))``."""
        emb = self.emb_noise(self.emb_fourier(c_noise.to(self.out_gain.dtype)))
        if self.emb_augment is not None and augment_labels is not None:
            emb = emb + self.emb_augment(augment_labels.to(emb.dtype), gain=self.augment_gain)
        if self.emb_label is not None:
            emb = mp_sum(emb, self.emb_label(labels.to(emb.dtype) * math.sqrt(self.label_dim)), self.label_balance)
        return mp_silu(emb)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None, concat: torch.Tensor | None = None,
                context: torch.Tensor | None = None, **cond) -> torch.Tensor:
        """``F(x, c_noise)``: ``x`` ``[B, in_channels, H, W]``, ``c_noise`` ``[B]`` (``ln(sigma) / 4`` in edm2)
        -> ``[B, out_channels, H, W]`` (conditions: see :class:`~.base.DiffusionNet`)."""
        c_noise, labels, augment_labels = self.check_inputs(x, c_noise, class_labels, augment_labels, cond)
        out_dtype = x.dtype
        x, context = self.check_conditions(x, concat, context)
        x = x.to(self.out_gain.dtype)
        emb = self.embed(c_noise, labels, augment_labels)
        n = self.in_channels
        x = torch.cat([x[:, :n], torch.ones_like(x[:, :1]), x[:, n:]], dim=1)  # [image, ones, concat]
        skips = []
        for name, layer in self.enc.items():
            x = layer(x) if name.endswith("_conv") else layer(x, emb, context)
            skips.append(x)
        for name, layer in self.dec.items():
            if "_block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = layer(x, emb, context)
        return self.out_conv(x, gain=self.out_gain).to(out_dtype)


# --- NVlabs/edm2 weights ----------------------------------------------------------------------------

#: edm2's Precond tensors besides ``unet.*``: the uncertainty (logvar) head of the loss, not the denoiser's.
PRECOND_KEYS = ("logvar_fourier.freqs", "logvar_fourier.phases", "logvar_linear.weight")


def _unet_state(state: Mapping[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """The UNet's tensors: without a whole Precond's ``unet.`` prefix and its logvar head."""
    if not any(k.startswith("unet.") for k in state):
        return dict(state)
    out = {}
    for key, value in state.items():
        if key.startswith("unet."):
            out[key[len("unet."):]] = value
        elif key not in PRECOND_KEYS:
            raise UserError(f"unexpected key {key!r} in {path} (neither 'unet.*' nor the Precond's logvar head)")
    return out


def edm2_network_kwargs(state: Mapping[str, torch.Tensor]) -> dict:
    """The :class:`EDM2UNet` arguments edm2's ``UNet`` tensors determine: resolution, channels, levels,
    blocks, attention resolutions, label dim and embedding widths. Not in the tensors, so left to edm2's
    defaults (or the caller): ``channels_per_head`` (64), the balances, ``clip_act``, ``resample_filter``."""
    state = _unet_state(state, "the state dict")
    convs = [k for k in state if k.startswith("enc.") and k.endswith("_conv.weight")]
    for key in ("emb_fourier.freqs", "emb_noise.weight", "out_conv.weight"):
        if key not in state:
            raise UserError(f"missing key {key!r} in the edm2 state dict (not an edm2 UNet)")
    if not convs:
        raise UserError("missing key 'enc.<H>x<W>_conv.weight' in the edm2 state dict (the input convolution)")
    top = convs[0][len("enc."):-len("_conv.weight")]
    h, _, w = top.partition("x")
    if not (h.isdigit() and w.isdigit()):
        raise UserError(f"unexpected key {convs[0]!r} in the edm2 state dict")
    # per level: the width of its first encoder block (its conv_res1 maps width -> width)
    prefixes, widths, blocks = [], {}, {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "enc" and "_block" in parts[1] and parts[2] == "conv_res1":
            res, _, idx = parts[1].partition("_block")
            if res not in widths:
                prefixes.append(res)
                widths[res] = value.shape[0]
            blocks[res] = max(blocks.get(res, 0), int(idx) + 1)
    if not widths:
        raise UserError("missing key 'enc.<H>x<W>_block0.conv_res1.weight' in the edm2 state dict")
    prefixes.sort(key=lambda r: -int(r.partition("x")[0]))  # level 0 first (files may sort keys by name)
    cnoise, cemb = state["emb_fourier.freqs"].shape[0], state["emb_noise.weight"].shape[0]
    model_channels = math.gcd(cnoise, cemb, *widths.values())
    attention = [min(int(side) for side in r.split("x")) for r in prefixes
                 if any(k.startswith((f"enc.{r}_block", f"dec.{r}_block")) and k.endswith("attn_qkv.weight")
                        for k in state)]
    in_channels = state[convs[0]].shape[1] - 1
    return dict(img_resolution=(int(h), int(w)) if h != w else int(h), in_channels=in_channels,
                out_channels=state["out_conv.weight"].shape[0],
                label_dim=state["emb_label.weight"].shape[1] if "emb_label.weight" in state else 0,
                model_channels=model_channels, channel_mult=tuple(widths[r] // model_channels for r in prefixes),
                channel_mult_noise=cnoise // model_channels, channel_mult_emb=cemb // model_channels,
                num_blocks=blocks[prefixes[0]], attn_resolutions=tuple(attention))



def load_edm2_network(path: str | os.PathLike, *, allow_torch_load: bool = False, **unet_kwargs) -> EDM2UNet:
    """Our :class:`EDM2UNet` holding the NVlabs/edm2 ``UNet`` tensors in ``path``; eval mode, on the CPU.

    ``path`` is a ``.safetensors`` export of edm2's ``net.unet.state_dict()`` or of the whole Precond's
    ``net.state_dict()`` (keys ``unet.*``; its logvar head, which only weights the training loss, is
    ignored) -- see docs/edm.md. With ``allow_torch_load=True`` it may be a ``torch.save``'d state dict,
    read with ``torch.load(weights_only=True)``. The constructor arguments are :func:`edm2_network_kwargs`
    (read off the tensors) updated by ``unet_kwargs`` (e.g. ``channels_per_head`` if the network was not
    trained with edm2's 64). Raises UserError naming the first unexpected, missing or mis-shaped tensor.
    """
    path = os.fspath(path)
    state = read_state_dict(path, allow_torch_load=allow_torch_load, origin="edm2", export="net.unet.state_dict()")
    state = _unet_state(state, path)
    net = EDM2UNet(**{**edm2_network_kwargs(state), **unet_kwargs})
    expected = net.state_dict()
    for key, value in state.items():
        if key not in expected:
            raise UserError(f"unexpected key {key!r} in {path}: the edm2 network built from these arguments "
                            "has no such tensor")
        if value.shape != expected[key].shape:
            raise UserError(f"edm2 key {key!r} in {path} has shape {list(value.shape)} but the edm2 network "
                            f"built from these arguments expects {list(expected[key].shape)}")
    for key in expected:
        if key not in state:
            raise UserError(f"missing key {key!r} in {path}: the edm2 network built from these arguments "
                            "has it, the file does not")
    net.load_state_dict(state)
    return net.eval()
