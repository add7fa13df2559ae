"""User-facing errors: the CLI prints these as one line (no traceback) and exits non-zero.

May import: nothing.
"""
from __future__ import annotations

__all__ = ["UserError", "ConfigError"]


class UserError(ValueError):
    """A problem with the user's input (file, key, value) rather than a bug."""


class ConfigError(UserError):
    """An invalid configuration: names the key, the value and what was expected."""
