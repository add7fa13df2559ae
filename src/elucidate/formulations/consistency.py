"""Song et al. 2023's consistency-model boundary on EDM's preconditioning: f(x, sigma) = c_skip x + c_out F with
f(x, epsilon) = x at a positive epsilon.

Why a formulation and not a wrapper over any formulation: every elucidate formulation already has c_skip(0) = 1 and
c_out(0) = 0, so with the boundary at 0 the teacher's own formulation *is* a consistency parametrization (ECT uses
exactly that: EDM's preconditioning, boundary 0). A positive boundary needs c_skip and c_out rewritten around the
data scale, which only the EDM family defines (Song et al. 2023, Appendix C, write it for EDM); moving the boundary
of a VP, DDPM or flow network would change what its F means. So the boundary is one registered dataclass on EDM's
c_in, c_noise, training sigma and discretization; ``epsilon = 0`` is EDM exactly, so a student of an EDM teacher
equals the teacher at step 0.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..params import param
from .base import Preconditioning, as_tensor
from .table1 import EDM

__all__ = ["Consistency"]


@dataclass
class Consistency(EDM):
    """EDM with the consistency boundary f(x, epsilon) = x (Song et al. 2023, Appendix C)."""

    epsilon: float = param(0.002, "boundary noise level where f(x, epsilon) = x (Song et al. 2023's epsilon, their "
                                  "code's sigma_min); 0 = EDM's own preconditioning", symbol="epsilon", minimum=0)
    name = "Consistency"
    description = "Song et al. 2023: EDM's preconditioning with f(x, epsilon) = x (consistency models)"

    def check(self) -> None:
        super().check()
        if self.epsilon > self.sigma_min:
            raise ValueError(f"epsilon = {self.epsilon} must not exceed sigma_min = {self.sigma_min} (the schedule "
                             f"must stay on the model's time horizon [epsilon, sigma_max])")

    def precondition(self, sigma) -> Preconditioning:
        sigma = as_tensor(sigma)
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / ((sigma - self.epsilon) ** 2 + sd2)  # Song et al. 2023, App. C: c_skip(epsilon) = 1
        c_out = self.sigma_data * (sigma - self.epsilon) / (sd2 + sigma ** 2).sqrt()  # App. C: c_out(epsilon) = 0
        c_in = 1 / (sigma ** 2 + sd2).sqrt()  # EDM Table 1
        c_noise = sigma.log() / 4  # EDM Table 1
        return Preconditioning(c_skip, c_out, c_in, c_noise)
