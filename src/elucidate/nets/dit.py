"""DiT: a transformer denoiser with adaLN-Zero conditioning (Peebles & Xie 2023, "Scalable Diffusion
Models with Transformers"), following this package's network contract
``F(x, c_noise, class_labels=None, augment_labels=None) -> [B, out_channels, H, W]``.

The image (pixels or autoencoder latents) is cut into ``patch_size x patch_size`` patches, each
linearly embedded into a token with a fixed 2-D sine-cosine position code; ``depth`` blocks of
multi-head self-attention and an MLP follow. The conditioning vector c (noise embedding of
``c_noise`` plus class embedding) regresses per block a shift, scale and gate for each sub-layer
(adaLN); the gates and the output layer start at zero, so every block starts as the identity and a
fresh network outputs exactly 0 (adaLN-Zero, DiT Sec. 3.2).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import DiffusionNet
from .layers import Checkpointed, Linear, PositionalEmbedding

__all__ = ["DiT", "DiTBlock", "sincos_position_embedding"]

_XAVIER = dict(init_mode="xavier_uniform")
_ZERO = dict(init_weight=0.0, init_bias=0.0)


def sincos_position_embedding(dim: int, height: int, width: int) -> torch.Tensor:
    """Fixed 2-D position codes ``[height * width, dim]`` (row-major tokens): the first half of the
    channels are sin/cos of the row at ``dim / 4`` frequencies 10000^(-k / (dim / 4)), the second
    half the same for the column (``dim`` must be divisible by 4)."""
    if dim % 4:
        raise ValueError(f"the position embedding needs hidden_size divisible by 4, got {dim}")
    freqs = 10000.0 ** (-torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                                indexing="ij")

    def code(pos: torch.Tensor) -> torch.Tensor:
        angle = pos.reshape(-1, 1) * freqs
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    return torch.cat([code(rows), code(cols)], dim=1).float()


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(shift, x, scale + 1)


class DiTBlock(Checkpointed):
    """``x + gate_1 * Attn(adaLN_1(x))``, then ``x + gate_2 * MLP(adaLN_2(x))``, with
    adaLN_i(x) = LayerNorm(x) * (1 + scale_i) + shift_i and (shift, scale, gate) regressed from c."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.qkv = Linear(hidden_size, 3 * hidden_size, **_XAVIER)
        self.proj = Linear(hidden_size, hidden_size, **_XAVIER)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        hidden_mlp = int(hidden_size * mlp_ratio)
        self.fc1 = Linear(hidden_size, hidden_mlp, **_XAVIER)
        self.fc2 = Linear(hidden_mlp, hidden_size, **_XAVIER)
        self.adaLN_modulation = Linear(hidden_size, 6 * hidden_size, **_ZERO)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)  # [B, heads, T, D / heads]
        return self.proj(a.transpose(1, 2).reshape(B, T, D))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c)[:, None].chunk(6, dim=2)
        x = x + gate1 * F.dropout(self.attention(_modulate(self.norm1(x), shift1, scale1)), self.dropout,
                                  self.training)
        h = F.gelu(self.fc1(_modulate(self.norm2(x), shift2, scale2)), approximate="tanh")
        return x + gate2 * self.fc2(F.dropout(h, self.dropout, self.training))


class DiT(DiffusionNet):
    """Diffusion transformer ``F(x, c_noise, class_labels=None)``; defaults are DiT-S/2
    (``hidden_size=384, depth=12, num_heads=6, patch_size=2``).

    ``img_resolution`` (int or ``(H, W)``, each divisible by ``patch_size``) and ``in_channels`` may
    be pixels or latents. ``c_noise`` (any scale) enters through ``noise_channels`` sinusoidal
    features (DiT's 256, max period 10^4) and a two-layer MLP; class labels (``label_dim > 0``,
    int or one-hot, zeroed with probability ``label_dropout`` in training) through a linear map
    added to it; ``augment_dim`` augmentation labels through a zero-initialized linear map.
    """

    def __init__(self, img_resolution: int | Sequence[int], in_channels: int, out_channels: int | None = None,
                 label_dim: int = 0, augment_dim: int = 0, patch_size: int = 2, hidden_size: int = 384,
                 depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 label_dropout: float = 0.0, noise_channels: int = 256,
                 checkpointing: bool = False):
        super().__init__(img_resolution, in_channels, out_channels, (1,), depth, (), dropout, label_dim,
                         label_dropout, augment_dim)
        for name, value in [("patch_size", patch_size), ("hidden_size", hidden_size), ("num_heads", num_heads),
                            ("noise_channels", noise_channels)]:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        H, W = self.img_resolution
        if H % patch_size or W % patch_size:
            raise ValueError(f"img_resolution {H}x{W} is not divisible by patch_size = {patch_size}")
        if hidden_size % num_heads or hidden_size % 4:
            raise ValueError(f"hidden_size = {hidden_size} must be divisible by num_heads = {num_heads} and by 4")
        if not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {mlp_ratio!r}")
        self.patch_size, self.hidden_size, self.depth, self.num_heads = patch_size, hidden_size, depth, num_heads
        self.grid = (H // patch_size, W // patch_size)

        self.patch_embed = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.register_buffer("pos_embed", sincos_position_embedding(hidden_size, *self.grid)[None], persistent=False)
        # conditioning, in DiffusionNet.embed's names: c = MLP(noise features [+ augment]) + label map
        self.map_noise = PositionalEmbedding(noise_channels)
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **_ZERO) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, hidden_size)
        self.map_layer1 = Linear(hidden_size, hidden_size)
        self.map_label = Linear(label_dim, hidden_size, bias=False) if label_dim else None

        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, self.dropout) for _ in range(depth))
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.final_modulation = Linear(hidden_size, 2 * hidden_size, **_ZERO)
        self.final_linear = Linear(hidden_size, patch_size * patch_size * self.out_channels, **_ZERO)
        self._init_weights()
        self.use_checkpointing(checkpointing)

    @torch.no_grad()
    def _init_weights(self) -> None:
        """DiT's initialization: patch embedding like a linear layer (Xavier), N(0, 0.02^2) for the
        noise MLP and label map; Xavier in the blocks; adaLN and output layers at zero (above)."""
        w = self.patch_embed.weight
        bound = math.sqrt(6 / (w[0].numel() + w.shape[0]))
        w.uniform_(-bound, bound)
        self.patch_embed.bias.zero_()
        for layer in (self.map_layer0, self.map_layer1, self.map_label):
            if layer is not None:
                layer.weight.normal_(0.0, 0.02)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, T, p * p * C]`` row-major patch tokens -> images ``[B, C, H, W]``."""
        (gh, gw), p, C = self.grid, self.patch_size, self.out_channels
        x = tokens.reshape(tokens.shape[0], gh, gw, p, p, C).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(tokens.shape[0], C, gh * p, gw * p)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None, **cond) -> torch.Tensor:
        """``F(x, c_noise)``: ``x`` ``[B, in_channels, H, W]``, ``c_noise`` ``[B]`` -> ``[B, out_channels, H, W]``."""
        c_noise, labels, augment_labels = self.check_inputs(x, c_noise, class_labels, augment_labels, cond)
        c = self.embed(c_noise, labels, augment_labels)  # silu(c): the adaLN regressors' input
        out_dtype = x.dtype
        h = self.patch_embed(x.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        h = h + self.pos_embed.to(h.dtype)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_modulation(c)[:, None].chunk(2, dim=2)
        h = self.final_linear(_modulate(self.norm_final(h), shift, scale))
        return self.unpatchify(h).to(out_dtype)
