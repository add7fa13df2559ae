"""The tables of the README and docs/ that are generated from the declarations (samplers, schedules,
formulations, networks, metrics, commands, every config key), so they cannot drift from the code.

A generated block in a Markdown file sits between ``<!-- generated: NAME -->`` and ``<!-- end generated -->``;
``python -m elucidate.cli.docs`` rewrites every block of README.md and docs/*.md, ``--check`` only lists the
files whose blocks are out of date (a test runs it).
"""
from __future__ import annotations

import argparse
import inspect
import re
import sys
from collections.abc import Callable
from pathlib import Path

from ..config.docs import config_docs, sampler_table, schedule_table
from ..data.build import DATASETS
from ..evaluation import METRICS
from ..formulations import FORMULATIONS
from ..nets import PRESETS
from ..params import describe
from ..sampling import SAMPLERS, SCHEDULES

__all__ = ["BLOCKS", "render", "update_docs", "main"]

_BLOCK = re.compile(r"(<!-- generated: ([a-z-]+) -->\n)(.*?)(<!-- end generated -->)", re.S)


def _first_sentence(obj) -> str:
    """The first sentence of a docstring, in Markdown."""
    text = " ".join((inspect.getdoc(obj) or "").split("\n\n")[0].split())
    return re.split(r"(?<=[.:;])\s", text)[0].rstrip(".:;").replace("``", "`")


def _names(names) -> str:
    return ", ".join(f"`{n}`" for n in names)


def _formulations() -> str:
    rows = ["| type | parameters | description |", "|---|---|---|"]
    for name, cls in FORMULATIONS.items():
        params = ", ".join(p.name for p in describe(cls))
        rows.append(f"| `{name}` | {params} | {cls.description or _first_sentence(cls)} |")
    return "\n".join(rows)


def _networks() -> str:
    rows = ["| arch | class | preset | description |", "|---|---|---|---|"]
    for arch, (cls, preset) in PRESETS.items():
        args = ", ".join(f"{k}={v}" for k, v in preset.items()) or "-"
        rows.append(f"| `{arch}` | `{cls.__name__}` | {args} | {_first_sentence(cls)} |")
    return "\n".join(rows)


def _metrics() -> str:
    rows = ["| metric | features | default for | description |", "|---|---|---|---|"]
    for name, metric in METRICS.items():
        fits = ", ".join(f"`{d}` runs" for d in metric.datasets) or "-"
        rows.append(f"| `{name}` | {metric.features or 'the dataset default'} | {fits} | {metric.description} |")
    return "\n".join(rows)


def _commands() -> str:
    from . import build_parser

    sub = build_parser()._subparsers._group_actions[0]
    rows = ["| command | what it does |", "|---|---|"]
    rows += [f"| `elucidate {action.dest}` | {action.help} |" for action in sub._choices_actions]
    return "\n".join(rows)


def _registry() -> str:
    """One line per kind of registered part (the README's summary)."""
    return "\n".join([
        "| part | registered (one declaration each; see [extending](docs/extending.md)) |", "|---|---|",
        f"| formulations | {_names(FORMULATIONS)} |",
        f"| samplers | {_names(SAMPLERS)} |",
        f"| schedules | {_names(SCHEDULES)} |",
        f"| networks | {_names(PRESETS)} |",
        f"| datasets | {_names(DATASETS)} |",
        f"| metrics | {_names(METRICS)} |",
    ])


#: block name -> its Markdown.
BLOCKS: dict[str, Callable[[], str]] = {
    "config": lambda: config_docs(markdown=True).strip(),
    "samplers": lambda: "\n".join(sampler_table(markdown=True)),
    "schedules": lambda: "\n".join(schedule_table(markdown=True)),
    "formulations": _formulations,
    "networks": _networks,
    "metrics": _metrics,
    "commands": _commands,
    "registry": _registry,
}


def render(text: str, where: str = "") -> str:
    """``text`` with every generated block rewritten (ValueError naming an unknown block)."""
    def fill(match: re.Match) -> str:
        name = match.group(2)
        if name not in BLOCKS:
            raise ValueError(f"{where}: unknown generated block {name!r}; expected one of {sorted(BLOCKS)}")
        return match.group(1) + BLOCKS[name]().rstrip() + "\n" + match.group(4)
    return _BLOCK.sub(fill, text)


def update_docs(root: str | Path, *, check: bool = False) -> list[Path]:
    """Rewrite the generated blocks of ``root``/README.md and ``root``/docs/*.md; returns the files that were
    out of date (with ``check``, nothing is written)."""
    root = Path(root)
    stale = []
    for path in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        if not path.is_file():
            continue
        text = path.read_text()
        new = render(text, str(path))
        if new != text:
            stale.append(path)
            if not check:
                path.write_text(new)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m elucidate.cli.docs", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", nargs="?", default=".", help="the repository (README.md and docs/)")
    parser.add_argument("--check", action="store_true", help="only list the files that are out of date")
    args = parser.parse_args(argv)
    stale = update_docs(args.root, check=args.check)
    for path in stale:
        print(f"{'out of date' if args.check else 'wrote'}: {path}")
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
