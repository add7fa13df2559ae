"""Evaluation commands of the CLI (eval, ref, sweep, plot, report)."""
from __future__ import annotations

__all__ = ["add_eval_commands", "EVAL_HANDLERS"]

EVAL_HANDLERS: dict = {}


def add_eval_commands(sub, add_sampling_options) -> None:
    """Register the evaluation subcommands on ``sub``."""
