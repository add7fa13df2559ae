"""The autoencoder's training loss: L1 (+ perceptual) reconstruction under a learned scalar
log-variance, KL to N(0, I), and a PatchGAN adversarial term with an adaptive weight
(latent-diffusion's ``LPIPSWithDiscriminator``; Esser et al. 2021, eq. 7, for the weight).

Per image (sums over pixels / latent elements, means over the batch, as in latent-diffusion):

    rec      = |x - x~| + w_p * d_perc(x, x~)                        (per pixel; d_perc per image)
    L_nll    = sum_pixels rec / exp(s) + s                            (s = learned log-variance)
    L_kl     = KL(q(z|x) || N(0, I))
    L_G      = -mean D(x~)
    lambda   = clamp(||grad_W L_nll|| / (||grad_W L_G|| + 1e-4), 0, 1e4) * disc_weight
               (W = the decoder's last layer; the adversarial term is off before disc_start)
    L_AE     = L_nll + kl_weight * L_kl + lambda * L_G
    L_D      = hinge or vanilla loss of D on x (real) and x~ (fake)

Unlike latent-diffusion, ``s`` is handed to the autoencoder's optimizer (there it is a parameter
that its optimizer never sees, so it stays at ``logvar_init``); the optimal ``s`` is log E[rec].
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .discriminator import DISC_LOSSES, PatchDiscriminator, generator_loss
from .distribution import DiagonalGaussianDistribution
from .perceptual import PerceptualLoss

__all__ = ["VAELoss", "adaptive_weight"]


def adaptive_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, *,
                    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """``clamp(||grad nll|| / (||grad g|| + 1e-4), 0, 1e4)`` at ``last_layer`` (detached).

    ``reduce`` maps a local gradient to the global one (the average over processes under DDP), so
    the weight is that of the global batch's losses.
    """
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    if reduce is not None:
        nll_grad, g_grad = reduce(nll_grad), reduce(g_grad)
    weight = torch.linalg.vector_norm(nll_grad) / (torch.linalg.vector_norm(g_grad) + 1e-4)
    return weight.clamp(0.0, 1e4).detach()


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Temporarily stop gradients to ``module``'s parameters (they still flow to its inputs)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class VAELoss(nn.Module):
    """Holds the learned log-variance ``logvar`` and the ``discriminator``; the perceptual feature
    network (frozen, optional) is held by reference: it is neither trained nor saved with the loss."""

    def __init__(self, in_channels: int, *, kl_weight: float = 1e-6, perceptual_weight: float = 0.0,
                 perceptual: nn.Module | None = None, disc_weight: float = 0.5, disc_start: int = 0,
                 disc_loss: str = "hinge", disc_layers: int = 3, disc_channels: int = 64, logvar_init: float = 0.0):
        super().__init__()
        if disc_loss not in DISC_LOSSES:
            raise ValueError(f"disc_loss must be one of {sorted(DISC_LOSSES)}, got {disc_loss!r}")
        if perceptual_weight > 0 and perceptual is None:
            raise ValueError(f"perceptual_weight = {perceptual_weight} needs a perceptual feature network")
        self.kl_weight, self.perceptual_weight = float(kl_weight), float(perceptual_weight)
        self.disc_weight, self.disc_start, self.disc_loss = float(disc_weight), int(disc_start), disc_loss
        self.logvar = nn.Parameter(torch.tensor(float(logvar_init)))
        self.discriminator = PatchDiscriminator(in_channels, disc_channels, disc_layers)
        if perceptual is not None and not isinstance(perceptual, PerceptualLoss):
            perceptual = PerceptualLoss(perceptual)
        self.__dict__["perceptual"] = perceptual  # not a submodule: frozen and not part of the state dict

    def adversarial(self, step: int) -> bool:
        """Whether the GAN terms are on at (0-based) ``step``: ``step >= disc_start`` and ``disc_weight > 0``."""
        return self.disc_weight > 0 and step >= self.disc_start

    def generator_loss(self, x: torch.Tensor, x_rec: torch.Tensor, posterior: DiagonalGaussianDistribution,
                       step: int, last_layer: torch.Tensor | None = None, *,
                       reduce_grad: Callable[[torch.Tensor], torch.Tensor] | None = None
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(L_AE, logs)`` for the autoencoder + log-variance update (module docstring)."""
        batch = x.shape[0]
        rec = (x.float() - x_rec.float()).abs()
        p_loss = None
        if self.perceptual_weight > 0:
            p_loss = self.perceptual(x.float(), x_rec.float())
            rec = rec + self.perceptual_weight * p_loss.view(-1, *([1] * (rec.ndim - 1)))
        nll_loss = (rec / self.logvar.exp() + self.logvar).sum() / batch
        kl_loss = posterior.kl().float().sum() / batch
        loss = nll_loss + self.kl_weight * kl_loss
        zero = loss.new_zeros(())
        logs = {"nll_loss": nll_loss.detach(), "kl_loss": kl_loss.detach(), "rec_loss": rec.detach().mean(),
                "p_loss": p_loss.detach().mean() if p_loss is not None else zero, "logvar": self.logvar.detach(),
                "g_loss": zero, "d_weight": zero, "disc_factor": zero}
        if self.adversarial(step):
            if last_layer is None:
                raise ValueError("the adversarial term needs last_layer (the decoder's output weight)")
            with frozen(self.discriminator):
                g_loss = generator_loss(self.discriminator(x_rec).float())
            d_weight = adaptive_weight(nll_loss, g_loss, last_layer, reduce=reduce_grad) * self.disc_weight
            loss = loss + d_weight * g_loss
            logs.update(g_loss=g_loss.detach(), d_weight=d_weight, disc_factor=loss.new_ones(()))
        logs["loss"] = loss.detach()
        return loss, logs

    def discriminator_loss(self, x: torch.Tensor, x_rec: torch.Tensor, step: int,
                           discriminator: nn.Module | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(L_D, logs)`` on real ``x`` and detached ``x_rec``; ``discriminator`` defaults to
        ``self.discriminator`` (pass its DDP wrapper under torchrun). Zero (and constant) before
        ``disc_start``."""
        if not self.adversarial(step):
            zero = x.new_zeros((), dtype=torch.float32)
            return zero, {"d_loss": zero, "logits_real": zero, "logits_fake": zero}
        d = discriminator if discriminator is not None else self.discriminator
        logits = d(torch.cat([x.detach(), x_rec.detach()])).float()
        logits_real, logits_fake = logits.chunk(2)
        d_loss = DISC_LOSSES[self.disc_loss](logits_real, logits_fake)
        return d_loss, {"d_loss": d_loss.detach(), "logits_real": logits_real.detach().mean(),
                        "logits_fake": logits_fake.detach().mean()}
