"""Diffusion formulations: EDM Table 1 (VP, VE, iDDPM, EDM), discrete DDPM and flow matching, each a small registered
dataclass.

May import: sampling, params, errors.
"""
from .base import FORMULATIONS, Formulation, Preconditioning, as_tensor, make_formulation
from .consistency import Consistency
from .ddpm import DDPM
from .flow import Flow
from .shift import Shifted, resolution_shift
from .table1 import EDM, IDDPM, VE, VP

__all__ = ["Preconditioning", "Formulation", "FORMULATIONS", "make_formulation", "as_tensor", "EDM", "VP", "VE",
           "IDDPM", "DDPM", "Flow", "Shifted", "resolution_shift", "Consistency"]
