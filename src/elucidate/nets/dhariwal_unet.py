"""DhariwalUNet: the ADM architecture of Dhariwal & Nichol (2021, "Diffusion Models Beat GANs on
Image Synthesis") as used by EDM (Karras et al. 2022) for ImageNet. ``build_network("adm")``."""
from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .base import DiffusionNet
from .layers import Conv2d, GroupNorm, Linear, PositionalEmbedding, UNetBlock

__all__ = ["DhariwalUNet"]


class DhariwalUNet(DiffusionNet):
    """ADM U-Net: positional noise embedding, residual blocks with adaptive group norm
    (embedding -> per-channel scale and shift), multi-head self-attention with ``channels_per_head``
    channels per head in every block at a resolution in ``attn_resolutions`` (smaller side of the
    feature map) plus the lowest-resolution middle block, box-filter resampling inside residual
    blocks. Class labels are added to the embedding after the mapping MLP. The output convolution
    and the last layer of every residual/attention branch start at exactly zero.
    """

    def __init__(self, img_resolution: int | Sequence[int], in_channels: int, out_channels: int | None = None,
                 label_dim: int = 0, augment_dim: int = 0, cond_channels: int = 0, context_dim: int = 0,
                 model_channels: int = 192,
                 channel_mult: Sequence[int] = (1, 2, 3, 4), channel_mult_emb: int = 4, num_blocks: int = 3,
                 attn_resolutions: Sequence[int] = (32, 16, 8), dropout: float = 0.10,
                 label_dropout: float = 0.0, channels_per_head: int = 64, checkpointing: bool = False):
        super().__init__(img_resolution, in_channels, out_channels, channel_mult, num_blocks,
                         attn_resolutions, dropout, label_dim, label_dropout, augment_dim, cond_channels,
                         context_dim)
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0.0, init_bias=0.0)
        block = partial(UNetBlock, emb_channels=emb_channels, channels_per_head=channels_per_head,
                        dropout=dropout, init=init, init_zero=init_zero)

        # Mapping network.
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal",
                                 init_weight=math.sqrt(label_dim)) if label_dim else None)

        # Encoder: every module output is a skip connection.
        self.enc = nn.ModuleList()
        cout = in_channels
        skip_channels = []
        for level, mult in enumerate(self.channel_mult):
            if level == 0:
                self.enc.append(self.widen_input(Conv2d(cout, model_channels * mult, 3, **init)))
                cout = model_channels * mult
            else:
                self.enc.append(block(cout, cout, down=True))
            skip_channels.append(cout)
            for _ in range(num_blocks):
                self.enc.append(block(cout, model_channels * mult, attention=self.use_attention(level)))
                cout = model_channels * mult
                skip_channels.append(cout)

        # Decoder: middle (lowest level) or up-sampling block, then blocks that each take a skip.
        self.dec = nn.ModuleList()
        self.dec_takes_skip: list[bool] = []
        for level in reversed(range(len(self.channel_mult))):
            if level == len(self.channel_mult) - 1:
                self.dec.extend([block(cout, cout, attention=True), block(cout, cout)])
                self.dec_takes_skip += [False, False]
            else:
                self.dec.append(block(cout, cout, up=True))
                self.dec_takes_skip.append(False)
            for _ in range(num_blocks + 1):
                cin = cout + skip_channels.pop()
                cout = model_channels * self.channel_mult[level]
                self.dec.append(block(cin, cout, attention=self.use_attention(level)))
                self.dec_takes_skip.append(True)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, self.out_channels, 3, **init_zero)
        self.add_cross_attention(self.dec[0])
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
        for layer in self.enc:
            x = layer(x, emb, context) if isinstance(layer, UNetBlock) else layer(x)
            skips.append(x)
        for blk, takes_skip in zip(self.dec, self.dec_takes_skip, strict=True):
            x = blk(torch.cat([x, skips.pop()], dim=1) if takes_skip else x, emb, context)
        return self.out_conv(F.silu(self.out_norm(x))).to(out_dtype)
