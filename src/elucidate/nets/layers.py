"""Building blocks shared by the U-Nets: initialized linear/conv layers with FIR resampling,
adaptive group norm, noise-level embeddings, multi-head self- and cross-attention and the residual
U-Net block.

Every layer is dtype/device agnostic: it runs in whatever dtype its inputs have (or the active
autocast context chooses) and never assumes a particular device or memory format.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["INIT_MODES", "weight_init", "num_groups", "Linear", "Conv2d", "GroupNorm",
           "PositionalEmbedding", "FourierEmbedding", "SelfAttention", "CrossAttention", "UNetBlock",
           "parse_resolution"]

INIT_MODES = ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal")


def weight_init(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """A tensor of ``shape`` drawn from the Glorot (xavier) or He (kaiming, gain 1) initializer."""
    if mode not in INIT_MODES:
        raise ValueError(f"init_mode must be one of {INIT_MODES}, got {mode!r}")
    uniform = mode.endswith("uniform")
    variance = 2 / (fan_in + fan_out) if mode.startswith("xavier") else 1 / fan_in
    out = torch.empty(tuple(shape))
    if uniform:
        bound = math.sqrt(3 * variance)  # U(-b, b) has variance b^2 / 3
        return out.uniform_(-bound, bound)
    return out.normal_(0.0, math.sqrt(variance))


def num_groups(channels: int, max_groups: int = 32, min_channels_per_group: int = 4) -> int:
    """Group count for GroupNorm: ``min(max_groups, channels // min_channels_per_group)``, at least 1,
    lowered until it divides ``channels`` (so any channel count works)."""
    groups = max(1, min(max_groups, channels // min_channels_per_group))
    while channels % groups:
        groups -= 1
    return groups


class Linear(nn.Module):
    """Fully connected layer ``y = x W^T + b`` with EDM-style initialization
    (``init_weight`` / ``init_bias`` scale the drawn values; 0 gives an exactly zero layer)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 init_mode: str = "kaiming_normal", init_weight: float = 1.0, init_bias: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(weight_init((out_features, in_features), **fans) * init_weight)
        self.bias = nn.Parameter(weight_init((out_features,), **fans) * init_bias) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def _is_box(taps: Sequence[float]) -> bool:
    return len(taps) == 2 and taps[0] == taps[1]


class Conv2d(nn.Module):
    """Square-kernel 'same' convolution with optional 2x up- or down-sampling by a separable FIR
    filter (``[1, 1]`` = box / nearest, ``[1, 3, 3, 1]`` = bilinear-like). ``kernel=0`` gives a pure
    resampling layer. ``fused_resample`` (down only) convolves first and filters after, as in the
    NCSN++ residual encoder."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True,
                 up: bool = False, down: bool = False, resample_filter: Sequence[float] = (1, 1),
                 fused_resample: bool = False, init_mode: str = "kaiming_normal",
                 init_weight: float = 1.0, init_bias: float = 0.0):
        super().__init__()
        if up and down:
            raise ValueError("Conv2d cannot both up- and down-sample")
        if kernel == 0 and in_channels != out_channels:
            raise ValueError("a resampling-only Conv2d (kernel=0) must keep the channel count")
        if fused_resample and up:
            raise ValueError("fused_resample is only supported for down-sampling")
        self.in_channels, self.out_channels, self.kernel = in_channels, out_channels, kernel
        self.up, self.down, self.fused = up, down, fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel ** 2, fan_out=out_channels * kernel ** 2)
        shape = (out_channels, in_channels, kernel, kernel)
        self.weight = nn.Parameter(weight_init(shape, **fans) * init_weight) if kernel else None
        self.bias = nn.Parameter(weight_init((out_channels,), **fans) * init_bias) if kernel and bias else None
        taps = [float(t) for t in resample_filter]
        self.box = _is_box(taps)  # fast path: average pooling / nearest up-sampling
        f = torch.tensor(taps)
        f = torch.outer(f, f) / f.sum() ** 2
        self.register_buffer("resample_filter", f[None, None] if (up or down) else None, persistent=False)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.box:
            return F.avg_pool2d(x, 2) if self.down else F.interpolate(x, scale_factor=2.0, mode="nearest")
        c = x.shape[1]
        f = self.resample_filter.to(x.dtype)
        pad = (f.shape[-1] - 1) // 2
        if self.down:
            return F.conv2d(x, f.expand(c, 1, -1, -1), stride=2, padding=pad, groups=c)
        return F.conv_transpose2d(x, (4 * f).expand(c, 1, -1, -1), stride=2, padding=pad, groups=c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.kernel // 2
        if self.fused and self.down and self.weight is not None:
            # conv on a margin wide enough that filtering without padding lands on H/2 x W/2
            f = self.resample_filter.to(x.dtype)
            fpad = 0 if self.box else (f.shape[-1] - 1) // 2
            x = F.conv2d(x, self.weight, padding=pad + fpad)
            if self.box:
                x = F.avg_pool2d(x, 2)
            else:
                x = F.conv2d(x, f.expand(x.shape[1], 1, -1, -1), stride=2, groups=x.shape[1])
            return x if self.bias is None else x + self.bias.to(x.dtype)[:, None, None]  # as edm: bias last
        if self.up or self.down:
            x = self._resample(x)
        if self.weight is not None:
            x = F.conv2d(x, self.weight, self.bias, padding=pad)
        return x


class GroupNorm(nn.GroupNorm):
    """GroupNorm whose group count adapts to small channel counts (see :func:`num_groups`)."""

    def __init__(self, num_channels: int, eps: float = 1e-5, max_groups: int = 32,
                 min_channels_per_group: int = 4):
        super().__init__(num_groups(num_channels, max_groups, min_channels_per_group), num_channels, eps=eps)


def _noise_input(c_noise: torch.Tensor) -> torch.Tensor:
    """c_noise as a float column (float64 kept, anything else computed in float32)."""
    dtype = torch.float64 if c_noise.dtype == torch.float64 else torch.float32
    return c_noise.to(dtype).reshape(-1, 1)


class PositionalEmbedding(nn.Module):
    """Sinusoidal features ``[cos(c f_k), sin(c f_k)]`` of the noise label ``c`` at frequencies
    ``f_k = (1 / max_positions)^(k / K)`` spanning 1 .. 1/max_positions, so both small (ln sigma / 4) and
    large (timestep 0..999) noise labels are resolved (DDPM++ uses ``endpoint=True``, ADM ``False``).
    ``sin_first`` gives ``[sin, cos]``, the order edm's SongUNet feeds its mapping network."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False,
                 sin_first: bool = False):
        super().__init__()
        if num_channels < 2 or num_channels % 2:
            raise ValueError(f"PositionalEmbedding needs an even num_channels >= 2, got {num_channels}")
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint
        self.sin_first = sin_first

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        c = _noise_input(c_noise)
        half = self.num_channels // 2
        k = torch.arange(half, device=c.device, dtype=c.dtype) / max(1, half - int(self.endpoint))
        angle = c * (1 / self.max_positions) ** k  # the same float32 rounding as edm
        return _sin_cos(angle, self.sin_first)


class FourierEmbedding(nn.Module):
    """Random Fourier features ``[cos(2 pi c f_k), sin(2 pi c f_k)]``, ``f_k ~ N(0, scale^2)``
    (NCSN++; ``sin_first`` as in :class:`PositionalEmbedding`). The frequencies ``freqs`` are drawn
    from the global RNG at construction: a saved buffer, or a trained parameter with ``learnable``."""

    def __init__(self, num_channels: int, scale: float = 16.0, sin_first: bool = False, learnable: bool = False):
        super().__init__()
        if num_channels < 2 or num_channels % 2:
            raise ValueError(f"FourierEmbedding needs an even num_channels >= 2, got {num_channels}")
        self.num_channels, self.sin_first = num_channels, sin_first
        freqs = torch.randn(num_channels // 2) * scale
        if learnable:
            self.freqs = nn.Parameter(freqs)
        else:
            self.register_buffer("freqs", freqs)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        c = _noise_input(c_noise)
        angle = c * (2 * math.pi * self.freqs.to(c.dtype))  # c * (2 pi f): the same rounding as edm
        return _sin_cos(angle, self.sin_first)


def _sin_cos(angle: torch.Tensor, sin_first: bool) -> torch.Tensor:
    return torch.cat([angle.sin(), angle.cos()] if sin_first else [angle.cos(), angle.sin()], dim=1)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map (pre-norm, 1x1 q/k/v and
    output projections, ``scaled_dot_product_attention``). Returns the residual update only.

    The q/k/v projection's ``3 * C`` output channels are laid out as edm's: channel
    ``(h * C/heads + c) * 3 + j`` is channel ``c`` of head ``h`` of q (j=0), k (j=1) or v (j=2)."""

    def __init__(self, channels: int, num_heads: int, eps: float = 1e-5,
                 init: dict | None = None, init_zero: dict | None = None):
        super().__init__()
        if num_heads < 1 or channels % num_heads:
            raise ValueError(f"attention needs channels ({channels}) divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.norm = GroupNorm(channels, eps=eps)
        self.qkv = Conv2d(channels, 3 * channels, kernel=1, **(init or {}))
        self.proj = Conv2d(channels, channels, kernel=1, **(init_zero or dict(init_weight=0.0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, self.num_heads, c // self.num_heads, 3, h * w)
        q, k, v = (t.transpose(-1, -2) for t in qkv.unbind(dim=3))  # each [B, heads, HW, C/heads]
        a = F.scaled_dot_product_attention(q, k, v)
        return self.proj(a.transpose(-1, -2).reshape(b, c, h, w))


class CrossAttention(nn.Module):
    """Multi-head cross-attention from the H*W positions of a feature map (queries; pre-norm, 1x1
    projection) to the L tokens of a context ``[B, L, context_dim]`` (keys and values; linear
    projections). The output projection starts at exactly zero. Returns the residual update only.

    A token whose values are all exactly 0 is padding: no query attends to it. A row whose tokens are
    all padding has no context, and its update is exactly 0 (the branch contributes nothing), so
    conditional and unconditional rows can share one batch (classifier-free guidance)."""

    def __init__(self, channels: int, context_dim: int, num_heads: int, eps: float = 1e-5,
                 init: dict | None = None):
        super().__init__()
        if num_heads < 1 or channels % num_heads:
            raise ValueError(f"attention needs channels ({channels}) divisible by num_heads ({num_heads})")
        self.num_heads, self.context_dim = num_heads, context_dim
        self.norm = GroupNorm(channels, eps=eps)
        self.q = Conv2d(channels, channels, kernel=1, **(init or {}))
        self.kv = Linear(context_dim, 2 * channels, **(init or {}))  # output j * C + (h * C/heads + c)
        self.proj = Conv2d(channels, channels, kernel=1, init_weight=0.0, init_bias=0.0)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        d = c // self.num_heads
        present = context.ne(0).any(dim=-1)  # [B, L]: real tokens (before any down-cast)
        has_context = present.any(dim=1)  # [B]
        q = self.q(self.norm(x)).reshape(b, self.num_heads, d, h * w).transpose(-1, -2)  # [B, heads, HW, d]
        kv = self.kv(context.to(x.dtype)).reshape(b, -1, 2, self.num_heads, d)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, L, d]
        mask = (present | ~has_context[:, None])[:, None, None, :]  # rows without context: any finite values
        a = F.scaled_dot_product_attention(q, k, v.to(q.dtype), attn_mask=mask)
        out = self.proj(a.transpose(-1, -2).reshape(b, c, h, w))
        return out * has_context.reshape(b, 1, 1, 1).to(out.dtype)


class Checkpointed(nn.Module):
    """A block whose activations can be recomputed in the backward pass instead of kept (activation checkpointing,
    ``torch.utils.checkpoint`` without reentrance): with ``checkpointing`` set (by the network's ``checkpointing``
    argument, :meth:`~.base.DiffusionNet.use_checkpointing`) and gradients enabled, a call keeps only its inputs
    and recomputes its insides (with the same RNG state: the same dropout) when the gradient is taken. Same outputs
    and gradients, less memory, one more forward per block."""

    checkpointing = False

    def __call__(self, *args, **kwargs):
        if not (self.checkpointing and torch.is_grad_enabled()):
            return super().__call__(*args, **kwargs)
        calls = []

        def run(*args, **kwargs):  # the second call is the recomputation (see recomputing())
            global _recomputing
            calls.append(1)
            if len(calls) == 1:
                return super(Checkpointed, self).__call__(*args, **kwargs)
            _recomputing, before = True, _recomputing
            try:
                return super(Checkpointed, self).__call__(*args, **kwargs)
            finally:
                _recomputing = before
        return checkpoint(run, *args, use_reentrant=False, **kwargs)


_recomputing = False


def recomputing() -> bool:
    """Whether a checkpointed block is being recomputed for the backward pass: a layer that changes its own state
    in a training forward (EDM2's forced weight normalization) must not do it twice."""
    return _recomputing


class UNetBlock(Checkpointed):
    """Residual block ``x -> skip(x) + conv1(drop(act(norm1(conv0(act(norm0 x))) (+) emb)))``,
    optionally 2x up/down-sampling, followed by optional self-attention and (after
    :meth:`add_cross_attention`) cross-attention to a context.

    The noise embedding enters as a per-channel shift (DDPM++/NCSN++) or, with ``adaptive_scale``,
    as scale-and-shift of the normalized features (ADM). ``skip_scale`` rescales each residual sum
    (sqrt(1/2) in DDPM++/NCSN++). ``init``/``init_zero``/``init_attn`` are keyword dicts for the
    regular, output (near-)zero and attention q/k/v layers. The cross-attention update is added
    without ``skip_scale``, so a block given no context computes exactly what it computes without
    cross-attention.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, *, up: bool = False,
                 down: bool = False, attention: bool = False, num_heads: int | None = None,
                 channels_per_head: int = 64, dropout: float = 0.0, skip_scale: float = 1.0,
                 eps: float = 1e-5, resample_filter: Sequence[float] = (1, 1),
                 resample_proj: bool = False, adaptive_scale: bool = True, init: dict | None = None,
                 init_zero: dict | None = None, init_attn: dict | None = None):
        super().__init__()
        init = init or {}
        init_zero = init_zero if init_zero is not None else dict(init_weight=0.0)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **init_zero)
        self.skip = None
        if in_channels != out_channels or up or down:
            kernel = 1 if resample_proj or in_channels != out_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)
        self.num_heads = num_heads if num_heads is not None else max(1, out_channels // channels_per_head)
        self.eps, self.init_attn = eps, init_attn if init_attn is not None else init
        self.attn = None
        if attention:
            self.attn = SelfAttention(out_channels, self.num_heads, eps=eps, init=self.init_attn, init_zero=init_zero)
        self.xattn: CrossAttention | None = None

    def add_cross_attention(self, context_dim: int) -> None:
        """Attend to a ``[B, L, context_dim]`` context after the self-attention (heads and init as it)."""
        self.xattn = CrossAttention(self.out_channels, context_dim, self.num_heads, eps=self.eps, init=self.init_attn)

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.skip_scale == 1 else x * self.skip_scale

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None]
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:
            h = F.silu(self.norm1(h + params))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        x = self._scaled(h + (self.skip(x) if self.skip is not None else x))
        if self.attn is not None:
            x = self._scaled(x + self.attn(x))
        if self.xattn is not None and context is not None:
            x = x + self.xattn(x, context)
        return x


def parse_resolution(img_resolution: int | Sequence[int]) -> tuple[int, int]:
    """``img_resolution`` (an int for square images or ``(H, W)``) as a ``(H, W)`` tuple."""
    res = (img_resolution, img_resolution) if isinstance(img_resolution, int) else tuple(img_resolution)
    if len(res) != 2 or not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in res):
        raise ValueError(f"img_resolution must be a positive int or (H, W) pair of ints, got {img_resolution!r}")
    return res
