"""The single error type of the data package, raised at dataset construction time."""
from __future__ import annotations

from ..errors import UserError

__all__ = ["DataError", "describe"]


class DataError(UserError):
    """A dataset cannot be built: missing/corrupt file, bad option, wrong shape, dtype or values.

    A ``ValueError`` (via the project's ``UserError``, which the CLI prints as one line). Messages are
    one line and name the offending file (and key, value or expectation).
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def describe(exc: BaseException) -> str:
    """A one-line description of a low-level exception, for wrapping it in a DataError."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
