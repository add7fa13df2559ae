"""Checkpoints: one safetensors file per step (network, EMA and optimizer tensors) with everything
else (step, config, optimizer hyper-parameters, data shape, normalizer) as JSON in its metadata.

Files are named ``ckpt-00001234.safetensors`` so the last in sort order is the latest, and are
written atomically (temp file, fsync, rename): a kill at any moment leaves the previous one usable.
The metadata carries a CRC-32 of the tensor data, so a file damaged later (truncated copy, bad
disk) is recognised: :class:`CheckpointDamaged` says why, and callers fall back to an older one.
"""
from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import UserError
from ..runtime.files import atomic_path

__all__ = ["save_checkpoint", "load_checkpoint", "list_checkpoints", "latest_checkpoint",
           "optimizer_to_flat", "optimizer_from_flat", "checkpoint_name", "FORMAT", "CheckpointDamaged",
           "CheckpointWarning", "read_header", "check_run_checkpoint", "check_fits", "set_aside", "newest_usable",
           "DAMAGED_DIR"]

FORMAT = "elucidate-checkpoint/2"  # /2: attention q/k/v and SongUNet embedding in NVlabs/edm layout
_NAME = re.compile(r"^ckpt-(\d{8,})\.safetensors$")
#: Sub-folder of ``checkpoints/`` where a resumed run moves damaged checkpoints (never deleted).
DAMAGED_DIR = "damaged"
_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}
Layout = dict[str, tuple[tuple[int, ...], str]]
T = TypeVar("T")


class CheckpointWarning(UserWarning):
    """A damaged checkpoint was skipped in favour of an older one."""


class CheckpointDamaged(UserError):
    """A checkpoint file that cannot be used as written: unreadable, truncated, bad metadata."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"checkpoint {path} is damaged: {reason}")
        self.path, self.reason = Path(path), reason


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
                    optimizer: torch.optim.Optimizer | None, meta: dict,
                    extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a checkpoint atomically; ``meta`` must be JSON-serializable; ``extra`` tensors are stored
    under their own (already prefixed) names, e.g. ``phema.*``."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in (("net", net), ("ema", ema)):
        if module is not None:
            for name, value in module.state_dict().items():
                tensors[f"{prefix}.{name}"] = value
    tensors.update(extra or {})
    meta = dict(meta, format=FORMAT)
    if optimizer is not None:
        opt_tensors, opt_info = optimizer_to_flat(optimizer)
        tensors.update(opt_tensors)
        meta["optimizer"] = opt_info
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    meta["crc32"] = _crc32(tensors)
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata={"elucidate": json.dumps(meta)})
        except SafetensorError as e:  # its I/O errors are not OSErrors: recover the errno
            found = re.search(r"os error (\d+)", str(e))
            if found is None:
                raise
            code = int(found.group(1))
            raise OSError(code, os.strerror(code)) from None
    return path


def _crc32(tensors: dict[str, torch.Tensor]) -> int:
    """CRC-32 of the names and raw bytes of ``tensors`` (CPU, contiguous), in key order."""
    crc = 0
    for key in sorted(tensors):
        crc = zlib.crc32(key.encode("utf-8"), crc)
        crc = zlib.crc32(tensors[key].reshape(-1).view(torch.uint8).numpy(), crc)
    return crc


def read_header(path: Path) -> tuple[Layout, dict]:
    """(every tensor's shape and safetensors dtype by key, metadata) without reading the data.

    Raises :class:`CheckpointDamaged` if the file is not a complete safetensors file with JSON
    elucidate metadata, a plain ``UserError`` if it is missing or of another checkpoint format."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = (f.metadata() or {}).get("elucidate")
            layout = {}
            for key in f.keys():
                part = f.get_slice(key)
                layout[key] = (tuple(part.get_shape()), part.get_dtype())
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointDamaged(path, f"not a complete safetensors file ({_brief(e)})") from None
    if raw is None:
        raise CheckpointDamaged(path, "no elucidate metadata (not written by elucidate?)")
    try:
        meta = json.loads(raw)
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise CheckpointDamaged(path, "its metadata is not a JSON object")
    if meta.get("format") == "elucidate-checkpoint/1":
        raise UserError(f"checkpoint {path} was written by elucidate 0.1 (format /1), whose attention and SongUNet "
                        f"embedding layouts changed to NVlabs/edm's; retrain it with this version")
    if meta.get("format") != FORMAT:
        raise UserError(f"checkpoint {path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return layout, meta


def check_run_checkpoint(path: Path, *, resumable: bool = False) -> tuple[Layout, dict]:
    """:func:`read_header` plus what a run's checkpoint must hold: an integer ``step`` that matches
    the file name, a ``config`` and a ``data`` description (and, if ``resumable``, the optimizer
    state and counters training resumes from). Raises :class:`CheckpointDamaged`."""
    layout, meta = read_header(path)
    step = meta.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointDamaged(path, f"its metadata has no valid step ({step!r})")
    for key in ("config", "data") + (("optimizer", "skipped_steps", "seconds") if resumable else ()):
        if meta.get(key) is None:
            raise CheckpointDamaged(path, f"its metadata has no {key!r}")
    named = _NAME.match(Path(path).name)
    if named and int(named.group(1)) != step:
        raise CheckpointDamaged(path, f"it holds step {step}, not the step {int(named.group(1))} of its name")
    return layout, meta


def check_fits(path: Path, layout: Layout, meta: dict, modules: dict[str, torch.nn.Module],
               optimizer: torch.optim.Optimizer | None = None) -> None:
    """Check that the tensors of a checkpoint (its :func:`read_header` layout) have the names,
    shapes and dtypes of ``modules`` (by key prefix, e.g. ``{"net.": net, "ema.": ema}``) and of
    ``optimizer``'s state; raise a one-line ``UserError`` naming the first mismatch (a network
    that changed since the run was trained, not a damaged file)."""
    def fail(problem: str) -> None:
        raise UserError(f"checkpoint {path} does not fit the configured network: {problem} "
                        f"(was the network config or code changed since it was written?)")

    for prefix, module in modules.items():
        expected = {prefix + k: (tuple(v.shape), _DTYPES.get(v.dtype, str(v.dtype)))
                    for k, v in module.state_dict().items()}
        found = {k: v for k, v in layout.items() if k.startswith(prefix)}
        missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        if missing or unexpected:
            fail(f"{len(missing)} tensors missing (e.g. {missing[:2]}), {len(unexpected)} unexpected "
                 f"(e.g. {unexpected[:2]})")
        for key, (shape, dtype) in expected.items():
            if found[key] != (shape, dtype):
                fail(f"{key} is {_fmt(found[key])}, the network has {_fmt((shape, dtype))}")
    if optimizer is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        groups = (meta.get("optimizer") or {}).get("param_groups")
        if not isinstance(groups, list) or sum(len(g.get("params", [])) for g in groups) != len(params):
            fail(f"its optimizer state does not cover the {len(params)} parameters of the network")
        for key, (shape, dtype) in layout.items():
            if not key.startswith("optimizer.state."):
                continue
            pid = key[len("optimizer.state."):].split(".", 1)[0]
            if not pid.isdigit() or int(pid) >= len(params):
                fail(f"{key} belongs to no parameter")
            p = params[int(pid)]
            want = (tuple(p.shape), _DTYPES.get(p.dtype, str(p.dtype)))
            if shape and (shape, dtype) != want:
                fail(f"{key} is {_fmt((shape, dtype))}, its parameter is {_fmt(want)}")


def _fmt(entry: tuple[tuple[int, ...], str]) -> str:
    return f"{list(entry[0])} {entry[1]}"


def _brief(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    text = text.removeprefix("Error while deserializing header: ")  # safetensors' wording
    return text or type(e).__name__


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint: (tensors by key, metadata), the data checked against its CRC-32 (if the
    file has one). Raises :class:`CheckpointDamaged` for a damaged file. Never unpickles anything."""
    path = Path(path)
    _, meta = read_header(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:
        raise CheckpointDamaged(path, f"its tensor data cannot be read ({_brief(e)})") from None
    if "crc32" in meta and _crc32(tensors) != meta["crc32"]:
        raise CheckpointDamaged(path, "its tensor data does not match the CRC-32 in its metadata")
    if torch.device(device).type != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
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


def set_aside(path: Path) -> Path:
    """Move a damaged checkpoint into ``checkpoints/damaged/`` (never deleting anything); returns
    its new path."""
    path = Path(path)
    folder = path.parent / DAMAGED_DIR
    folder.mkdir(exist_ok=True)
    target, n = folder / path.name, 1
    while target.exists():
        target, n = folder / f"{path.name}.{n}", n + 1
    os.replace(path, target)
    return target


def newest_usable(candidates: Iterable[Path], attempt: Callable[[Path], T],
                  on_damaged: Callable[[CheckpointDamaged], None]) -> tuple[Path, T] | None:
    """``(ckpt, attempt(ckpt))`` for the first of ``candidates`` (newest first) that ``attempt``
    does not find damaged, or None. Each :class:`CheckpointDamaged` goes to ``on_damaged`` (which
    may move the file aside); a file that disappeared meanwhile (pruned by a running trainer, moved
    by another process) is skipped; other errors propagate."""
    for ckpt in candidates:
        try:
            return ckpt, attempt(ckpt)
        except CheckpointDamaged as e:
            if Path(ckpt).exists():
                on_damaged(e)
        except UserError:
            if Path(ckpt).exists():
                raise
    return None
