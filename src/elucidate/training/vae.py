"""The autoencoder trainer (``elucidate train-vae``) on the one training loop (:mod:`.loop`): two optimizers
(autoencoder + log-variance, discriminator) on the same batch, a fixed held-out split, periodic reconstruction
grids and held-out PSNR / Frechet distance.

Determinism: the data indices and posterior noise of the global batch at step k are pure functions of (seed,
k), and each process takes its slice; dropout uses the global RNG reseeded from (seed, k, rank). The
discriminator uses GroupNorm, so a sample's losses do not depend on the rest of the batch and N processes
train the same weights as one.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..config.network import DataInfo
from ..config.vae import VAEConfig, dump_vae_config, load_vae_config, parse_vae_config
from ..data import build_dataset
from ..errors import ConfigError, UserError
from ..latent.distribution import DiagonalGaussianDistribution
from ..latent.evaluate import evaluate_reconstructions, save_reconstruction_grid
from ..latent.perceptual import load_feature_network
from ..latent.vae_loss import VAELoss
from ..metrics.features import feature_extractor
from ..run.model import CHECKPOINT_KIND, build_autoencoder
from ..runtime.distributed import all_reduce_sum, process_group
from ..runtime.precision import autocast_for
from ..runtime.rng import batch_indices, derive_seed, derived_generator
from .loop import TrainingLoop
from .optim import make_optimizer
from .stats import MeanStats

__all__ = ["VAETrainer", "train_vae", "LOG_KEYS", "holdout_split", "build_vae_loss"]

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


def build_vae_loss(config: VAEConfig, channels: int, *, device: torch.device | str | None = None) -> VAELoss:
    """The config's VAELoss (discriminator, log-variance and, if asked for, the perceptual network)."""
    c = config.loss
    perceptual = None
    if c.perceptual is not None and c.perceptual_weight > 0:
        try:
            perceptual = load_feature_network(c.perceptual, device=device)
        except UserError as e:
            raise ConfigError(f"loss.perceptual: {e}") from None
    return VAELoss(channels, kl_weight=c.kl_weight, perceptual_weight=c.perceptual_weight, perceptual=perceptual,
                   disc_weight=c.disc_weight, disc_start=c.disc_start, disc_loss=c.disc_loss,
                   disc_layers=c.disc_layers, disc_channels=c.disc_channels, logvar_init=c.logvar_init)


class _Autoencoder(nn.Module):
    """What the first optimizer trains (the DDP unit): the autoencoder and the loss's log-variance."""

    def __init__(self, vae: nn.Module, logvar: nn.Parameter):
        super().__init__()
        self.vae, self.logvar = vae, logvar

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x)
        return self.vae.decode(posterior.sample(noise=noise)), posterior.parameters


class VAETrainer(TrainingLoop):
    """Train the autoencoder ``config`` into ``run_dir`` (resuming from its latest checkpoint if there is one)."""

    what, label, kind = "train-vae", "training vae", CHECKPOINT_KIND

    def build(self, init) -> None:
        config, t = self.config, self.t
        if self.precision == "fp16":  # its two optimizers (autoencoder, discriminator) have no loss scaling
            raise UserError("training.precision fp16 is not supported by train-vae (no loss scaling); use bf16 or fp32")
        self.dataset = build_dataset(config.data)
        self.channels, self.resolution = self.dataset.channels, tuple(self.dataset.resolution)
        train, held = holdout_split(self.dataset.num_images, t.holdout)
        if self.dataset.xflip:  # mirrored copies of the training images train too; evaluation uses originals
            train = torch.cat([train, train + self.dataset.num_images])
        self.train_indices, self.holdout_indices = train, held
        init()
        self.vae = build_autoencoder(config, self.channels, self.resolution).to(self.device)
        self.loss = build_vae_loss(config, self.channels, device=self.device).to(self.device)
        self.state = nn.ModuleDict({"vae": self.vae, "loss": self.loss})  # the checkpoint's "net."
        self.modules = {"net": self.state}
        self.ae_model: nn.Module = _Autoencoder(self.vae, self.loss.logvar)
        self.disc_model: nn.Module = self.loss.discriminator
        if self.dist.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ae_model = DistributedDataParallel(self.ae_model, device_ids=ids)
            self.disc_model = DistributedDataParallel(self.disc_model, device_ids=ids)
        self.ae_params = list(self.vae.parameters()) + [self.loss.logvar]
        self.disc_params = list(self.loss.discriminator.parameters())
        self.optimizers = [make_optimizer(self.ae_params, t), make_optimizer(self.disc_params, t, lr=t.disc_lr)]
        self.base_lrs = [t.lr, t.disc_lr]
        self.eval_every = t.eval_every
        self.last_eval: dict | None = None
        self._extractor = None

    def config_text(self) -> str:
        return dump_vae_config(self.config)

    def parse_stored_config(self, raw: dict) -> VAEConfig:
        return parse_vae_config(raw)

    def data_info(self) -> dict:
        return DataInfo(self.channels, self.resolution, self.dataset.num_classes).to_dict()

    def meta(self) -> dict:
        return {**super().meta(), "latent_shape": list(self.vae.latent_shape), "eval": self.last_eval}

    def resume(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.last_eval = meta.get("eval")

    def make_stats(self) -> MeanStats:
        return MeanStats(LOG_KEYS, self.t.batch_size)

    def lr_record(self) -> dict:
        return {"lr": self.optimizers[0].param_groups[0]["lr"], "disc_lr": self.optimizers[1].param_groups[0]["lr"]}

    def postfix(self, record: dict) -> dict:
        if record.get("loss") is None:
            return {}
        return {"rec": f"{record['rec_loss']:.4f}", "logvar": f"{record['logvar']:.2f}"}

    def summary(self, ckpt: Path | None, picture: Path | None) -> dict:
        last = self.last_eval or {}
        return {**super().summary(ckpt, picture), "psnr": last.get("psnr"), "fd": last.get("fd"),
                "latent_std": last.get("latent_std")}

    # ------------------------------------------------------------------------------------------ a step
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

    def optimizer_step(self, step: int) -> tuple[dict[str, torch.Tensor], bool]:
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
        applied = self._apply(self.optimizers[0], self.ae_params)
        if self.loss.adversarial(step):  # discriminator on this step's (pre-update) reconstructions
            with autocast_for(self.precision, self.device):
                d_loss, d_logs = self.loss.discriminator_loss(x, x_rec, step, self.disc_model)
            d_loss.backward()
            applied = self._apply(self.optimizers[1], self.disc_params) and applied
        else:
            _, d_logs = self.loss.discriminator_loss(x, x_rec, step)
        logs.update(d_logs)
        return logs, applied

    # ------------------------------------------------------------------------------------------ pictures, evaluation
    def _holdout_images(self, count: int | None = None) -> torch.Tensor:
        indices = self.holdout_indices if count is None else self.holdout_indices[:count]
        return self.dataset.get_batch(indices)[0]

    def picture(self) -> Path:
        """``samples/step-XXXXXXXX.png``: held-out originals above their reconstructions."""
        return save_reconstruction_grid(self.vae, self._holdout_images(self.t.num_sample_images).to(self.device),
                                        self.run.sample_grid(self.step))

    def _feature_extractor(self):
        name = self.t.fd_features
        if name == "auto":
            digits = self.config.data.get("dataset") == "digits" and self.channels in (1, 3)
            name = "fd_digits" if digits else "none"
        if name == "none":
            return None
        if self._extractor is None:
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
        self._append_metrics(self.last_eval)
        return self.last_eval


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
    with process_group(device):
        return VAETrainer(config, out_dir, device=device, progress=progress).train()
