"""The book build's separate output folders and its offline behaviour on paper-scale presets."""
import time
from pathlib import Path

import pytest

from helpers import book
from helpers.hub import HubUnreachable

ROOT = Path(__file__).resolve().parents[1]


def test_default_book_is_the_repository_and_other_presets_get_their_own_folder():
    assert book.default_site("default", ROOT) == ROOT
    assert book.default_site("gpt2-small", ROOT) == ROOT / "build" / "book-gpt2-small"
    assert book.default_site("smoke", ROOT) == ROOT / "build" / "book-smoke"


@pytest.mark.parametrize("preset", ["gpt2-small", "gpt2-medium", "pythia-160m"])
def test_paper_scale_book_fails_fast_offline_and_writes_nothing(preset, offline, tmp_path):
    site = tmp_path / "site"
    t0 = time.time()
    with pytest.raises(HubUnreachable, match="params/default.yaml"):
        book.build(preset, site=site)
    assert time.time() - t0 < 5 and not site.exists()


def test_prepare_site_copies_config_toc_and_pages(tmp_path):
    book.prepare_site(tmp_path, ROOT)
    assert (tmp_path / "_config.yml").read_text() == (ROOT / "_config.yml").read_text()
    assert (tmp_path / "_toc.yml").is_file() and (tmp_path / "book" / "intro.md").is_file()


def test_executed_folder_missing_a_chapter_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="--executed must name a folder"):
        book.build("smoke", notebooks=["00_seed_family"], skip_html=True, site=tmp_path / "s", executed=tmp_path / "none")
