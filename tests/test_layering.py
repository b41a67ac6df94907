"""The layering of the house, read from the source (ast), so it stays true as the code changes.

Data flows one way: dicom_node (in) -> db -> pipeline -> models / converters -> dicom_node (out).
The packages stand in layers (`LAYERS`, bottom first): a module imports only from its own layer or
the ones below, never up. So `models/` and `converters/` know nothing of the node, the database or the
pipeline; `converters/` knows nothing of the models; the job flow (`pipeline/`) knows nothing of the
model lifecycle (`model_lifecycle/`: fine-tuning, the registry), the web app or the command line;
nothing imports the command line (`cli/`). And no chain of imports among the project's modules comes
back to where it started (function-level imports included: a lazy import hides a cycle, it does not
break it).
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Bottom first: each package may import its own layer and those before it.
LAYERS = ("config", "converters", "models", "db", "dicom_node", "pipeline", "model_lifecycle", "web", "cli")
PACKAGES = LAYERS


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
    assert "cli.main" in graph and "model_lifecycle.registry" in graph


def test_no_import_cycle_among_the_projects_modules():
    assert cycles(import_graph()) == []


def test_cycle_finder_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports from a package into one of a higher layer."""
    rank = {package: i for i, package in enumerate(LAYERS)}
    return sorted(f"{m} imports {d}" for m, deps in graph.items() for d in deps
                  if rank[d.split(".")[0]] > rank[m.split(".")[0]])


def test_every_package_of_the_tree_has_a_layer():
    tops = {p.parent.name for p in REPO.glob("*/__init__.py")}
    assert tops - {"tests"} == set(LAYERS)


def test_no_import_runs_up_the_layers():
    assert upward_imports(import_graph()) == []


def test_the_layer_check_sees_an_upward_import():
    assert upward_imports({"pipeline.jobs": {"web.app"}, "web.app": {"pipeline.jobs"}}) == \
        ["pipeline.jobs imports web.app"]
