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
