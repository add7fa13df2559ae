"""Post-hoc EMA during training (EDM2 sec. 3): the run's :class:`~.phema.PowerEMA` tracker, its
checkpoint tensors (``phema.*``) and its snapshots in ``RUN/phema/``."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .phema import PowerEMA, save_snapshot, snapshot_name

__all__ = ["PREFIX", "RunPowerEMA"]

#: prefix of the tracker's tensors in a checkpoint.
PREFIX = "phema."


class RunPowerEMA:
    """The power EMA of a run configured by ``training.ema`` (a validated dict); with ``ema=None`` every
    method does nothing (the run has no power EMA and its checkpoints no ``phema.*`` tensors)."""

    def __init__(self, net: nn.Module, ema: dict | None, run_dir: Path, is_main: bool = True) -> None:
        self.tracker = PowerEMA(net, ema["stds"]) if ema else None
        self.every = int(ema["snapshot_every"]) if ema else 0
        self.folder, self.is_main = Path(run_dir) / "phema", is_main

    def after_step(self, net: nn.Module, step: int, last: bool = False) -> Path | None:
        """Fold in the weights after optimizer step ``step`` (1-based, skipped steps too: t = step, as
        :class:`PowerEMA` expects); write a snapshot every ``snapshot_every`` steps and at the last one."""
        if self.tracker is None:
            return None
        self.tracker.update(net, float(step))
        return self.maybe_snapshot(step, last)

    def maybe_snapshot(self, step: int, last: bool = False) -> Path | None:
        """Write ``phema/phema-XXXXXXXX.safetensors`` every ``snapshot_every`` steps and at ``last`` (rank 0)."""
        if self.tracker is None or not self.is_main or step <= 0 or not (step % self.every == 0 or last):
            return None
        path = self.folder / snapshot_name(step)
        if path.exists():
            return path
        self.folder.mkdir(parents=True, exist_ok=True)
        return save_snapshot(path, self.tracker, step)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """The tracker's state as checkpoint tensors named ``phema.*`` (none without a tracker)."""
        if self.tracker is None:
            return {}
        return {PREFIX + k: v for k, v in self.tracker.state_dict().items()}

    def resume(self, tensors: dict[str, torch.Tensor], step: int) -> None:
        """Restore from a checkpoint's ``phema.*`` tensors (bit-exact); drop snapshots after ``step``."""
        if self.tracker is None:
            return
        self.tracker.load_state_dict({k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)})
        self.drop_snapshots_after(step)

    def drop_snapshots_after(self, step: int) -> None:
        """Remove snapshots newer than the checkpoint being resumed (they are rewritten identically)."""
        if self.is_main and self.folder.is_dir():
            for p in self.folder.glob("phema-*.safetensors"):
                if p.stem[6:].isdigit() and int(p.stem[6:]) > step:
                    p.unlink(missing_ok=True)
