"""The import layers of docs/architecture.md ("Layers"), checked on the source of every module.

    contracts  <-  core  <-  analyzer | dispatcher | agent  <-  cli, wiring, demo (the composition root)

contracts import nothing of ours but contracts; core (settings, db, observability, ...) imports contracts
and core; each service imports contracts, core and itself, never another service; only the composition
root imports everything.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOP = "livekit_proctor"
ROOT_MODULES = {f"{TOP}.cli", f"{TOP}.wiring", f"{TOP}.demo"}  # demo: runs an analyzer in-process


def _roots() -> dict[str, str]:
    """namespace -> folder, read from setup.py's ROOTS (the one place that says how folders install)."""
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "ROOTS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no ROOTS mapping")


def _modules() -> dict[str, Path]:
    """Every installed Python module of ours, by its import name."""
    roots = _roots()
    out: dict[str, Path] = {}
    for ns, folder in roots.items():
        base = REPO / folder
        others = {REPO / f for n, f in roots.items() if n != ns}  # a folder mapped on its own is not ours here
        for path in base.rglob("*.py"):
            if any(o in path.parents for o in others):
                continue
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([ns, *parts])] = path
    return out


MODULES = _modules()


def layer(module: str) -> str:
    if module in ROOT_MODULES:
        return "root"
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ("contracts", "analyzer", "dispatcher", "agent", "models", "proto"):
        return parts[1]
    return "core"  # livekit_proctor itself and its other modules: settings, db, observability, ...


# What each layer may import (of ours).
ALLOWED: dict[str, set[str]] = {
    "contracts": {"contracts"},
    "core": {"contracts", "core", "proto", "models"},
    "analyzer": {"contracts", "core", "proto", "models", "analyzer"},
    "dispatcher": {"contracts", "core", "proto", "models", "dispatcher"},
    "agent": {"contracts", "core", "proto", "models", "agent"},
}


def imports(module: str, path: Path) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every import of ours, lazy ones and importlib.import_module("...") too."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from pkg import mod` imports pkg.mod
            names = [f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source for a in node.names]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, (ast.Attribute, ast.Name))
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names = [node.args[0].value]
        else:
            continue
        for name in dict.fromkeys(names):  # `from m import a, b` is one import of m
            if name == TOP or name.startswith(TOP + "."):
                yield node.lineno, name


def violations(of_layer: str) -> list[str]:
    out = []
    for module, path in sorted(MODULES.items()):
        if layer(module) != of_layer:
            continue
        for line, name in imports(module, path):
            if layer(name) not in ALLOWED[of_layer]:
                out.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    return out


def test_the_source_tree_is_found() -> None:
    expected = {"analyzer.app", "dispatcher.engine", "agent.worker", "contracts.alerts", "cli", "wiring"}
    assert {f"{TOP}.{m}" for m in expected} <= set(MODULES)


@pytest.mark.parametrize("of_layer", sorted(ALLOWED))
def test_layer_imports_only_what_is_below_it(of_layer: str) -> None:
    found = violations(of_layer)
    assert not found, "\n".join(found)


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """A lazy import of the dispatcher inside an analyzer function is one."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from livekit_proctor.dispatcher import retention\n    from . import jsonl\n")
    found = list(imports("livekit_proctor.dispatcher.x", bad))
    assert found == [(2, "livekit_proctor.dispatcher.retention"), (3, "livekit_proctor.dispatcher.jsonl")]
    assert layer(found[0][1]) not in ALLOWED["analyzer"]
