"""Training: the loop (EMA, checkpoints, exact resume, DDP), and its building blocks."""
from ..checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from ..runtime.rng import batch_indices, derive_seed, derived_generator
from .ema import EMA
from .loop import SIGMA_EDGES, Trainer

__all__ = ["Trainer", "EMA", "SIGMA_EDGES", "save_checkpoint", "load_checkpoint", "latest_checkpoint",
           "list_checkpoints", "batch_indices", "derive_seed", "derived_generator"]
