"""The preconditioned denoiser D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) (EDM eq. 7).

May import: formulations, errors.
"""
from __future__ import annotations

import torch
from torch import nn

from .formulations import Formulation

__all__ = ["Denoiser", "Guided", "batch_sigma", "with_null_condition"]


def batch_sigma(sigma, x: torch.Tensor) -> torch.Tensor:
    """``sigma`` as a ``[B]`` tensor in x's dtype and device (a float or 0-d tensor is broadcast)."""
    if not torch.is_tensor(sigma) and x.is_floating_point():  # a Python number: no float32 detour
        sigma = torch.tensor(sigma, dtype=x.dtype, device=x.device)
    sigma = torch.as_tensor(sigma, device=x.device)
    if sigma.dtype != x.dtype and x.is_floating_point():
        sigma = sigma.to(x.dtype)
    if sigma.ndim == 0:
        return sigma.expand(x.shape[0])
    sigma = sigma.reshape(-1)
    if sigma.shape[0] != x.shape[0]:
        raise ValueError(f"sigma has {sigma.shape[0]} values but x has batch size {x.shape[0]}")
    return sigma


class Denoiser(nn.Module):
    """Wrap a raw network ``F(x_in, c_noise, **cond)`` with a formulation's preconditioning.

    Works for any data shape ``[B, ...]``. ``sigma`` may be a float, a 0-d tensor or a ``[B]`` tensor.
    The network is fed in its own parameter dtype (and runs under whatever autocast context is
    active), while x, c_skip x and the output stay in x's dtype: float64 sampling state works with a
    float32 network, as in NVlabs/edm.
    """

    def __init__(self, net: nn.Module, formulation: Formulation):
        super().__init__()
        self.net = net
        self.formulation = formulation

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        sigma = batch_sigma(sigma, x)
        c_skip, c_out, c_in, c_noise = self.formulation.precondition(sigma)
        view = (-1,) + (1,) * (x.ndim - 1)
        x_in = c_in.reshape(view) * x
        F_x = self.net(x_in.to(_param_dtype(self.net, x_in.dtype)), c_noise.reshape(-1), **cond)
        if F_x.shape != x.shape:
            raise ValueError(f"network output shape {tuple(F_x.shape)} does not match input shape {tuple(x.shape)}")
        return c_skip.reshape(view) * x + c_out.reshape(view) * F_x.to(x.dtype)

    @property
    def supported_range(self) -> tuple[float, float]:
        """The noise levels the network is defined on (from the formulation)."""
        return self.formulation.supported_range

    def round_sigma(self, sigma):
        """Noise levels the network knows (iDDPM snaps to its grid; identity otherwise)."""
        return self.formulation.round_sigma(sigma)


def _param_dtype(net: nn.Module, default: torch.dtype) -> torch.dtype:
    """The dtype of the network's first floating parameter (``default`` for parameter-free callables)."""
    if isinstance(net, nn.Module):
        for p in net.parameters():
            if p.is_floating_point():
                return p.dtype
    return default


def with_null_condition(net, key: str, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the condition as the network takes it, its "no condition" counterpart) for one conditioning key:
    integer class labels become one-hot vectors and their null is the zero vector; a network may define
    ``null_condition(key, value)`` for its own keys; otherwise the null is zeros."""
    if key == "class_labels" and not value.is_floating_point():
        label_dim = int(getattr(net, "label_dim", 0) or 0)
        if not label_dim:
            raise ValueError("class_labels were given but the network is not class-conditional")
        value = torch.nn.functional.one_hot(value.long(), label_dim).float()
    make_null = getattr(net, "null_condition", None)
    return value, (make_null(key, value) if make_null is not None else torch.zeros_like(value))


class Guided(nn.Module):
    """Classifier-free guidance (Ho & Salimans 2022): D_w(x; sigma, c) = D(x; sigma, none) + w (D(x; sigma, c) -
    D(x; sigma, none)), both halves in one batched forward. w = 1 is the conditional model, 0 the
    unconditional one. Samplers see an ordinary denoiser."""

    def __init__(self, denoiser: nn.Module, guidance: float):
        super().__init__()
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or guidance < 0:
            raise ValueError(f"guidance must be a number >= 0, got {guidance!r}")
        self.denoiser, self.guidance = denoiser, float(guidance)

    @property
    def formulation(self) -> Formulation:
        return self.denoiser.formulation

    @property
    def supported_range(self) -> tuple[float, float]:
        return self.denoiser.formulation.supported_range

    def round_sigma(self, sigma):
        return self.denoiser.round_sigma(sigma)

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        if self.guidance == 1 or not cond:
            return self.denoiser(x, sigma, **cond)
        net = getattr(self.denoiser, "net", None)
        pairs = {key: with_null_condition(net, key, value) for key, value in cond.items()}
        if self.guidance == 0:
            return self.denoiser(x, sigma, **{key: null for key, (_, null) in pairs.items()})
        sigma = batch_sigma(sigma, x)
        both = {key: torch.cat([value, null]) for key, (value, null) in pairs.items()}
        conditional, unconditional = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **both).chunk(2)
        return unconditional + self.guidance * (conditional - unconditional)
