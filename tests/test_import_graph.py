"""The package has no import circles: module-level and function-level imports, read with ``ast``.

``from pkg import submodule`` counts as an import of the submodule (``pkg/__init__`` is already
running when a submodule of it imports a sibling that way).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "streamssl"


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module name -> the package's modules it imports (anywhere in its code)."""
    mods: dict[str, Path] = {}
    for p in root.rglob("*.py"):
        parts = p.relative_to(root.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p

    def known(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        here = m.split(".") if path.name == "__init__.py" else m.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(here[: len(here) - node.level + 1] + [node.module or ""]).strip(".") \
                    if node.level else (node.module or "")
                subs = [f"{base}.{a.name}" for a in node.names]
                targets = [t for t in subs if t in mods] + ([base] if any(t not in mods for t in subs) else [])
            else:
                continue
            for t in targets:
                r = known(t) if t.split(".")[0] == root.name else None
                if r is not None and r != m:
                    graph[m].add(r)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_circles() -> None:
    graph = import_graph()
    assert len(graph) > 50 and "streamssl.data.shard_writer" in graph["streamssl.data.append"]
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The same graph between streamssl's subpackages and top-level modules (``streamssl.data``,
    ``streamssl.config`` ...; the package's own ``__init__`` as ``streamssl``)."""
    def unit(m: str) -> str:
        parts = m.split(".")
        return ".".join(parts[:2])

    out: dict[str, set[str]] = {unit(m): set() for m in graph}
    for m, targets in graph.items():
        out[unit(m)] |= {unit(t) for t in targets if unit(t) != unit(m)}
    return out


def test_subpackages_only_import_downward() -> None:
    """No two subpackages (or top-level modules) import each other, even through others: their
    graph is acyclic, so the layer order in README.md ("The pieces") holds for every import."""
    units = package_graph(import_graph())
    assert {"streamssl.data", "streamssl.train", "streamssl.evaluate"} <= set(units)
    assert cycles(units) == []
