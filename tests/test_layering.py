"""The helpers package imports one way, bottom to top:

    core -> data -> models -> streaming -> the chapters' analyses -> book

and the analyses (one subpackage per chapter) import each other only along the edges listed in
`ANALYSIS_EDGES`. Every import counts, module-level or inside a function, so a lazy import cannot
hide a cycle or a climb."""
import ast
import shutil
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "helpers"

# Lower rank = lower layer. A module may import modules of its own rank or below, never above.
RANK = {"core": 0, "data": 1, "models": 2, "streaming": 3,
        "correlations": 4, "properties": 5, "taxonomy": 6, "prediction": 7, "entropy": 7, "attention": 7,
        "book": 9}
ANALYSES = {"correlations", "properties", "taxonomy", "prediction", "entropy", "attention"}
# The only imports from one chapter's analysis into another's: (importer, imported), as modules.
ANALYSIS_EDGES = {
    ("taxonomy.explain", "properties.neuron_stats"),         # activation statistics of a sampled model
    ("prediction.vocab", "taxonomy.features"),               # token classes
    ("entropy.candidates", "properties.neuron_stats"),       # weight statistics, activation signs
}


def module_imports(package: Path = PACKAGE) -> dict[str, set[str]]:
    """`subpackage.module` -> the `subpackage.module`s of helpers it imports (anywhere in the file)."""
    graph = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package).with_suffix("").parts
        if len(parts) != 2 or parts[1] in ("__init__", "__main__"):
            continue
        here = ".".join(parts)
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against this subpackage
                    base = [parts[0]] if node.level == 1 else []
                    mod = base + (node.module.split(".") if node.module else [])
                    names = [".".join(mod + [a.name]) for a in node.names] if len(mod) == 1 else [".".join(mod[:2])]
                elif node.module and node.module.split(".")[0] == "helpers":
                    mod = node.module.split(".")[1:]
                    names = ([".".join(mod + [a.name]) for a in node.names] if len(mod) == 1
                             else [".".join(mod[:2])] if mod else [a.name for a in node.names])
            elif isinstance(node, ast.Import):
                names = [".".join(a.name.split(".")[1:3]) for a in node.names if a.name.startswith("helpers.")]
            deps.update(n for n in names if n and n != here)
        graph[here] = deps
    return graph


def _rank(module: str) -> int:
    return RANK[module.split(".")[0]]


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that climbs a layer, or crosses between two chapters' analyses off the list."""
    bad = []
    for m, deps in sorted(graph.items()):
        for d in sorted(deps):
            if d.split(".")[0] not in RANK:
                continue  # a name imported from a subpackage's __init__, not a module
            if _rank(d) > _rank(m):
                bad.append(f"{m} (rank {_rank(m)}) imports {d} (rank {_rank(d)})")
            elif (m.split(".")[0] in ANALYSES and d.split(".")[0] in ANALYSES
                  and m.split(".")[0] != d.split(".")[0] and (m, d) not in ANALYSIS_EDGES):
                bad.append(f"{m} imports {d}: an analysis-to-analysis import that is not in ANALYSIS_EDGES")
    return bad


def test_every_module_has_a_rank():
    unranked = sorted({m.split(".")[0] for m in module_imports()} - set(RANK))
    assert not unranked, f"subpackages without a rank in tests/test_layering.py: {unranked}"


def test_no_import_cycle():
    graph = module_imports()
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


def test_no_module_imports_a_higher_layer_or_an_unlisted_analysis():
    bad = violations(module_imports())
    assert not bad, "imports against the layers: " + "; ".join(bad)


def test_every_listed_analysis_edge_exists():
    graph = module_imports()
    stale = sorted(e for e in ANALYSIS_EDGES if e[1] not in graph.get(e[0], set()))
    assert not stale, f"ANALYSIS_EDGES lists imports the code no longer makes: {stale}"


def test_a_planted_import_from_another_chapter_is_caught(tmp_path):
    copy = tmp_path / "helpers"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "tokenizer_gpt2"))
    target = copy / "entropy" / "candidates.py"
    target.write_text(target.read_text() + "\nfrom helpers.prediction.vocab import CODE_VERSION\n")
    assert not violations(module_imports(PACKAGE))
    bad = violations(module_imports(copy))
    assert bad == ["entropy.candidates imports prediction.vocab: an analysis-to-analysis import that is not "
                   "in ANALYSIS_EDGES"]
    target.write_text(target.read_text() + "from .interventions import np\nfrom helpers.book import plots\n")
    assert "entropy.candidates (rank 7) imports book.plots (rank 9)" in violations(module_imports(copy))


def test_importing_the_data_layer_loads_nothing_above_it():
    code = ("import sys, helpers.data.tokens, helpers.data.corpus; "
            "print(' '.join(sorted({m.split('.')[1] for m in sys.modules if m.count('.') >= 1 "
            "and m.startswith('helpers.')})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    above = [m for m in out if RANK.get(m, 99) > RANK["data"]]
    assert not above, f"importing helpers.data also imported {above}"
