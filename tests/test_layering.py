"""The package's imports point one way: no cycles, and no import from a lower layer to a higher one.

Layers (rank): ``nn``, ``heap`` 0; ``large``, ``data`` 1; ``deploy``, ``training`` 2; ``tasks``, ``compat`` 3;
``cli`` 4; the root package ``settransformer/__init__`` 5 (with ``__main__``). A module may import
modules of a lower rank and of its own subpackage only: not a higher rank, not another subpackage
of the same rank (``large`` <-> ``data``, ``deploy`` <-> ``training``), not ``cli`` (only
``__main__``, the ``python -m settransformer`` launcher, runs it), and not the root package.
Imports are read with :mod:`ast` wherever they are in a module, inside functions too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "settransformer"
ROOT = Path(__file__).resolve().parents[1] / "src" / PACKAGE

RANKS = {
    "nn": 0,
    "heap": 0,
    "large": 1,
    "data": 1,
    "deploy": 2,
    "training": 2,
    "tasks": 3,
    "compat": 3,
    "cli": 4,
    "__init__": 5,
    "__main__": 5,
}


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (``pkg.__init__`` as ``pkg``)."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name of what ``from ... import`` names, relative imports resolved."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _known(name: str) -> str | None:
    """The package module ``name`` refers to: itself, or its longest prefix that is a module."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str) -> set[str]:
    """Every package module that ``module`` imports, anywhere in its source."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, path.name == "__init__.py", node)
            # ``from pkg import sub`` imports the module pkg.sub when there is one, else a name of pkg
            names = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names
            ]
        else:
            continue
        for name in names:
            target = _known(name)
            if target is not None and target != module:
                targets.add(target)
    return targets


GRAPH = {m: _imports(m) for m in MODULES}


def _layer(module: str) -> str:
    """``nn``, ``large``, ..., ``cli``, ``compat``, or ``__init__`` for the root package."""
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    return parts[1]


def _violation(importer: str, imported: str) -> str | None:
    """Why ``importer`` may not import ``imported``, or ``None``."""
    if imported == PACKAGE:
        return "imports the root package (import from the module that defines the name)"
    if _layer(imported) == "cli":
        # ``python -m settransformer`` runs the CLI: its launcher is the one module that may
        return None if importer == f"{PACKAGE}.__main__" else "imports cli (nothing may)"
    a, b = _layer(importer), _layer(imported)
    if a == b:
        return None
    ra, rb = RANKS[a], RANKS[b]
    if rb > ra:
        return f"imports a higher layer ({a} = {ra} < {b} = {rb})"
    if rb == ra:
        return f"imports another subpackage of the same layer ({a}, {b}: {ra})"
    return None


EDGES = sorted((a, b) for a, targets in GRAPH.items() for b in targets)
VIOLATIONS = [(a, b, why) for a, b in EDGES if (why := _violation(a, b)) is not None]


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v]):
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
                found.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return sorted(found)


CYCLES = _cycles()


def test_the_graph_is_read() -> None:
    """The test can fail: the package's own imports are seen, relative ones included."""
    assert f"{PACKAGE}.nn.blocks" in GRAPH[f"{PACKAGE}.nn.models"]
    assert f"{PACKAGE}.nn.validation" in GRAPH[f"{PACKAGE}.nn.blocks"]
    assert _violation(f"{PACKAGE}.nn.blocks", f"{PACKAGE}.training.loop") is not None
    assert _violation(f"{PACKAGE}.large.ragged", f"{PACKAGE}.data.files") is not None
    assert _violation(f"{PACKAGE}.tasks.base", PACKAGE) is not None
    assert _violation(f"{PACKAGE}.deploy.export", f"{PACKAGE}.nn.blocks") is None


@pytest.mark.parametrize("cycle", CYCLES or [None], ids=[" <-> ".join(c) for c in CYCLES] or ["none"])
def test_no_import_cycle(cycle: list[str] | None) -> None:
    assert cycle is None, f"import cycle between {', '.join(cycle)}"


@pytest.mark.parametrize(
    ("importer", "imported", "why"),
    VIOLATIONS or [(None, None, None)],
    ids=[f"{a} -> {b}" for a, b, _ in VIOLATIONS] or ["none"],
)
def test_imports_point_down(importer: str | None, imported: str | None, why: str | None) -> None:
    assert why is None, f"{importer} {why}: {imported}"
