"""Rectified flow's reflow (Liu et al. 2023, "Flow Straight and Fast"): straighten a trained model's ODE.

The model's probability-flow ODE maps each noise n to a sample y = ODE(n). Reflow fine-tunes the model on those
couplings: the noisy input of a pair is y + sigma n with *its* n (``data.pairs``, :mod:`elucidate.data.pairs`)
instead of a fresh draw. The paths the new model learns are the straight lines from n to y, so its ODE is
straighter and few-step Euler loses less. For Flow the line is x_t = (1 - t) y + t n (Liu et al.'s Algorithm 1);
in EDM's view it is the same for any formulation (x = y + sigma n is a straight line in x for every pair), so
reflow runs on any trained diffusion run, pixels only.

``reflow(run, out, pairs=N)``: generate N pairs with the run's deterministic sampler into ``out/pairs.npz``, write
``out`` as a new run (the run's config with ``data.pairs`` and ``training.steps``) that starts from the run's EMA
weights (its step-0 checkpoint), and train it on the one training loop: resume, lock, checkpoints, EMA and DDP as
for any run. Calling it again resumes.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import Config, parse_config
from ..config.sampling import SamplingConfig
from ..config.schema import parse_with_overrides
from ..data.pairs import read_pairs, write_pairs
from ..errors import UserError
from ..run.model import LoadedRun, load_run, resolve_checkpoint
from ..run.rundir import RunDir
from ..runtime.rng import derive_seed
from ..sampling import get_sampler
from ..sampling.api import SeededNoise
from .diffusion import Trainer

__all__ = ["reflow", "make_pairs", "reflow_config", "PAIRS_FILE", "DEFAULT_STEPS"]

PAIRS_FILE = "pairs.npz"
DEFAULT_STEPS = 1000


def pair_seeds(seed: int, num: int) -> list[int]:
    """The noise seeds of the pairs: derived from (seed, i), never the 0, 1, 2, ... that eval and sample use, so
    a reflowed model is not scored on the noise it was fine-tuned on."""
    return [derive_seed("reflow", seed, i) for i in range(num)]


def check_deterministic(cfg: SamplingConfig) -> None:
    """Reflow's couplings are an ODE's: the sampler must not add noise."""
    spec = get_sampler(cfg.sampler)
    churn = float(cfg.s_churn or 0.0) if spec.takes("s_churn") else 0.0
    eta = getattr(cfg, "eta", None)
    if (spec.stochastic and not (eta is not None and float(eta) == 0.0)) or churn > 0:
        raise UserError(f"reflow needs a deterministic sampler (the ODE's couplings), but sampler {cfg.sampler!r}"
                        + (f" with s_churn = {churn:g}" if churn > 0 else " adds fresh noise")
                        + ": use --ode-sampler heun (or euler, dpmpp_2m, ...), or s_churn 0")


def make_pairs(run: LoadedRun, num: int, cfg: SamplingConfig, *, seed: int = 0, batch_size: int = 256, device=None,
               precision: str = "fp32", progress: bool = True) -> tuple:
    """``num`` couplings (samples y in model units, their noise n, class labels or None) of the run's ODE under
    ``cfg``: y is what :meth:`LoadedRun.sample` makes from n (x = sigma_max n at the first level). A class-
    conditional run gets labels i % classes."""
    check_deterministic(cfg)
    seeds = pair_seeds(seed, num)
    noise = SeededNoise(seeds, run.shape)()  # the first draw of each seed: the sample's initial noise
    labels = torch.arange(num) % run.label_dim if run.label_dim else None
    images = run.sample(seeds, cfg, class_labels=labels, batch_size=batch_size, device=device, precision=precision,
                        progress=progress)
    return images, noise, labels


def reflow_config(teacher: Config, pairs: Path, steps: int, overrides: list[str] = ()) -> Config:
    """The new run's config: the teacher's, trained on ``pairs`` for ``steps`` steps (no augmentation or
    mirroring: an altered sample is no longer the ODE's image of its noise), then ``overrides``."""
    raw = teacher.to_dict()
    raw["data"] = {**raw["data"], "pairs": str(Path(pairs).resolve()), "xflip": False}
    raw["training"] = {**raw["training"], "steps": int(steps), "augment": None}
    return parse_with_overrides(raw, list(overrides), parse_config, source="the reflow configuration")


def reflow(run: str | Path, out: str | Path, *, pairs: int, steps: int = DEFAULT_STEPS, seed: int = 0,
           cfg: SamplingConfig | None = None, overrides: list[str] = (), batch_size: int = 256, device=None,
           precision: str = "fp32", progress: bool = True, log=print) -> dict:
    """Reflow ``run`` into the new run ``out`` (module docstring); returns the training summary plus ``pairs``.

    ``cfg``: the sampler that makes the pairs (default the run's sampling settings); ``precision`` applies to
    that sampling (the training uses the config's). An ``out`` that has started is resumed with its stored config
    and pairs."""
    out = Path(out)
    rundir = RunDir(out)
    if rundir.config.is_file():  # started before: resume it as it is
        from ..config import load_config

        config = load_config(rundir.config, list(overrides))
        if not config.data.get("pairs"):
            raise UserError(f"{out} is a run but not a reflow run (its data has no pairs); use a new --out")
        log(f"resuming {out} with its stored configuration ({rundir.config})")
        trainer = Trainer(config, out, device=device, progress=progress, log=log)
        if not rundir.list_checkpoints():
            raise UserError(f"{out} has a config but no checkpoint (its start was interrupted): remove {out} and "
                            f"run reflow again")
        return {**trainer.train(), "pairs": Path(config.data["pairs"])}
    if isinstance(pairs, bool) or not isinstance(pairs, int) or pairs < 1:
        raise UserError(f"--pairs {pairs!r}: expected an integer >= 1")
    checkpoint = resolve_checkpoint(Path(run))
    teacher = load_run(checkpoint, ema=True, device=device)
    if teacher.decode is not None:
        raise UserError(f"{run} is a latent run: reflow of latent runs is not supported (its pairs would be latents)")
    if set(teacher.condition_shapes) - {"class_labels"}:
        raise UserError(f"{run} takes a spatial or token condition: reflow supports unconditional and "
                        f"class-conditional runs")
    cfg = cfg or teacher.config.sampling
    check_deterministic(cfg)
    path = out / PAIRS_FILE
    config = reflow_config(teacher.config, path, steps, overrides)  # a bad override fails before any work
    out.mkdir(parents=True, exist_ok=True)
    if path.is_file() and len(read_pairs(path)[0]) == pairs:
        log(f"using the {pairs} pairs already in {path}")
    else:
        log(f"generating {pairs} (noise, sample) pairs with {cfg.sampler}, {cfg.steps} steps -> {path}")
        images, noise, labels = make_pairs(teacher, pairs, cfg, seed=seed, batch_size=batch_size, device=device,
                                           precision=precision, progress=progress)
        write_pairs(path, images, noise, labels)
    trainer = Trainer(config, out, device=device, progress=progress, log=log)
    ema = {k: v.detach().clone() for k, v in teacher.denoiser.net.state_dict().items()}
    trainer.start_from({"net": ema, "ema": ema}, source=f"{checkpoint} (EMA)")
    return {**trainer.train(), "pairs": path}
