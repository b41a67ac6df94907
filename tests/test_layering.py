"""The layering of the house, read from the source (ast), so it stays true as the code changes.

Data flows one way: dicom_node (in) -> db -> pipeline -> models / converters -> dicom_node (out).
`models/` and `converters/` know nothing of the node, the database or the pipeline; `converters/`
knows nothing of the models; and no chain of imports among the project's modules comes back to
where it started (function-level imports included: a lazy import hides a cycle, it does not break it).
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("config", "converters", "db", "dicom_node", "models", "pipeline", "web")
FORBIDDEN = {
    "models": {"pipeline", "dicom_node", "db", "web"},
    "converters": {"pipeline", "dicom_node", "db", "web", "models"},
    "config": {"pipeline", "dicom_node", "db", "web", "models", "converters"},
}


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            if "migrations" in path.parts:
                continue
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its body."""
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                if node.level:  # relative import: resolve against this module's package
                    base = name.split(".")[: -node.level] if not path.name == "__init__.py" else name.split(".")
                    module = ".".join([*base, node.module])
                else:
                    module = node.module
                found.add(module)
                found |= {f"{module}.{alias.name}" for alias in node.names}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read_from_real_modules():
    graph = import_graph()
    assert "models.classic" in graph and "models.result" in graph["models.classic"]
    assert "pipeline.cli" in graph


def test_no_import_cycle_among_the_projects_modules():
    assert cycles(import_graph()) == []


def test_cycle_finder_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_models_converters_and_config_never_reach_up_the_chain():
    bad = [f"{m} imports {d}" for m, deps in import_graph().items() for d in deps
           if d.split(".")[0] in FORBIDDEN.get(m.split(".")[0], set())]
    assert bad == []
