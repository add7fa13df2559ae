"""Training: the one loop every trainer runs (run directory, resume, checkpoints, logging, DDP, precision) and
the trainers on it (diffusion, the autoencoder), EMA (half-life and post-hoc), augmentation, optimizers.

May import: config, run, latent, formulations, sampling, nets, data, metrics, viz, denoiser, losses, runtime,
params, errors.
"""
from ..run.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from ..runtime.rng import batch_indices, derive_seed, derived_generator
from .diffusion import SIGMA_EDGES, Trainer
from .ema import EMA, PowerEMA
from .loop import TrainingLoop, TrainingStopped
from .vae import VAETrainer, train_vae

__all__ = ["Trainer", "TrainingLoop", "TrainingStopped", "VAETrainer", "train_vae", "EMA", "PowerEMA", "SIGMA_EDGES",
           "save_checkpoint", "load_checkpoint", "latest_checkpoint", "list_checkpoints", "batch_indices",
           "derive_seed", "derived_generator"]
