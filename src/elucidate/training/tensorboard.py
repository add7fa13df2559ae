"""Optional TensorBoard mirror of a run's log (``training.tensorboard: true``): the scalars of every
metrics.jsonl line and every sample grid, as event files in ``RUN/tensorboard`` (main process only)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

__all__ = ["TensorBoardLog"]

#: metrics.jsonl fields written as scalars (loss_by_sigma is written per bin as loss_by_sigma/<edge>).
SCALARS = ("loss", "lr", "images_per_sec", "skipped_steps")


class TensorBoardLog:
    """Writes to ``folder`` (a run's ``RUN/tensorboard``) when ``enabled``; a no-op otherwise. The writer is opened on
    first use; on resume with ``purge_step`` = the first step redone, so the resumed run replaces what
    followed its checkpoint (as metrics.jsonl does)."""

    def __init__(self, folder: Path, enabled: bool):
        self.folder, self.enabled, self.writer = Path(folder), enabled, None

    def _open(self, step: int):
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(self.folder), purge_step=step)
        return self.writer

    def scalars(self, record: dict) -> None:
        """A metrics.jsonl record with a ``step``: its numeric training fields (a ``resume`` record opens
        the writer at the resumed step)."""
        if not self.enabled or "step" not in record:
            return
        if record.get("event") == "resume":  # events after the checkpoint's step are redone: purge them
            self._open(record["step"] + 1)  # the first step that is redone
            return
        if "loss" not in record:
            return
        writer, step = self._open(record["step"]), record["step"]
        for key in SCALARS:
            value = record.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                writer.add_scalar(f"train/{key}", value, step)
        for lo, value in zip(record.get("sigma_edges", []), record.get("loss_by_sigma", [])):
            if value is not None:
                writer.add_scalar(f"loss_by_sigma/sigma>={lo:.3g}", value, step)
        writer.flush()

    def image(self, path: Path, step: int) -> None:
        """A sample grid PNG."""
        if not self.enabled or path is None:
            return
        from PIL import Image

        pixels = np.asarray(Image.open(path).convert("RGB"))
        self._open(step).add_image("samples", pixels, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
