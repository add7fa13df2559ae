"""The Formulation interface (one row of EDM Table 1 per method) and its registry.

A formulation owns everything that differs between diffusion methods: preconditioning (c_skip, c_out,
c_in, c_noise), the training noise distribution, the loss weight lambda(sigma), its own sampling
discretization, the noise levels its network supports, and (where it has one) the time variable
sigma(t), s(t). Samplers and the training loop only talk to this interface.

Adding a formulation = writing one dataclass subclass with a ``name`` and its fields declared with
:func:`elucidate.params.param`; it registers itself, and config keys, validation and docs follow.
"""
from __future__ import annotations

import math
from typing import ClassVar, NamedTuple

import torch

from ..params import describe, validate_fields

__all__ = ["Preconditioning", "Formulation", "FORMULATIONS", "make_formulation", "as_tensor"]

#: name -> formulation class, filled as subclasses with a ``name`` are defined.
FORMULATIONS: dict[str, type[Formulation]] = {}


class Preconditioning(NamedTuple):
    """The coefficients of EDM eq. 7: D(x) = c_skip x + c_out F(c_in x, c_noise)."""

    c_skip: torch.Tensor
    c_out: torch.Tensor
    c_in: torch.Tensor
    c_noise: torch.Tensor


def as_tensor(sigma, dtype=None) -> torch.Tensor:
    """``sigma`` as a floating tensor (Python numbers in the default dtype)."""
    sigma = torch.as_tensor(sigma)
    if not sigma.is_floating_point():
        sigma = sigma.to(torch.get_default_dtype())
    return sigma if dtype is None else sigma.to(dtype)


class Formulation:
    """Common interface; subclasses are dataclasses whose fields are the method's parameters."""

    name: ClassVar[str] = "base"
    description: ClassVar[str] = ""
    #: The paper's sampler range (EDM Algorithm 2 defaults), used by named schedules unless overridden.
    default_range: ClassVar[tuple[float, float]] = (0.002, 80.0)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if isinstance(cls.__dict__.get("name"), str):
            FORMULATIONS[cls.name] = cls

    def __post_init__(self) -> None:
        validate_fields(self)
        self.check()

    def check(self) -> None:
        """Cross-field checks and derived state, after every field passed its own check."""

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
        sigma = as_tensor(sigma)
        return 1 / sigma ** 2

    def pointwise_loss(self, D_yn: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The per-element training loss at ``sigma`` ([B]): lambda(sigma) (D(y + sigma n) - y)^2 (EDM eq. 2)."""
        view = (-1,) + (1,) * (y.ndim - 1)
        return self.loss_weight(sigma).reshape(view) * (D_yn - y).square()

    def sampling_sigmas(self, num_steps: int, *, device=None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The formulation's own sampling discretization: ``num_steps + 1`` sigmas ending in 0."""
        raise NotImplementedError

    @property
    def supported_range(self) -> tuple[float, float]:
        """The noise levels the network is defined on (edm's ``net.sigma_min``, ``net.sigma_max``)."""
        return 0.0, math.inf

    def schedule_range(self, sigma_min: float | None = None, sigma_max: float | None = None) -> tuple[float, float]:
        """The range of a named schedule: the given bounds (default :attr:`default_range`, the paper's
        [0.002, 80]) clipped to :attr:`supported_range`, as EDM's sampler does."""
        lo = self.default_range[0] if sigma_min is None else sigma_min
        hi = self.default_range[1] if sigma_max is None else sigma_max
        s_lo, s_hi = self.supported_range
        return max(lo, s_lo), min(hi, s_hi)

    # --- time variable (sigma(t) = t, s(t) = 1 unless overridden) ------------------------------
    def sigma(self, t):
        """sigma(t)."""
        return as_tensor(t)

    def sigma_inv(self, sigma):
        """t such that sigma(t) = sigma."""
        return as_tensor(sigma)

    def sigma_deriv(self, t):
        """d sigma / dt."""
        return torch.ones_like(as_tensor(t))

    def scale(self, t):
        """s(t), the signal scale."""
        return torch.ones_like(as_tensor(t))

    def scale_deriv(self, t):
        """d s / dt."""
        return torch.zeros_like(as_tensor(t))

    def round_sigma(self, sigma):
        """Snap sigma to a noise level the network was trained on (identity unless discrete)."""
        return as_tensor(sigma)

    # --- misc ----------------------------------------------------------------------------------
    def to_config(self) -> dict:
        """The parameters as a JSON/YAML-ready dict, with ``type``."""
        return {"type": self.name, **{p.name: _plain(getattr(self, p.name)) for p in describe(type(self))}}

    def _rand(self, n, generator, device, dtype, normal: bool) -> torch.Tensor:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n!r}")
        dtype = dtype or torch.get_default_dtype()
        draw = torch.randn if normal else torch.rand
        return draw(n, generator=generator, device=device, dtype=dtype)


def _plain(value):
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


def make_formulation(type: str, **params) -> Formulation:
    """Build a formulation from its name (case-insensitive) and parameters."""
    by_lower = {k.lower(): v for k, v in FORMULATIONS.items()}
    cls = by_lower.get(str(type).lower())
    if cls is None:
        raise ValueError(f"unknown diffusion type {type!r}; expected one of {list(FORMULATIONS)}")
    return cls(**params)
