"""Resolution-aware noise shift (Hoogeboom et al. 2023, "simple diffusion"): log-SNR shifted by
-2 log(shift), i.e. every noise level multiplied by ``shift`` (SNR = 1/sigma^2).

For a model at resolution ``res`` tuned at ``base``, simple diffusion uses shift = res / base (log-SNR
+ 2 log(base/res)): higher resolutions need more noise to destroy the same amount of signal.
``Shifted(formulation, shift)`` applies it to any formulation: training and sampling levels, the
supported range and the grid are scaled; c_skip, c_out, c_in and lambda use the actual sigma (they
are exact algebra of the noise level), while the network's noise label c_noise is the base
formulation's at sigma / shift (a DDPM network keeps seeing "timestep t", now of the shifted chain).
In configs: ``diffusion: {type: ..., shift: 2.0}``.
"""
from __future__ import annotations

import torch

from .base import Formulation, Preconditioning, as_tensor

__all__ = ["Shifted", "resolution_shift"]


def resolution_shift(resolution: int, base: int = 64) -> float:
    """simple diffusion's factor for images of side ``resolution`` when the schedule was made for ``base``."""
    if resolution <= 0 or base <= 0:
        raise ValueError(f"resolution and base must be positive, got {resolution}, {base}")
    return resolution / base


class Shifted(Formulation):
    """``base`` with every noise level multiplied by ``shift`` (see the module docstring)."""

    def __init__(self, base: Formulation, shift: float):
        if isinstance(base, Shifted):
            base, shift = base.base, base.shift * shift
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not shift > 0:
            raise ValueError(f"shift = {shift!r}: expected a number > 0")
        if getattr(base, "original_elbo_weight", 0):
            raise ValueError("shift is not supported with original_elbo_weight > 0 (the VLB weights belong to the "
                             "unshifted chain)")
        self.base, self.shift = base, float(shift)

    def __eq__(self, other) -> bool:
        return isinstance(other, Shifted) and (self.base, self.shift) == (other.base, other.shift)

    def __repr__(self) -> str:
        return f"Shifted({self.base!r}, shift={self.shift})"

    def __getattr__(self, item):  # the base's parameters (sigma_data, rho, prediction, ...)
        if item in ("base", "shift"):
            raise AttributeError(item)
        return getattr(self.base, item)

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.base.name

    @property
    def default_range(self) -> tuple[float, float]:  # type: ignore[override]
        lo, hi = self.base.default_range
        return lo * self.shift, hi * self.shift

    @property
    def supported_range(self) -> tuple[float, float]:
        lo, hi = self.base.supported_range
        return lo * self.shift, hi * self.shift

    def precondition(self, sigma) -> Preconditioning:
        sigma = as_tensor(sigma)
        c_skip, c_out, c_in, _ = self.base.precondition(sigma)
        return Preconditioning(c_skip, c_out, c_in, self.base.precondition(sigma / self.shift).c_noise)

    def training_sigma(self, n, *, generator=None, device=None, dtype=None):
        return self.base.training_sigma(n, generator=generator, device=device, dtype=dtype) * self.shift

    def loss_weight(self, sigma):
        return self.base.loss_weight(sigma)

    def pointwise_loss(self, D_yn, y, sigma):
        return self.base.pointwise_loss(D_yn, y, sigma)

    def sampling_sigmas(self, num_steps, *, device=None, dtype=torch.float64, **kwargs):
        return self.base.sampling_sigmas(num_steps, device=device, dtype=dtype, **kwargs) * self.shift

    def sigma(self, t):
        return self.base.sigma(t) * self.shift

    def sigma_inv(self, sigma):
        return self.base.sigma_inv(as_tensor(sigma) / self.shift)

    def sigma_deriv(self, t):
        return self.base.sigma_deriv(t) * self.shift

    def scale(self, t):
        return self.base.scale(t)

    def scale_deriv(self, t):
        return self.base.scale_deriv(t)

    def round_sigma(self, sigma):
        return self.base.round_sigma(as_tensor(sigma) / self.shift) * self.shift

    def to_config(self) -> dict:
        return {**self.base.to_config(), "shift": self.shift}
