"""The ``elucidate`` command line: one module per command group, sharing :mod:`.options` (flags derived from the
declarations); :mod:`.docs` writes the generated tables of the docs.

User errors (bad config, missing files, bad data) print one line and exit with status 2; no
traceback. Everything else is a bug and keeps its traceback. A command module exposes
``register(subparsers) -> {command: handler}``; adding a command group = one module + one entry in
:data:`COMMAND_MODULES`.

May import: anything.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import warnings

__all__ = ["main", "build_parser", "COMMAND_MODULES"]

#: The command modules, in the order their commands appear in ``elucidate --help``.
COMMAND_MODULES = ("train", "demo", "sample", "evaluate", "tune", "reports", "interop", "phema")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _build(modules=COMMAND_MODULES) -> tuple[argparse.ArgumentParser, dict]:
    parser = _Parser(prog="elucidate", description="Diffusion models on the EDM design space.")
    sub = parser.add_subparsers(dest="command", required=True)
    handlers: dict = {}
    for name in modules:
        handlers.update(importlib.import_module(f"{__name__}.{name}").register(sub))
    return parser, handlers


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    return _build()[0]


def _one_line_warnings(command: str):
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"elucidate {command}: warning: {message}", file=sys.stderr)
    return show


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``elucidate`` console script."""
    from ..data import DataError
    from ..errors import UserError

    parser, handlers = _build()
    args = parser.parse_args(argv)
    previous = warnings.showwarning
    warnings.showwarning = _one_line_warnings(args.command)
    try:
        return handlers[args.command](args) or 0
    except (UserError, DataError) as e:
        print(f"elucidate {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"elucidate {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = previous
