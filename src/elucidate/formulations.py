"""The four formulations of EDM Table 1 (VP, VE, iDDPM, EDM) as small classes.

Each formulation owns everything that differs between them: preconditioning
(c_skip, c_out, c_in, c_noise), the training noise distribution, the loss weight lambda(sigma),
its sampling discretization, and (where it has one) the time variable sigma(t), s(t).
Samplers and the training loop only talk to this interface.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch

from .sampling import schedules

__all__ = ["Preconditioning", "Formulation", "EDM", "VP", "VE", "IDDPM", "FORMULATIONS",
           "make_formulation"]


class Preconditioning(NamedTuple):
    """The coefficients of EDM eq. 7: D(x) = c_skip x + c_out F(c_in x, c_noise)."""

    c_skip: torch.Tensor
    c_out: torch.Tensor
    c_in: torch.Tensor
    c_noise: torch.Tensor


def _as_tensor(sigma, dtype=None) -> torch.Tensor:
    sigma = torch.as_tensor(sigma)
    if not sigma.is_floating_point():
        sigma = sigma.to(torch.get_default_dtype())
    return sigma if dtype is None else sigma.to(dtype)


class Formulation:
    """Common interface; subclasses are dataclasses whose fields are the Table 1 parameters."""

    name = "base"
    sigma_min: float
    sigma_max: float

    # --- Table 1 rows -------------------------------------------------------------------------
    def precondition(self, sigma) -> Preconditioning:
        """c_skip, c_out, c_in, c_noise at noise level ``sigma`` (same shape as ``sigma``)."""
        raise NotImplementedError

    def training_sigma(self, n: int, *, generator: torch.Generator | None = None, device=None,
                       dtype: torch.dtype | None = None) -> torch.Tensor:
        """Draw ``n`` training noise levels from the formulation's distribution."""
        raise NotImplementedError

    def loss_weight(self, sigma) -> torch.Tensor:
        """lambda(sigma): the loss weight (1/sigma^2 for VP/VE/iDDPM)."""
        sigma = _as_tensor(sigma)
        return 1 / sigma ** 2

    def sampling_sigmas(self, num_steps: int, *, device=None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The formulation's own sampling discretization: ``num_steps + 1`` sigmas ending in 0."""
        raise NotImplementedError

    # --- time variable (sigma(t) = t, s(t) = 1 unless overridden) ------------------------------
    def sigma(self, t):
        """sigma(t)."""
        return _as_tensor(t)

    def sigma_inv(self, sigma):
        """t such that sigma(t) = sigma."""
        return _as_tensor(sigma)

    def sigma_deriv(self, t):
        """d sigma / dt."""
        return torch.ones_like(_as_tensor(t))

    def scale(self, t):
        """s(t), the signal scale."""
        return torch.ones_like(_as_tensor(t))

    def scale_deriv(self, t):
        """d s / dt."""
        return torch.zeros_like(_as_tensor(t))

    def round_sigma(self, sigma):
        """Snap sigma to a noise level the network was trained on (identity unless discrete)."""
        return _as_tensor(sigma)

    # --- misc ----------------------------------------------------------------------------------
    def to_config(self) -> dict:
        """The parameters as a JSON/YAML-ready dict, with ``type``."""
        return {"type": self.name, **asdict(self)}  # type: ignore[call-overload]

    def _rand(self, n, generator, device, dtype, normal: bool) -> torch.Tensor:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n!r}")
        dtype = dtype or torch.get_default_dtype()
        draw = torch.randn if normal else torch.rand
        return draw(n, generator=generator, device=device, dtype=dtype)


@dataclass
class EDM(Formulation):
    """EDM (Karras et al. 2022), Table 1 right column."""

    sigma_data: float = 0.5
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    P_mean: float = -1.2
    P_std: float = 1.2
    name = "EDM"

    def __post_init__(self):
        schedules.check_range(self.sigma_min, self.sigma_max)
        schedules.check_positive(sigma_data=self.sigma_data, rho=self.rho, P_std=self.P_std)

    def precondition(self, sigma) -> Preconditioning:
        sigma = _as_tensor(sigma)
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
        sigma = _as_tensor(sigma)
        return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2

    def sampling_sigmas(self, num_steps, *, device=None, dtype=torch.float64):
        return schedules.karras_sigmas(num_steps, self.sigma_min, self.sigma_max, self.rho,
                                       device=device, dtype=dtype)


@dataclass
class VP(Formulation):
    """Variance preserving (Song et al. 2021, DDPM++), Table 1 first column."""

    beta_d: float = 19.9
    beta_min: float = 0.1
    M: int = 1000
    epsilon_t: float = 1e-5
    epsilon_s: float = 1e-3
    name = "VP"

    def __post_init__(self):
        schedules.check_positive(beta_d=self.beta_d, beta_min=self.beta_min, M=self.M,
                                 epsilon_t=self.epsilon_t, epsilon_s=self.epsilon_s)

    @property
    def sigma_min(self) -> float:  # sigma(epsilon_s): the end of sampling
        return float(self.sigma(torch.tensor(self.epsilon_s, dtype=torch.float64)))

    @property
    def sigma_max(self) -> float:  # sigma(1)
        return float(self.sigma(torch.tensor(1.0, dtype=torch.float64)))

    def sigma(self, t):
        # sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)
        t = _as_tensor(t)
        return torch.expm1(0.5 * self.beta_d * t ** 2 + self.beta_min * t).sqrt()

    def sigma_inv(self, sigma):
        sigma = _as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * torch.log1p(sigma ** 2)).sqrt()
                - self.beta_min) / self.beta_d

    def sigma_deriv(self, t):
        t = _as_tensor(t)
        return 0.5 * (self.beta_min + self.beta_d * t) * (self.sigma(t) + 1 / self.sigma(t))

    def scale(self, t):
        # s(t) = 1 / sqrt(exp(beta_d t^2 / 2 + beta_min t)) = 1 / sqrt(1 + sigma(t)^2)
        t = _as_tensor(t)
        return torch.exp(-0.5 * (0.5 * self.beta_d * t ** 2 + self.beta_min * t))

    def scale_deriv(self, t):
        t = _as_tensor(t)
        return -0.5 * (self.beta_min + self.beta_d * t) * self.scale(t)

    def precondition(self, sigma):
        sigma = _as_tensor(sigma)
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

    sigma_min: float = 0.02
    sigma_max: float = 100.0
    name = "VE"

    def __post_init__(self):
        schedules.check_range(self.sigma_min, self.sigma_max)

    def sigma(self, t):
        return _as_tensor(t).sqrt()  # sigma(t) = sqrt(t)

    def sigma_inv(self, sigma):
        return _as_tensor(sigma) ** 2

    def sigma_deriv(self, t):
        return 0.5 / _as_tensor(t).sqrt()

    def precondition(self, sigma):
        sigma = _as_tensor(sigma)
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

    C_1: float = 0.001
    C_2: float = 0.008
    M: int = 1000
    sigma_min: float = 0.002
    sigma_max: float = 81.0
    name = "iDDPM"

    def __post_init__(self):
        schedules.check_range(self.sigma_min, self.sigma_max)
        self._u = schedules.iddpm_u(self.C_1, self.C_2, self.M)

    def _index(self, sigma: torch.Tensor) -> torch.Tensor:
        u = self._u.to(sigma.device)
        return (sigma.to(torch.float64).reshape(-1, 1) - u).abs().argmin(dim=1).reshape(sigma.shape)

    def round_sigma(self, sigma):
        sigma = _as_tensor(sigma)
        return self._u.to(sigma.device)[self._index(sigma)].to(sigma.dtype)

    def precondition(self, sigma):
        sigma = _as_tensor(sigma)
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

    def to_config(self) -> dict:
        return {"type": self.name, "C_1": self.C_1, "C_2": self.C_2, "M": self.M,
                "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


FORMULATIONS: dict[str, type[Formulation]] = {"EDM": EDM, "VP": VP, "VE": VE, "iDDPM": IDDPM}


def make_formulation(type: str, **params) -> Formulation:
    """Build a formulation from its Table-1 name (case-insensitive) and parameters."""
    by_lower = {k.lower(): v for k, v in FORMULATIONS.items()}
    cls = by_lower.get(str(type).lower())
    if cls is None:
        raise ValueError(f"unknown diffusion type {type!r}; expected one of {list(FORMULATIONS)}")
    return cls(**params)
