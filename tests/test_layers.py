"""Layers point one way: foundation <- tdad <- engines <- calibration <- inspector, and no module imports itself back.

Every import statement of the project's packages counts, the lazy ones inside functions included (they are
dependencies all the same), read with `ast` without importing anything.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("foundation", "tdad", "engines", "calibration", "inspector")
# package -> the packages it may import (every layer below it)
ALLOWED = {
    "foundation": set(),
    "tdad": {"foundation"},
    "engines": {"foundation", "tdad"},
    "calibration": {"foundation", "tdad", "engines"},
    "inspector": {"foundation", "tdad", "engines", "calibration"},
}


def module_name(path: Path) -> str:
    """Dotted module name of a file under the repository root (a package's __init__ is the package)."""
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    """Every module of the project's packages, by dotted name."""
    return {module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


@cache
def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (module-level and function-level imports alike)."""
    modules = project_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                candidates = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            else:
                continue
            targets |= {c for c in candidates if c in modules}
        graph[name] = targets - {name}
    return graph


def package(module: str) -> str:
    return module.split(".", 1)[0]


def test_every_package_is_scanned() -> None:
    found = {package(m) for m in import_graph()}
    assert found == set(PACKAGES)


@pytest.mark.parametrize("pkg", PACKAGES)
def test_packages_import_only_the_layers_below(pkg: str) -> None:
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in import_graph().items() if package(module) == pkg
        for target in targets
        if package(target) != pkg and package(target) not in ALLOWED[pkg]
    )
    assert not wrong, "\n".join(wrong)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as a node list (first node repeated at the end), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_package_graph_is_acyclic() -> None:
    packages: dict[str, set[str]] = {p: set() for p in PACKAGES}
    for module, targets in import_graph().items():
        packages[package(module)] |= {package(t) for t in targets} - {package(module)}
    assert _cycle(packages) is None, _cycle(packages)


def test_no_module_import_cycles() -> None:
    """No module reaches back to one that imports it, directly or through others (lazy imports included)."""
    graph = import_graph()
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
