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
    users = {
        m: sorted(d for d in deps if d.startswith("p2pfl.cli"))
        for m, deps in graph.items()
        if not m.startswith("p2pfl.cli") and any(d.startswith("p2pfl.cli") for d in deps)
    }
    # `python -m p2pfl`, and the harness's two peer entry points (the poisoning peer, the
    # multi-node process): they parse and launch `run` as the command line does, through
    # the two modules that import no other command.
    assert users == {
        "p2pfl.__main__": ["p2pfl.cli"],
        "p2pfl.harness.byzantine": ["p2pfl.cli.launch", "p2pfl.cli.parser"],
        "p2pfl.harness.multinode": ["p2pfl.cli.launch", "p2pfl.cli.parser"],
    }
    for shared in ("p2pfl.cli.launch", "p2pfl.cli.parser", "p2pfl.cli.args"):
        assert not {d for d in graph[shared] if d.startswith(("p2pfl.harness", "p2pfl.cli.c"))}
    assert "p2pfl.config" not in graph["p2pfl.core.topology"]


#: The pure packages: the decisions of the protocol, testable without sockets or a loop.
PURE = ("p2pfl.core", "p2pfl.proto", "p2pfl.secure", "p2pfl.config")
#: What a pure module may not import: an event loop, threads, sockets, processes.
SHELL_LIBRARIES = {
    "asyncio",
    "websockets",
    "threading",
    "socket",
    "selectors",
    "subprocess",
    "concurrent",
    "multiprocessing",
}
#: The packages that run things (and the tools built on them).
SHELL_PACKAGES = ("p2pfl.daemon", "p2pfl.cli", "p2pfl.harness", "p2pfl.logs", "p2pfl.store")


def all_imports(path: Path) -> set[str]:
    """Every module name ``path`` imports, anywhere in its body (lazy imports too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def pure_modules() -> list[tuple[str, Path]]:
    found = []
    for package in PURE:
        folder = PACKAGE.parent / package.replace(".", "/")
        for path in sorted(folder.glob("*.py")):
            found.append((f"{package}.{path.stem}", path))
    return found


def test_the_pure_packages_import_no_event_loop_thread_socket_nor_shell() -> None:
    modules = pure_modules()
    assert len(modules) > 20
    for name, path in modules:
        for imported in all_imports(path):
            assert imported.split(".")[0] not in SHELL_LIBRARIES, (name, imported)
            assert not imported.startswith(SHELL_PACKAGES), (name, imported)


def test_the_boundary_test_sees_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    import asyncio\n    from p2pfl.daemon.net import Network\n")
    assert {"asyncio", "p2pfl.daemon.net"} <= all_imports(bad)


def test_the_config_parts_do_not_import_the_public_face() -> None:
    graph = import_graph()
    parts = sorted(m for m in graph if m.startswith("p2pfl.config."))
    assert parts == [
        "p2pfl.config.aggregation",
        "p2pfl.config.fields",
        "p2pfl.config.limits",
        "p2pfl.config.local",
        "p2pfl.config.roster",
        "p2pfl.config.safe_yaml",
        "p2pfl.config.schema",
        "p2pfl.config.training",
    ]
    assert set(parts) - {"p2pfl.config.local"} <= graph["p2pfl.config"]
    for part in parts:
        assert "p2pfl.config" not in graph[part], part
    # The section readers share the field readers and the types, never each other.
    for reader in ("roster", "training", "aggregation", "limits"):
        uses = {m for m in graph[f"p2pfl.config.{reader}"] if m.startswith("p2pfl.config")}
        assert uses <= {"p2pfl.config.fields", "p2pfl.config.schema"}, reader


#: A function a newcomer can read in one screen (issue 21).
MAX_FUNCTION_LINES = 80


def test_no_function_in_the_package_is_longer_than_a_screen() -> None:
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1 if node.end_lineno else 0
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.name} ({lines})")
    assert long == []


def test_the_package_reaches_into_no_other_objects_private_members() -> None:
    """``obj._name`` only on ``self``/``cls``: a module that needs another's internals gets
    a public seam instead (argparse's subparser type has no public name)."""
    reach_ins = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Attribute) or not node.attr.startswith("_"):
                continue
            if node.attr.startswith("__") or node.attr == "_SubParsersAction":
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            reach_ins.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} .{node.attr}")
    assert reach_ins == []
