"""Training the autoencoder: two optimizers (autoencoder + log-variance, discriminator), the shared
run-directory layout, bit-exact resume and torchrun DDP — the structure of ``training/loop.py``.

Determinism: the data indices and posterior noise of the global batch at step k are pure functions
of (seed, k), and each process takes its slice; dropout uses the global RNG reseeded from
(seed, k, rank). The discriminator uses GroupNorm, so a sample's losses do not depend on the rest of
the batch and N processes train the same weights as one.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint import (
    checkpoint_name,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    optimizer_from_flat,
    save_checkpoint,
)
from ..errors import UserError
from ..fileio import atomic_write_text
from ..generate import autocast_for
from ..precision import resolve_precision
from ..rundir import append_metrics, check_same_run, truncate_metrics
from ..runfiles import DataInfo
from ..runlock import RunLock
from ..runtime.distributed import DistInfo, all_reduce_sum, barrier, init_distributed, shutdown_distributed
from ..runtime.optim import make_optimizer
from ..runtime.rng import batch_indices, derive_seed, derived_generator
from .build import CHECKPOINT_KIND, OptimizerPair, build_autoencoder, build_vae_loss
from .config import RESUMABLE_KEYS, VAEConfig, dump_vae_config, load_vae_config, parse_vae_config
from .distribution import DiagonalGaussianDistribution
from .evaluate import evaluate_reconstructions, save_reconstruction_grid

__all__ = ["VAETrainer", "train_vae", "LOG_KEYS", "holdout_split"]

#: per-step values averaged into each metrics.jsonl line
LOG_KEYS = ("loss", "nll_loss", "rec_loss", "p_loss", "kl_loss", "logvar", "g_loss", "d_weight", "disc_factor",
            "d_loss", "logits_real", "logits_fake")


def holdout_split(num_images: int, holdout: float | int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) image indices: a fixed permutation of ``num_images`` (independent of the
    training seed, so runs with different seeds are evaluated on the same images)."""
    count = round(holdout * num_images) if isinstance(holdout, float) else int(holdout)
    if not 1 <= count < num_images:
        raise UserError(f"training.holdout = {holdout!r} holds out {count} of {num_images} images; "
                        f"need at least 1 held out and 1 to train on")
    perm = torch.randperm(num_images, generator=derived_generator("vae-holdout", num_images))
    return perm[count:].sort().values, perm[:count].sort().values


class _Autoencoder(nn.Module):
    """What the first optimizer trains (the DDP unit): the autoencoder and the loss's log-variance."""

    def __init__(self, vae: nn.Module, logvar: nn.Parameter):
        super().__init__()
        self.vae, self.logvar = vae, logvar

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x)
        return self.vae.decode(posterior.sample(noise=noise)), posterior.parameters


class VAETrainer:
    """Train ``config`` into ``run_dir`` (resuming from its latest checkpoint if there is one)."""

    def __init__(self, config: VAEConfig, run_dir: str | Path, *, device: str | None = None, progress: bool = True,
                 log=print):
        self.config, self.run_dir, self.progress, self.log = config, Path(run_dir), progress, log
        self.t = config.training
        self.dist: DistInfo = init_distributed(device)
        self.device = self.dist.device
        if self.t.batch_size % self.dist.world_size:
            raise UserError(f"training.batch_size = {self.t.batch_size} must be divisible by the number of "
                            f"processes ({self.dist.world_size})")
        self.local_batch = self.t.batch_size // self.dist.world_size
        self.precision = resolve_precision(self.t.precision, self.device)  # auto: bf16 only on bf16 hardware

        from ..data import build_dataset
        self.dataset = build_dataset(config.data)
        self.channels, self.resolution = self.dataset.channels, tuple(self.dataset.resolution)
        train, held = holdout_split(self.dataset.num_images, self.t.holdout)
        if self.dataset.xflip:  # mirrored copies of the training images train too; evaluation uses originals
            train = torch.cat([train, train + self.dataset.num_images])
        self.train_indices, self.holdout_indices = train, held

        torch.manual_seed(derive_seed(self.t.seed, "init"))
        self.vae = build_autoencoder(config, self.channels, self.resolution).to(self.device)
        self.loss = build_vae_loss(config, self.channels, device=self.device).to(self.device)
        self.state = nn.ModuleDict({"vae": self.vae, "loss": self.loss})  # the checkpoint's "net."
        self.ae_model: nn.Module = _Autoencoder(self.vae, self.loss.logvar)
        self.disc_model: nn.Module = self.loss.discriminator
        if self.dist.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ae_model = DistributedDataParallel(self.ae_model, device_ids=ids)
            self.disc_model = DistributedDataParallel(self.disc_model, device_ids=ids)
        self.ae_params = list(self.vae.parameters()) + [self.loss.logvar]
        self.disc_params = list(self.loss.discriminator.parameters())
        adam = dict(optimizer="adam", betas=self.t.betas, eps=1e-8, weight_decay=0.0)
        self.opt_ae = make_optimizer(nn.ParameterList(self.ae_params), _Hyper(lr=self.t.lr, **adam))
        self.opt_disc = make_optimizer(nn.ParameterList(self.disc_params), _Hyper(lr=self.t.disc_lr, **adam))
        self.optimizers = OptimizerPair(self.opt_ae, self.opt_disc)
        self.step, self.skipped, self.seconds = 0, 0, 0.0
        self.last_eval: dict | None = None
        self.stop_requested = False
        self._extractor = None
        self._prepare_run_dir()

    # ------------------------------------------------------------------------------------------
    def _meta(self) -> dict:
        normalizer = getattr(self.dataset, "normalizer", None)
        return {"kind": CHECKPOINT_KIND, "step": self.step, "images": self.step * self.t.batch_size,
                "skipped_steps": self.skipped, "seconds": self.seconds, "config": self.config.to_dict(),
                "data": DataInfo(self.channels, self.resolution, self.dataset.num_classes).to_dict(),
                "latent_shape": list(self.vae.latent_shape), "eval": self.last_eval,
                "normalizer": normalizer.to_config() if normalizer is not None else None,
                "world_size": self.dist.world_size, "precision": self.precision,
                "torch": torch.__version__}

    def _prepare_run_dir(self) -> None:
        ckpt = latest_checkpoint(self.run_dir / "checkpoints")
        if ckpt is None:
            if self.dist.is_main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                atomic_write_text(self.run_dir / "config.yaml", dump_vae_config(self.config))
                (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
            barrier()
            return
        tensors, meta = load_checkpoint(ckpt, self.device)
        if meta.get("kind") != CHECKPOINT_KIND:
            raise UserError(f"{self.run_dir} holds a diffusion run ({ckpt.name}); use a new --out directory")
        check_same_run(parse_vae_config(meta["config"]).to_dict(), self.config.to_dict(), self.run_dir, ckpt,
                       resumable=RESUMABLE_KEYS)
        self.state.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        self.optimizers.load_state_dict(optimizer_from_flat(tensors, meta["optimizer"]))
        self.step, self.skipped, self.seconds = int(meta["step"]), int(meta["skipped_steps"]), float(meta["seconds"])
        self.last_eval = meta.get("eval")
        if self.dist.is_main:
            atomic_write_text(self.run_dir / "config.yaml", dump_vae_config(self.config))
            truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
            append_metrics(self.run_dir / "metrics.jsonl", {"event": "resume", "step": self.step,
                                                            "checkpoint": ckpt.name})
        self.log(f"resuming {self.run_dir} from {ckpt.name} (step {self.step})")
        barrier()

    # ------------------------------------------------------------------------------------------
    def _batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's slice of the global batch at ``step``: (images, posterior noise)."""
        B = self.t.batch_size
        indices = self.train_indices[batch_indices(self.t.seed, step, B, len(self.train_indices))]
        noise = torch.randn((B, *self.vae.latent_shape), generator=derived_generator(self.t.seed, "posterior", step))
        part = slice(self.dist.rank * self.local_batch, (self.dist.rank + 1) * self.local_batch)
        images, _ = self.dataset.get_batch(indices[part])
        return images.to(self.device), noise[part].to(self.device)

    def _reduce(self, grad: torch.Tensor) -> torch.Tensor:
        """A gradient of the local mean loss -> that of the global mean loss (average over processes)."""
        if self.dist.world_size == 1:
            return grad
        return all_reduce_sum(grad.clone()) / self.dist.world_size

    @staticmethod
    def _apply(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> bool:
        """Step ``optimizer`` unless a gradient is NaN/Inf (then skip it); clear the gradients."""
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else None
        applied = norm is not None and bool(torch.isfinite(norm))
        if applied:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return applied

    def train_step(self, step: int) -> tuple[dict[str, torch.Tensor], bool]:
        """One step of both optimizers on the same batch; returns (logs, whether the autoencoder update was applied)."""
        x, noise = self._batch(step)
        torch.manual_seed(derive_seed(self.t.seed, "dropout", step, self.dist.rank))
        self.state.train()
        with autocast_for(self.precision, self.device):
            x_rec, moments = self.ae_model(x, noise)
        posterior = DiagonalGaussianDistribution(moments.float(), deterministic=not self.vae.double_z)
        with autocast_for(self.precision, self.device):
            loss, logs = self.loss.generator_loss(x, x_rec, posterior, step, self.vae.last_layer,
                                                  reduce_grad=self._reduce)
        loss.backward()
        applied = self._apply(self.opt_ae, self.ae_params)
        if self.loss.adversarial(step):  # discriminator on this step's (pre-update) reconstructions
            with autocast_for(self.precision, self.device):
                d_loss, d_logs = self.loss.discriminator_loss(x, x_rec, step, self.disc_model)
            d_loss.backward()
            applied = self._apply(self.opt_disc, self.disc_params) and applied
        else:
            _, d_logs = self.loss.discriminator_loss(x, x_rec, step)
        logs.update(d_logs)
        return logs, applied

    # ------------------------------------------------------------------------------------------
    def save(self) -> Path:
        """Write a checkpoint for the current step (main process) and prune old ones."""
        path = self.run_dir / "checkpoints" / checkpoint_name(self.step)
        if self.dist.is_main:
            save_checkpoint(path, net=self.state, ema=None, optimizer=self.optimizers, meta=self._meta())
            if self.t.keep_checkpoints:
                for old in list_checkpoints(path.parent)[:-self.t.keep_checkpoints]:
                    old.unlink(missing_ok=True)
        barrier()
        return path

    def _holdout_images(self, count: int | None = None) -> torch.Tensor:
        indices = self.holdout_indices if count is None else self.holdout_indices[:count]
        return self.dataset.get_batch(indices)[0]

    def sample_grid(self) -> Path | None:
        """Write ``samples/step-XXXXXXXX.png``: held-out originals above their reconstructions (main process)."""
        if not self.dist.is_main:
            return None
        path = self.run_dir / "samples" / f"step-{self.step:08d}.png"
        return save_reconstruction_grid(self.vae, self._holdout_images(self.t.num_sample_images).to(self.device),
                                        path)

    def _feature_extractor(self):
        name = self.t.fd_features
        if name == "auto":
            digits = self.config.data.get("dataset") == "digits" and self.channels in (1, 3)
            name = "fd_digits" if digits else "none"
        if name == "none":
            return None
        if self._extractor is None:
            from ..metrics.features import feature_extractor
            if name == "fd_digits" and self.channels not in (1, 3):
                raise UserError(f"training.fd_features = fd_digits needs 1- or 3-channel data, got {self.channels}")
            self._extractor = (feature_extractor("fd_digits") if name == "fd_digits"
                               else feature_extractor("inception", inception=name))
            self._extractor.name = "fd_digits" if name == "fd_digits" else "fid"
        return self._extractor

    def evaluate(self) -> dict | None:
        """PSNR and Fréchet distance of held-out reconstructions, appended to metrics.jsonl (main process)."""
        if not self.dist.is_main:
            return None
        extractor = self._feature_extractor()
        result = evaluate_reconstructions(self.vae, self._holdout_images().to(self.device),
                                          normalizer=getattr(self.dataset, "normalizer", None), extractor=extractor)
        self.last_eval = {"step": self.step, "event": "eval", **result,
                          "fd_features": extractor.name if extractor is not None else None}
        append_metrics(self.run_dir / "metrics.jsonl", self.last_eval)
        return self.last_eval

    def _request_stop(self, signum, frame) -> None:
        self.stop_requested = True
        self.log("interrupt received: finishing this step and writing a checkpoint")

    def train(self) -> dict:
        """Run until ``training.steps``; returns a summary. Ctrl-C checkpoints and stops cleanly."""
        total = self.t.steps
        if self.step >= total:
            self.log(f"{self.run_dir} is already trained to step {self.step} (training.steps = {total})")
            return self._summary(latest_checkpoint(self.run_dir / "checkpoints"), None)
        previous = signal.signal(signal.SIGINT, self._request_stop) if _main_thread() else None
        bar = None
        if self.progress and self.dist.is_main:
            from tqdm.auto import tqdm
            bar = tqdm(total=total, initial=self.step, desc="training vae", unit="step", dynamic_ncols=True)
        acc = torch.zeros(len(LOG_KEYS) + 1, dtype=torch.float64)  # per-key sums, step count
        interval_start, interval_images = time.perf_counter(), 0
        try:
            while self.step < total and not self.stop_requested:
                t0 = time.perf_counter()
                logs, applied = self.train_step(self.step)
                self.step += 1
                self.skipped += 0 if applied else 1
                self.seconds += time.perf_counter() - t0
                interval_images += self.t.batch_size
                acc[:-1] += torch.stack([logs[k].detach().double().cpu() for k in LOG_KEYS])
                acc[-1] += 1
                if bar is not None:
                    bar.update(1)
                if self.step % self.t.log_every == 0 or self.step == total:
                    self._log_interval(acc, interval_images / max(time.perf_counter() - interval_start, 1e-9), bar)
                    acc.zero_()
                    interval_start, interval_images = time.perf_counter(), 0
                if self.t.sample_every and self.step % self.t.sample_every == 0 and self.step < total:
                    self.sample_grid()
                if self.t.eval_every and self.step % self.t.eval_every == 0 and self.step < total:
                    self.evaluate()  # before the checkpoint, so the checkpoint's metadata holds it
                if self.step % self.t.checkpoint_every == 0 and self.step < total:
                    self.save()
            grid = self.sample_grid()
            self.evaluate()
            ckpt = self.save()
        finally:
            if bar is not None:
                bar.close()
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        return self._summary(ckpt, grid)

    def _summary(self, ckpt: Path | None, grid: Path | None) -> dict:
        last = self.last_eval or {}
        return {"step": self.step, "skipped_steps": self.skipped, "checkpoint": ckpt, "samples": grid,
                "psnr": last.get("psnr"), "fd": last.get("fd"), "latent_std": last.get("latent_std"),
                "seconds": self.seconds, "interrupted": self.stop_requested}

    def _log_interval(self, acc: torch.Tensor, images_per_sec: float, bar) -> None:
        acc = all_reduce_sum(acc.to(self.device)).cpu() if self.dist.world_size > 1 else acc
        means = {k: float(acc[i] / acc[-1]) if acc[-1] > 0 else None for i, k in enumerate(LOG_KEYS)}
        record = {"step": self.step, "kimg": self.step * self.t.batch_size / 1000, **means,
                  "lr": self.opt_ae.param_groups[0]["lr"], "disc_lr": self.opt_disc.param_groups[0]["lr"],
                  "images_per_sec": images_per_sec, "seconds": round(self.seconds, 3), "skipped_steps": self.skipped}
        if self.dist.is_main:
            append_metrics(self.run_dir / "metrics.jsonl", record)
            if bar is not None and means["loss"] is not None:
                bar.set_postfix(rec=f"{means['rec_loss']:.4f}", logvar=f"{means['logvar']:.2f}",
                                img_s=f"{images_per_sec:.0f}")


class _Hyper:
    """The optimizer hyper-parameters ``make_optimizer`` reads."""

    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def train_vae(config_path_or_dict: str | Path | dict | VAEConfig, out_dir: str | Path, *,
              overrides: list[str] | tuple[str, ...] = (), device: str | None = None, progress: bool = True) -> dict:
    """Train (or resume) an autoencoder run into ``out_dir`` from a YAML path, a raw mapping or a
    ``VAEConfig``; ``overrides`` are ``section.key=value`` strings. Returns the summary dict
    (``step``, ``skipped_steps``, ``checkpoint``, ``samples``, ``psnr``, ``fd``, ``latent_std``,
    ``seconds``, ``interrupted``). Under torchrun each process calls it (DDP, gloo on CPU)."""
    if isinstance(config_path_or_dict, VAEConfig):
        config = load_vae_config(config_path_or_dict.to_dict(), overrides)
    else:
        config = load_vae_config(config_path_or_dict, overrides)
    joined = dist.is_available() and dist.is_initialized()
    lock = RunLock(out_dir, "train-vae")  # one writer per run directory (rank 0 holds it)
    if int(os.environ.get("RANK", "0")) == 0:
        lock.acquire()
    try:
        return VAETrainer(config, out_dir, device=device, progress=progress).train()
    finally:
        lock.release()
        if not joined:
            shutdown_distributed()
