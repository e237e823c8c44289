"""The helpers package imports one way: bottom (artifacts, presets, hub) -> data -> corpus -> models
-> train -> families -> analyses -> plots/book. Every import counts, module-level or inside a
function, so a lazy import cannot hide a cycle."""
import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "helpers"

# Lower rank = lower layer. A module may import modules of its own rank or below, never above.
RANK = {
    "artifacts": 0, "presets": 0, "hub": 0, "paper": 0, "correlation": 0,
    "data": 1,
    "corpus": 2,
    "models": 3,
    "train": 4,
    "families": 5,
    "plots": 7, "book": 7, "sweep": 7,
}
ANALYSIS_RANK = 6  # every other module: activations, correlate, neuron_stats, universality, properties, ...


def _imports() -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.glob("*.py"):
        if path.stem == "__init__":
            continue
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    deps.add(node.module.split(".")[0])
                else:
                    deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("helpers."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[1] for a in node.names if a.name.startswith("helpers."))
        graph[path.stem] = deps - {path.stem}
    return graph


def _rank(module: str) -> int:
    return RANK.get(module, ANALYSIS_RANK)


def test_no_import_cycle():
    graph = _imports()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_module_imports_a_higher_layer():
    bad = [f"{m} (rank {_rank(m)}) imports {d} (rank {_rank(d)})"
           for m, deps in _imports().items() for d in deps if _rank(d) > _rank(m)]
    assert not bad, "imports that run up the layers: " + "; ".join(bad)


def test_importing_data_loads_nothing_above_it():
    code = ("import sys, helpers.data; "
            "print(' '.join(sorted(m.split('.')[1] for m in sys.modules if m.startswith('helpers.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    above = [m for m in out if _rank(m) > RANK["data"]]
    assert not above, f"`import helpers.data` also imported {above}"
