"""The training loop: one skeleton for every trainer (diffusion in :mod:`.diffusion`, the autoencoder in
:mod:`.vae`). It owns the run directory, the one-writer lock, resuming from the newest usable checkpoint,
the learning-rate schedule, the NaN/Inf guard, logging (metrics.jsonl, progress bar, TensorBoard),
checkpoints, stopping on a signal, DDP agreement and precision; a trainer says how to build its data and
modules, what one step does and what its periodic picture is.

Determinism: everything random at step k is drawn from (seed, k) (:mod:`elucidate.runtime.rng`) and each
process takes its slice of the global batch, so a run resumed from a checkpoint continues bit-exactly and N
processes train the same weights as one.
"""
from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import torch
from torch import nn

from ..config.training import resumable_keys
from ..data.build import RESUMABLE_DATA_KEYS
from ..errors import UserError
from ..run.checkpoint import (
    CheckpointDamaged,
    check_fits,
    check_run_checkpoint,
    load_checkpoint,
    newest_usable,
    optimizer_from_flat,
    save_checkpoint,
    set_aside,
)
from ..run.lock import RunLock, RunLocked
from ..run.rundir import RunDir, check_same_run
from ..runtime.distributed import DistInfo, all_reduce_max, all_reduce_sum, barrier, init_distributed
from ..runtime.files import remove_stale_temp_files
from ..runtime.precision import resolve_precision
from ..runtime.rng import derive_seed
from .optim import OptimizerGroup, lr_factor
from .tensorboard import TensorBoardLog

__all__ = ["TrainingLoop", "TrainingStopped", "load_matching"]


def load_matching(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``module.load_state_dict(state)``, with a one-line error naming the first tensor that is missing, extra or
    of another shape (``source`` names where the weights come from)."""
    own = module.state_dict()
    for key, value in own.items():
        if key not in state:
            raise UserError(f"{source}: no tensor {key!r} for this network (it has {len(state)} tensors, the network "
                            f"{len(own)}): another architecture?")
        if tuple(state[key].shape) != tuple(value.shape):
            raise UserError(f"{source}: tensor {key!r} has shape {tuple(state[key].shape)} but this network's is "
                            f"{tuple(value.shape)}")
    extra = [key for key in state if key not in own]
    if extra:
        raise UserError(f"{source}: tensor {extra[0]!r} has no place in this network (another architecture?)")
    module.load_state_dict(state)


class TrainingStopped(UserError):
    """Training gave up (too many consecutive non-finite steps); the message says where it stands."""


class TrainingLoop:
    """Train ``config`` into ``run_dir``, resuming from its newest usable checkpoint if it has one.

    A trainer subclasses it and provides :meth:`build` (data, modules, optimizers: sets :attr:`modules`,
    :attr:`optimizers`, :attr:`base_lrs`), :meth:`optimizer_step`, :meth:`make_stats` and :meth:`picture`, and
    may extend :meth:`meta`, :meth:`after_step`, :meth:`evaluate` and :meth:`summary`.
    """

    #: what the lock says holds the run; the progress bar's label; ``meta["kind"]`` of its checkpoints
    what, label, kind = "training", "training", None
    #: config sections that may change when the run is resumed (besides the resumable training keys)
    free_sections: tuple[str, ...] = ()
    #: micro-batches of a step: the global batch must split evenly over processes x micro-batches
    micro_batches = 1

    def __init__(self, config, run_dir: str | Path, *, device: str | None = None, progress: bool = True,
                 log=print):
        self.config, self.t, self.progress, self.log = config, config.training, progress, log
        self.run = RunDir(run_dir)
        self.run_dir = self.run.path
        self.dist: DistInfo = init_distributed(device)
        self.device = self.dist.device
        self._lock = self._lock_run()  # one writer per run directory (held until train() returns)
        try:
            self._setup()
        except BaseException:
            self._lock.release()
            raise

    def _setup(self) -> None:
        t = self.t
        if t.batch_size % (self.dist.world_size * self.micro_batches):
            raise UserError(f"training.batch_size = {t.batch_size} must be divisible by the number of processes"
                            + (f" x grad_accumulation = {self.dist.world_size} x {self.micro_batches}"
                               if self.micro_batches > 1 else f" ({self.dist.world_size})"))
        self.local_batch = t.batch_size // self.dist.world_size
        self.precision = resolve_precision(t.precision, self.device)  # auto: bf16 only on bf16 hardware
        if t.precision == "auto" and self.dist.is_main:
            self.log(f"precision auto: {self.precision} on {self.device}"
                     + ("" if self.precision == "bf16" else " (no bf16 hardware)"))
        self.modules: dict[str, nn.Module] = {}  # checkpoint prefix ("net", "ema") -> module
        self.optimizers: list[torch.optim.Optimizer] = []
        self.base_lrs: list[float] = []  # each optimizer's learning rate after the ramp-up
        self.build(init=lambda: torch.manual_seed(derive_seed(t.seed, "init")))
        self.optimizer = self.optimizers[0] if len(self.optimizers) == 1 else OptimizerGroup(*self.optimizers)
        self.tb = TensorBoardLog(self.run.tensorboard, t.tensorboard and self.dist.is_main)  # no-op when off
        self.step, self.skipped, self.seconds = 0, 0, 0.0
        self.bad_streak, self.saved_step = 0, None  # consecutive skipped steps; step of the last checkpoint
        self.stop_requested = False
        self._prepare_run_dir()

    # ------------------------------------------------------------------------------------------ a trainer's part
    def build(self, init) -> None:
        """Build the data, then call ``init()`` (seeds the global RNG from the run's seed) and build the modules
        and optimizers."""
        raise NotImplementedError

    def optimizer_step(self, step: int) -> tuple[object, bool]:
        """One optimizer step at the learning rate already set: (what :meth:`make_stats`'s ``add`` takes,
        whether the update was applied)."""
        raise NotImplementedError

    def make_stats(self):
        """The accumulator of a logging interval: ``add(result)`` per step and ``take(reduce) -> dict``."""
        raise NotImplementedError

    def picture(self) -> Path | None:
        """Write the periodic picture (main process); returns its path."""
        raise NotImplementedError

    def data_info(self) -> dict:
        """``meta["data"]``: what a reader needs to know about the data."""
        raise NotImplementedError

    def config_text(self) -> str:
        """The resolved config as the run directory's config.yaml holds it."""
        raise NotImplementedError

    def parse_stored_config(self, raw: dict):
        """A checkpoint's stored config parsed as this trainer's config (for the resume check)."""
        raise NotImplementedError

    def meta(self) -> dict:
        """The checkpoint metadata (JSON): counters, config, data and the trainer's additions."""
        normalizer = getattr(self.dataset, "normalizer", None)
        return {**({"kind": self.kind} if self.kind else {}), "step": self.step,
                "images": self.step * self.t.batch_size, "skipped_steps": self.skipped, "seconds": self.seconds,
                "config": self.config.to_dict(), "data": self.data_info(),
                "normalizer": normalizer.to_config() if normalizer is not None else None,
                "world_size": self.dist.world_size, "precision": self.precision, "torch": torch.__version__,
                "bad_streak": self.bad_streak}

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors the checkpoint holds besides the modules and the optimizer (already prefixed)."""
        return {}

    def resume(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Restore the trainer's own state from a checkpoint (the modules and optimizer are restored)."""

    def after_step(self, step: int, last: bool) -> None:
        """Called after every step, skipped ones included (``step`` counts from 1)."""

    eval_every = 0  # steps between evaluate() calls (0 = only at the end); a trainer that evaluates sets it

    def evaluate(self) -> dict | None:
        """A periodic evaluation (before the checkpoint of that step, so its metadata can hold it)."""
        return None

    def summary(self, ckpt: Path | None, picture: Path | None) -> dict:
        """What :meth:`train` returns."""
        return {"step": self.step, "skipped_steps": self.skipped, "checkpoint": ckpt, "samples": picture,
                "seconds": self.seconds, "interrupted": self.step < self.t.steps}

    def postfix(self, record: dict) -> dict:
        """Values shown next to the progress bar."""
        return {"loss": f"{record['loss']:.4f}"} if record.get("loss") is not None else {}

    # ------------------------------------------------------------------------------------------ run directory
    def _lock_run(self) -> RunLock:
        """Take the run directory's lock (rank 0 only; every rank fails if rank 0 cannot)."""
        lock, error = RunLock(self.run_dir, self.what), None
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
            if any(self.run.damaged.glob("*")):
                raise UserError(f"{self.run_dir} has only damaged checkpoints (moved to {self.run.damaged}); to "
                                f"start over, remove that folder or use a new --out directory")
            if self.dist.is_main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                self.run.write_config(self.config_text())
                self.run.metrics.unlink(missing_ok=True)
            self._same_start_on_every_process(0)
            return
        for prefix, module in self.modules.items():
            module.load_state_dict({k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")})
        self.optimizer.load_state_dict(optimizer_from_flat(tensors, meta["optimizer"]))
        self.step, self.skipped, self.seconds = int(meta["step"]), int(meta["skipped_steps"]), float(meta["seconds"])
        self.bad_streak, self.saved_step = int(meta.get("bad_streak", 0)), self.step
        self.resume(tensors, meta)
        if self.dist.is_main:
            remove_stale_temp_files(self.run_dir, self.run.config.name, self.run.metrics.name)  # left by a kill
            remove_stale_temp_files(self.run.checkpoints, "ckpt-*")
            self.run.write_config(self.config_text())
            self.run.truncate_metrics(self.step)
            self._append_metrics({"event": "resume", "step": self.step, "checkpoint": ckpt.name, "damaged": damaged})
        self.log(f"resuming {self.run_dir} from {ckpt.name} (step {self.step})")
        self._same_start_on_every_process(self.step)

    def _same_start_on_every_process(self, step: int) -> None:
        """Every process starts from the same step (also the barrier after preparing the run directory): a run
        directory that nodes see differently (not on a shared filesystem) would pair gradients of different runs."""
        if self.dist.world_size == 1:
            return
        steps = all_reduce_max(torch.tensor([step, -step], dtype=torch.long, device=self.device))
        if int(steps[0]) != -int(steps[1]):
            raise UserError(f"{self.run_dir}: the processes start from different steps ({-int(steps[1])} to "
                            f"{int(steps[0])}); every node must see the same run directory (a shared filesystem)")

    def _newest_usable_checkpoint(self) -> tuple[Path | None, dict, dict, list[str]]:
        """(newest undamaged checkpoint, its tensors and metadata, names of damaged ones moved aside).
        A readable one of another kind, config or network is an error (moving it would lose the run)."""
        damaged, new = [], self.config.to_dict()

        def attempt(ckpt: Path) -> tuple[dict, dict]:
            layout, meta = check_run_checkpoint(ckpt, resumable=True)
            if meta.get("kind") != self.kind:
                holds = "an autoencoder (train-vae)" if meta.get("kind") == "vae" else "a diffusion"
                raise UserError(f"{self.run_dir} holds {holds} run ({ckpt.name}); use a new --out directory")
            old = self.parse_stored_config(meta["config"]).to_dict()
            sections = [s for s in {**old, **new} if s not in self.free_sections]
            check_same_run(old, new, self.run_dir, ckpt, sections=sections,
                           resumable=resumable_keys(type(self.t)) | {f"data.{k}" for k in RESUMABLE_DATA_KEYS})
            check_fits(ckpt, layout, meta, {prefix + ".": m for prefix, m in self.modules.items()}, self.optimizer)
            return load_checkpoint(ckpt, self.device)

        def on_damaged(e: CheckpointDamaged) -> None:
            where = set_aside(e.path) if self.dist.is_main else self.run.damaged
            self.log(f"warning: {e}; moved it to {where} and trying the previous checkpoint")
            damaged.append(e.path.name)

        found = newest_usable(reversed(self.run.list_checkpoints()), attempt, on_damaged)
        return (found[0], *found[1], damaged) if found else (None, {}, {}, damaged)

    def _append_metrics(self, record: dict) -> None:
        self.run.append_metrics(record)
        self.tb.scalars(record)

    def save(self) -> Path:
        """Write a checkpoint for the current step (main process) and prune old ones."""
        path = self.run.checkpoint(self.step)
        if self.dist.is_main:  # a failed write raises WriteError and leaves the older ones as they were
            save_checkpoint(path, net=self.modules["net"], ema=self.modules.get("ema"), optimizer=self.optimizer,
                            meta=self.meta(), extra=self.checkpoint_tensors())
            if self.t.keep_checkpoints:
                for old in self.run.list_checkpoints()[:-self.t.keep_checkpoints]:
                    try:
                        old.unlink(missing_ok=True)
                    except OSError as e:  # not fatal: the new checkpoint is written
                        self.log(f"warning: cannot remove old checkpoint {old}: {e}")
        self.saved_step = self.step
        barrier()
        return path

    def start_from(self, states: dict[str, dict[str, torch.Tensor]], source: str) -> Path:
        """Start this new run from existing weights: ``states`` maps a checkpoint prefix (``"net"``, ``"ema"``) to
        a state dict for that module; the optimizer and step start from zero. The start is written as the step-0
        checkpoint, so a run stopped before its first checkpoint resumes from it (fine-tuning, reflow,
        distillation). A run that already has checkpoints is refused: that is resuming."""
        if self.step or self.run.list_checkpoints():
            raise UserError(f"{self.run_dir} already has checkpoints (step {self.step}): it resumes from them; "
                            f"start from {source} in a new --out directory")
        for prefix, state in states.items():
            if prefix not in self.modules:
                raise ValueError(f"no module {prefix!r} to start from; the run has {', '.join(self.modules)}")
            load_matching(self.modules[prefix], state, source)
        if self.dist.is_main:
            self._append_metrics({"event": "start_from", "step": 0, "source": source})
        return self.save()

    def _picture(self) -> Path | None:
        if not self.dist.is_main:
            return None
        path = self.picture()
        self.tb.image(path, self.step)
        return path

    # ------------------------------------------------------------------------------------------ the loop
    def train_step(self, step: int) -> tuple[object, bool]:
        """Step ``step`` (0-based): the learning rates of the schedule, then :meth:`optimizer_step`."""
        self.set_lr(step)
        return self.optimizer_step(step)

    def set_lr(self, step: int) -> None:
        """Every optimizer at its base learning rate times the schedule's factor for step ``step`` (0-based): the
        ramp-up and ``training.lr_schedule`` (:func:`~.optim.lr_factor`, a function of the step only)."""
        factor = lr_factor(self.t, step)
        for optimizer, base in zip(self.optimizers, self.base_lrs):
            for group in optimizer.param_groups:
                group["lr"] = base * factor

    def _request_stop(self, signum, frame) -> None:
        if not self.stop_requested and self.dist.is_main:
            self.log("interrupt received: finishing this step and writing a checkpoint")
        self.stop_requested = True

    def close(self) -> None:
        """Release the run directory without training (after stepping it by hand, as benchmarks and the
        configuration fit do); :meth:`train` releases it itself."""
        self.tb.close()
        self._lock.release()

    def train(self) -> dict:
        """Run until ``training.steps``; returns a summary. Ctrl-C (SIGINT) and SIGTERM (preemption)
        finish the step, checkpoint it and stop (no final evaluation or sample grid; the summary says
        ``interrupted``). Releases the run directory's lock (taken by __init__)."""
        try:
            return self._train()
        finally:
            self.tb.close()
            self._lock.release()

    def _train(self) -> dict:
        total = self.t.steps
        if self.step >= total:
            self.log(f"{self.run_dir} is already trained to step {self.step} (training.steps = {total})")
            return self.summary(self.run.latest_checkpoint(), None)
        main_thread = threading.current_thread() is threading.main_thread()
        previous = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGINT, signal.SIGTERM)
                    } if main_thread else {}
        bar = None
        if self.progress and self.dist.is_main:
            from tqdm.auto import tqdm
            bar = tqdm(total=total, initial=self.step, desc=self.label, unit="step", dynamic_ncols=True)
        stats = self.make_stats()
        stopping = False  # agreed by every process after each step: all stop after the same one
        try:
            while self.step < total and not stopping:
                t0 = time.perf_counter()
                result, applied = self.train_step(self.step)
                self.step += 1
                self.skipped += 0 if applied else 1
                self.bad_streak = 0 if applied else self.bad_streak + 1
                self.after_step(self.step, self.step == total)
                self.seconds += time.perf_counter() - t0
                stats.add(result)
                if bar is not None:
                    bar.update(1)
                if self.step % self.t.log_every == 0 or self.step == total:
                    self._log_interval(stats, bar)
                if self.t.max_bad_steps is not None and self.bad_streak >= self.t.max_bad_steps:
                    self._stop_diverged()
                stopping = self._stop_agreed()
                if self.step < total and not stopping:  # interrupted: no periodic evaluation or picture
                    if self.eval_every and self.step % self.eval_every == 0:
                        self.evaluate()  # before the checkpoint, so the checkpoint's metadata holds it
                    if self.step % self.t.checkpoint_every == 0 and not self.bad_streak:
                        self.save()  # (none during a run of skipped steps: the state has not changed)
                    if self.t.sample_every and self.step % self.t.sample_every == 0:
                        self._picture()
            if self.step < total:  # interrupted: the checkpoint only, no final evaluation or picture
                ckpt, picture = self.save(), None
            else:
                self.evaluate()
                ckpt = self.save()
                picture = self._picture()
        finally:
            if bar is not None:
                bar.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self.summary(ckpt, picture)

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
                              f"gradient (training.max_bad_steps); {self.run.checkpoint(self.saved_step).name} holds "
                              f"the last good state (step {good}); lower training.lr, or resume with a larger "
                              f"max_bad_steps")

    def _log_interval(self, stats, bar) -> None:
        reduce = (lambda acc: all_reduce_sum(acc.to(self.device)).cpu()) if self.dist.world_size > 1 else None
        interval = stats.take(reduce)
        record = {"step": self.step, "kimg": self.step * self.t.batch_size / 1000, **interval,
                  **self.lr_record(), "seconds": round(self.seconds, 3), "skipped_steps": self.skipped}
        if self.dist.is_main:
            self._append_metrics(record)
            if bar is not None:
                bar.set_postfix(**self.postfix(record), img_s=f"{record['images_per_sec']:.0f}")

    def lr_record(self) -> dict:
        """The learning rates a metrics line reports."""
        return {"lr": self.optimizers[0].param_groups[0]["lr"]}
