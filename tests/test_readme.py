"""The README's chapter table is generated (notebook titles + book/runtimes.yml) and must not drift;
the citation file is valid."""
from pathlib import Path

import pytest
import yaml

from helpers.book import build as book

ROOT = Path(__file__).resolve().parents[1]


def test_readme_chapter_table_is_the_generated_one():
    readme = (ROOT / "README.md").read_text()
    assert book.readme_with_table(readme, book.chapter_table(ROOT)) == readme, \
        "README.md's chapter table is stale: run `python -m helpers.book --readme`"


def test_every_chapter_has_a_row_and_a_parsed_title():
    table = book.chapter_table(ROOT)
    for name in book.notebook_names(ROOT):
        h = book.chapter_heading(ROOT / "notebooks" / f"{name}.py")
        assert h["number"] == name[:2] and h["paper"].startswith("§"), h
        assert f"`notebooks/{name}`" in table


def test_a_malformed_title_is_an_error(tmp_path):
    py = tmp_path / "09_x.py"
    py.write_text("# %% [markdown]\n# # 09 · No paper reference\n")
    with pytest.raises(ValueError, match="first line must read"):
        book.chapter_heading(py)


def test_runtimes_file_names_its_cpu_and_known_chapters():
    runtimes = book.load_runtimes(ROOT)
    assert runtimes, "book/runtimes.yml is empty"
    names = set(book.notebook_names(ROOT))
    for kind, entry in runtimes.items():
        assert entry["cpu"] and entry["measured"], kind
        assert set(entry["seconds"]) <= names, f"{kind}: runtimes of chapters that do not exist"
        assert all(v > 0 for v in entry["seconds"].values())


def test_citation_file_is_valid_cff():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["title"] and cff["authors"]
    ref = cff["preferred-citation"] if "preferred-citation" in cff else cff["references"][0]
    assert "2401.12181" in str(ref)


def _readme_map() -> dict[str, set[str]]:
    """{subpackage: {module, ...}} as the README's "Where things are" block lists them."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Where things are", 1)[1].split("```", 2)[1]
    out, sub = {}, None
    for line in block.splitlines():
        if line.startswith("  ") and not line.startswith("    ") and line.strip().split()[0].endswith("/"):
            sub = line.strip().split()[0].rstrip("/")
            out[sub] = set()
        elif line.startswith("    ") and sub is not None:
            out[sub].add(line.strip().split()[0])
    return out


def test_readme_map_of_the_package_matches_the_tree():
    package = ROOT / "src" / "helpers"
    tree = {d.name: {f.stem for f in d.glob("*.py") if not f.stem.startswith("__")}
            for d in package.iterdir() if (d / "__init__.py").is_file()}
    assert _readme_map() == tree, "README.md's \"Where things are\" map differs from src/helpers: update it"
    flat = sorted(f.name for f in package.glob("*.py") if f.name != "__init__.py")
    assert not flat, f"modules outside the subpackages: {flat}"
