"""Reading run directories without building anything: the data shape a run was trained on, and its
newest usable checkpoint (damaged ones skipped with a warning). A leaf of the package: the model
loader and the VAE tools both use it."""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import CheckpointDamaged, CheckpointWarning, check_run_checkpoint, list_checkpoints, newest_usable
from .errors import UserError

__all__ = ["DataInfo", "first_usable", "resolve_checkpoint"]


@dataclass(frozen=True)
class DataInfo:
    """What the network needs to know about the data: channels, (H, W), number of classes, channels
    of the spatial condition (0 = none) and ``(L, D)`` of the context tokens (None = none)."""

    channels: int
    resolution: tuple[int, int]
    num_classes: int = 0
    cond_channels: int = 0
    context_shape: tuple[int, int] | None = None

    def to_dict(self) -> dict:
        return {"channels": self.channels, "resolution": list(self.resolution), "num_classes": self.num_classes,
                "cond_channels": self.cond_channels,
                "context_shape": None if self.context_shape is None else list(self.context_shape)}

    @classmethod
    def from_dict(cls, d: dict) -> DataInfo:
        """Inverse of :meth:`to_dict`; metadata written before conditions existed loads as unconditioned."""
        context = d.get("context_shape")
        return cls(int(d["channels"]), tuple(int(v) for v in d["resolution"]), int(d.get("num_classes", 0)),
                   int(d.get("cond_channels", 0)), None if context is None else tuple(int(v) for v in context))

    @classmethod
    def from_dataset(cls, dataset) -> DataInfo:
        """The info of an :class:`elucidate.data.ImageDataset` (conditions included)."""
        context = getattr(dataset, "context_shape", None)
        return cls(int(dataset.channels), tuple(dataset.resolution), int(dataset.num_classes),
                   int(getattr(dataset, "cond_channels", 0)), None if context is None else tuple(context))


def _candidates(path: Path) -> tuple[list[Path], bool]:
    """(checkpoints to try, newest first; whether ``path`` is a run directory)."""
    if path.is_dir():
        found = list_checkpoints(path / "checkpoints") or list_checkpoints(path)
        if not found:
            raise UserError(f"{path} has no checkpoints (expected {path}/checkpoints/ckpt-*.safetensors)")
        return found[::-1], True
    if not path.exists():
        raise UserError(f"{path} does not exist (expected a run directory or a checkpoint file)")
    return [path], False


def first_usable(path: Path, attempt: Callable[[Path], tuple]) -> tuple:
    """``attempt(ckpt)`` (a tuple ending in the metadata) on the newest checkpoint of ``path`` that
    is not damaged. In a run directory a damaged one is skipped with a :class:`CheckpointWarning`
    (and left in place: readers never move files); a damaged file named explicitly is an error."""
    candidates, is_run = _candidates(path)
    damaged: list[CheckpointDamaged] = []

    def on_damaged(error: CheckpointDamaged) -> None:
        if not is_run:
            raise error
        damaged.append(error)

    found = newest_usable(candidates, attempt, on_damaged)
    if found is None:
        raise UserError(f"{path} has no usable checkpoint: {damaged[0] if damaged else 'they all vanished'}"
                        + (f" (and {len(damaged) - 1} older ones are damaged too)" if len(damaged) > 1 else ""))
    ckpt, result = found
    if damaged:  # warn_explicit without a source line: the warning prints as one line
        warnings.warn_explicit(f"{'; '.join(str(e) for e in damaged)}; using {ckpt.name} (step "
                               f"{result[-1]['step']}), the newest usable checkpoint", CheckpointWarning,
                               "elucidate", 0)
    return result


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint file from a run directory (its newest undamaged one, see ``load_run``) or a
    checkpoint path (checked to be a readable checkpoint)."""
    return first_usable(Path(path), lambda c: (c, check_run_checkpoint(c)[1]))[0]
