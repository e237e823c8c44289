"""The browser test of the built book (scripts/check_book.py) on a hand-built site with known faults:
it must pass the good page and name each fault on the bad ones."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("check_book", ROOT / "scripts" / "check_book.py")
check_book = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = check_book  # dataclasses look their module up
spec.loader.exec_module(check_book)

pytestmark = pytest.mark.skipif(check_book.find_browser() is None,
                                reason="no Chromium on this machine (`make browser` installs it; make test does)")


def _figure_html(div: str, data) -> str:
    return (f'<div id="{div}" style="height:300px"></div><script>'
            f'Plotly.newPlot("{div}", {json.dumps(data)}, {{}});</script>')


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    import circuitsvis
    from helpers.book.plots import plotly_js_path

    root = tmp_path_factory.mktemp("site")
    (root / "_static").mkdir()
    (root / "_static" / "plotly.min.js").write_bytes(plotly_js_path().read_bytes())
    head = '<html><head><script src="_static/plotly.min.js"></script></head><body>'
    view = circuitsvis.tokens.colored_tokens(["one", " two", " three"], [0.1, 0.9, 0.4]).local_src
    pages = {
        "good.html": head + _figure_html("a", [{"y": [1, 3, 2]}]) + _figure_html("b", [{"x": [1, 2], "type": "bar"}])
                     + view + "</body></html>",
        # the second figure's call throws (its div does not exist): one drawn of two, and an error
        "bad_figure.html": head + _figure_html("a", [{"y": [1, 2]}])
                           + '<script>Plotly.newPlot("missing", [{"y": [1]}], {});</script></body></html>',
        "empty_view.html": head + '<div id="circuits-vis-0000-dead"></div></body></html>',
        "js_error.html": head + "<script>notDefinedAnywhere();</script></body></html>",
        "outside.html": head + '<img src="https://example.invalid/logo.png"></body></html>',
        "console.html": head + '<script>console.error("something broke")</script></body></html>',
        # a code line too long for the column, a table past the page's edge, a table that scrolls, and a
        # figure whose title runs past its frame
        "wide.html": head + '<article class="bd-article" style="width:600px">'
                     '<div class="cell_input"><pre style="overflow-x:auto">' + "x = 1  # " + "long " * 40 + '</pre></div>'
                     '<table><tr><td style="white-space:nowrap">' + "wide cell " * 60 + '</td></tr></table>'
                     '<div style="overflow-x:auto"><table><tr><td style="white-space:nowrap">' + "fine " * 200
                     + '</td></tr></table></div>'
                     + _figure_html("t", [{"y": [1, 2]}]).replace("{}", '{"title": {"text": "' + "a long title " * 12
                                                                   + '"}, "width": 400}')
                     + '</article></body></html>',
        "narrow.html": head + '<article class="bd-article" style="width:600px">'
                       '<div class="cell_input"><pre style="overflow-x:auto">x = 1  # short</pre></div>'
                       '<table><tr><td>' + "a cell that wraps " * 30 + '</td></tr></table>'
                       + _figure_html("t", [{"y": [1, 2]}]).replace("{}", '{"title": {"text": "short"}, "width": 400}')
                       + '</article></body></html>',
        "static.html": head + '<p class="static-figure-links"><a href="_static/plotly.min.js">JS</a> · '
                       '<a href="figures/none.png">PNG</a></p></body></html>',
    }
    for name, html in pages.items():
        (root / name).write_text(html)
    return {r.page: r for r in check_book.check_site(root, settle_ms=500)}


def test_a_good_page_passes_with_its_figures_and_view_counted(site):
    r = site["good.html"]
    assert (r.plotly_expected, r.plotly_drawn, r.views_expected, r.views_drawn) == (2, 2, 1, 1)
    assert r.ok, r.line()


def test_a_figure_that_does_not_draw_fails(site):
    r = site["bad_figure.html"]
    assert (r.plotly_expected, r.plotly_drawn) == (2, 1) and not r.ok


def test_an_empty_circuitsvis_view_fails(site):
    r = site["empty_view.html"]
    assert (r.views_expected, r.views_drawn) == (1, 0) and not r.ok


def test_javascript_errors_fail(site):
    assert any("notDefinedAnywhere" in e for e in site["js_error.html"].errors) and not site["js_error.html"].ok
    assert any("something broke" in e for e in site["console.html"].errors) and not site["console.html"].ok


def test_a_request_outside_the_site_is_blocked_and_fails(site):
    r = site["outside.html"]
    assert r.outside == ["https://example.invalid/logo.png"] and not r.ok


def test_a_link_to_a_missing_static_figure_fails(site):
    assert site["static.html"].errors == ["static figure missing: figures/none.png"]


def test_elements_wider_than_their_container_fail(site):
    r = site["wide.html"]
    assert not r.ok
    kinds = sorted(o.split(" (")[0].split(":")[0] if o.startswith("code") else o.split(":")[0].split(" reaches")[0]
                   for o in r.overflow)
    assert kinds == ["code cell wider than the page", "figure title cut by its frame", "table"], r.overflow
    assert site["narrow.html"].overflow == [] and site["narrow.html"].ok, site["narrow.html"].line()
