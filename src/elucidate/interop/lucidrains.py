"""The lucidrains-style API (``Unet`` and ``ElucidatedDiffusion``, as in lucidrains' elucidated-diffusion) as thin
calls into elucidate's core.

``Unet`` is elucidate's :class:`~elucidate.nets.UNet` under lucidrains' argument names; ``ElucidatedDiffusion``
holds an :class:`~elucidate.EDM` formulation and a :class:`~elucidate.Denoiser` and delegates every
computation to them, to :func:`~elucidate.denoising_loss` and to the samplers in :mod:`elucidate.sampling`.
Images enter and leave in [0, 1] and are modelled in [-1, 1]. See docs/lucidrains.md.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..denoiser import Denoiser
from ..errors import UserError
from ..formulations import EDM
from ..losses import denoising_loss
from ..nets.layers import FourierEmbedding, Linear, PositionalEmbedding, parse_resolution
from ..nets.unet import UNet
from ..sampling import dpmpp_2m, heun

__all__ = ["Unet", "ElucidatedDiffusion", "normalize_to_neg_one_to_one", "unnormalize_to_zero_to_one"]


def normalize_to_neg_one_to_one(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1]."""
    return images * 2 - 1


def unnormalize_to_zero_to_one(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1]."""
    return (x + 1) * 0.5


class _FourierNoiseEmbedding(nn.Module):
    """``[c, sin(2 pi c f_k), cos(2 pi c f_k)]``: the noise label itself followed by its random
    (frozen) or learned Fourier features, ``f_k ~ N(0, 1)`` (``num_channels + 1`` outputs)."""

    def __init__(self, num_channels: int, learnable: bool):
        super().__init__()
        self.fourier = FourierEmbedding(num_channels, scale=1.0, sin_first=True, learnable=learnable)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        features = self.fourier(c_noise)
        return torch.cat([c_noise.reshape(-1, 1).to(features.dtype), features], dim=1)


class Unet(UNet):
    """elucidate's U-Net under lucidrains' names: ``F(x, c_noise, class_labels=None)`` for any
    ``[B, channels, H, W]`` with H and W divisible by :attr:`downsample_factor` = 2**(len(dim_mults)-1).

    ``dim`` -> ``model_channels``, ``dim_mults`` -> ``channel_mult``, ``channels`` -> ``in_channels``,
    ``out_dim`` -> ``out_channels`` (default ``channels``), ``dropout`` -> ``dropout``,
    ``attn_dim_head`` -> ``channels_per_head``; ``full_attn`` (a bool or one per level; default: only the
    innermost level) picks the levels whose blocks get self-attention (the middle blocks always do).
    ``learned_sinusoidal_cond`` / ``random_fourier_features`` / ``random_or_learned_sinusoidal_cond``
    embed c_noise with ``learned_sinusoidal_dim`` learned (or, with ``random_fourier_features``, frozen
    random) Fourier features plus c_noise itself; otherwise with the UNet's sinusoidal embedding
    (``sinusoidal_pos_emb_theta`` = its max_positions). ``self_condition``, ``learned_variance``,
    ``init_dim`` and ``attn_heads`` are not supported (a clear error if set).
    """

    def __init__(self, dim: int, init_dim: int | None = None, out_dim: int | None = None,
                 dim_mults: Sequence[int] = (1, 2, 4, 8), channels: int = 3, self_condition: bool = False,
                 learned_variance: bool = False, learned_sinusoidal_cond: bool = False,
                 random_fourier_features: bool = False, learned_sinusoidal_dim: int = 16,
                 sinusoidal_pos_emb_theta: int = 10000, dropout: float = 0.0, attn_dim_head: int = 32,
                 attn_heads: int | None = None, full_attn: bool | Sequence[bool] | None = None,
                 flash_attn: bool = False, random_or_learned_sinusoidal_cond: bool = False):
        if self_condition:
            raise UserError("Unet(self_condition=True) is not supported: elucidate's samplers are plain "
                            "functions of D(x, sigma) and carry no self-conditioning state")
        if learned_variance:
            raise UserError("Unet(learned_variance=True) is not supported: EDM's network predicts the "
                            "denoised image only")
        dim_mults = tuple(int(m) for m in dim_mults)
        if init_dim is not None and init_dim != dim * dim_mults[0]:
            raise UserError(f"Unet(init_dim={init_dim}) is not supported: the first convolution has "
                            f"dim * dim_mults[0] = {dim * dim_mults[0]} channels")
        if attn_heads is not None:
            raise UserError("Unet(attn_heads=...) is not supported: each attention layer has "
                            "width // attn_dim_head heads; set attn_dim_head instead")
        if isinstance(attn_dim_head, bool) or not isinstance(attn_dim_head, int) or attn_dim_head < 1:
            raise UserError(f"attn_dim_head must be an int >= 1, got {attn_dim_head!r}")
        # lucidrains: a false-y full_attn means "full attention at the innermost level only"
        levels = len(dim_mults)
        full = full_attn if full_attn else (False,) * (levels - 1) + (True,)
        full = (bool(full),) * levels if isinstance(full, bool) else tuple(bool(f) for f in full)
        if len(full) != levels:
            raise UserError(f"full_attn has {len(full)} entries but dim_mults has {levels} levels")
        self.full_attn = full  # read by use_attention() while UNet.__init__ builds the blocks
        self.downsample_factor = 2 ** (levels - 1)
        super().__init__(img_resolution=self.downsample_factor, in_channels=channels, out_channels=out_dim,
                         model_channels=dim, channel_mult=dim_mults, dropout=dropout,
                         channels_per_head=attn_dim_head, mid_attention=True)
        self.img_resolution = None  # any H, W divisible by downsample_factor (see check_inputs)
        self.channels, self.out_dim = channels, self.out_channels
        self.self_condition, self.flash_attn = False, flash_attn
        self.random_or_learned_sinusoidal_cond = bool(
            learned_sinusoidal_cond or random_fourier_features or random_or_learned_sinusoidal_cond)
        if self.random_or_learned_sinusoidal_cond:
            self.map_noise = _FourierNoiseEmbedding(learned_sinusoidal_dim, learnable=not random_fourier_features)
            init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
            self.map_layer0 = Linear(learned_sinusoidal_dim + 1, self.map_layer0.out_features, **init)
        elif sinusoidal_pos_emb_theta != self.map_noise.max_positions:
            self.map_noise = PositionalEmbedding(dim, max_positions=sinusoidal_pos_emb_theta)

    def use_attention(self, level: int) -> bool:
        return self.full_attn[level]

    def check_inputs(self, x: torch.Tensor, c_noise, class_labels, augment_labels,
                     cond: dict) -> tuple[torch.Tensor, None, None]:
        """As every network's check, but any H and W divisible by :attr:`downsample_factor` are accepted."""
        if cond:
            raise TypeError(f"Unet.forward got unknown conditioning key(s) {sorted(cond)}")
        if class_labels is not None or augment_labels is not None:
            raise ValueError("Unet is unconditional but class_labels or augment_labels were given")
        f = self.downsample_factor
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"Unet expects x of shape [B, {self.in_channels}, H, W] with H and W divisible by "
                             f"2**(len(dim_mults)-1) = {f}, got {list(x.shape)}")
        c_noise = torch.as_tensor(c_noise, device=x.device).reshape(-1)
        if c_noise.numel() == 1:
            c_noise = c_noise.expand(x.shape[0])
        elif c_noise.numel() != x.shape[0]:
            raise ValueError(f"c_noise has {c_noise.numel()} values but x has batch size {x.shape[0]}")
        return c_noise, None, None


class ElucidatedDiffusion(nn.Module):
    """EDM training and sampling of ``net`` on ``[B, channels, *image_size]`` images in [0, 1].

    ``net`` is any network with elucidate's contract ``F(x, c_noise)`` (e.g. :class:`Unet`). The
    diffusion is ``self.edm = EDM(sigma_data, sigma_min, sigma_max, rho, P_mean, P_std)`` and the
    preconditioned network is ``self.denoiser = Denoiser(net, self.edm)``; ``num_sample_steps`` and the
    churn parameters ``S_churn, S_tmin, S_tmax, S_noise`` (EDM Algorithm 2) are the sampling defaults.
    ``image_size`` is an int or ``(H, W)``. The module's parameters are the network's.
    """

    def __init__(self, net: nn.Module, *, image_size: int | Sequence[int], channels: int = 3,
                 num_sample_steps: int = 32, sigma_min: float = 0.002, sigma_max: float = 80,
                 sigma_data: float = 0.5, rho: float = 7, P_mean: float = -1.2, P_std: float = 1.2,
                 S_churn: float = 80, S_tmin: float = 0.05, S_tmax: float = 50, S_noise: float = 1.003):
        super().__init__()
        if getattr(net, "self_condition", False):
            raise UserError("ElucidatedDiffusion: self-conditioning networks are not supported")
        try:
            self.image_size = parse_resolution(image_size)
        except ValueError as err:
            raise UserError(f"image_size: {err}") from None
        factor = getattr(net, "downsample_factor", 1)
        if any(side % factor for side in self.image_size):
            raise UserError(f"image_size {self.image_size} must be divisible by the network's downsample factor "
                            f"{factor} (2**(len(dim_mults)-1))")
        bound = getattr(net, "img_resolution", None)
        if bound is not None and tuple(bound) != self.image_size:
            raise UserError(f"image_size {self.image_size} differs from the network's img_resolution {tuple(bound)}")
        in_channels = getattr(net, "in_channels", channels)
        if in_channels != channels:
            raise UserError(f"channels={channels} but the network takes {in_channels} input channels")
        if isinstance(num_sample_steps, bool) or not isinstance(num_sample_steps, int) or num_sample_steps < 1:
            raise UserError(f"num_sample_steps must be an int >= 1, got {num_sample_steps!r}")
        self.edm = EDM(sigma_data=sigma_data, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
                       P_mean=P_mean, P_std=P_std)
        self.denoiser = Denoiser(net, self.edm)
        self.channels, self.num_sample_steps = channels, num_sample_steps
        self.S_churn, self.S_tmin, self.S_tmax, self.S_noise = S_churn, S_tmin, S_tmax, S_noise
        self.self_condition = False

    # --- the formulation's fields under the lucidrains-style names ------------------------------
    net = property(lambda self: self.denoiser.net, doc="The raw network F.")
    sigma_data = property(lambda self: self.edm.sigma_data)
    sigma_min = property(lambda self: self.edm.sigma_min)
    sigma_max = property(lambda self: self.edm.sigma_max)
    rho = property(lambda self: self.edm.rho)
    P_mean = property(lambda self: self.edm.P_mean)
    P_std = property(lambda self: self.edm.P_std)

    @property
    def device(self) -> torch.device:
        """The device of the network's parameters (CPU for a parameter-free network)."""
        return next((p.device for p in self.net.parameters()), torch.device("cpu"))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype sampling runs in: that of the network's parameters."""
        return next((p.dtype for p in self.net.parameters() if p.is_floating_point()), torch.get_default_dtype())

    # --- preconditioning (EDM Table 1, eq. 7) -----------------------------------------------------
    def c_skip(self, sigma) -> torch.Tensor:
        return self.edm.precondition(sigma).c_skip

    def c_out(self, sigma) -> torch.Tensor:
        return self.edm.precondition(sigma).c_out

    def c_in(self, sigma) -> torch.Tensor:
        return self.edm.precondition(sigma).c_in

    def c_noise(self, sigma) -> torch.Tensor:
        return self.edm.precondition(sigma).c_noise

    def preconditioned_network_forward(self, noised_images: torch.Tensor, sigma, self_cond=None,
                                       clamp: bool = False) -> torch.Tensor:
        """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) (eq. 7), clamped to [-1, 1] if ``clamp``."""
        if self_cond is not None:
            raise UserError("self_cond is not supported (the network has no self-conditioning input)")
        out = self.denoiser(noised_images, sigma)
        return out.clamp(-1.0, 1.0) if clamp else out

    # --- sampling ---------------------------------------------------------------------------------
    def sample_schedule(self, num_sample_steps: int | None = None) -> torch.Tensor:
        """The ``N + 1`` float32 noise levels of eq. 5 from sigma_max down to sigma_min, then 0."""
        steps = self.num_sample_steps if num_sample_steps is None else num_sample_steps
        return self.edm.sampling_sigmas(steps, device=self.device, dtype=torch.float32)

    def _initial_noise(self, batch_size: int, sigmas: torch.Tensor) -> torch.Tensor:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"batch_size must be an int >= 1, got {batch_size!r}")
        shape = (batch_size, self.channels, *self.image_size)
        return float(sigmas[0]) * torch.randn(shape, device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def sample(self, batch_size: int = 16, num_sample_steps: int | None = None, clamp: bool = True) -> torch.Tensor:
        """EDM Algorithm 2 (Heun with churn ``S_churn, S_tmin, S_tmax, S_noise``) from N(0, sigma_max^2)
        noise; ``clamp`` clamps each denoised estimate to [-1, 1]. Returns images in [0, 1]."""
        sigmas = self.sample_schedule(num_sample_steps)
        x = self._initial_noise(batch_size, sigmas)
        D = lambda x, sigma: self.preconditioned_network_forward(x, sigma, clamp=clamp)  # noqa: E731
        x = heun(D, x, sigmas, s_churn=self.S_churn, s_tmin=self.S_tmin, s_tmax=self.S_tmax, s_noise=self.S_noise)
        return unnormalize_to_zero_to_one(x.clamp(-1.0, 1.0))

    @torch.no_grad()
    def sample_using_dpmpp(self, batch_size: int = 16, num_sample_steps: int | None = None) -> torch.Tensor:
        """DPM-Solver++(2M) (Lu et al. 2022) from N(0, sigma_max^2) noise. Returns images in [0, 1]."""
        sigmas = self.sample_schedule(num_sample_steps)
        x = dpmpp_2m(self.denoiser, self._initial_noise(batch_size, sigmas), sigmas)
        return unnormalize_to_zero_to_one(x.clamp(-1.0, 1.0))

    # --- training ---------------------------------------------------------------------------------
    def loss_weight(self, sigma) -> torch.Tensor:
        """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2."""
        return self.edm.loss_weight(sigma)

    def noise_distribution(self, batch_size: int) -> torch.Tensor:
        """``batch_size`` training noise levels, ln(sigma) ~ N(P_mean, P_std^2)."""
        return self.edm.training_sigma(batch_size, device=self.device)

    def forward(self, images: torch.Tensor, *, sigma: torch.Tensor | None = None,
                loss_reduction: str = "mean") -> torch.Tensor:
        """The EDM loss lambda(sigma) ||D(y + sigma n; sigma) - y||^2 of ``images`` in [0, 1] (mapped to
        y in [-1, 1]), averaged over elements and, with ``loss_reduction='mean'``, over the batch."""
        expected = (self.channels, *self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise UserError(f"images must have shape [B, {expected[0]}, {expected[1]}, {expected[2]}] "
                            f"(channels, image_size), got {list(images.shape)}")
        if loss_reduction not in ("mean", "none"):
            raise UserError(f"loss_reduction must be 'mean' or 'none', got {loss_reduction!r}")
        losses = denoising_loss(self.denoiser, normalize_to_neg_one_to_one(images), sigma=sigma)
        return losses.mean() if loss_reduction == "mean" else losses
