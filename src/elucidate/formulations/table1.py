"""The four formulations of EDM Table 1 (VP, VE, iDDPM, EDM) as small dataclasses."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..params import param
from ..sampling import schedules
from .base import Formulation, Preconditioning, as_tensor

__all__ = ["EDM", "VP", "VE", "IDDPM"]


@dataclass
class EDM(Formulation):
    """EDM (Karras et al. 2022), Table 1 right column."""

    sigma_data: float = param(0.5, "standard deviation of the data (sets c_skip, c_out, c_in and lambda)",
                              symbol="sigma_data", minimum=0, exclusive=True)
    sigma_min: float = param(0.002, "lowest noise level of the sampling schedule", symbol="sigma_min",
                             minimum=0, exclusive=True)
    sigma_max: float = param(80.0, "highest noise level of the sampling schedule", symbol="sigma_max",
                             minimum=0, exclusive=True)
    rho: float = param(7.0, "schedule exponent of eq. 5 (larger = more steps near sigma_min)", symbol="rho",
                       minimum=0, exclusive=True)
    P_mean: float = param(-1.2, "mean of ln(sigma) during training", symbol="P_mean")
    P_std: float = param(1.2, "standard deviation of ln(sigma) during training", symbol="P_std",
                         minimum=0, exclusive=True)
    name = "EDM"
    description = "Karras et al. 2022: preconditioned for unit-variance inputs and targets"

    def check(self) -> None:
        schedules.check_range(self.sigma_min, self.sigma_max)

    @property
    def default_range(self) -> tuple[float, float]:  # type: ignore[override]
        return self.sigma_min, self.sigma_max

    def precondition(self, sigma) -> Preconditioning:
        sigma = as_tensor(sigma)
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (sigma ** 2 + sd2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + sd2).sqrt()
        c_in = 1 / (sigma ** 2 + sd2).sqrt()
        c_noise = sigma.log() / 4
        return Preconditioning(c_skip, c_out, c_in, c_noise)

    def training_sigma(self, n, *, generator=None, device=None, dtype=None):
        # ln(sigma) ~ N(P_mean, P_std^2)
        return (self._rand(n, generator, device, dtype, True) * self.P_std + self.P_mean).exp()

    def loss_weight(self, sigma):
        sigma = as_tensor(sigma)
        return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2

    def sampling_sigmas(self, num_steps, *, device=None, dtype=torch.float64):
        return schedules.karras_sigmas(num_steps, self.sigma_min, self.sigma_max, self.rho,
                                       device=device, dtype=dtype)


@dataclass
class VP(Formulation):
    """Variance preserving (Song et al. 2021, DDPM++), Table 1 first column."""

    beta_d: float = param(19.9, "slope of the linear beta(t) = beta_min + beta_d t", symbol="beta_d",
                          minimum=0, exclusive=True)
    beta_min: float = param(0.1, "beta(0), the initial noise rate", symbol="beta_min", minimum=0, exclusive=True)
    M: int = param(1000, "number of discrete training timesteps (c_noise = (M - 1) t)", symbol="M", minimum=1)
    epsilon_t: float = param(1e-5, "smallest training time: t ~ U(epsilon_t, 1)", symbol="epsilon_t",
                             minimum=0, exclusive=True, maximum=1)
    epsilon_s: float = param(1e-3, "last sampling time of its own discretization", symbol="epsilon_s",
                             minimum=0, exclusive=True, maximum=1)
    name = "VP"
    description = "variance preserving (DDPM++): sigma(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1)"

    @property
    def sigma_min(self) -> float:  # sigma(epsilon_s): the end of its own sampling discretization
        return float(self.sigma(torch.tensor(self.epsilon_s, dtype=torch.float64)))

    @property
    def sigma_max(self) -> float:  # sigma(1)
        return float(self.sigma(torch.tensor(1.0, dtype=torch.float64)))

    @property
    def supported_range(self) -> tuple[float, float]:
        return float(self.sigma(torch.tensor(self.epsilon_t, dtype=torch.float64))), self.sigma_max

    def sigma(self, t):
        # sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)
        t = as_tensor(t)
        return torch.expm1(0.5 * self.beta_d * t ** 2 + self.beta_min * t).sqrt()

    def sigma_inv(self, sigma):
        sigma = as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * torch.log1p(sigma ** 2)).sqrt()
                - self.beta_min) / self.beta_d

    def sigma_deriv(self, t):
        t = as_tensor(t)
        return 0.5 * (self.beta_min + self.beta_d * t) * (self.sigma(t) + 1 / self.sigma(t))

    def scale(self, t):
        # s(t) = 1 / sqrt(exp(beta_d t^2 / 2 + beta_min t)) = 1 / sqrt(1 + sigma(t)^2)
        t = as_tensor(t)
        return torch.exp(-0.5 * (0.5 * self.beta_d * t ** 2 + self.beta_min * t))

    def scale_deriv(self, t):
        t = as_tensor(t)
        return -0.5 * (self.beta_min + self.beta_d * t) * self.scale(t)

    def precondition(self, sigma):
        sigma = as_tensor(sigma)
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        return Preconditioning(c_skip, c_out, c_in, c_noise)

    def training_sigma(self, n, *, generator=None, device=None, dtype=None):
        # t ~ U(epsilon_t, 1)
        t = self._rand(n, generator, device, dtype, False) * (1 - self.epsilon_t) + self.epsilon_t
        return self.sigma(t)

    def sampling_sigmas(self, num_steps, *, device=None, dtype=torch.float64):
        return schedules.vp_sigmas(num_steps, self.beta_d, self.beta_min, self.epsilon_s,
                                   device=device, dtype=dtype)


@dataclass
class VE(Formulation):
    """Variance exploding (Song et al. 2021, NCSN++), Table 1 second column."""

    sigma_min: float = param(0.02, "lowest noise level (training and its own sampling)", symbol="sigma_min",
                             minimum=0, exclusive=True)
    sigma_max: float = param(100.0, "highest noise level (training and its own sampling)", symbol="sigma_max",
                             minimum=0, exclusive=True)
    name = "VE"
    description = "variance exploding (NCSN++): sigma(t) = sqrt(t), ln(sigma) ~ U(ln sigma_min, ln sigma_max)"

    def check(self) -> None:
        schedules.check_range(self.sigma_min, self.sigma_max)

    @property
    def supported_range(self) -> tuple[float, float]:
        return self.sigma_min, self.sigma_max

    def sigma(self, t):
        return as_tensor(t).sqrt()  # sigma(t) = sqrt(t)

    def sigma_inv(self, sigma):
        return as_tensor(sigma) ** 2

    def sigma_deriv(self, t):
        return 0.5 / as_tensor(t).sqrt()

    def precondition(self, sigma):
        sigma = as_tensor(sigma)
        one = torch.ones_like(sigma)
        return Preconditioning(one, sigma.clone(), one.clone(), (0.5 * sigma).log())

    def training_sigma(self, n, *, generator=None, device=None, dtype=None):
        # ln(sigma) ~ U(ln sigma_min, ln sigma_max)
        u = self._rand(n, generator, device, dtype, False)
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        return (lo + u * (hi - lo)).exp()

    def sampling_sigmas(self, num_steps, *, device=None, dtype=torch.float64):
        return schedules.ve_sigmas(num_steps, self.sigma_min, self.sigma_max, device=device, dtype=dtype)


@dataclass
class IDDPM(Formulation):
    """Improved DDPM (Nichol & Dhariwal 2021, ADM), Table 1 third column."""

    C_1: float = param(0.001, "clip of alpha_bar(j-1)/alpha_bar(j) in the noise-level recursion", symbol="C_1",
                       minimum=0, exclusive=True)
    C_2: float = param(0.008, "offset of the cosine schedule", symbol="C_2", minimum=0, exclusive=True)
    M: int = param(1000, "number of discrete noise levels u_0 > ... > u_{M-1}", symbol="M", minimum=2)
    sigma_min: float = param(0.002, "lowest level of its own discretization (selects j0)", symbol="sigma_min",
                             minimum=0, exclusive=True)
    sigma_max: float = param(81.0, "highest level of its own discretization", symbol="sigma_max",
                             minimum=0, exclusive=True)
    name = "iDDPM"
    description = "improved DDPM (ADM): a cosine schedule of M discrete noise levels u_j"

    def check(self) -> None:
        schedules.check_range(self.sigma_min, self.sigma_max)
        self._u = schedules.iddpm_u(self.C_1, self.C_2, self.M)

    @property
    def supported_range(self) -> tuple[float, float]:
        return float(self._u[-1]), float(self._u[0])

    def _index(self, sigma: torch.Tensor) -> torch.Tensor:
        u = self._u.to(sigma.device)
        return (sigma.to(torch.float64).reshape(-1, 1) - u).abs().argmin(dim=1).reshape(sigma.shape)

    def round_sigma(self, sigma):
        sigma = as_tensor(sigma)
        return self._u.to(sigma.device)[self._index(sigma)].to(sigma.dtype)

    def precondition(self, sigma):
        sigma = as_tensor(sigma)
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = (self.M - 1 - self._index(sigma)).to(sigma.dtype)  # M - 1 - argmin_j |u_j - sigma|
        return Preconditioning(c_skip, c_out, c_in, c_noise)

    def training_sigma(self, n, *, generator=None, device=None, dtype=None):
        # sigma = u_j, j ~ U{0, ..., M-1}
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n!r}")
        j = torch.randint(0, self.M, (n,), generator=generator, device=device)
        return self._u.to(device=j.device)[j].to(dtype or torch.get_default_dtype())

    def sampling_sigmas(self, num_steps, *, device=None, dtype=torch.float64):
        return schedules.iddpm_sigmas(num_steps, self.sigma_min, self.sigma_max, self.C_1, self.C_2,
                                      self.M, device=device, dtype=dtype)
