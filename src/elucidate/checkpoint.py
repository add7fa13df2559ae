"""Checkpoints: one safetensors file per step (network, EMA and optimizer tensors) with everything
else (step, config, optimizer hyper-parameters, data shape, normalizer) as JSON in its metadata.

Files are named ``ckpt-00001234.safetensors`` so the last in sort order is the latest, and are
written atomically (temp file, fsync, rename): a kill at any moment leaves the previous one usable.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import UserError
from .fileio import atomic_path

__all__ = ["save_checkpoint", "load_checkpoint", "list_checkpoints", "latest_checkpoint",
           "optimizer_to_flat", "optimizer_from_flat", "checkpoint_name", "FORMAT"]

FORMAT = "elucidate-checkpoint/2"  # /2: attention q/k/v and SongUNet embedding in NVlabs/edm layout
_NAME = re.compile(r"^ckpt-(\d{8,})\.safetensors$")


def checkpoint_name(step: int) -> str:
    """The file name of the checkpoint after ``step`` steps."""
    return f"ckpt-{step:08d}.safetensors"


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors and a JSON-able remainder."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.state.{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], info: dict) -> dict:
    """Rebuild an optimizer state dict from ``optimizer_to_flat``'s parts."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer.state."):
            pid, key = name[len("optimizer.state."):].split(".", 1)
            state.setdefault(int(pid), {})[key] = value
    for name, value in info.get("scalars", {}).items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": info["param_groups"]}


def save_checkpoint(path: Path, *, net: torch.nn.Module, ema: torch.nn.Module | None,
                    optimizer: torch.optim.Optimizer | None, meta: dict) -> Path:
    """Write a checkpoint atomically; ``meta`` must be JSON-serializable."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in (("net", net), ("ema", ema)):
        if module is not None:
            for name, value in module.state_dict().items():
                tensors[f"{prefix}.{name}"] = value
    meta = dict(meta, format=FORMAT)
    if optimizer is not None:
        opt_tensors, opt_info = optimizer_to_flat(optimizer)
        tensors.update(opt_tensors)
        meta["optimizer"] = opt_info
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"elucidate": json.dumps(meta)})
    return path


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint: (tensors by key, metadata). Never unpickles anything."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            raw = (f.metadata() or {}).get("elucidate")
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except UserError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise UserError(f"checkpoint {path} is not a readable safetensors file ({type(e).__name__})") from None
    if raw is None:
        raise UserError(f"checkpoint {path} has no elucidate metadata (not written by elucidate)")
    meta = json.loads(raw)
    if meta.get("format") == "elucidate-checkpoint/1":
        raise UserError(f"checkpoint {path} was written by elucidate 0.1 (format /1), whose attention and SongUNet "
                        f"embedding layouts changed to NVlabs/edm's; retrain it with this version")
    if meta.get("format") != FORMAT:
        raise UserError(f"checkpoint {path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return tensors, meta


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files in ``directory``, oldest first (temp files and strays ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name))


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest checkpoint in ``directory``, or None."""
    found = list_checkpoints(directory)
    return found[-1] if found else None
