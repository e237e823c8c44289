"""Checks of the notebooks as files: pairing, no outputs, the page skeleton, presets in sync."""
import ast
import json
import re
from pathlib import Path

import jupytext
import pytest
import yaml

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
    colab = f"https://colab.research.google.com/github/{repo}/blob/{CONFIG['repository']['branch']}/notebooks/{py.stem}.ipynb"
    assert colab in first.source, f"the first cell must link to the source notebook in Colab: {colab}"
    code = _code_cells(nb)
    assert "IN_COLAB" in code[0].source, "first code cell is the set-up cell"
    assert "parameters" in code[1].metadata.get("tags", []), "second code cell is the parameters cell"
    assert "Result vs paper" in "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    for c in code:
        src = c.source
        assert not re.search(r"^\s*(%cd|os\.chdir|sys\.path\.(append|insert))", src, re.M)
        assert not re.search(r"except\s*:", src), "no bare except"


@pytest.mark.parametrize("py", SOURCES, ids=lambda p: p.stem)
def test_parameters_are_literals_matching_default_preset(py):
    nb = jupytext.read(py)
    cell = _code_cells(nb)[1]
    tree = ast.parse(cell.source)
    values = {}
    for node in tree.body:
        assert isinstance(node, ast.Assign), "the parameters cell holds assignments only"
        values[node.targets[0].id] = ast.literal_eval(node.value)
    default = yaml.safe_load((ROOT / "params" / "default.yaml").read_text())
    for key, val in default.items():
        if key in values:
            assert values[key] == val, f"{py.stem}: parameter {key!r} = {values[key]!r} but params/default.yaml has {val!r}"
    assert values.get("preset") == "default"


@pytest.mark.parametrize("py", SOURCES, ids=lambda p: p.stem)
def test_notebooks_hold_no_loops(py):
    """Loops over tokens, models or statistics belong in helpers, not in notebooks."""
    for c in _code_cells(jupytext.read(py)):
        src = "\n".join(l for l in c.source.splitlines() if not l.lstrip().startswith("%"))
        for node in ast.walk(ast.parse(src)):
            assert not isinstance(node, (ast.For, ast.While)), f"{py.stem}: a loop in a notebook cell:\n{c.source[:200]}"


def test_every_notebook_is_in_the_table_of_contents():
    toc = (ROOT / "_toc.yml").read_text()
    for py in SOURCES:
        assert f"book/executed/{py.stem}" in toc


def test_presets_parse_and_name_a_family():
    from helpers.families import KNOWN_FAMILIES
    from helpers.presets import available_presets, load_preset

    names = available_presets()
    assert {"smoke", "default", "gpt2-small", "gpt2-medium"} <= set(names)
    for n in names:
        assert load_preset(n)["family"] in KNOWN_FAMILIES


def test_unknown_preset_lists_known_ones():
    from helpers.presets import load_preset

    with pytest.raises(FileNotFoundError, match="smoke"):
        load_preset("gigantic")
