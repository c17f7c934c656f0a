"""spoctl's modules import one another without a circle -- counting the imports inside functions too, which is
where a circle hides once someone breaks it by moving an import into a function (engine/keep.py once imported
train.make_scheduler that way: train -> plan -> extensions -> keep -> train). A circle means two modules that can
only be understood together; the fix is the shared piece in a module of its own (engine/schedule.py)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(module: str, is_package: bool, node: ast.Import | ast.ImportFrom, known: set[str]) -> set[str]:
    """The spoctl modules an import statement loads (a package's `from . import x` loads x, not the package's
    other submodules)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names} & known
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    subs = {f"{target}.{a.name}" for a in node.names} & known
    return (subs | ({target} if len(subs) < len(node.names) else set())) & known


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in (SRC / "spoctl").rglob("*.py")}
    known = set(files)
    graph = {}
    for name, path in files.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= imported(name, path.name == "__init__.py", node, known)
        graph[name] = edges - {name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each a circle or several."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
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
    return found


def test_the_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_spoctl_has_no_import_circle():
    graph = import_graph()
    assert len(graph) > 50 and graph["spoctl.engine.train"]  # the walk found the package and its imports
    assert circles(graph) == [], "modules that import each other, directly or round a loop: " + "; ".join(
        " <-> ".join(c) for c in circles(graph))
