"""The package's layers import one way only (docs/architecture.md, "Layers").

Read with ``ast`` (nothing is imported), every ``import`` of a ``simprop`` module, at module top
or inside a function, is an edge of the import graph.  The test fails on:

* any import cycle between modules;
* a module importing a layer above its own (``infra/`` importing an experiment package, ``model/``
  importing ``engine/``, ...), or ``train/`` and ``evaluate/`` importing each other;
* a ``simprop`` import inside a function, unless it is listed in :data:`DEFERRED` with its reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "simprop"

# Layer of each top-level part of simprop/, bottom first: a module may import its own layer and the
# layers below it.  Within layer 5 and 6 the packages are siblings and do not import each other.
LAYERS: dict[str, int] = {
    "simprop": 0, "errors": 0, "params": 0, "voc": 0, "paper": 0, "layout": 0,
    "infra": 1,
    "data": 2,
    "model": 3,
    "engine": 4,
    "train": 5, "evaluate": 5,
    "report": 6, "analysis": 6, "segment": 6,
    "cli": 7,
}  # fmt: skip
SIBLINGS_APART = {5, 6}

# simprop imports deliberately inside a function, and why (module -> imported modules).
DEFERRED: dict[str, set[str]] = {
    # `simprop params` must answer without importing torch (start-up cost of every CLI call)
    "simprop.cli": {"simprop.segment.api"},
    # the generated dataset (numpy, scipy, PIL drawing) is imported only when data.source is synthetic
    "simprop.data.download": {"simprop.data.synthetic"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, known: set[str]) -> list[tuple[str, bool]]:
    """(imported simprop module, at module top?) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    name = module_name(path)
    is_package = path.name == "__init__.py"
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # "from simprop.x import y": y is a submodule or a name defined in simprop.x
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        else:
            continue
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            continue
        top = id(node) in top_level or _under_type_checking(tree, node)
        found += [(t, top) for t in targets if t in known and t != name]
    return found


def _under_type_checking(tree: ast.Module, node: ast.AST) -> bool:
    for stmt in tree.body:
        if isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test):
            if any(child is node for child in ast.walk(stmt)):
                return True
    return False


def graph() -> dict[str, list[tuple[str, bool]]]:
    mods = modules()
    known = set(mods)
    return {name: imports(path, known) for name, path in mods.items()}


def part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "simprop"


def cycles(edges: dict[str, list[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, []):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_every_top_level_part_has_a_layer():
    assert {part(m) for m in modules()} <= set(LAYERS), "give each new part of simprop/ a layer in LAYERS"


def test_no_import_cycles():
    g = graph()
    # a package's __init__ re-exporting its own submodules is not a cycle of the layers
    edges = {m: sorted({t for t, _ in targets if not (m == t.rsplit(".", 1)[0])}) for m, targets in g.items()}
    assert cycles(edges) == []


def test_imports_go_down_the_layers():
    wrong = []
    for module, targets in graph().items():
        here = LAYERS[part(module)]
        for target, _ in targets:
            there = LAYERS[part(target)]
            if there > here or (there == here in SIBLINGS_APART and part(target) != part(module)):
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_simprop_imports_are_at_module_top_unless_deferred_for_a_reason():
    inner = sorted(
        f"{module} -> {target}"
        for module, targets in graph().items()
        for target, top in targets
        if not top and target not in DEFERRED.get(module, set())
    )
    assert inner == []


def test_the_checks_see_a_cycle_and_a_layer_violation():
    """The graph code itself: a cycle is found, and an upward edge is named."""
    assert cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]
    assert cycles({"a": ["b"], "b": []}) == []
    assert LAYERS[part("simprop.infra.stage")] < LAYERS[part("simprop.train.trainer")]


def test_every_stage_script_parses_its_command_line_one_way():
    """Each stages/*.py takes its options from simprop.infra.stage (``--params``, and ``--root`` or
    ``--variant``/``--fold`` where it has them), never from an argparse parser of its own."""
    stages = sorted((PACKAGE.parent / "stages").glob("*.py"))
    assert len(stages) >= 12
    shared = {"stage_args", "stage_parser", "run_analysis_stage"}
    for script in stages:
        tree = ast.parse(script.read_text())
        imported = {
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module == "simprop.infra.stage"
            for alias in node.names
        }
        own_argparse = any(isinstance(n, ast.Import) and any(a.name == "argparse" for a in n.names) for n in ast.walk(tree))
        assert imported & shared and not own_argparse, script.name
