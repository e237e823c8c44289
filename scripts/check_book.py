"""Browser check of the built book: every chapter page renders its plotly figures offline.

Loads each page of `_build/html/book/executed/` in headless Chromium with networking disabled,
lets its scripts run, and counts the figures that plotly actually drew (`svg.main-svg`). Writes a
screenshot of each page next to it in `_build/screenshots/`. Exit status 1 if a page that holds a
plotly figure rendered none.

    python scripts/check_book.py _build/html
"""

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--virtual-time-budget=15000", "--window-size=1280,6000"]


def main(html_dir: str = "_build/html") -> int:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        print("chromium not found: `apt-get install chromium`")
        return 2
    root = Path(html_dir).resolve()
    pages = sorted((root / "book" / "executed").glob("*.html"))
    if not pages:
        print(f"no chapter pages under {root}/book/executed")
        return 1
    shots = root.parent / "screenshots"
    shots.mkdir(exist_ok=True)
    failed = False
    for page in pages:
        expected = page.read_text().count("Plotly.newPlot")
        with tempfile.TemporaryDirectory() as profile:
            dom = subprocess.run([chromium, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
                                 capture_output=True, text=True, timeout=180).stdout
            subprocess.run([chromium, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={shots / (page.stem + '.png')}",
                            page.as_uri()], capture_output=True, text=True, timeout=180)
        drawn = len(re.findall(r"class=\"plot-container plotly\"", dom))  # one per figure plotly rendered
        ok = expected == 0 or drawn >= expected
        failed |= not ok
        print(f"{'ok ' if ok else 'FAIL'} {page.name}: {drawn} of {expected} plotly figures drawn")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
