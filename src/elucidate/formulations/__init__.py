"""Diffusion formulations: EDM Table 1 (VP, VE, iDDPM, EDM) and discrete DDPM, each a small registered
dataclass.

May import: sampling, params, errors.
"""
from .base import FORMULATIONS, Formulation, Preconditioning, as_tensor, make_formulation
from .ddpm import DDPM
from .shift import Shifted, resolution_shift
from .table1 import EDM, IDDPM, VE, VP

__all__ = ["Preconditioning", "Formulation", "FORMULATIONS", "make_formulation", "as_tensor", "EDM", "VP", "VE",
           "IDDPM", "DDPM", "Shifted", "resolution_shift"]
