"""AutoencoderKL (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models"):
a convolutional encoder/decoder of ResNet blocks with down/up-sampling and a middle attention block,
whose encoder outputs a diagonal Gaussian posterior over a latent feature map ``[embed_dim, H/f, W/f]``
with ``f = 2 ** (len(ch_mult) - 1)``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..nets.layers import GroupNorm, SelfAttention, parse_resolution
from .distribution import DiagonalGaussianDistribution

__all__ = ["AutoencoderKL", "Encoder", "Decoder", "ResnetBlock"]

_EPS = 1e-6  # GroupNorm epsilon (latent-diffusion's)
# residual attention starts as the identity; q/k/v use torch's default conv initialization
_ATTN_INIT = dict(init_mode="kaiming_uniform", init_weight=3 ** -0.5, init_bias=3 ** -0.5)


class ResnetBlock(nn.Module):
    """``x -> shortcut(x) + conv2(drop(silu(norm2(conv1(silu(norm1 x))))))`` (no time embedding)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = GroupNorm(in_channels, eps=_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNorm(out_channels, eps=_EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.dropout = float(dropout)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.dropout(F.silu(self.norm2(h)), p=self.dropout, training=self.training))
        return h + (x if self.shortcut is None else self.shortcut(x))


class _Attention(nn.Module):
    """Single-head self-attention over all positions, as a residual block."""

    def __init__(self, channels: int):
        super().__init__()
        self.attn = SelfAttention(channels, 1, eps=_EPS, init=_ATTN_INIT, init_zero=dict(init_weight=0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(x)


class _Downsample(nn.Module):
    """Stride-2 3x3 convolution with (0, 1, 0, 1) padding: H x W -> H/2 x W/2."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class _Upsample(nn.Module):
    """Nearest-neighbour 2x up-sampling followed by a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _stage(cin: int, cout: int, blocks: int, attention: bool, dropout: float) -> tuple[nn.ModuleList, int]:
    layers = nn.ModuleList()
    for _ in range(blocks):
        layers.append(ResnetBlock(cin, cout, dropout))
        if attention:
            layers.append(_Attention(cout))
        cin = cout
    return layers, cout


class Encoder(nn.Module):
    """x ``[B, in_channels, H, W]`` -> ``[B, z_channels * (2 if double_z else 1), H/f, W/f]``."""

    def __init__(self, *, in_channels: int, ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 attn_resolutions: Sequence[int], dropout: float, z_channels: int, double_z: bool,
                 resolution: tuple[int, int]):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin, (h, w) = ch, resolution
        for level, mult in enumerate(ch_mult):
            stage, cin = _stage(cin, ch * mult, num_res_blocks, min(h, w) in attn_resolutions, dropout)
            if level != len(ch_mult) - 1:
                stage.append(_Downsample(cin))
                h, w = h // 2, w // 2
            self.down.append(stage)
        self.mid = nn.Sequential(ResnetBlock(cin, cin, dropout), _Attention(cin), ResnetBlock(cin, cin, dropout))
        self.norm_out = GroupNorm(cin, eps=_EPS)
        self.conv_out = nn.Conv2d(cin, z_channels * (2 if double_z else 1), 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for layer in stage:
                h = layer(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z ``[B, z_channels, H/f, W/f]`` -> ``[B, out_channels, H, W]`` (``num_res_blocks + 1`` blocks per level)."""

    def __init__(self, *, out_channels: int, ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 attn_resolutions: Sequence[int], dropout: float, z_channels: int, resolution: tuple[int, int]):
        super().__init__()
        factor = 2 ** (len(ch_mult) - 1)
        h, w = resolution[0] // factor, resolution[1] // factor
        cin = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, cin, 3, padding=1)
        self.mid = nn.Sequential(ResnetBlock(cin, cin, dropout), _Attention(cin), ResnetBlock(cin, cin, dropout))
        self.up = nn.ModuleList()
        for level in reversed(range(len(ch_mult))):
            stage, cin = _stage(cin, ch * ch_mult[level], num_res_blocks + 1, min(h, w) in attn_resolutions, dropout)
            if level != 0:
                stage.append(_Upsample(cin))
                h, w = h * 2, w * 2
            self.up.append(stage)
        self.norm_out = GroupNorm(cin, eps=_EPS)
        self.conv_out = nn.Conv2d(cin, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for stage in self.up:
            for layer in stage:
                h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """The KL-regularized autoencoder of latent diffusion.

    ``encode(x)`` gives the posterior :class:`DiagonalGaussianDistribution` over latents
    ``[B, embed_dim, H/f, W/f]`` (deterministic when ``double_z=False``), ``decode(z)`` the image,
    ``forward(x, sample_posterior=True)`` both: ``(reconstruction, posterior)``. Level ``l`` of
    the encoder runs ``num_res_blocks`` ResNet blocks with ``ch * ch_mult[l]`` channels (the
    decoder ``num_res_blocks + 1``), with single-head self-attention after each block at levels
    whose smaller side is in ``attn_resolutions``; both have a middle ResNet-attention-ResNet block.
    The network is fully convolutional: any ``H, W`` divisible by ``f`` is accepted
    (``img_resolution`` only decides which levels get attention).
    """

    def __init__(self, img_resolution: int | Sequence[int] = 32, in_channels: int = 3,
                 out_channels: int | None = None, ch: int = 64, ch_mult: Sequence[int] = (1, 2, 4),
                 num_res_blocks: int = 2, attn_resolutions: Sequence[int] = (), dropout: float = 0.0,
                 z_channels: int = 4, double_z: bool = True, embed_dim: int = 4):
        super().__init__()
        self.img_resolution = parse_resolution(img_resolution)
        out_channels = in_channels if out_channels is None else out_channels
        for name, value in [("in_channels", in_channels), ("out_channels", out_channels), ("ch", ch),
                            ("num_res_blocks", num_res_blocks), ("z_channels", z_channels), ("embed_dim", embed_dim)]:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        ch_mult = tuple(ch_mult)
        if not ch_mult or not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in ch_mult):
            raise ValueError(f"ch_mult must be a non-empty sequence of positive ints, got {ch_mult!r}")
        if not isinstance(double_z, bool):
            raise ValueError(f"double_z must be true or false, got {double_z!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.factor = 2 ** (len(ch_mult) - 1)
        H, W = self.img_resolution
        if H % self.factor or W % self.factor:
            raise ValueError(f"img_resolution {H}x{W} is not divisible by 2**(len(ch_mult)-1) = {self.factor}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.z_channels, self.embed_dim, self.double_z = z_channels, embed_dim, double_z
        attn = tuple(int(r) for r in attn_resolutions)
        common = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, attn_resolutions=attn,
                      dropout=float(dropout), z_channels=z_channels, resolution=self.img_resolution)
        self.encoder = Encoder(in_channels=in_channels, double_z=double_z, **common)
        self.decoder = Decoder(out_channels=out_channels, **common)
        moments = 2 if double_z else 1
        self.quant_conv = nn.Conv2d(moments * z_channels, moments * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(embed_dim, H/f, W/f)`` for images of ``img_resolution``."""
        return self.embed_dim, self.img_resolution[0] // self.factor, self.img_resolution[1] // self.factor

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output convolution weight (where the adaptive GAN weight is measured)."""
        return self.decoder.conv_out.weight

    def _check(self, x: torch.Tensor, channels: int, what: str) -> None:
        if x.ndim != 4 or x.shape[1] != channels or x.shape[2] % self.factor or x.shape[3] % self.factor:
            raise ValueError(f"{type(self).__name__}.{what} expects [B, {channels}, H, W] with H and W divisible "
                             f"by {self.factor}, got {list(x.shape)}")

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """The posterior q(z | x) for images ``x [B, in_channels, H, W]`` in model range."""
        self._check(x, self.in_channels, "encode")
        moments = self.quant_conv(self.encoder(x))
        if self.double_z:
            return DiagonalGaussianDistribution(moments)
        return DiagonalGaussianDistribution.from_mean(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images ``[B, out_channels, f h, f w]`` for latents ``z [B, embed_dim, h, w]``."""
        if z.ndim != 4 or z.shape[1] != self.embed_dim:
            raise ValueError(f"{type(self).__name__}.decode expects [B, {self.embed_dim}, h, w], got {list(z.shape)}")
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True, *, generator: torch.Generator | None = None,
                noise: torch.Tensor | None = None) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """``(decode(z), posterior)`` with z sampled from the posterior (``generator`` / ``noise``) or its mode."""
        posterior = self.encode(x)
        z = posterior.sample(generator=generator, noise=noise) if sample_posterior else posterior.mode()
        return self.decode(z), posterior
