"""The package's module structure: no import cycles, and only the entry points (CLI, demo) import the trainer.

    .venv/bin/python -m pytest tests/test_structure.py -q      # the check, runnable by anyone

Every `import` / `from . import` between package modules counts, at module level or inside a function.
"""

import ast

import pytest

from .helpers import ROOT

PACKAGE = ROOT / "distributed_distill"
# The trainer is the top of the stack: only the command line and the demo (which drives the command line) use it.
MAY_IMPORT_TRAINER = {"cli", "demo"}
# The loss module is pure torch: usable without the rest of the package (docs/losses.md).
IMPORTS_NOTHING_FROM_PACKAGE = {"losses", "errors", "integrity", "heartbeat"}


def package_imports() -> dict[str, set[str]]:
    """module name -> the package modules it imports (anywhere in the file). A subpackage (`losses/`) counts as one
    module: the imports of all its files together, its imports among its own files left out."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name, depth = parts[0], len(parts) - 1  # depth: how many subpackage levels down the file is
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == depth + 1:  # relative to distributed_distill
                if node.module:
                    deps.add(node.module.split(".")[0])
                else:
                    deps.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("distributed_distill"):
                modules = node.module.split(".")
                deps.update([modules[1]] if len(modules) > 1 else [a.name for a in node.names])
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[1] for a in node.names if a.name.startswith("distributed_distill."))
        graph[name] = graph.get(name, set()) | (deps - {name, "__init__"})
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep] if dep in path else [node, dep]
            if dep not in state and (cycle := visit(dep, path + [dep])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    graph = package_imports()
    assert {"trainer", "setup", "objective", "evaluate", "losses"} <= graph.keys()
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_only_the_entry_points_import_the_trainer():
    importers = {name for name, deps in package_imports().items() if "trainer" in deps}
    assert importers <= MAY_IMPORT_TRAINER, f"{sorted(importers - MAY_IMPORT_TRAINER)} import trainer"


@pytest.mark.parametrize("module", sorted(IMPORTS_NOTHING_FROM_PACKAGE))
def test_leaf_modules_import_nothing_from_the_package(module):
    assert package_imports()[module] == set()
