"""Flow matching / rectified flow (Lipman et al. 2023; Liu et al. 2023; SD3, Esser et al. 2024) as one
more row of EDM Table 1: x_t = (1 - t) y + t n, the network predicts the velocity v = n - y.

In EDM's view it is the pair s(t) = 1 - t, sigma(t) = t / (1 - t): the sigma-space input x = y + sigma n
is x_t / (1 - t), and t = sigma / (1 + sigma). With c_skip = c_in = 1 / (1 + sigma), c_out = -sigma / (1 + sigma)
the denoiser is D(x; sigma) = x_t - t v_hat, the network sees (x_t, 1000 t) as diffusers' flow
schedulers feed their models, and lambda(sigma) = ((1 + sigma) / sigma)^2 makes EDM's loss the
flow-matching loss ||v_hat - v||^2. Every sampler then runs on a flow model; elucidate's ``euler``
on these levels *is* the flow-matching Euler step x_t' = x_t + (t' - t) v_hat.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..params import param
from .base import Formulation, Preconditioning, as_tensor

__all__ = ["Flow", "FLOW_T_MAX"]

#: Finite stand-in for t = 1 (sigma = infinity, pure noise) as the first level of :meth:`Flow.sampling_sigmas`:
#: t = 1 - 1e-3, i.e. sigma = 999 before the shift (or 10x the next level's sigma if that is larger), as
#: zero-terminal-SNR DDPM uses sigma = 1e4 for alpha_bar = 0.
FLOW_T_MAX = 1 - 1e-3


@dataclass
class Flow(Formulation):
    """Flow matching with velocity prediction, logit-normal training times and SD3's timestep shift."""

    logit_mean: float = param(0.0, "mean of logit(t) during training (SD3's logit-normal; = mean of ln sigma)",
                              symbol="logit_mean")
    logit_std: float = param(1.0, "standard deviation of logit(t) during training (= std of ln sigma)",
                             symbol="logit_std", minimum=0, exclusive=True)
    shift: float = param(1.0, "SD3 timestep shift t' = shift t / (1 + (shift - 1) t), i.e. sigma' = shift sigma, "
                              "of training and sampling levels", symbol="shift", minimum=0, exclusive=True)
    name = "Flow"
    description = "flow matching / rectified flow: x_t = (1 - t) y + t n, velocity prediction, sigma = t / (1 - t)"

    # --- Table 1 rows ----------------------------------------------------------------------------
    def precondition(self, sigma) -> Preconditioning:
        sigma = as_tensor(sigma)
        c_in = 1 / (1 + sigma)  # x_t = x / (1 + sigma) = s(t) x
        c_skip = c_in.clone()  # D = x_t - t v_hat
        c_out = -sigma / (1 + sigma)  # -t
        c_noise = 1000 * sigma / (1 + sigma)  # 1000 t: diffusers' flow timestep scale
        return Preconditioning(c_skip, c_out, c_in, c_noise)

    def training_sigma(self, n, *, generator=None, device=None, dtype=None):
        # t = sigmoid(logit_mean + logit_std n), so sigma = t / (1 - t) = exp(logit_mean + logit_std n); then shifted
        logit = self._rand(n, generator, device, dtype, True) * self.logit_std + self.logit_mean
        return logit.exp() * self.shift

    def loss_weight(self, sigma):
        # lambda = 1 / t^2 = ((1 + sigma) / sigma)^2, so lambda ||D - y||^2 = ||v_hat - v||^2 (D - y = t (v - v_hat))
        sigma = as_tensor(sigma)
        return ((1 + sigma) / sigma) ** 2

    def sampling_sigmas(self, num_steps, *, device=None, dtype=torch.float64):
        """t uniform from 1 to 0 (diffusers' flow default), shifted (sigma' = shift sigma), then sigma;
        t = 1 (sigma = infinity) is replaced by :data:`FLOW_T_MAX` (sigma = 999 shift, or 10x the next level)."""
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
        t = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)[1:]
        sigma = t / (1 - t)  # the levels after the first, unshifted
        first = FLOW_T_MAX / (1 - FLOW_T_MAX)
        if num_steps > 1:
            first = max(first, 10 * float(sigma[0]))
        sigmas = torch.cat([sigma.new_tensor([first]), sigma]) * self.shift
        return sigmas.to(device=device, dtype=dtype)

    # --- time variable: the flow's own t, s(t) = 1 - t, sigma(t) = t / (1 - t) -------------------
    def sigma(self, t):
        t = as_tensor(t)
        return t / (1 - t)

    def sigma_inv(self, sigma):
        sigma = as_tensor(sigma)
        return sigma / (1 + sigma)

    def sigma_deriv(self, t):
        t = as_tensor(t)
        return 1 / (1 - t) ** 2

    def scale(self, t):
        return 1 - as_tensor(t)

    def scale_deriv(self, t):
        return -torch.ones_like(as_tensor(t))
