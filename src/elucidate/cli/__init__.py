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
import os
import sys
import warnings

__all__ = ["main", "build_parser", "COMMAND_MODULES"]

#: The command modules, in the order their commands appear in ``elucidate --help``.
COMMAND_MODULES = ("train", "demo", "sample", "evaluate", "tune", "reports", "interop", "phema", "distill", "data")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit status 2) and help that shows every option's default (the
    subcommands' parsers are of this class too)."""

    def __init__(self, *args, **kwargs):
        from .options import HelpFormatter

        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _build(modules=COMMAND_MODULES) -> tuple[argparse.ArgumentParser, dict]:
    from .. import __version__

    parser = _Parser(prog="elucidate", description="Diffusion models on the EDM design space.",
                     epilog="`elucidate COMMAND --help` describes a command's options (docs/cli.md)")
    parser.add_argument("--version", action="version", version=f"elucidate {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    handlers: dict = {}
    for name in modules:
        handlers.update(importlib.import_module(f"{__name__}.{name}").register(sub))
    for choice in sub._choices_actions:  # a command's --help starts with what it does
        command = sub.choices[choice.dest]
        if command.description is None:
            command.description = choice.help
    return parser, handlers


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    return _build()[0]


def _ours(category, filename) -> bool:
    """Whether a warning is elucidate's own: of a category it defines, or raised by its code (a filename inside
    the package, or the bare name ``elucidate`` of ``warnings.warn_explicit``)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if getattr(category, "__module__", "").partition(".")[0] == "elucidate" or filename == "elucidate":
        return True
    try:
        return os.path.commonpath([package, os.path.abspath(filename)]) == package
    except ValueError:  # another drive, or not a path
        return False


def _one_line_warnings(command: str, default):
    """``warnings.showwarning`` for a command: elucidate's own warnings as one line "elucidate COMMAND: warning:
    ..."; anybody else's (torch's, numpy's ...) through ``default``, as Python shows them."""
    def show(message, category, filename, lineno, file=None, line=None):
        if _ours(category, filename):
            print(f"elucidate {command}: warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)
    return show


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``elucidate`` console script."""
    from ..data import DataError
    from ..errors import UserError

    parser, handlers = _build()
    args = parser.parse_args(argv)
    if "device" in vars(args) and args.device is None:  # one default device for every command (docs/cli.md)
        from ..runtime.distributed import pick_device

        args.device = str(pick_device(None, int(os.environ.get("LOCAL_RANK", "0"))))
    previous = warnings.showwarning
    warnings.showwarning = _one_line_warnings(args.command, previous)
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
