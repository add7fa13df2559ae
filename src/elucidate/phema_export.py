"""Post-hoc EMA of a trained run (EDM2 Algorithm 3): reconstruct the EMA of any relative std from
the run's ``RUN/phema/`` snapshots and write it as a checkpoint that ``sample`` / ``eval`` load."""
from __future__ import annotations

import numbers
from pathlib import Path

from .checkpoint import read_header, save_checkpoint
from .errors import UserError
from .training.phema import MAX_SIGMA_REL, list_snapshots, read_snapshot_info, reconstruct

__all__ = ["check_std", "ema_checkpoint", "ema_file_name", "write_ema_checkpoint"]


def check_std(std: float) -> float:
    """``std`` if it is a valid relative EMA std, else a one-line UserError."""
    if isinstance(std, bool) or not isinstance(std, numbers.Real) or not 0 < std < MAX_SIGMA_REL:
        raise UserError(f"EMA std {std!r} must be in (0, {MAX_SIGMA_REL:.4f}) (EDM2's sigma_rel)")
    return float(std)


def ema_file_name(std: float) -> str:
    """Default file name of the reconstructed EMA with relative std ``std``: ``ema-0.070.safetensors``."""
    return f"ema-{std:.3f}.safetensors"


def _snapshots(run: Path) -> list[Path]:
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"{run} is not a run directory (post-hoc EMA needs the run's phema/ snapshots)")
    snaps = list_snapshots(run / "phema")
    if not snaps:
        raise UserError(f"{run} has no power EMA snapshots in {run / 'phema'} (train with training.ema: "
                        f"{{type: power, stds: [0.05, 0.10]}})")
    return snaps


def write_ema_checkpoint(run: str | Path, std: float, out: str | Path | None = None) -> Path:
    """Reconstruct the EMA of relative std ``std`` at the run's last snapshot and write it as a
    checkpoint (``ema.*`` and ``net.*`` = the reconstruction; config, data and normalizer of the run's
    latest checkpoint); default ``RUN/phema/ema-{std:.3f}.safetensors``."""
    from .model import load_run

    run, std = Path(run), check_std(std)
    snaps = _snapshots(run)
    last = read_snapshot_info(snaps[-1])
    state = reconstruct(snaps, std)
    loaded = load_run(run, ema=True)
    net = loaded.denoiser.net
    missing = set(net.state_dict()) ^ set(state)
    if missing:
        raise UserError(f"the snapshots in {run / 'phema'} do not fit the run's network (e.g. {sorted(missing)[:2]})")
    net.load_state_dict(state)
    _, meta = read_header(loaded.checkpoint)
    meta = {k: v for k, v in meta.items() if k not in ("optimizer", "crc32", "format")}
    meta.update(step=last.step, phema={"std": std, "snapshot_step": last.step, "snapshots": len(snaps)})
    path = Path(out) if out is not None else run / "phema" / ema_file_name(std)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(path, net=net, ema=net, optimizer=None, meta=meta)


def ema_checkpoint(run: str | Path, std: float) -> Path:
    """The cached reconstruction ``RUN/phema/ema-{std:.3f}.safetensors`` if it is up to date with the
    run's last snapshot, else a fresh one."""
    run, std = Path(run), check_std(std)
    last = read_snapshot_info(_snapshots(run)[-1])
    path = run / "phema" / ema_file_name(std)
    if path.is_file():
        try:
            cached = read_header(path)[1].get("phema") or {}
        except Exception:  # damaged cache: rebuild it
            cached = {}
        if cached.get("snapshot_step") == last.step and cached.get("std") == std:
            return path
    return write_ema_checkpoint(run, std)
