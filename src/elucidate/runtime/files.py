"""Atomic file writes: a temp file in the target folder, fsync, then rename. A crash or kill at any
moment leaves either the old file or the new one, never a half-written one.

A write that fails (full disk, read-only folder, quota, I/O error) removes its temp file and raises
:class:`WriteError`, one line naming the target and the OS error, e.g. ``cannot write
RUN/checkpoints/ckpt-00000500.safetensors: [Errno 28] No space left on device``. It is both a
:class:`~elucidate.errors.UserError` (the CLI prints it without a traceback) and an ``OSError``.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import UserError

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "append_text", "remove_stale_temp_files",
           "WriteError"]


class WriteError(UserError, OSError):
    """Writing ``path`` failed; the message names the path and the OS error."""

    def __init__(self, path: str | os.PathLike, error: BaseException):
        code = getattr(error, "errno", None)
        reason = f"[Errno {code}] {error.strerror}" if code and getattr(error, "strerror", None) else str(error)
        self.message = f"cannot write {path}: {reason}"
        super().__init__(self.message)
        self.errno, self.strerror, self.filename = code, getattr(error, "strerror", None), str(path)

    def __str__(self) -> str:  # not OSError's "[Errno N] reason: 'filename'"
        return self.message


# safetensors (>= 0.7, Rust ``tempfile``) writes through its own ``.tmpXXXXXX`` file in the target's
# folder before the rename into our temp path: a kill at that moment leaves one behind
SAFETENSORS_TEMP = ".tmp" + "?" * 6


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_directory(directory: Path) -> None:
    """Make a rename durable (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` (with the usual
    umask permissions), on error it is removed (an ``OSError`` becomes a :class:`WriteError`).
    ``suffix`` helps writers that insist on one."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + suffix)
        os.close(fd)
        yield Path(tmp)
        os.chmod(tmp, _default_mode())  # mkstemp creates 0600
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_directory(path.parent)
    except OSError as e:
        if isinstance(e, WriteError):
            raise
        raise WriteError(path, e) from e
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def remove_stale_temp_files(directory: str | os.PathLike, *name_globs: str) -> list[Path]:
    """Remove the temp files that :func:`atomic_path` (and safetensors inside it) left in ``directory``
    for targets matching ``name_globs`` (only a killed process leaves any); returns them. Call it only while no other
    process can be writing those targets (e.g. holding the run lock)."""
    directory = Path(directory)
    globs = [f".{g}.*.tmp*" for g in name_globs] + [SAFETENSORS_TEMP]
    found = sorted({p for g in globs for p in directory.glob(g) if p.is_file()})
    for path in found:
        path.unlink(missing_ok=True)
    return found


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append ``text`` (whole lines) to ``path``. If the file ends in a partial line (a crash
    mid-append) a newline is added first, so the new lines stay readable; if the write fails the
    file is cut back to its old length and a :class:`WriteError` is raised."""
    path = Path(path)
    try:
        f = open(path, "ab+", buffering=0)
    except OSError as e:
        raise WriteError(path, e) from e
    with f:
        size = f.seek(0, os.SEEK_END)
        try:
            if size:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    text = "\n" + text
            data = memoryview(text.encode("utf-8"))
            while data:  # unbuffered: a short write is possible, and nothing is left to flush on error
                data = data[f.write(data):]
        except OSError as e:
            with contextlib.suppress(OSError):
                f.truncate(size)
            raise WriteError(path, e) from e
