"""The package's import graph: who may import whom (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "p2pfl"
#: Circles allowed: none (secure_exchange reaches the node through ``ExchangeHost``).
KNOWN: list[list[str]] = []


def import_graph() -> dict[str, set[str]]:
    """module -> the p2pfl modules it imports anywhere in its body (lazy imports too)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module in modules:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    graph[name].add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names if a.name in modules)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
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
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_no_import_circles_but_the_known_one() -> None:
    assert circles(import_graph()) == KNOWN


def test_the_cycle_finder_finds_cycles() -> None:
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_the_harness_and_the_core_do_not_import_the_command_line() -> None:
    graph = import_graph()
    users = sorted(m for m, deps in graph.items() if "p2pfl.cli" in deps)
    # Entry points only: `python -m p2pfl` and the harness's poisoning peer.
    assert users == ["p2pfl.__main__", "p2pfl.harness.byzantine"]
    assert "p2pfl.config" not in graph["p2pfl.topology"]


def test_the_config_parts_do_not_import_the_public_face() -> None:
    graph = import_graph()
    parts = sorted(m for m in graph if m.startswith("p2pfl.config_"))
    assert parts == [
        "p2pfl.config_aggregation",
        "p2pfl.config_fields",
        "p2pfl.config_limits",
        "p2pfl.config_roster",
        "p2pfl.config_training",
        "p2pfl.config_types",
        "p2pfl.config_yaml",
    ]
    assert set(parts) <= graph["p2pfl.config"]
    for part in parts:
        assert "p2pfl.config" not in graph[part], part
    # The section readers share the field readers and the types, never each other.
    readers = ("config_roster", "config_training", "config_aggregation", "config_limits")
    for reader in readers:
        uses = {m for m in graph[f"p2pfl.{reader}"] if m.startswith("p2pfl.config")}
        assert uses <= {"p2pfl.config_fields", "p2pfl.config_types"}, reader
