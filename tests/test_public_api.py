"""What users had before the restructure still works: every public name (the ``__all__`` of the packages, recorded
at commit 071d25e in tests/fixtures/public_names_071d25e.json) and every CLI verb and flag (cli_flags_071d25e.json)."""
from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path

import pytest

from elucidate.cli import _build

FIXTURES = Path(__file__).resolve().parent / "fixtures"
NAMES = json.loads((FIXTURES / "public_names_071d25e.json").read_text())


@pytest.mark.parametrize("module", sorted(NAMES))
def test_every_public_name_of_before_is_still_importable_there(module):
    package = importlib.import_module(module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # renamed names (sampler/solver, elucidate.UNet) warn
        missing = [name for name in NAMES[module] if not hasattr(package, name)]
    assert missing == []


def test_every_cli_verb_and_flag_of_before_still_parses():
    before = json.loads((FIXTURES / "cli_flags_071d25e.json").read_text())
    verbs = next(a.choices for a in _build()[0]._actions if isinstance(getattr(a, "choices", None), dict))
    now = {verb: {s for a in p._actions for s in a.option_strings} for verb, p in verbs.items()}
    assert set(before) <= set(now)
    assert {verb: sorted(set(flags) - now[verb]) for verb, flags in before.items() if set(flags) - now[verb]} == {}
