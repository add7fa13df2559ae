"""Codebase shape: at most 10 modules at the package root, no import cycles, and the layering every package
(and root module) states in its docstring ("May import: ..."), checked on every import, inside functions too."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "elucidate"
#: What the core (the mathematics and the networks) must never reach, lazily or not (issue 29).
UPPER = {"config", "run", "training", "cli", "evaluation", "interop"}
CORE = ("formulations", "sampling", "nets", "denoiser", "analytic", "losses")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in SRC.rglob("*.py")}


def _unit(module: str) -> str:
    """The layer unit a module belongs to: its top-level package or root module (``elucidate`` itself for __init__)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "elucidate"


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, bool]]:
    """(elucidate module imported, whether inside a function) for every import of ``name``, with the package
    __init__s that such an import runs (except this module's own ancestors, which are already running)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: list[tuple[str, bool]] = []

    def visit(node, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            targets: list[str] = []
            if isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    module = ".".join(base + ([child.module] if child.module else []))
                else:
                    module = child.module or ""
                targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules else module
                           for alias in child.names]
            for target in targets:
                if not target.startswith("elucidate"):
                    continue
                while target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                parts = target.split(".")
                for k in range(1, len(parts) + 1):
                    prefix = ".".join(parts[:k])
                    if prefix in modules and not (name == prefix or name.startswith(prefix + ".")):
                        found.append((prefix, inner))
            visit(child, inner)

    visit(ast.parse(path.read_text()), False)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def _rules() -> dict[str, tuple[set[str], set[str]]]:
    """unit -> (what it may import, what it may import lazily to re-export it), from the "May import:" line
    of each package's __init__ and each root module's docstring."""
    rules = {}
    for path in [*SRC.glob("*.py"), *SRC.glob("*/__init__.py")]:
        unit = "elucidate" if path == SRC / "__init__.py" else (path.stem if path.parent == SRC else path.parent.name)
        if unit == "__main__":
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        found = re.search(r"May import: (.+?)\.\s*$", " ".join(doc.split()))
        assert found, f"{path.relative_to(ROOT)}: its docstring must end with 'May import: ...'"
        text = found.group(1)
        lazy = set()
        if "(and lazily" in text:
            text, rest = text.split("(and lazily", 1)
            lazy = {w.strip(" )") for w in rest.split(":", 1)[1].split(",")}
        allowed = {w.strip() for w in text.strip().rstrip(",").split(",")} - {"nothing", ""}
        rules[unit] = (allowed, lazy)
    return rules


def test_at_most_ten_modules_at_the_root():
    root = sorted(p.name for p in SRC.glob("*.py"))
    assert len(root) <= 10, root


def test_no_import_cycles():
    """Import-time edges only (a lazy re-export in a function is not a cycle at import time; the layering
    test below still checks it)."""
    modules = _modules()
    graph = {name: {m for m, lazy in _imports(name, path, modules) if not lazy} for name, path in modules.items()}
    assert _cycles(graph) == []


def test_the_cycle_detector_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    modules = _modules()
    assert ("elucidate.sampling.registry", False) in _imports("elucidate.sampling.solvers",
                                                              modules["elucidate.sampling.solvers"], modules)


def _violations(modules: dict[str, Path]) -> list[str]:
    """Every import of ``modules`` (name -> file) that its unit's rule does not allow."""
    rules, problems = _rules(), []
    for name, path in modules.items():
        unit = _unit(name)
        if unit == "__main__" or "anything" in rules.get(unit, ({"anything"}, set()))[0]:
            continue
        allowed, lazy = rules[unit]
        for target, inner in _imports(name, path, modules):
            other = _unit(target)
            if other == unit or other in allowed:
                continue
            if other in lazy and inner and path.name == "__init__.py":
                continue
            problems.append(f"{name} imports {target} ({'in a function' if inner else 'at import time'}); "
                            f"{unit} may import {sorted(allowed)}")
    return problems


def test_every_import_follows_the_stated_layering():
    assert _violations(_modules()) == []


def test_the_core_never_reaches_runs_training_or_the_cli():
    rules = _rules()
    for unit in CORE:
        allowed, lazy = rules[unit]
        assert not (allowed | lazy) & UPPER, (unit, sorted((allowed | lazy) & UPPER))


def test_the_layering_test_sees_a_violation(tmp_path):
    """A core module that imports the run layer, even inside a function, is reported."""
    modules = _modules()
    sneaky = tmp_path / "solvers.py"
    sneaky.write_text(modules["elucidate.sampling.solvers"].read_text()
                      + "\n\ndef _sneaky():\n    from ..run import RunDir\n    return RunDir\n")
    problems = _violations({**modules, "elucidate.sampling.solvers": sneaky})
    assert len(problems) == 1
    assert problems[0].startswith("elucidate.sampling.solvers imports elucidate.run (in a function)")


def test_import_elucidate_loads_the_core_only(env):
    """``import elucidate`` (the public API) loads no run, training, tuning, evaluation or CLI code; the tuning
    entry points of ``elucidate.sampling`` load it on first use."""
    import subprocess
    import sys

    code = ("import sys, elucidate\n"
            "loaded = {m.split('.')[1] for m in sys.modules if m.startswith('elucidate.')}\n"
            "assert not loaded & {'config', 'run', 'training', 'tuning', 'evaluation', 'cli'}, sorted(loaded)\n"
            "assert elucidate.sampling.tune.__module__ == 'elucidate.tuning.tuner'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
