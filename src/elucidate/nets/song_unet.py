"""SongUNet: the DDPM++ / NCSN++ architectures of Song et al. (2021, "Score-Based Generative
Modeling through Stochastic Differential Equations") in the single configurable form EDM uses
(Karras et al. 2022, Appendix F.2). ``build_network("ddpmpp")`` / ``("ncsnpp")`` select the presets."""
from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .base import DiffusionNet
from .layers import Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding, UNetBlock

__all__ = ["SongUNet"]

EMBEDDING_TYPES = ("positional", "fourier")
ENCODER_TYPES = ("standard", "skip", "residual")
DECODER_TYPES = ("standard", "skip")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


class SongUNet(DiffusionNet):
    """U-Net of DDPM++ (positional noise embedding, standard encoder, [1, 1] resampling) and
    NCSN++ (random Fourier embedding, residual encoder, [1, 3, 3, 1] resampling).

    Residual blocks add the noise embedding as a per-channel shift and scale every residual sum by
    sqrt(1/2); every block at a resolution in ``attn_resolutions`` (smaller side of the feature
    map) gets single-head (``num_heads``) self-attention, and the lowest resolution always has one
    attention block. Encoder types: ``standard``, ``skip`` (input pyramid added at every level),
    ``residual`` (NCSN++: a strided residual path from the input). Decoder types: ``standard``,
    ``skip`` (output pyramid summed across levels). The embedding width is ``model_channels *
    channel_mult_emb``; the noise features are ``model_channels * channel_mult_noise`` wide and
    enter the mapping network as ``[sin, cos]``, as in edm (whose weights load via :mod:`.edm_port`).
    The final output convolution(s) start at exactly zero, so a fresh network outputs 0.
    """

    def __init__(self, img_resolution: int | Sequence[int], in_channels: int, out_channels: int | None = None,
                 label_dim: int = 0, augment_dim: int = 0, cond_channels: int = 0, context_dim: int = 0,
                 model_channels: int = 128,
                 channel_mult: Sequence[int] = (1, 2, 2, 2), channel_mult_emb: int = 4, num_blocks: int = 4,
                 attn_resolutions: Sequence[int] = (16,), dropout: float = 0.10, label_dropout: float = 0.0,
                 embedding_type: str = "positional", channel_mult_noise: int = 1,
                 encoder_type: str = "standard", decoder_type: str = "standard",
                 resample_filter: Sequence[float] = (1, 1), num_heads: int = 1, checkpointing: bool = False):
        super().__init__(img_resolution, in_channels, out_channels, channel_mult, num_blocks,
                         attn_resolutions, dropout, label_dim, label_dropout, augment_dim, cond_channels,
                         context_dim)
        self.embedding_type = _choice("embedding_type", embedding_type, EMBEDDING_TYPES)
        self.encoder_type = _choice("encoder_type", encoder_type, ENCODER_TYPES)
        self.decoder_type = _choice("decoder_type", decoder_type, DECODER_TYPES)
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_out = dict(init_mode="xavier_uniform", init_weight=0.0)
        block = partial(UNetBlock, emb_channels=emb_channels, num_heads=num_heads, dropout=dropout,
                        skip_scale=math.sqrt(0.5), eps=1e-6, resample_filter=resample_filter,
                        resample_proj=True, adaptive_scale=False, init=init, init_zero=init_zero,
                        init_attn=dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2)))

        # Mapping network: noise label (+ class label, augmentation label) -> embedding.
        # edm's SongUNet swaps its embedding's halves to [sin, cos] before the mapping MLP.
        self.map_noise = (PositionalEmbedding(noise_channels, endpoint=True, sin_first=True)
                          if embedding_type == "positional" else FourierEmbedding(noise_channels, sin_first=True))
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder: one stage per level; every module output below is also a skip connection.
        self.enc = nn.ModuleList()
        cout = caux = in_channels
        skip_channels = []
        for level, mult in enumerate(self.channel_mult):
            stage = nn.ModuleDict()
            if level == 0:
                stage["conv"] = self.widen_input(Conv2d(cout, model_channels, 3, **init))
                cout = model_channels
            else:
                stage["down"] = block(cout, cout, down=True)
                if encoder_type == "skip":
                    stage["aux_down"] = Conv2d(caux, caux, 0, down=True, resample_filter=resample_filter)
                    stage["aux_skip"] = Conv2d(caux, cout, 1, **init)
                elif encoder_type == "residual":
                    stage["aux_residual"] = Conv2d(caux, cout, 3, down=True, resample_filter=resample_filter,
                                                   fused_resample=True, **init)
                    caux = cout
            skip_channels.append(cout)
            stage["blocks"] = nn.ModuleList()
            for _ in range(num_blocks):
                stage["blocks"].append(block(cout, model_channels * mult, attention=self.use_attention(level)))
                cout = model_channels * mult
                skip_channels.append(cout)
            self.enc.append(stage)

        # Decoder: mirror image, consuming one skip per block.
        self.dec = nn.ModuleList()
        bottom = len(self.channel_mult) - 1
        for level in reversed(range(len(self.channel_mult))):
            stage = nn.ModuleDict()
            if level == bottom:
                stage["mid"] = nn.ModuleList([block(cout, cout, attention=True), block(cout, cout)])
            else:
                stage["up"] = block(cout, cout, up=True)
            stage["blocks"] = nn.ModuleList()
            for idx in range(num_blocks + 1):
                cin = cout + skip_channels.pop()
                cout = model_channels * self.channel_mult[level]
                attention = idx == num_blocks and self.use_attention(level)
                stage["blocks"].append(block(cin, cout, attention=attention))
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < bottom:
                    stage["aux_up"] = Conv2d(self.out_channels, self.out_channels, 0, up=True,
                                             resample_filter=resample_filter)
                stage["aux_norm"] = GroupNorm(cout, eps=1e-6)
                stage["aux_conv"] = Conv2d(cout, self.out_channels, 3, **init_out)
            self.dec.append(stage)
        self.add_cross_attention(self.dec[0]["mid"][0])
        self.use_checkpointing(checkpointing)

    def embed(self, c_noise: torch.Tensor, labels: torch.Tensor | None,
              augment_labels: torch.Tensor | None) -> torch.Tensor:
        """The conditioning embedding ``[B, model_channels * channel_mult_emb]``."""
        dtype = self.map_layer0.weight.dtype
        emb = self.map_noise(c_noise).to(dtype)
        if self.map_label is not None:
            emb = emb + self.map_label(labels.to(dtype) * math.sqrt(self.label_dim))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(dtype))
        return F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None, concat: torch.Tensor | None = None,
                context: torch.Tensor | None = None, **cond) -> torch.Tensor:
        """``F(x, c_noise)``: ``x`` ``[B, in_channels, H, W]``, ``c_noise`` ``[B]`` -> ``[B, out_channels, H, W]``
        (conditions: see :class:`~.base.DiffusionNet`)."""
        c_noise, labels, augment_labels = self.check_inputs(x, c_noise, class_labels, augment_labels, cond)
        emb = self.embed(c_noise, labels, augment_labels)
        out_dtype, skips, aux = x.dtype, [], x  # the skip/residual encoders' input pyramid starts from x alone
        x, context = self.check_conditions(x, concat, context)
        for stage in self.enc:
            if "conv" in stage:
                x = stage["conv"](x)
            else:
                x = stage["down"](x, emb, context)
                if "aux_skip" in stage:
                    aux = stage["aux_down"](aux)
                    x = x + stage["aux_skip"](aux)
                elif "aux_residual" in stage:
                    x = aux = (x + stage["aux_residual"](aux)) / math.sqrt(2)
            skips.append(x)
            for blk in stage["blocks"]:
                x = blk(x, emb, context)
                skips.append(x)

        aux = None
        for stage in self.dec:
            if "mid" in stage:
                for blk in stage["mid"]:
                    x = blk(x, emb, context)
            else:
                x = stage["up"](x, emb, context)
            for blk in stage["blocks"]:
                x = blk(torch.cat([x, skips.pop()], dim=1), emb, context)
            if "aux_conv" in stage:
                if "aux_up" in stage:
                    aux = stage["aux_up"](aux)
                y = stage["aux_conv"](F.silu(stage["aux_norm"](x)))
                aux = y if aux is None else aux + y
        return aux.to(out_dtype)
