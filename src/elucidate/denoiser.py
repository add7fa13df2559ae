"""The preconditioned denoiser D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) (EDM eq. 7)."""
from __future__ import annotations

import torch
from torch import nn

from .formulations import Formulation

__all__ = ["Denoiser", "batch_sigma"]


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
