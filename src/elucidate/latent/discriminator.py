"""PatchGAN discriminator (Isola et al. 2017, pix2pix; as in taming-transformers) and its losses.

Deviation from taming: GroupNorm instead of BatchNorm, so a patch's logit depends on its own image
only (not on the rest of the batch): training with N processes then equals one process, and the
discriminator has no running statistics to keep in sync.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..nets.layers import GroupNorm

__all__ = ["PatchDiscriminator", "hinge_d_loss", "vanilla_d_loss", "generator_loss", "DISC_LOSSES"]


class PatchDiscriminator(nn.Module):
    """``n_layers`` stride-2 4x4 convolutions (channels ``ndf * min(2^k, 8)``), one stride-1 4x4
    convolution and a 1-channel 4x4 output: a map of real/fake logits, one per receptive-field patch.
    Weights start as N(0, 0.02^2), norm scales as N(1, 0.02^2) (pix2pix's initialization)."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        if n_layers < 1 or ndf < 1 or in_channels < 1:
            raise ValueError(f"need in_channels, ndf, n_layers >= 1, got {in_channels}, {ndf}, {n_layers}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=False),
                       GroupNorm(ndf * mult), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.normal_(0.0, 0.02)
            elif isinstance(m, nn.GroupNorm):
                m.weight.normal_(1.0, 0.02)
                m.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, 1, h, w]`` (one per patch) for images ``[B, C, H, W]``."""
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss 1/2 (E[max(0, 1 - D(x))] + E[max(0, 1 + D(x~))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator non-saturating GAN loss 1/2 (E[softplus(-D(x))] + E[softplus(D(x~))])
    (= binary cross-entropy with real = 1, fake = 0)."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's adversarial loss -E[D(x~)] (used with either discriminator loss, as in taming)."""
    return -logits_fake.mean()


DISC_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}
