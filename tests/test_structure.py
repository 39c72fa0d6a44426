"""The package's module structure (docs/design.md, Modules): no import cycle, the layers between the subpackages, the
trainer at the top, one definition per public name, one ignore label, and the run's setup readable on one screen.

    .venv/bin/python -m pytest tests/test_structure.py -q      # the check, runnable by anyone

Every `import` / `from . import` between package modules counts, at module level or inside a function. A
subpackage (`data/`, `store/`, `eval/`, `losses/`) counts as one unit: the imports of all its files together, its
imports among its own files left out.
"""

import ast

import pytest

from .helpers import ROOT

PACKAGE = ROOT / "distributed_distill"
SUBPACKAGES = {"data", "store", "eval", "losses"}
# The trainer is the top of the stack: only the command line and the demo (which drives the command line) use it.
MAY_IMPORT_TRAINER = {"cli", "demo"}
# Leaves: the loss module is pure torch, usable without the rest of the package (docs/losses.md).
IMPORTS_NOTHING_FROM_PACKAGE = {"losses", "errors", "integrity", "heartbeat"}
# The layers below the training core: what each subpackage may use (everything else in the package is above it).
MAY_IMPORT = {
    "data": {"config", "errors"},
    "store": {"config", "data", "errors", "integrity", "lock", "losses", "tokenizer", "models"},
    "eval": {
        "config",
        "data",
        "errors",
        "generation",
        "integrity",
        "lock",
        "losses",
        "models",
        "objective",
        "on_policy",
        "setup",
        "store",
        "teacher",
        "teachers",  # several teachers: a teacher source like teacher's (distill eval of a teachers: config)
        "tokenizer",
        "checkpoint",
        "rundir",
        "tracking",
    },
}
# What sits above every subpackage: neither data/ nor store/ nor eval/ may import these.
TOP = {"trainer", "cli", "demo", "training_data", "precompute", "generate"}


def package_imports() -> dict[str, set[str]]:
    """unit name -> the package units it imports (anywhere in the file)."""
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
    assert {"trainer", "setup", "objective", "losses", "data", "store", "eval", "tokenizer", "rundir"} <= graph.keys()
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


@pytest.mark.parametrize("subpackage", sorted(MAY_IMPORT))
def test_subpackages_import_only_their_layers(subpackage):
    """data/ sits on the config alone, store/ on data/ and the file rules, eval/ below the trainer and the commands;
    none of them imports what is above it."""
    deps = package_imports()[subpackage]
    assert not deps & TOP, f"{subpackage}/ imports {sorted(deps & TOP)}, which sit above it"
    assert deps <= MAY_IMPORT[subpackage], f"{subpackage}/ imports {sorted(deps - MAY_IMPORT[subpackage])}"
    if subpackage in ("data", "store"):
        assert "eval" not in deps


def test_the_layer_checks_catch_a_violation():
    """The rules above are not vacuous: the graph really has these units and edges."""
    graph = package_imports()
    assert "data" in graph["store"] and "store" in graph["training_data"] and "eval" in graph["trainer"]
    assert "config" in graph["data"]


def public_definitions() -> dict[str, list[str]]:
    """public name -> the package files that define it at module level (a def, a class or an assignment; an import
    is not a definition)."""
    found: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names = [node.name]
            elif isinstance(node, ast.Assign):
                names = [n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name)]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names = [node.target.id]
            else:
                continue
            for name in names:
                if not name.startswith("_"):
                    found.setdefault(name, []).append(str(path.relative_to(PACKAGE)))
    return found


def test_no_two_modules_define_the_same_public_name():
    """`from distributed_distill.X import name` means one thing: two stores' `encode_rows`, two `Sampler`s, two
    `read_manifest`s would each be a different function behind the same name."""
    twice = {name: files for name, files in public_definitions().items() if len(files) > 1}
    assert not twice, f"defined in more than one module: {twice}"


def test_one_ignore_label():
    """IGNORE_INDEX is defined once (data/batching.py, importable without `datasets`); no module keeps a copy. The
    loss module's -100 defaults are its documented standalone API (it imports nothing from the package)."""
    assert public_definitions()["IGNORE_INDEX"] == ["data/batching.py"]
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "losses" or str(rel) == "data/batching.py":
            continue
        literals = [
            node.lineno
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.UnaryOp)
            and isinstance(node.op, ast.USub)
            and isinstance(node.operand, ast.Constant)
            and node.operand.value == 100
        ]
        assert not literals, f"{rel}:{literals[0]}: -100 written out; use data.batching.IGNORE_INDEX"


def test_the_run_reads_as_its_phases_on_one_screen():
    """trainer._train, the whole setup of a run: at most 40 lines (issue 22)."""
    tree = ast.parse((PACKAGE / "trainer.py").read_text())
    (node,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_train"]
    assert node.end_lineno - node.lineno + 1 <= 40
