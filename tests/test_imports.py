"""The package's import graph: no circle (function-level imports included), no module importing an entry
point, and the leaves (config, errors, registry) importing nothing of dpo_exp but errors."""
import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "dpo_exp"
ENTRY_POINTS = {"dpo_exp.train", "dpo_exp.judge"}


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(f): f for f in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):  # every import, at module level or inside a function
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dpo_exp"):
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                         for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("dpo_exp")}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_circle():
    assert circles(import_graph()) == []


def test_no_module_imports_an_entry_point():
    graph = import_graph()
    assert {name: deps & ENTRY_POINTS for name, deps in graph.items() if deps & ENTRY_POINTS} == {}


def test_config_errors_and_registry_are_leaves():
    graph = import_graph()
    assert graph["dpo_exp.config"] == set() and graph["dpo_exp.errors"] == set()
    assert graph["dpo_exp.registry"] == {"dpo_exp.errors"}
    assert graph["dpo_exp.judging.config"] == set()


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
