"""UNet: a small, fast U-Net for quick CPU experiments (e.g. 8x8 digits).

Its defaults are the ``build_network("unet", img_resolution=8, in_channels=1, out_channels=1)``
digits preset (about 1.7M parameters). It uses the ADM-style residual block of :mod:`.layers` but
spends less compute than :class:`DhariwalUNet`: resampling is parameter-free (2x2 average pooling
down, nearest-neighbour up) instead of residual up/down blocks, and there is one skip connection
per level instead of one per block.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .base import DiffusionNet
from .layers import Conv2d, GroupNorm, Linear, PositionalEmbedding, UNetBlock

__all__ = ["UNet"]


class UNet(DiffusionNet):
    """Small U-Net ``F(x, c_noise, class_labels=None)``.

    Level ``l`` runs at ``(H / 2^l, W / 2^l)`` with ``model_channels * channel_mult[l]`` channels and
    ``num_blocks`` residual blocks in both the encoder and the decoder; the lowest level adds a
    middle pair of blocks, the first with self-attention if ``mid_attention``. Blocks at levels
    whose smaller side is in ``attn_resolutions`` also get self-attention (``channels_per_head``
    channels per head). The noise embedding (positional features of ``c_noise``, any scale) and
    optional class embedding modulate each block by scale and shift. The output convolution and
    the last layer of every residual branch start at exactly zero, so a fresh network outputs 0.
    """

    def __init__(self, img_resolution: int | Sequence[int], in_channels: int, out_channels: int | None = None,
                 label_dim: int = 0, augment_dim: int = 0, cond_channels: int = 0, context_dim: int = 0,
                 model_channels: int = 32,
                 channel_mult: Sequence[int] = (1, 2, 3), channel_mult_emb: int = 4, num_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (), dropout: float = 0.0, label_dropout: float = 0.0,
                 channels_per_head: int = 64, mid_attention: bool = True, checkpointing: bool = False):
        super().__init__(img_resolution, in_channels, out_channels, channel_mult, num_blocks,
                         attn_resolutions, dropout, label_dim, label_dropout, augment_dim, cond_channels,
                         context_dim)
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0.0, init_bias=0.0)
        block = partial(UNetBlock, emb_channels=emb_channels, channels_per_head=channels_per_head,
                        dropout=dropout, init=init, init_zero=init_zero)
        widths = [model_channels * m for m in self.channel_mult]

        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal",
                                 init_weight=math.sqrt(label_dim)) if label_dim else None)

        self.stem = self.widen_input(Conv2d(in_channels, widths[0], 3, **init))
        self.enc = nn.ModuleList()
        cout = widths[0]
        for level, width in enumerate(widths):
            blocks = nn.ModuleList()
            for _ in range(num_blocks):
                blocks.append(block(cout, width, attention=self.use_attention(level)))
                cout = width
            self.enc.append(blocks)
        self.mid = nn.ModuleList([block(cout, cout, attention=mid_attention), block(cout, cout)])
        self.dec = nn.ModuleList()
        for level in reversed(range(len(widths))):
            blocks = nn.ModuleList()
            for idx in range(num_blocks):
                cin = cout + (widths[level] if idx == 0 else 0)
                blocks.append(block(cin, widths[level], attention=self.use_attention(level)))
                cout = widths[level]
            self.dec.append(blocks)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, self.out_channels, 3, **init_zero)
        self.add_cross_attention(self.mid[0])
        self.use_checkpointing(checkpointing)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None, concat: torch.Tensor | None = None,
                context: torch.Tensor | None = None, **cond) -> torch.Tensor:
        """``F(x, c_noise)``: ``x`` ``[B, in_channels, H, W]``, ``c_noise`` ``[B]`` -> ``[B, out_channels, H, W]``
        (conditions: see :class:`~.base.DiffusionNet`)."""
        c_noise, labels, augment_labels = self.check_inputs(x, c_noise, class_labels, augment_labels, cond)
        emb = self.embed(c_noise, labels, augment_labels)
        out_dtype, skips = x.dtype, []
        x, context = self.check_conditions(x, concat, context)
        x = self.stem(x)
        for level, blocks in enumerate(self.enc):
            if level > 0:
                x = F.avg_pool2d(x, 2)
            for blk in blocks:
                x = blk(x, emb, context)
            skips.append(x)
        for blk in self.mid:
            x = blk(x, emb, context)
        for i, blocks in enumerate(self.dec):
            if i > 0:
                x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            x = torch.cat([x, skips.pop()], dim=1)
            for blk in blocks:
                x = blk(x, emb, context)
        return self.out_conv(F.silu(self.out_norm(x))).to(out_dtype)
