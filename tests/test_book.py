"""The book build's separate output folders and its offline behaviour on paper-scale presets."""
import time
from pathlib import Path

import pytest

from helpers.book import build as book
from helpers.core.presets import load_preset
from helpers.data.hub import HubUnreachable

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


def _plotly_output(title: str) -> dict:
    import nbformat

    fig = {"data": [{"type": "scatter", "y": [1, 3, 2]}], "layout": {"title": {"text": title}, "height": 300}}
    return nbformat.v4.new_output("display_data", data={book.PLOTLY_MIME: fig, "text/html": "<div></div>"})


@pytest.mark.skipif(__import__("shutil").which("chromium") is None, reason="kaleido needs Chromium (`make browser`)")
def test_static_copies_of_paper_figures_only_and_idempotent(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("fig")
    cell.outputs = [_plotly_output("Fig 5a · vocabulary effect"), _plotly_output("Training curves"),
                    _plotly_output("Fig 5a · the same figure for another model")]
    nb.cells = [cell]
    path = tmp_path / "04_x.ipynb"
    nbformat.write(nb, path)
    static = tmp_path / "_static"
    written = book.export_static_figures(path, static)
    names = sorted(p.name for p in written)
    assert names == ["fig-5a-2.png", "fig-5a-2.svg", "fig-5a.png", "fig-5a.svg"]
    assert all(p.stat().st_size > 1000 for p in written)
    assert (static / "figures" / "04_x" / "fig-5a.svg").read_text().lstrip().startswith("<svg")
    outs = nbformat.read(path, as_version=4).cells[0].outputs
    links = [o for o in outs if book.STATIC_MARK in str(o.get("data", {}).get("text/html", ""))]
    assert len(outs) == 5 and len(links) == 2 and "../../_static/figures/04_x/fig-5a.png" in links[0].data["text/html"]
    book.export_static_figures(path, static)  # a second export replaces its links
    assert len(nbformat.read(path, as_version=4).cells[0].outputs) == 5


def test_headline_counts_verdicts_links_chapters_and_names_missing_results(tmp_path):
    import pandas as pd

    from helpers.core import report

    names = book.notebook_names(ROOT)[:2]
    rvp = pd.DataFrame({"quantity": ["share", "depth", "seeds", "spread", "rho", "consistency"],
                        "this book": [0.01, "late", 5, 0.05, 0.3, "0 neurons"],
                        "verdict": ["matched", "differs", "not scored", "not informative", "not informative",
                                    "not measured"]}).set_index("quantity")
    params = load_preset("smoke", artifacts_dir=str(tmp_path))
    path = report.publish(names[0], params, {"Result vs paper": rvp})
    assert path == tmp_path / "results" / "smoke" / f"{names[0]}.json"
    site = tmp_path / "site"
    text = book.write_headline(site, params, names, ROOT).read_text()
    assert ("6 comparisons with the paper: 1 matched, 1 differ, 2 not informative (the untrained control passes the same "
            "test), 1 not measured, 1 not scored.") in text
    assert "| matched | differs | not informative | not measured | not scored | other |" in text
    assert f"<executed/{names[0]}>` | " in text and "| 1 | 1 | 2 | 1 | 1 | 0 |" in text
    assert "| share | 0.01 | matched |" in text
    assert "This chapter saved no results in this build." in text  # names[1] published nothing


def test_headline_counts_rows_beyond_the_paper_apart_from_the_papers(tmp_path):
    import pandas as pd

    from helpers.core import report

    names = book.notebook_names(ROOT)[:1]
    rvp = pd.DataFrame({"quantity": ["a", "b"], "verdict": ["matched", "differs"]}).set_index("quantity")
    beyond = pd.DataFrame({"quantity": ["c", "d", "e"],
                           "verdict": ["matched", "matched", "not informative"]}).set_index("quantity")
    params = load_preset("smoke", artifacts_dir=str(tmp_path))
    report.publish(names[0], params, {"Result vs paper": rvp, report.BEYOND_TITLE: beyond})
    text = book.write_headline(tmp_path / "site", params, names, ROOT).read_text()
    assert "2 comparisons with the paper: 1 matched, 1 differ, 0 not informative" in text
    assert ("Beyond the paper, 3 comparisons with its follow-ups: 2 matched, 0 differ, 1 not informative"
            in text)
    assert "| 1 | 1 | 0 | 0 | 0 | 0 |" in text  # the chapter's row counts the paper's rows only
    assert f"**{report.BEYOND_TITLE}**" in text  # and the follow-ups' table is shown


def test_long_figure_titles_are_wrapped_to_the_column_and_short_ones_kept():
    import plotly.graph_objects as go

    from helpers.book import plots

    long = "Fig 6a · " + "a title that names the figure and says what every line means " * 3
    fig = go.Figure(go.Scatter(y=[1, 2])).update_layout(title=long, height=300, xaxis_title="x " * 80,
                                                       yaxis_title="short")
    out = plots.wrap_titles(fig.to_dict())
    lines = out["layout"]["title"]["text"].split("<br>")
    assert len(lines) > 1 and max(map(len, lines)) <= plots.TITLE_CHARS
    assert " ".join(lines) == long.strip()
    assert max(map(len, out["layout"]["xaxis"]["title"]["text"].split("<br>"))) <= plots.AXIS_CHARS
    assert out["layout"]["yaxis"]["title"]["text"] == "short"
    assert fig.layout.title.text == long  # the figure itself is not changed
    # a subplot's x-axis title wraps to its own share of the width
    from plotly.subplots import make_subplots

    two = make_subplots(rows=1, cols=2).update_xaxes(title_text="x " * 60, row=1, col=2)
    axis = plots.wrap_titles(two.to_dict())["layout"]["xaxis2"]
    share = axis["domain"][1] - axis["domain"][0]
    assert max(map(len, axis["title"]["text"].split("<br>"))) <= max(20, int(plots.AXIS_CHARS * share))
