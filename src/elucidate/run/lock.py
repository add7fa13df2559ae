"""One writer per run directory: an exclusive OS lock on ``RUN/.lock``.

The lock is ``fcntl.flock`` on the open lock file, so the kernel drops it when the holder exits in
any way (SIGKILL and crashes included): there is never a stale lock to clean up. The file holds the
holder's pid, host, command and start time (JSON) so a refused writer can say who has the run; it
is removed when the holder releases the lock normally, and a file left by a killed holder is simply
reused. Readers (sample, eval, report) never take the lock: every file a writer produces appears
atomically (:mod:`elucidate.runtime.files`), so they never see half-written files.

Platforms without ``fcntl`` (Windows) and filesystems that refuse ``flock`` run unlocked with a
:class:`RunLockWarning`: there a second writer is not detected.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import socket
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

from ..errors import UserError
from .rundir import RunDir

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["RunLock", "RunLocked", "RunLockWarning", "run_lock"]


class RunLocked(UserError):
    """Another process holds the run directory's lock."""


class RunLockWarning(UserWarning):
    """The run directory could not be locked (no fcntl, or the filesystem refuses flock)."""


def _describe(run_dir: Path, text: str) -> str:
    try:
        info = json.loads(text)
        holder = (f"{info.get('what', 'a writer')} (pid {info.get('pid')} on {info.get('host')}, "
                  f"since {info.get('started')}: {info.get('command')})")
    except (ValueError, AttributeError):
        holder = "another process"
    return f"{run_dir} is in use by {holder}; wait for it to finish or stop it, or use another output directory"


def _command() -> str:
    """This process's command line (``elucidate train ...`` for ``python -m elucidate train ...``)."""
    prog = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("python")
    name = prog.parent.name if prog.name == "__main__.py" else prog.name
    return " ".join([name, *sys.argv[1:]])


class RunLock:
    """The exclusive lock of ``run_dir`` for a writer doing ``what`` (e.g. "training").

    ``acquire()`` raises :class:`RunLocked` at once if another process holds it (also another
    ``RunLock`` in this process); ``release()`` is idempotent. Also a context manager.
    """

    def __init__(self, run_dir: str | os.PathLike, what: str = "training"):
        self.run_dir, self.what = Path(run_dir), what
        self.path = RunDir(self.run_dir).lock
        self._fd: int | None = None
        self._pid = 0
        self.created = False  # acquire() made the directory: release() removes it if it is still empty

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        if self._fd is not None:
            return self
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise UserError(f"{self.run_dir} is a file; expected a run directory (an existing one is resumed)")
        self.created = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if fcntl is None:  # pragma: no cover - Windows
            warnings.warn(f"{self.run_dir} is not locked: locking run directories needs fcntl (POSIX); "
                          f"make sure no other process writes to it", RunLockWarning, stacklevel=2)
            return self
        for _ in range(100):  # retried only if the holder removed the file while we waited for it
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.pread(fd, 4096, 0).decode("utf-8", errors="replace")
                os.close(fd)
                raise RunLocked(_describe(self.run_dir, text)) from None
            except OSError as e:  # e.g. ENOLCK / EOPNOTSUPP on some network or FUSE filesystems
                os.close(fd)
                warnings.warn(f"{self.run_dir} is not locked: the filesystem refused flock ({e}); "
                              f"make sure no other process writes to it", RunLockWarning, stacklevel=2)
                return self
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:  # pragma: no cover - only if the file is deleted under us 100 times in a row
            raise RunLocked(f"{self.run_dir}: could not lock {self.path} (it keeps disappearing)")
        info = {"what": self.what, "pid": os.getpid(), "host": socket.gethostname(),
                "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                "command": _command()[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
        self._fd, self._pid = fd, os.getpid()
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if self._pid == os.getpid():  # not in a forked child: the parent still holds the lock
            with contextlib.suppress(OSError):
                self.path.unlink()  # while still holding the lock; a waiter that opened it retries
            if self.created:  # a writer that failed before writing anything leaves no empty run behind
                with contextlib.suppress(OSError):
                    self.run_dir.rmdir()
        os.close(fd)  # drops the flock (once no other descriptor shares it)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:  # a forgotten lock is released with its owner
        with contextlib.suppress(Exception):
            self.release()


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike, what: str = "training") -> Iterator[RunLock]:
    """Hold the exclusive lock of ``run_dir`` for the ``with`` block (see :class:`RunLock`)."""
    lock = RunLock(run_dir, what).acquire()
    try:
        yield lock
    finally:
        lock.release()
