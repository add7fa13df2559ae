"""The training loop: any formulation, any network, one process or many (torchrun + DDP).

Determinism: the data indices, augmentations, training sigmas and noise of the global batch at step k
are pure functions of (seed, k), and each process takes its slice; dropout uses a generator reseeded from
(seed, k, rank). A run resumed from a checkpoint therefore continues bit-exactly, and N processes
see the same global batch as one.
"""
from __future__ import annotations

import contextlib
import signal
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint import (
    DAMAGED_DIR,
    CheckpointDamaged,
    check_fits,
    check_run_checkpoint,
    checkpoint_name,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    newest_usable,
    optimizer_from_flat,
    save_checkpoint,
    set_aside,
)
from ..config import Config, dump_config, parse_config
from ..denoiser import Denoiser, with_null_condition
from ..errors import UserError
from ..fileio import atomic_write_text, remove_stale_temp_files
from ..generate import autocast_for, generate
from ..losses import denoising_loss
from ..model import DataInfo, build_network_for
from ..precision import resolve_precision
from ..rundir import append_metrics, check_same_run, truncate_metrics
from ..runlock import RunLock, RunLocked
from ..runtime.distributed import DistInfo, all_reduce_sum, barrier, init_distributed
from ..runtime.optim import make_optimizer
from ..runtime.rng import batch_indices, derive_seed, derived_generator
from .augment import augment_batch, augment_pipe
from .ema import EMA
from .posthoc import RunPowerEMA
from .stats import SIGMA_EDGES, IntervalStats
from .tensorboard import TensorBoardLog

__all__ = ["Trainer", "TrainingStopped", "SIGMA_EDGES", "RESUMABLE_KEYS"]

#: training keys that may change when a run is resumed (they do not affect the weights).
RESUMABLE_KEYS = {"steps", "checkpoint_every", "sample_every", "log_every", "keep_checkpoints", "num_sample_images",
                  "max_bad_steps", "tensorboard"}


class TrainingStopped(UserError):
    """Training gave up (too many consecutive non-finite steps); the message says where it stands."""


class Trainer:
    """Train ``config`` into ``run_dir`` (resuming from its latest checkpoint if there is one)."""

    def __init__(self, config: Config, run_dir: str | Path, *, device: str | None = None, progress: bool = True,
                 log=print):
        self.config, self.run_dir, self.progress, self.log = config, Path(run_dir), progress, log
        self.t = config.training
        self.dist: DistInfo = init_distributed(device)
        self.device = self.dist.device
        self._lock = self._lock_run()  # one writer per run directory (held until train() returns)
        try:
            self._setup(config)
        except BaseException:
            self._lock.release()
            raise

    def _setup(self, config: Config) -> None:
        if self.t.batch_size % (self.dist.world_size * self.t.grad_accumulation):
            raise UserError(f"training.batch_size = {self.t.batch_size} must be divisible by processes x "
                            f"grad_accumulation = {self.dist.world_size} x {self.t.grad_accumulation}")
        self.local_batch = self.t.batch_size // self.dist.world_size
        self.precision = resolve_precision(self.t.precision, self.device)  # auto: bf16 only on bf16 hardware
        if self.t.precision == "auto" and self.dist.is_main:
            self.log(f"precision auto: {self.precision} on {self.device}"
                     + ("" if self.precision == "bf16" else " (no bf16 hardware)"))

        from ..data import build_dataset
        self.dataset, self.latent = build_dataset(config.data), None  # latent: the record of a latent run
        if config.latent is not None:  # diffusion on a VAE's latents: elucidate.latent.diffusion
            from ..latent.diffusion import latent_training_data
            self.dataset, self.latent = latent_training_data(
                config, self.dataset, self.run_dir, sigma_data=getattr(config.formulation(), "sigma_data", None),
                is_main=self.dist.is_main, barrier=barrier, device=self.device, log=self.log)
        self.info = DataInfo.from_dataset(self.dataset)
        torch.manual_seed(derive_seed(self.t.seed, "init"))
        self.net = build_network_for(config, self.info).to(self.device)
        if self.t.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.formulation = config.formulation()
        self.denoiser = Denoiser(self.net, self.formulation)
        self.model = self.denoiser
        self.augment = augment_pipe(self.t.augment, self.info.resolution)  # None = off
        if self.dist.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.denoiser, device_ids=ids)
        self.optimizer = make_optimizer(self.net, self.t)
        self.ema = EMA(self.net, self.t.ema_halflife, self.t.ema_rampup)
        self.tb = TensorBoardLog(self.run_dir, self.t.tensorboard and self.dist.is_main)  # no-op when off
        self.phema = RunPowerEMA(self.net, self.t.ema, self.run_dir, self.dist.is_main)  # inert if training.ema is null
        self.params = list(self.net.parameters())
        self.step, self.skipped, self.seconds = 0, 0, 0.0
        self.bad_streak, self.saved_step = 0, None  # consecutive skipped steps; step of the last checkpoint
        self.stop_requested = False
        self._prepare_run_dir()

    # ------------------------------------------------------------------------------------------
    def _meta(self) -> dict:
        normalizer = getattr(self.dataset, "normalizer", None)
        return {"step": self.step, "images": self.step * self.t.batch_size, "skipped_steps": self.skipped,
                "seconds": self.seconds, "config": self.config.to_dict(), "data": self.info.to_dict(),
                "normalizer": normalizer.to_config() if normalizer is not None else None,
                "world_size": self.dist.world_size, "precision": self.precision, "torch": torch.__version__,
                "bad_streak": self.bad_streak, "latent": self.latent}

    def _lock_run(self) -> RunLock:
        """Take the run directory's lock (rank 0 only; every rank fails if rank 0 cannot)."""
        lock, error = RunLock(self.run_dir, "training"), None
        try:
            if self.dist.is_main:
                lock.acquire()
        except RunLocked as e:
            error = e
        if self.dist.world_size > 1 and all_reduce_sum(torch.tensor([float(error is not None)], device=self.device)):
            raise error or RunLocked(f"{self.run_dir} is in use by another writer (see rank 0)")
        if error is not None:
            raise error
        return lock

    def _prepare_run_dir(self) -> None:
        ckpt, tensors, meta, damaged = self._newest_usable_checkpoint()
        if ckpt is None:
            if any((folder := self.run_dir / "checkpoints" / DAMAGED_DIR).glob("*")):
                raise UserError(f"{self.run_dir} has only damaged checkpoints (moved to {folder}); to start "
                                f"over, remove that folder or use a new --out directory")
            if self.dist.is_main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                atomic_write_text(self.run_dir / "config.yaml", dump_config(self.config))
                (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
            barrier()
            return
        self.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        self.ema.module.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        self.optimizer.load_state_dict(optimizer_from_flat(tensors, meta["optimizer"]))
        self.step, self.skipped, self.seconds = int(meta["step"]), int(meta["skipped_steps"]), float(meta["seconds"])
        self.bad_streak, self.saved_step = int(meta.get("bad_streak", 0)), self.step
        self.phema.resume(tensors, self.step)
        if self.dist.is_main:
            remove_stale_temp_files(self.run_dir, "config.yaml", "metrics.jsonl")  # left by a killed run
            remove_stale_temp_files(self.run_dir / "checkpoints", "ckpt-*")
            atomic_write_text(self.run_dir / "config.yaml", dump_config(self.config))
            truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
            self._append_metrics({"event": "resume", "step": self.step, "checkpoint": ckpt.name, "damaged": damaged})
        self.log(f"resuming {self.run_dir} from {ckpt.name} (step {self.step})")
        barrier()

    def _newest_usable_checkpoint(self) -> tuple[Path | None, dict, dict, list[str]]:
        """(newest undamaged checkpoint, its tensors and metadata, names of damaged ones moved aside).
        A readable one of another config or network is an error (moving it would lose the run)."""
        damaged = []

        def attempt(ckpt: Path) -> tuple[dict, dict]:
            layout, meta = check_run_checkpoint(ckpt, resumable=True)
            check_same_run(parse_config(meta["config"]).to_dict(), self.config.to_dict(), self.run_dir, ckpt,
                           sections=("data", "network", "diffusion", "training", "latent"), resumable=RESUMABLE_KEYS)
            check_fits(ckpt, layout, meta, {"net.": self.net, "ema.": self.ema.module}, self.optimizer)
            return load_checkpoint(ckpt, self.device)

        def on_damaged(e: CheckpointDamaged) -> None:
            where = set_aside(e.path) if self.dist.is_main else e.path.parent / DAMAGED_DIR
            self.log(f"warning: {e}; moved it to {where} and trying the previous checkpoint")
            damaged.append(e.path.name)

        found = newest_usable(reversed(list_checkpoints(self.run_dir / "checkpoints")), attempt, on_damaged)
        return (found[0], *found[1], damaged) if found else (None, {}, {}, damaged)

    def _append_metrics(self, record: dict) -> None:
        append_metrics(self.run_dir / "metrics.jsonl", record)
        self.tb.scalars(record)

    # ------------------------------------------------------------------------------------------
    def _batch(self, step: int):
        """This process's slice of the global batch at ``step``: (images, conditions, sigma, noise), images
        augmented by ``training.augment`` (:mod:`.augment`). With ``cond_drop_prob`` each sample loses all
        its conditions with that probability (classifier-free guidance), drawn from (seed, step) too."""
        B, C, (H, W) = self.t.batch_size, self.info.channels, self.info.resolution
        indices = batch_indices(self.t.seed, step, B, len(self.dataset))
        g = derived_generator(self.t.seed, "noise", step)
        sigma = self.formulation.training_sigma(B, generator=g, dtype=torch.float32)
        noise = torch.randn((B, C, H, W), generator=g)
        part = slice(self.dist.rank * self.local_batch, (self.dist.rank + 1) * self.local_batch)
        images, labels = self.dataset.get_batch(indices[part])
        if self.latent is not None:  # a fresh posterior sample of each latent, drawn from (seed, step)
            images = self.dataset.draw_batch(indices, derived_generator(self.t.seed, "latent", step))[part]
        to = dict(device=self.device, non_blocking=True)
        images, augment = augment_batch(self.augment, int(getattr(self.net, "augment_dim", 0) or 0),
                                        images.to(**to), self.t.seed, step, B, part)
        if self.t.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        cond = {"class_labels": labels} if self.net_label_dim > 0 else {}
        wanted = {"concat": self.net_sizes[0], "context": self.net_sizes[1]}  # what the network takes
        cond.update({k: v for k, v in self.dataset.get_conditions(indices[part]).items() if wanted.get(k)})
        if cond and self.t.cond_drop_prob > 0:
            keep = torch.rand(B, generator=derived_generator(self.t.seed, "cond_drop", step))[part]
            keep = keep >= self.t.cond_drop_prob
            for key, value in cond.items():
                value, null = with_null_condition(self.net, key, value)
                cond[key] = torch.where(keep.reshape((-1,) + (1,) * (value.ndim - 1)), value, null)
        cond = {key: value.to(**to) for key, value in {**cond, **augment}.items()}
        return images, cond, sigma[part].to(**to), noise[part].to(**to)

    @property
    def net_label_dim(self) -> int:
        return int(getattr(self.net, "label_dim", 0) or 0)

    @property
    def net_sizes(self) -> tuple[int, int]:
        """(cond_channels, context_dim) of the network: which data conditions it takes."""
        return int(getattr(self.net, "cond_channels", 0) or 0), int(getattr(self.net, "context_dim", 0) or 0)

    def train_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """One optimizer step; returns (per-sample losses, their sigmas, whether the step was applied)."""
        images, conds, sigma, noise = self._batch(step)
        torch.manual_seed(derive_seed(self.t.seed, "dropout", step, self.dist.rank))
        if not self.net.training:
            self.net.train()
        micro = self.local_batch // self.t.grad_accumulation
        losses = []
        for m in range(self.t.grad_accumulation):
            part = slice(m * micro, (m + 1) * micro)
            cond = {key: value[part] for key, value in conds.items()}
            last = m == self.t.grad_accumulation - 1
            sync = self.model.no_sync() if (self.dist.world_size > 1 and not last) else contextlib.nullcontext()
            with sync:
                with autocast_for(self.precision, self.device):
                    loss = denoising_loss(self.model, images[part], sigma=sigma[part], noise=noise[part],
                                          formulation=self.formulation, **cond)
                (loss.sum() / self.local_batch).backward()
            losses.append(loss.detach())
        params = [p for p in self.params if p.grad is not None]
        if self.t.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, self.t.grad_clip, foreach=True)
        else:  # the norm is still needed for the NaN/Inf guard
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in params])))
        applied = bool(torch.isfinite(norm))
        if applied:  # NaN/Inf guard: skip the update and keep the EMA clean
            images_seen = (step + 1) * self.t.batch_size
            lr = self.t.lr * min(images_seen / max(self.t.lr_rampup, 1e-8), 1.0)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            self.ema.update(self.net, images_seen, self.t.batch_size)
        self.optimizer.zero_grad(set_to_none=True)
        return torch.cat(losses), sigma, applied

    # ------------------------------------------------------------------------------------------
    def save(self) -> Path:
        """Write a checkpoint for the current step (main process) and prune old ones."""
        path = self.run_dir / "checkpoints" / checkpoint_name(self.step)
        if self.dist.is_main:  # a failed write raises fileio.WriteError and leaves the older ones as they were
            save_checkpoint(path, net=self.net, ema=self.ema.module, optimizer=self.optimizer, meta=self._meta(),
                            extra=self.phema.checkpoint_tensors())
            if self.t.keep_checkpoints:
                for old in list_checkpoints(path.parent)[:-self.t.keep_checkpoints]:
                    try:
                        old.unlink(missing_ok=True)
                    except OSError as e:  # not fatal: the new checkpoint is written
                        self.log(f"warning: cannot remove old checkpoint {old}: {e}")
        self.saved_step = self.step
        barrier()
        return path

    def sample_grid(self) -> Path | None:
        """Write ``samples/step-XXXXXXXX.png`` from the EMA network (main process)."""
        if not self.dist.is_main:
            return None
        from ..viz import save_image_grid

        n = self.t.num_sample_images
        labels = None
        if self.net_label_dim:
            labels = torch.arange(n) % self.net_label_dim
        denoiser = Denoiser(self.ema.module, self.formulation).eval()
        x = generate(denoiser, self.formulation, (self.info.channels, *self.info.resolution), range(n),
                     self.config.sampling, device=self.device, class_labels=labels, precision=self.precision)
        if self.latent is not None:  # decoded with the VAE the dataset already holds
            x = self.dataset.decode(x)
        path = self.run_dir / "samples" / f"step-{self.step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image_grid(x, path)
        self.tb.image(path, self.step)
        return path

    def _request_stop(self, signum, frame) -> None:
        self.stop_requested = True
        self.log("interrupt received: finishing this step and writing a checkpoint")

    def train(self) -> dict:
        """Run until ``training.steps``; returns a summary. Ctrl-C (SIGINT) and SIGTERM (preemption)
        finish the step, checkpoint and stop cleanly. Releases the run directory's lock (taken by __init__)."""
        try:
            return self._train()
        finally:
            self.tb.close()
            self._lock.release()

    def _train(self) -> dict:
        total = self.t.steps
        if self.step >= total:
            self.log(f"{self.run_dir} is already trained to step {self.step} (training.steps = {total})")
            latest = latest_checkpoint(self.run_dir / "checkpoints")
            return {"step": self.step, "skipped_steps": self.skipped, "checkpoint": latest, "samples": None,
                    "seconds": self.seconds, "interrupted": False}
        previous = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGINT, signal.SIGTERM)
                    } if _main_thread() else {}
        bar = None
        if self.progress and self.dist.is_main and self.step < total:
            from tqdm.auto import tqdm
            bar = tqdm(total=total, initial=self.step, desc="training", unit="step", dynamic_ncols=True)
        stats = IntervalStats()
        try:
            while self.step < total and not self._stop_agreed():
                t0 = time.perf_counter()
                losses, sigma, applied = self.train_step(self.step)
                self.step += 1
                self.skipped += 0 if applied else 1
                self.bad_streak = 0 if applied else self.bad_streak + 1
                self.phema.after_step(self.net, self.step, self.step == total)
                self.seconds += time.perf_counter() - t0
                stats.add(losses, sigma, self.t.batch_size)
                if bar is not None:
                    bar.update(1)
                if self.step % self.t.log_every == 0 or self.step == total:
                    self._log_interval(stats, bar)
                if self.t.max_bad_steps is not None and self.bad_streak >= self.t.max_bad_steps:
                    self._stop_diverged()
                if self.step % self.t.checkpoint_every == 0 and self.step < total and not self.bad_streak:
                    self.save()  # (none during a run of skipped steps: the state has not changed)
                if self.t.sample_every and self.step % self.t.sample_every == 0 and self.step < total:
                    self.sample_grid()
            ckpt = self.save()
            grid = self.sample_grid()
        finally:
            if bar is not None:
                bar.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return {"step": self.step, "skipped_steps": self.skipped, "checkpoint": ckpt, "samples": grid,
                "seconds": self.seconds, "interrupted": self.stop_requested}

    def _stop_agreed(self) -> bool:
        """Whether any process was asked to stop (all processes must stop at the same step)."""
        if self.dist.world_size == 1:
            return self.stop_requested
        return bool(all_reduce_sum(torch.tensor([float(self.stop_requested)], device=self.device)))

    def _stop_diverged(self) -> None:
        """Stop after ``max_bad_steps`` skipped steps in a row, keeping a checkpoint of the last good state
        (a skipped step changes nothing but the counters: the state now is the state after step ``good``)."""
        streak, good = self.bad_streak, self.step - self.bad_streak
        if self.saved_step is None or self.saved_step < good:
            now = self.step, self.skipped, streak
            self.step, self.skipped, self.bad_streak = good, self.skipped - streak, 0
            self.save()
            self.step, self.skipped, self.bad_streak = now
        if self.dist.is_main:
            self._append_metrics({"event": "stopped", "step": self.step, "bad_steps": streak, "last_good_step": good})
        raise TrainingStopped(f"training stopped at step {self.step}: {streak} steps in a row had a non-finite "
                              f"gradient (training.max_bad_steps); {checkpoint_name(self.saved_step)} holds the last "
                              f"good state (step {good}); lower training.lr, or resume with a larger max_bad_steps")

    def _log_interval(self, stats: IntervalStats, bar) -> None:
        reduce = (lambda acc: all_reduce_sum(acc.to(self.device)).cpu()) if self.dist.world_size > 1 else None
        interval = stats.take(reduce)
        record = {"step": self.step, "kimg": self.step * self.t.batch_size / 1000, "loss": interval["loss"],
                  "lr": self.optimizer.param_groups[0]["lr"], "images_per_sec": interval["images_per_sec"],
                  "seconds": round(self.seconds, 3), **{k: interval[k] for k in ("sigma_edges", "loss_by_sigma",
                                                                                 "count_by_sigma")},
                  "skipped_steps": self.skipped}
        if self.dist.is_main:
            self._append_metrics(record)
            if bar is not None and (loss := interval["loss"]) is not None:
                bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{record['images_per_sec']:.0f}")


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()
