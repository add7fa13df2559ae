"""The diffusion trainer: any formulation, any network, pixels or a VAE's latents, one process or many
(torchrun + DDP), on the one training loop (:mod:`.loop`).

A step draws its global batch from (seed, step): data indices, augmentations, training sigmas, noise (a
pairs dataset's own noise for reflow) and condition dropout; each process takes its slice, and dropout uses a
generator reseeded from (seed, step, rank). The half-life EMA follows every applied step; the post-hoc power
EMA (``training.ema``) every step. With ``training.loss_weighting: uncertainty`` a small u(sigma) head
(:class:`~elucidate.losses.UncertaintyHead`) trains beside the network in the same optimizer (EDM2 eq. 21): it is
in every checkpoint (``uncertainty.*``) but not in the EMA, and sampling never sees it.

A step's micro-batches, autocast, loss scaling, clipping, NaN/Inf guard, update and EMA are one skeleton
(:meth:`Trainer._step_over_micro_batches`), which the distillation trainer's step (:mod:`.distill`) shares.
``training.precision: fp16`` scales the loss (``torch.amp.GradScaler``; its state is in the checkpoint metadata, so a
resumed run continues bit-exactly); a step whose gradient overflowed is skipped as any non-finite step is.
``training.compile`` runs the forward through ``torch.compile`` (eager if compilation fails: one warning); the
checkpoints hold the uncompiled network's keys.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..config import Config, dump_config, parse_config
from ..config.network import DataInfo, build_network_for
from ..data import ImageDataset, build_dataset
from ..data.loader import BatchPrefetcher, default_workers
from ..denoiser import Denoiser, with_null_condition
from ..errors import UserError
from ..losses import UncertaintyHead, denoising_loss, uncertainty_weighted
from ..run.model import LoadedRun
from ..runtime.compile import compiled
from ..runtime.distributed import barrier
from ..runtime.precision import autocast_for, grad_scaler
from ..runtime.rng import batch_indices, derive_seed, derived_generator
from ..viz import save_image_grid
from .augment import augment_batch, augment_pipe
from .ema import EMA, RunPowerEMA
from .latent import latent_training_data
from .loop import TrainingLoop, TrainingStopped
from .optim import make_optimizer
from .stats import SIGMA_EDGES, IntervalStats

__all__ = ["Trainer", "TrainingStopped", "SIGMA_EDGES", "Objective"]

#: checkpoint prefix of the u(sigma) head of training.loss_weighting: uncertainty
UNCERTAINTY = "uncertainty"


class Objective(nn.Module):
    """What a step differentiates, as one module (the DDP unit, so the gradients of the network and of the
    u(sigma) head are all-reduced alike): per sample, the fixed-weight loss lambda(sigma) ||D - y||^2 (mean over
    elements) and u(sigma) (None without a head)."""

    def __init__(self, denoiser: Denoiser, uncertainty: UncertaintyHead | None = None):
        super().__init__()
        self.denoiser, self.uncertainty = denoiser, uncertainty

    def forward(self, y: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, **cond
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        loss = denoising_loss(self.denoiser, y, sigma=sigma, noise=noise, **cond)
        return loss, None if self.uncertainty is None else self.uncertainty(sigma)


class Trainer(TrainingLoop):
    """Train the diffusion ``config`` into ``run_dir`` (resuming from its latest checkpoint if there is one)."""

    free_sections = ("sampling",)  # sampling settings may change between resumes

    def __init__(self, config: Config, run_dir: str | Path, *, dataset: ImageDataset | None = None, **options):
        """``dataset``: the data already built from ``config.data`` (not loaded again); ``options``: those of
        :class:`TrainingLoop` (device, progress, log)."""
        self._given_dataset = dataset
        super().__init__(config, run_dir, **options)

    @property
    def micro_batches(self) -> int:
        return self.t.grad_accumulation

    def build(self, init) -> None:
        config, t = self.config, self.t
        if config.data.get("pairs") and (config.latent is not None or t.augment is not None):
            raise UserError(f"data.pairs (reflow couplings) cannot be combined with "
                            f"{'a latent run' if config.latent is not None else 'training.augment'}: an augmented or "
                            f"encoded sample is no longer the ODE's image of its noise")
        self.dataset = self._given_dataset
        if self.dataset is None:  # a given dataset was described by whoever built it
            self.dataset = build_dataset(config.data)
            if self.dist.is_main:
                self.log(self.dataset.describe())
        self.latent = None  # the record of a latent run
        if config.latent is not None:  # diffusion on a VAE's latents (training.latent)
            self.dataset, self.latent = latent_training_data(
                config, self.dataset, self.run_dir, sigma_data=getattr(config.formulation(), "sigma_data", None),
                is_main=self.dist.is_main, barrier=barrier, device=self.device, log=self.log)
        self.info = DataInfo.from_dataset(self.dataset)
        init()
        self.net = build_network_for(config, self.info).to(self.device)
        if t.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.formulation = config.formulation()
        # the step's forward may go through torch.compile; the checkpoints and the EMA keep the plain self.net
        self.denoiser = Denoiser(compiled(self.net) if t.compile else self.net, self.formulation)
        self.scaler = grad_scaler(self.precision, self.device)  # fp16: loss scaling; otherwise a pass-through
        # initialized after the network, so the network's initial weights do not depend on the loss weighting
        self.uncertainty = UncertaintyHead().to(self.device) if t.loss_weighting == "uncertainty" else None
        self.objective = self.model = self.make_objective()
        self.augment = augment_pipe(t.augment, self.info.resolution)  # None = off
        if self.dist.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.objective, device_ids=ids)
        self.params = list(self.net.parameters()) + list(self.uncertainty.parameters() if self.uncertainty else [])
        self.optimizers, self.base_lrs = [make_optimizer(self.params, t)], [t.lr]
        self.ema = EMA(self.net, t.ema_halflife, t.ema_rampup)
        self.modules = {"net": self.net, "ema": self.ema.module}
        if self.uncertainty is not None:  # restored on resume and checked by the loop; saved by checkpoint_tensors
            self.modules[UNCERTAINTY] = self.uncertainty
        self.phema = RunPowerEMA(self.net, t.ema, self.run_dir, self.dist.is_main)  # inert if training.ema is null

    def make_objective(self) -> nn.Module:
        """The module a step differentiates (wrapped in DDP with several processes); a trainer with another step
        (distillation, :mod:`.distill`) returns its own."""
        return Objective(self.denoiser, self.uncertainty)

    def config_text(self) -> str:
        return dump_config(self.config)

    def parse_stored_config(self, raw: dict) -> Config:
        return parse_config(raw)

    def data_info(self) -> dict:
        return self.info.to_dict()

    def meta(self) -> dict:
        cond_normalizer = getattr(self.dataset, "cond_normalizer", None)  # what `sample --cond` normalizes with
        scaler = {"grad_scaler": self.scaler.state_dict()} if self.scaler.is_enabled() else {}  # fp16 only
        return {**super().meta(), "latent": self.latent, **scaler,
                "cond_normalizer": None if cond_normalizer is None else cond_normalizer.to_config()}

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        head = {} if self.uncertainty is None else {f"{UNCERTAINTY}.{k}": v
                                                     for k, v in self.uncertainty.state_dict().items()}
        return {**self.phema.checkpoint_tensors(), **head}

    def resume(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.phema.resume(tensors, self.step)
        if self.scaler.is_enabled() and meta.get("grad_scaler"):
            self.scaler.load_state_dict(meta["grad_scaler"])

    def after_step(self, step: int, last: bool) -> None:
        self.phema.after_step(self.net, step, last)

    def make_stats(self) -> IntervalStats:
        return IntervalStats(self.t.batch_size, uncertainty=self.uncertainty is not None)

    # ------------------------------------------------------------------------------------------ a step
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
        images, labels = self._read_batch(step, indices[part], part)
        paired = None if self.latent is not None else self.dataset.get_noise(indices[part])  # reflow (data.pairs)
        if paired is not None:
            noise[part] = paired
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

    def _read_batch(self, step: int, indices: torch.Tensor, part: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """``dataset.get_batch(indices)``; a streamed dataset's batches are read ahead in ``data.workers``
        processes (:class:`~elucidate.data.loader.BatchPrefetcher`), each still a function of (seed, step)."""
        if getattr(self, "_prefetch", None) is None:
            B, N, seed = self.t.batch_size, len(self.dataset), self.t.seed
            workers = getattr(self.dataset, "workers", None)
            self._prefetch = BatchPrefetcher(self.dataset, lambda s: batch_indices(seed, s, B, N)[part], self.t.steps,
                                             default_workers() if workers is None else workers,
                                             release=self._lock.release)
        return self._prefetch.get(step, indices)

    def _close_prefetch(self) -> None:
        if getattr(self, "_prefetch", None) is not None:
            self._prefetch.close()

    def summary(self, ckpt, picture) -> dict:
        self._close_prefetch()  # training is over: stop the batch workers
        return super().summary(ckpt, picture)

    def close(self) -> None:
        self._close_prefetch()
        super().close()

    @property
    def net_label_dim(self) -> int:
        return int(getattr(self.net, "label_dim", 0) or 0)

    @property
    def net_sizes(self) -> tuple[int, int]:
        """(cond_channels, context_dim) of the network: which data conditions it takes."""
        return int(getattr(self.net, "cond_channels", 0) or 0), int(getattr(self.net, "context_dim", 0) or 0)

    def optimizer_step(self, step: int) -> tuple[tuple, bool]:
        """One optimizer step: ((per-sample fixed-weight losses, their sigmas[, their u(sigma) with
        ``training.loss_weighting: uncertainty``]), whether the step was applied). The gradient is that of the loss
        of ``training.loss_weighting``."""
        images, conds, sigma, noise = self._batch(step)
        torch.manual_seed(derive_seed(self.t.seed, "dropout", step, self.dist.rank))

        def micro_loss(m: int, rows: slice) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
            cond = {key: value[rows] for key, value in conds.items()}
            loss, u = self.model(images[rows], sigma[rows], noise[rows], **cond)
            trained = loss if u is None else uncertainty_weighted(loss, u)  # EDM2 eq. 21
            return trained, (loss,) if u is None else (loss, u)

        (losses, *us), applied = self._step_over_micro_batches(step, micro_loss)
        return (losses, sigma, *us), applied

    def _step_over_micro_batches(self, step: int, micro_loss: Callable[[int, slice], tuple[torch.Tensor, tuple]]
                                 ) -> tuple[tuple[torch.Tensor, ...], bool]:
        """The skeleton of a step (this trainer's and :mod:`.distill`'s): for each of the ``grad_accumulation``
        micro-batches m (``rows`` of this process's slice), ``micro_loss(m, rows)``, under autocast, returns (the
        per-sample loss to differentiate, the per-sample tensors to report); the gradient of sum / local batch
        accumulates (fp16: scaled; with DDP all-reduced at the last micro-batch only), is unscaled, clipped
        (``training.grad_clip``) and, if its norm is finite, applied and followed by the half-life EMA. Returns
        (the reported tensors, each concatenated over the micro-batches; whether the step was applied)."""
        if not self.net.training or (self.uncertainty is not None and not self.uncertainty.training):
            self.objective.train()
        micro = self.local_batch // self.t.grad_accumulation
        reported = []
        for m in range(self.t.grad_accumulation):
            rows = slice(m * micro, (m + 1) * micro)
            last = m == self.t.grad_accumulation - 1
            sync = self.model.no_sync() if (self.dist.world_size > 1 and not last) else contextlib.nullcontext()
            with sync:
                with autocast_for(self.precision, self.device):
                    trained, report = micro_loss(m, rows)
                self.scaler.scale(trained.sum() / self.local_batch).backward()
            reported.append([value.detach() for value in report])
        self.scaler.unscale_(self.optimizer)  # fp16: the true gradient, for the norm, the clip and the guard
        params = [p for p in self.params if p.grad is not None]
        if self.t.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, self.t.grad_clip, foreach=True)
        else:  # the norm is still needed for the NaN/Inf guard
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in params])))
        applied = bool(torch.isfinite(norm))
        if applied:  # NaN/Inf guard: skip the update and keep the EMA clean
            self.scaler.step(self.optimizer)  # (fp16: the scaler found no inf either, as the norm is finite)
            self.ema.update(self.net, (step + 1) * self.t.batch_size, self.t.batch_size)
        self.scaler.update()  # fp16: an overflowed (skipped) step halves the scale
        self.optimizer.zero_grad(set_to_none=True)
        return tuple(torch.cat(values) for values in zip(*reported)), applied

    def picture(self) -> Path:
        """``samples/step-XXXXXXXX.png``: the EMA network sampled as a loaded run would be (the run's sampling
        settings, class i % classes for a class-conditional network, the spatial/context conditions of the first
        ``num_sample_images`` data items for a network that takes them, decoded for a latent run)."""
        n = self.t.num_sample_images
        run = LoadedRun(Denoiser(self.ema.module, self.formulation).eval(), self.config, self.info, None, self.step,
                        self.run.checkpoint(self.step), self.dataset.decode if self.latent is not None else None)
        labels = torch.arange(n) % run.label_dim if run.label_dim else None
        cond = {k: v for k, v in self.dataset.get_conditions(torch.arange(n) % len(self.dataset)).items()
                if k in run.condition_shapes}
        x = run.sample(range(n), class_labels=labels, cond=cond, device=self.device, precision=self.precision)
        return save_image_grid(run.images(x), self.run.sample_grid(self.step))
