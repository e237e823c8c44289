"""Browser test of a built book: every page renders, offline, without errors.

Opens every HTML page of the site in headless Chromium (driven by Playwright, with the system's
Chromium) with networking off: every request for anything outside the site's folder is blocked and
recorded. A page fails when

- a plotly figure does not render (fewer drawn `.plot-container` elements than `Plotly.newPlot` calls
  in its HTML),
- a circuitsvis view does not render (a `circuits-vis-*` container left empty or of zero height),
- it logs a JavaScript error (an uncaught exception or a `console.error`), or
- it requests anything outside the site (a CDN script, a web font, ...), or
- it links a static copy (PNG/SVG) of a figure that is not in the site, or
- something is wider than its container: a code cell that needs a horizontal scroll bar, a figure or
  axis title cut by the figure's frame, or a table, figure or output that runs past the page's
  edge outside a scrolling container (wide tables must scroll or wrap).

Writes a screenshot of every chapter page to `<site>/../screenshots/`. Exit status 1 if any page
failed, 2 if no browser is available.

    python scripts/check_book.py _build/html
    python scripts/check_book.py build/book-smoke/_build/html
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
SETTLE_MS = 1500  # after the load event: plotly and circuitsvis draw from scripts that run on load


@dataclass
class PageReport:
    page: str
    plotly_expected: int = 0
    plotly_drawn: int = 0
    views_expected: int = 0
    views_drawn: int = 0
    errors: list[str] = field(default_factory=list)
    outside: list[str] = field(default_factory=list)
    overflow: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.plotly_drawn >= self.plotly_expected and self.views_drawn >= self.views_expected
                and not self.errors and not self.outside and not self.overflow)

    def line(self) -> str:
        s = (f"{'ok  ' if self.ok else 'FAIL'} {self.page}: {self.plotly_drawn}/{self.plotly_expected} plotly figures, "
             f"{self.views_drawn}/{self.views_expected} circuitsvis views")
        if self.errors:
            s += f"; {len(self.errors)} JavaScript error(s): " + " | ".join(e[:160] for e in self.errors[:3])
        if self.outside:
            s += f"; {len(self.outside)} request(s) outside the site: " + ", ".join(u[:100] for u in self.outside[:3])
        if self.overflow:
            s += f"; {len(self.overflow)} element(s) wider than their container: " + " | ".join(
                o[:120] for o in self.overflow[:3])
        return s


def find_browser() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


# JavaScript evaluated in the page once it has settled.
COUNT_DRAWN = """() => ({
  plotlyDrawn: Array.from(document.querySelectorAll('.js-plotly-plot'))
          .filter(d => d.querySelector('.plot-container.plotly svg.main-svg')).length,
  views: Array.from(document.querySelectorAll('div[id^="circuits-vis-"]'))
          .filter(d => d.childElementCount > 0 && d.getBoundingClientRect().height > 0).length,
})"""


# Elements wider than their container (evaluated once the page has settled); one line each.
FIND_OVERFLOW = r"""() => {
  const article = document.querySelector('article.bd-article') || document.querySelector('main') || document.body;
  const edge = article.getBoundingClientRect().right;
  const out = [];
  const describe = el => {
    const c = el.getAttribute('class') || '';
    return el.tagName.toLowerCase() + (c ? '.' + c.trim().split(/\s+/).slice(0, 2).join('.') : '');
  };
  const scrolls = el => {
    for (let a = el.parentElement; a && a !== article; a = a.parentElement) {
      const s = getComputedStyle(a).overflowX;
      if ((s === 'auto' || s === 'scroll') && a.getBoundingClientRect().right <= edge + 2) return true;
    }
    return false;
  };
  // 1. the chapters' code cells: every line is visible without scrolling
  for (const pre of article.querySelectorAll('div.cell_input pre, div.highlight pre')) {
    if (pre.closest('div.cell_output')) continue;
    // a collapsed cell (hide-input) is not on the page until the reader opens it
    if (pre.getClientRects().length === 0 || (pre.checkVisibility && !pre.checkVisibility())) continue;
    if (pre.scrollWidth > pre.clientWidth + 2) {
      const longest = pre.textContent.split('\n').reduce((a, b) => (b.length > a.length ? b : a), '');
      out.push(`code cell wider than the page (${pre.scrollWidth}px in ${pre.clientWidth}px): ${longest.trim().slice(0, 70)}`);
    }
  }
  // 2. a figure's title or axis title cut by its own frame
  for (const fig of article.querySelectorAll('.js-plotly-plot')) {
    const frame = fig.getBoundingClientRect();
    for (const t of fig.querySelectorAll('.gtitle, .xtitle, .ytitle, .g-xtitle text, .g-ytitle text')) {
      const r = t.getBoundingClientRect();
      if (r.width && (r.right > frame.right + 2 || r.left < frame.left - 2))
        out.push(`figure title cut by its frame: ${t.textContent.slice(0, 70)}`);
    }
  }
  // 3. anything else past the article's right edge that is not inside a scrolling container
  for (const el of article.querySelectorAll('table, img, svg.main-svg, .js-plotly-plot, pre, div.cell_output > div')) {
    const r = el.getBoundingClientRect();
    if (r.width === 0 || r.right <= edge + 2 || scrolls(el)) continue;
    out.push(`${describe(el)} reaches ${Math.round(r.right - edge)}px past the page's edge`);
  }
  return out;
}"""


def _router(prefix: str, outside: list[str]):
    """A request handler that lets the site's own files through and blocks, and records, the rest."""
    def route(r):
        url = r.request.url
        if url.startswith(prefix) or url.startswith(("data:", "blob:", "about:")):
            r.continue_()
        else:
            outside.append(url)
            r.abort()
    return route


def check_site(site: str | Path, browser: str | None = None, screenshots: str | Path | None = None,
               settle_ms: int = SETTLE_MS) -> list[PageReport]:
    """Open every page under `site` and report what rendered; see the module docstring."""
    from playwright.sync_api import sync_playwright

    root = Path(site).resolve()
    pages = sorted(p for p in root.rglob("*.html") if not p.name.startswith("_") and "_static" not in p.parts
                   and p.name not in ("genindex.html", "search.html"))
    if not pages:
        raise FileNotFoundError(f"no HTML pages under {root}: build the book first (make book)")
    prefix = root.as_uri()
    reports = []
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=browser or find_browser(),
                                      args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        context = chromium.new_context(viewport={"width": 1280, "height": 2000})
        for path in pages:
            rep = PageReport(str(path.relative_to(root)))
            html = path.read_text(errors="replace")
            rep.plotly_expected = html.count("Plotly.newPlot(")
            rep.views_expected = html.count('id="circuits-vis-')
            for href in re.findall(r'class="static-figure-links".*?</p>', html, flags=re.S):
                for target in re.findall(r'href="([^"]+)"', href):
                    if not (path.parent / target).resolve().is_file():
                        rep.errors.append(f"static figure missing: {target}")
            page = context.new_page()

            page.route("**/*", _router(prefix, rep.outside))
            page.on("pageerror", lambda e, rep=rep: rep.errors.append(f"uncaught: {e}"))
            page.on("console", lambda m, rep=rep: m.type == "error" and rep.errors.append(f"console.error: {m.text}"))
            page.goto(path.as_uri(), wait_until="load")
            page.wait_for_timeout(settle_ms)
            counts = page.evaluate(COUNT_DRAWN)
            rep.plotly_drawn, rep.views_drawn = counts["plotlyDrawn"], counts["views"]
            rep.overflow = page.evaluate(FIND_OVERFLOW)
            # a blocked request also logs a console error; it is reported once, as a request outside the site
            rep.errors = [e for e in rep.errors if "net::ERR_FAILED" not in e or not rep.outside]
            if screenshots is not None and (rep.plotly_expected or rep.views_expected):
                Path(screenshots).mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(Path(screenshots) / (path.stem + ".png")), full_page=False)
            page.close()
            reports.append(rep)
        chromium.close()
    return reports


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("site", nargs="?", default="_build/html", help="the built site (the folder holding index.html)")
    ap.add_argument("--browser", default=None, help="path of a Chromium binary (default: chromium on PATH)")
    ap.add_argument("--max-mb", type=float, default=None, help="fail if the whole site is larger than this (MB)")
    args = ap.parse_args(argv)
    browser = args.browser or find_browser()
    if browser is None:
        print("error: no Chromium found. Install it with `make browser` (Debian's chromium package) "
              "or pass --browser PATH")
        return 2
    site = Path(args.site)
    reports = check_site(site, browser, screenshots=site.resolve().parent / "screenshots")
    for rep in reports:
        print(rep.line())
    failed = [r for r in reports if not r.ok]
    n_fig = sum(r.plotly_drawn for r in reports)
    n_views = sum(r.views_drawn for r in reports)
    size = sum(f.stat().st_size for f in site.rglob("*") if f.is_file()) / 1e6
    print(f"{len(reports)} pages, {n_fig} plotly figures and {n_views} circuitsvis views drawn; "
          f"{len(failed)} page(s) failed; the site is {size:.1f} MB")
    if args.max_mb is not None and size > args.max_mb:
        print(f"FAIL the site is larger than --max-mb {args.max_mb:g}")
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
