"""The run directory: :class:`RunDir` (every path of a run), checkpoints, the one-writer lock, loading models
back from runs (diffusion, autoencoder, a latent run's decoder) and writing generated samples.

May import: config, latent, formulations, sampling, nets, data, viz, denoiser, runtime, params, errors.
"""
from .checkpoint import CheckpointDamaged, CheckpointWarning, load_checkpoint, save_checkpoint
from .lock import RunLock, RunLocked, run_lock
from .model import LoadedRun, load_run, load_vae, resolve_checkpoint
from .outputs import NonFiniteSamples, check_finite, write_samples
from .rundir import RunDir

__all__ = ["RunDir", "LoadedRun", "load_run", "load_vae", "resolve_checkpoint", "save_checkpoint", "load_checkpoint",
           "CheckpointDamaged", "CheckpointWarning", "RunLock", "RunLocked", "run_lock", "write_samples",
           "check_finite", "NonFiniteSamples"]
