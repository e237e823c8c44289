"""The end-to-end book build: corpus -> seed family -> every notebook (papermill) -> Jupyter Book.

`python -m helpers.book --preset default` is what `make book` runs. Each step is cached (corpus and
models by their configuration), notebooks are executed into `book/executed/` (build output, never
committed), the run record (versions, hardware, preset, corpus provenance, timings) is written to
`book/_generated/run_record.md` for the reproducibility page, and `jupyter-book build` writes
`_build/html`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from helpers.core.cache import read_json, write_json
from helpers.core.paper import VERDICTS
from helpers.core.report import BEYOND_TITLE
from helpers.core.cli import add_preset_options
from helpers.core.presets import Preset, load_preset, preset_path, published_ref, repo_root
from helpers.core.report import results_folder

PACKAGES = ["torch", "transformer_lens", "transformers", "numpy", "pandas", "plotly", "circuitsvis",
            "papermill", "jupytext", "jupyter-book", "nbmake", "safetensors", "scipy"]


def notebook_names(root: Path | None = None) -> list[str]:
    root = root or repo_root()
    return sorted(p.stem for p in (root / "notebooks").glob("[0-9][0-9]_*.py"))


def sync_notebook(py: Path) -> Path:
    """Make sure the paired .ipynb exists and matches its .py source (jupytext)."""
    import jupytext
    from jupytext.cli import jupytext as jupytext_cli

    nb_path = py.with_suffix(".ipynb")

    def content(nb):
        return [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in nb.cells]

    if not nb_path.is_file() or content(jupytext.read(nb_path)) != content(jupytext.read(py)):
        jupytext_cli(["--sync", "--quiet", str(py)])  # keeps the .ipynb's cell ids
    return nb_path


def execute_notebook(name: str, preset_file: Path, out_dir: Path, root: Path | None = None, extra: dict | None = None) -> float:
    """Execute notebooks/<name>.ipynb with papermill on a preset (injected as `preset` alone: the
    notebook reads every other value from the preset file); returns seconds."""
    import papermill as pm

    root = root or repo_root()
    nb = sync_notebook(root / "notebooks" / f"{name}.py")
    in_params = preset_file.resolve().parent == (root / "params").resolve()
    params = {"preset": preset_file.stem if in_params else str(preset_file.resolve()), **(extra or {})}
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    pm.execute_notebook(str(nb), str(out_dir / f"{name}.ipynb"), parameters=params, cwd=str(root),
                        kernel_name="python3", progress_bar=False, log_output=False, request_save_on_cell_execute=False)
    return time.time() - t0


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in PACKAGES:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = "not installed"
    return out


def hardware() -> dict:
    import torch

    info = {"python": sys.version.split()[0], "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    from helpers.models.training import cpu_description

    cpu = cpu_description()
    info["cpu"] = cpu["model"]
    info["cpu bf16 instructions"] = ", ".join(cpu["bf16_flags"]) or "none (fp32 only)"
    info["torch cpu capability"] = cpu["capability"]
    try:
        with open("/proc/meminfo") as f:
            info["memory_gb"] = round(int(f.readline().split()[1]) / 1e6, 1)
    except OSError:
        pass
    return info


def _md_table(rows: list[dict]) -> str:
    if not rows:
        return "(none)\n"
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out) + "\n"


def _model_checksums(params) -> list[dict]:
    """The real models' weights files and checksums (`single_model` and `second_model`; the embedded
    family's are listed with it). Gemma's assembled file is verified against its pinned sha256."""
    from helpers.core.cache import sha256_file
    from helpers.models.gemma import GEMMA_NAME, GEMMA_SHA256, gemma_gguf
    from helpers.models.loading import SMOLLM2_FILE, smollm2_path

    out = []
    for name in dict.fromkeys(params.get(k) for k in ("single_model", "second_model")):
        try:
            if name == "smollm2-135m":
                path = smollm2_path() / SMOLLM2_FILE
                out.append({"model": name, "file": path.name, "sha256": sha256_file(path)})
            elif name == GEMMA_NAME:
                path = gemma_gguf(params.artifacts_path)  # assembles if needed; hashed and checked, raises if damaged
                out.append({"model": name, "file": path.name, "sha256": GEMMA_SHA256})
        except (ModuleNotFoundError, FileNotFoundError) as e:  # a package is missing: say so on the page rather than fail the build
            out.append({"model": name, "file": "not installed", "sha256": str(e)[:80]})
    return out


def write_run_record(record: dict, path: Path) -> None:
    """The generated part of `book/reproducibility.md`."""
    lines = [f"*Generated by `python -m helpers.book` on {record['date']} (preset `{record['preset']}`).*\n"]
    if record.get("chapters"):
        lines.append("### Chapters\n")
        lines.append(_md_table(record["chapters"]))
    lines.append("### Run times\n")
    lines.append(_md_table([{"step": k, "seconds": round(v, 1)} for k, v in record["timings"].items()]))
    lines.append("\n### Hardware\n")
    lines.append(_md_table([{"item": k, "value": v} for k, v in record["hardware"].items()]))
    lines.append("\n### Package versions\n")
    lines.append(_md_table([{"package": k, "version": v} for k, v in record["versions"].items()]))
    lines.append("\n### Preset\n")
    lines.append("```yaml\n" + record["preset_text"].strip() + "\n```\n")
    corpus = record.get("corpus")
    if corpus:
        lines.append("\n### Corpus provenance\n")
        lines.append(f"Corpus `{corpus['key']}`: {corpus['n_train_tokens']:,} training and {corpus['n_val_tokens']:,} "
                     f"validation GPT-2 tokens; content sha256 `{corpus['content_sha256']}`.\n\n")
        rows = []
        for label, info in corpus["inputs"].items():
            what = info.get("package") or info.get("python") and f"CPython {info['python']} stdlib" or info.get("path", "")
            rows.append({"source": label, "input": what, "version": info.get("version", info.get("python", "")),
                         "input sha256": str(info.get("sha256", ""))[:16] + "…", "documents": info.get("n_documents")})
        lines.append(_md_table(rows))
        lines.append("\nToken files (sha256):\n\n")
        lines.append(_md_table([{"file": k, "sha256": v} for k, v in corpus["outputs_sha256"].items()]))
    fam = record.get("family")
    if fam:
        lines.append("\n### Embedded family\n")
        lines.append(f"Weights: {fam['source']}, folder `{fam['folder']}`; weight processing on load: "
                     f"`{json.dumps(fam['processing'])}`. Training precision this machine would choose: "
                     f"{fam['precision_here']['precision']} ({fam['precision_here']['reason']}).\n\n")
        lines.append(_md_table([{"member": m, "seed": fam["seeds"][m], "validation loss (nats)": round(v, 4),
                                 "trained in": fam["precision"].get(m, "?"), "training seconds": round(fam["train_seconds"][m], 1),
                                 "weights sha256": fam["sha256"][m][:16] + "…"} for m, v in fam["val_loss"].items()]))
    if record.get("models"):
        lines.append("\n### Other models\n")
        lines.append(_md_table(record["models"]))
    if record.get("seeds"):
        lines.append("\n### Seeds\n")
        lines.append(_md_table([{"what": k, "seed": v if not isinstance(v, dict) else ", ".join(f"{m}: {x}" for m, x in v.items())}
                                for k, v in record["seeds"].items()]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def execution_key(name: str, preset_file: Path, root: Path) -> str:
    """Hash of everything a chapter's execution depends on: its source, the preset, the helpers."""
    import hashlib

    h = hashlib.sha256()
    for f in [root / "notebooks" / f"{name}.py", preset_file, *sorted((root / "src" / "helpers").rglob("*.py"))]:
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Static copies (PNG, SVG) of the figures compared with the paper
# --------------------------------------------------------------------------------------------

PAPER_FIGURE = re.compile(r"^\s*Figs?\.?\s+\d")  # a figure whose title names a paper figure: "Fig 2a · ..."
PLOTLY_MIME = "application/vnd.plotly.v1+json"
STATIC_MARK = "static-figure-links"


def _figure_title(fig: dict) -> str:
    title = (fig.get("layout") or {}).get("title") or ""
    return title.get("text", "") if isinstance(title, dict) else str(title)


def _slug(title: str) -> str:
    head = re.split(r"\s[·:]\s|:", title, maxsplit=1)[0]
    return re.sub(r"[^a-z0-9]+", "-", head.lower()).strip("-")


def export_static_figures(notebook: Path, static_dir: Path, formats: tuple[str, ...] = ("png", "svg")) -> list[Path]:
    """Export every plotly figure of an executed `notebook` whose title names a paper figure
    ("Fig 2a · ...") as PNG and SVG (kaleido, headless Chromium) into
    `static_dir/figures/<chapter>/`, and add a line of links under the figure in the notebook. The
    book serves `static_dir` as `_static/`; the chapter pages sit two levels below the site root.
    Re-running replaces the links rather than adding more. Returns the written files."""
    import kaleido
    import nbformat

    nb = nbformat.read(notebook, as_version=4)
    chapter = notebook.stem
    out_dir = static_dir / "figures" / chapter
    jobs, written, seen = [], [], {}
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        outputs = []
        for out in cell.get("outputs", []):
            if STATIC_MARK in str(out.get("data", {}).get("text/html", "")):
                continue  # links from an earlier export
            outputs.append(out)
            fig = out.get("data", {}).get(PLOTLY_MIME)
            if not fig or not PAPER_FIGURE.match(_figure_title(fig)):
                continue
            slug = _slug(_figure_title(fig))
            seen[slug] = seen.get(slug, 0) + 1
            name = slug if seen[slug] == 1 else f"{slug}-{seen[slug]}"
            links = []
            for fmt in formats:
                path = out_dir / f"{name}.{fmt}"
                jobs.append({"fig": fig, "path": str(path), "opts": {"format": fmt, "width": 1000,
                                                                      "height": (fig.get("layout") or {}).get("height") or 450}})
                written.append(path)
                links.append(f'<a href="../../_static/figures/{chapter}/{name}.{fmt}">{fmt.upper()}</a>')
            outputs.append(nbformat.v4.new_output("display_data", data={
                "text/html": f'<p class="{STATIC_MARK}">Static copies of this figure: {" · ".join(links)}</p>'}))
        cell.outputs = outputs
    if jobs:
        out_dir.mkdir(parents=True, exist_ok=True)
        kaleido.write_fig_from_object_sync(jobs, cancel_on_error=True)
        missing = [p for p in written if not p.is_file()]
        if missing:
            raise RuntimeError(f"kaleido wrote no {missing[0]}: it needs Chromium (`make browser`)")
    nbformat.write(nb, notebook)
    return written


# --------------------------------------------------------------------------------------------
# The front page's headline: every chapter's computed "Result vs paper" tables
# --------------------------------------------------------------------------------------------

def _md_escape(v) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def headline_markdown(results: dict[str, dict | None], root: Path | None = None) -> str:
    """The front page's chapter list and "Result vs paper" tables, from the files chapters write with
    `report.publish` ({chapter: its JSON, or None when it wrote none}). Nothing here is typed: a
    chapter without a results file says so."""
    root = root or repo_root()

    def count(beyond: bool) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for name, res in results.items():
            counts: dict[str, int] = {}
            for title, tab in (res or {}).get("tables", {}).items():
                if "verdict" in tab["columns"] and (title == BEYOND_TITLE) == beyond:
                    i = tab["columns"].index("verdict")
                    for row in tab["rows"]:
                        if row[i]:
                            counts[row[i]] = counts.get(row[i], 0) + 1
            out[name] = counts
        return out

    def tally(verdicts: dict[str, dict[str, int]], what: str) -> str:
        # every verdict is counted under its own name: "not informative" (the untrained control passes
        # too) and "not measured" are never counted as matched; an unknown verdict goes to "other"
        total = {k: sum(c.get(k, 0) for c in verdicts.values()) for k in VERDICTS}
        n_other = sum(v for c in verdicts.values() for k, v in c.items() if k not in VERDICTS)
        return (f"{sum(total.values()) + n_other} {what}: {total['matched']} matched, {total['differs']} differ, "
                f"{total['not informative']} not informative (the untrained control passes the same test), "
                f"{total['not measured']} not measured, {total['not scored']} not scored"
                + (f", {n_other} other" if n_other else ""))

    # the paper's rows and the follow-ups' rows (sections beyond the paper) are counted apart
    verdicts, beyond = count(False), count(True)
    lines = [f"*Computed by the build of this book from each chapter's results; "
             f"{tally(verdicts, 'comparisons with the paper')}.*\n"]
    if any(beyond.values()):
        lines.append(f"*Beyond the paper, {tally(beyond, 'comparisons with its follow-ups')}.*\n")
    lines += ["| chapter | paper | " + " | ".join(VERDICTS) + " | other |", "|---|---|" + "---|" * (len(VERDICTS) + 1)]
    for name in results:
        h = chapter_heading(root / "notebooks" / f"{name}.py")
        c = verdicts[name]
        other = sum(v for k, v in c.items() if k not in VERDICTS)
        lines.append(f"| {{doc}}`{h['number']} · {h['title']} <executed/{name}>` | {h['paper']} | "
                     + " | ".join(str(c.get(k, 0)) for k in VERDICTS) + f" | {other} |")
    for name, res in results.items():
        h = chapter_heading(root / "notebooks" / f"{name}.py")
        lines.append(f"\n### {h['number']} · {h['title']}\n")
        if not res:
            lines.append("This chapter saved no results in this build.\n")
            continue
        lines.append(f"From {{doc}}`the chapter <executed/{name}>` (preset `{res['preset']}`, {res['date']}).\n")
        for title, tab in res["tables"].items():
            lines.append(f"**{title}**\n")
            if not tab["rows"]:
                lines.append("(empty)\n")
                continue
            lines.append("| " + " | ".join(_md_escape(c) for c in tab["columns"]) + " |")
            lines.append("|" + "---|" * len(tab["columns"]))
            lines += ["| " + " | ".join(_md_escape(v) for v in row) + " |" for row in tab["rows"]]
            lines.append("")
    return "\n".join(lines) + "\n"


def write_headline(site: Path, params: Preset, names: list[str], root: Path | None = None) -> Path:
    """The front page's summary of every chapter's published "Result vs paper" tables."""
    results = {}
    for name in names:
        f = results_folder(params) / f"{name}.json"
        res = read_json(f) if f.is_file() else None
        tables = (res or {}).get("tables", {})
        if res is not None and not all(isinstance(t, dict) and {"columns", "rows"} <= set(t) for t in tables.values()):
            print(f"warning: {f} is not in the format report.publish writes; re-execute {name} to refresh it", flush=True)
            res = None
        results[name] = res
    path = site / "book" / "_generated" / "headline.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(headline_markdown(results, root))
    return path


SITE_FILES = ["_config.yml", "_toc.yml"]  # plus book/*.md and book/_static/*.css: what a book needs besides its chapters


def default_site(preset: str, root: Path | None = None) -> Path:
    """Where a preset's book is built: the repository itself for the default preset (the published
    book), `build/book-<preset>/` for every other one, so a paper-scale or smoke re-run never
    overwrites the default book's chapters."""
    root = root or repo_root()
    return root if Path(preset).stem == "default" else root / "build" / f"book-{Path(preset).stem}"


def prepare_site(site: Path, root: Path) -> None:
    """Copy the book's configuration and prose pages into `site` (a separate output folder)."""
    (site / "book").mkdir(parents=True, exist_ok=True)
    for name in SITE_FILES:
        shutil.copy2(root / name, site / name)
    for page in (root / "book").glob("*.md"):
        shutil.copy2(page, site / "book" / page.name)
    (site / "book" / "_static").mkdir(exist_ok=True)
    for style in (root / "book" / "_static").glob("*.css"):  # the book's own layout rules
        shutil.copy2(style, site / "book" / "_static" / style.name)


def build(preset: str = "default", notebooks: list[str] | None = None, skip_html: bool = False, force: bool = False,
          site: str | Path | None = None, executed: str | Path | None = None) -> Path:
    """Execute every chapter on `preset` and build the book in `site` (see `default_site`).

    `executed`: a folder of chapters already executed on this preset (e.g. by `make test`, which runs
    them with nbmake --overwrite); they are copied instead of executed again."""
    root = repo_root()
    pfile = preset_path(preset)
    params = load_preset(pfile)
    site = Path(site).resolve() if site else default_site(pfile.stem, root)
    from helpers.models.families import HUB_FAMILIES
    from helpers.data.hub import require_hub

    for name in {params.get("family"), params.get("single_model")} & set(HUB_FAMILIES):
        require_hub(f"the {name!r} models of preset {pfile.stem!r}")  # before anything is executed or written
    if site != root:
        prepare_site(site, root)
    timings: dict[str, float] = {}
    record: dict = {"preset": pfile.stem, "preset_text": pfile.read_text(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if params.family.startswith("embedded"):
        from helpers.data.corpus import preset_corpus
        from helpers.models.families import embedded_family
        from helpers.models.training import choose_precision
        from helpers.models.weights import member_seed

        t0 = time.time()
        corpus = preset_corpus(params)
        timings["corpus (build or reuse)"] = time.time() - t0
        t0 = time.time()
        # the shipped weights when they match the preset; trains (and says so) only when none do
        fam = embedded_family(params, device=params.device, train=True)
        timings["seed family (shipped, cached or trained)"] = time.time() - t0
        folder = Path(fam.info["family_folder"])
        arch = params.arch
        record["corpus"] = corpus.provenance
        record["family"] = {"source": fam.info["source"], "folder": str(folder.relative_to(root)) if folder.is_relative_to(root) else str(folder),
                            "processing": fam.info["processing"], "val_loss": fam.info["val_loss"],
                            "train_seconds": fam.info["train_seconds"], "precision": fam.info.get("precision", {}),
                            "seeds": {m: int(fam.info["base_seed"]) + i for i, m in enumerate(fam.members)},
                            "sha256": {m: v.removeprefix("sha256:") for m, v in fam.identity.items()},
                            "precision_here": choose_precision(params.recipe.precision, params.device,
                                                               arch.d_model, arch.d_vocab)}
        record["seeds"] = {"embedded family (initialisation and data order)": record["family"]["seeds"],
                           "untrained control (initialisation)": {m: member_seed(int(fam.info["base_seed"]), m, untrained=True)
                                                                  for m in fam.members}}
    record.setdefault("seeds", {}).update({"rotation baseline (baseline_seed)": params.get("baseline_seed"),
                                           "text samples (sample_seed)": params.get("sample_seed")})
    record["models"] = _model_checksums(params)
    chapters: list[dict] = []
    out_dir = site / "book" / "executed"
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in notebooks or notebook_names(root):
        if executed is not None:
            src = Path(executed) / f"{name}.ipynb"
            if not src.is_file():
                raise FileNotFoundError(f"{src} missing: --executed must name a folder holding every executed chapter "
                                        f"(make test writes them to build/smoke/)")
            shutil.copy2(src, out_dir / f"{name}.ipynb")
            print(f"{name}: executed earlier in {executed}, copied", flush=True)
            chapters.append({"chapter": name, "status": f"executed by the tests (nbmake), copied from {executed}", "seconds": ""})
            continue
        key = execution_key(name, pfile, root)
        stamp = out_dir / f".{name}.key"
        last = read_json(stamp) if stamp.is_file() else {}
        if not force and (out_dir / f"{name}.ipynb").is_file() and last.get("key") == key:
            print(f"{name}: unchanged since its last execution (notebook, preset and helpers), reused", flush=True)
            timings[f"notebook {name} (executed earlier)"] = last["seconds"]
            chapters.append({"chapter": name, "status": "reused: unchanged since its last execution", "seconds": round(last["seconds"])})
            continue
        print(f"executing {name} ...", flush=True)
        stamp.unlink(missing_ok=True)
        timings[f"notebook {name}"] = execute_notebook(name, pfile, out_dir, root)
        write_json(stamp, {"key": key, "seconds": timings[f"notebook {name}"]})
        print(f"  {timings[f'notebook {name}']:.0f} s", flush=True)
        chapters.append({"chapter": name, "status": "executed by this build (papermill)", "seconds": round(timings[f"notebook {name}"])})
    for c in chapters:
        res = results_folder(params) / f"{c['chapter']}.json"
        c["preset"] = pfile.stem
        c["results for the front page"] = read_json(res)["date"] if res.is_file() else "none saved"
    record.update(timings=timings, chapters=chapters, hardware=hardware(), versions=package_versions())
    write_json(params.artifacts_path / f"run_record_{pfile.stem}.json", record)
    write_run_record(record, site / "book" / "_generated" / "run_record.md")
    write_headline(site, params, notebook_names(root), root)
    if skip_html:
        return out_dir
    from helpers.book.plots import install_plotly_js

    install_plotly_js(site / "book" / "_static")
    from helpers.book.browser import build_browser

    t0 = time.time()
    info = build_browser(site, params, device=params.device)
    print(f"neuron browser: {info['neurons']:,} neurons of {', '.join(info['models']) or 'no model'}, "
          f"{sum(info['bytes'].values()) / 1e6:.1f} MB, {time.time() - t0:.0f} s", flush=True)
    t0 = time.time()
    n_static = sum(len(export_static_figures(out_dir / f"{name}.ipynb", site / "book" / "_static"))
                   for name in notebooks or notebook_names(root))
    print(f"static figures: {n_static} files in {time.time() - t0:.0f} s")
    t0 = time.time()
    jb = Path(sys.executable).parent / "jupyter-book"
    subprocess.run([str(jb) if jb.exists() else "jupyter-book", "build", str(site), "--path-output", str(site)], check=True)
    print(f"jupyter-book build: {time.time() - t0:.0f} s")
    index = site / "_build" / "html" / "index.html"
    if not index.is_file():
        raise RuntimeError(f"jupyter-book finished but {index} is missing")
    return index


# --------------------------------------------------------------------------------------------
# The README's chapter table, generated from the notebooks' titles and the measured runtimes
# --------------------------------------------------------------------------------------------

RUNTIMES = Path("book") / "runtimes.yml"
TABLE_START, TABLE_END = "<!-- chapter table: generated by `python -m helpers.book --readme` -->", "<!-- end of chapter table -->"


def chapter_heading(py: Path) -> dict:
    """The chapter's H1, `# NN · Title (paper §...; Figs ...)`, split into number, title and paper part."""
    import re

    import jupytext

    first = jupytext.read(py).cells[0].source.splitlines()[0]
    m = re.match(r"#\s+(\d\d)\s+·\s+(.*?)\s*\((paper .*)\)\s*$", first)
    if m is None:
        raise ValueError(f"{py.name}: the first line must read '# NN · Title (paper §...; Figs ...)', got {first!r}")
    return {"number": m.group(1), "title": m.group(2), "paper": m.group(3).removeprefix("paper ")}


def load_runtimes(root: Path | None = None) -> dict:
    import yaml

    path = (root or repo_root()) / RUNTIMES
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def _minutes(seconds) -> str:
    return "not measured" if seconds is None else f"{seconds / 60:.1f} min"


def chapter_table(root: Path | None = None) -> str:
    """Markdown table: notebook, title, paper sections and figures, runtime per measured CPU kind, Colab link."""
    import yaml

    root = root or repo_root()
    cfg = yaml.safe_load((root / "_config.yml").read_text())["repository"]
    repo, branch = cfg["url"].removeprefix("https://github.com/"), published_ref(root)  # the notebooks as published
    runtimes = load_runtimes(root)
    kinds = list(runtimes)
    head = ["notebook", "chapter", "paper", *[f"runtime, default preset ({k})" for k in kinds], "Colab"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in notebook_names(root):
        h = chapter_heading(root / "notebooks" / f"{name}.py")
        times = [_minutes(runtimes[k].get("seconds", {}).get(name)) for k in kinds]
        colab = f"[open](https://colab.research.google.com/github/{repo}/blob/{branch}/notebooks/{name}.ipynb)"
        lines.append("| " + " | ".join([f"`notebooks/{name}`", h["title"], h["paper"], *times, colab]) + " |")
    notes = [f"- **{k}**: {v['cpu']}; {v.get('measured', '')}." for k, v in runtimes.items()]
    return "\n".join(lines) + "\n\nRuntimes measured on:\n\n" + "\n".join(notes) + "\n"


def readme_with_table(readme: str, table: str) -> str:
    if TABLE_START not in readme or TABLE_END not in readme:
        raise ValueError(f"README.md lacks the markers {TABLE_START!r} ... {TABLE_END!r} around its chapter table")
    head, rest = readme.split(TABLE_START, 1)
    return head + TABLE_START + "\n" + table + rest[rest.index(TABLE_END):]


def update_readme(root: Path | None = None) -> bool:
    """Rewrite README.md's chapter table; True if it changed."""
    root = root or repo_root()
    path = root / "README.md"
    old = path.read_text()
    new = readme_with_table(old, chapter_table(root))
    if new != old:
        path.write_text(new)
    return new != old


def record_runtimes(kind: str, cpu: str, preset: str = "default", root: Path | None = None) -> dict:
    """Add the chapter times of the last build's run record under `kind` in book/runtimes.yml."""
    import yaml

    root = root or repo_root()
    params = load_preset(preset_path(preset))
    record_path = params.artifacts_path / f"run_record_{preset}.json"
    if not record_path.is_file():
        raise FileNotFoundError(f"{record_path} missing: build the book first (python -m helpers.book --preset {preset})")
    record = read_json(record_path)
    seconds = {k.removeprefix("notebook ").split(" ")[0]: round(v) for k, v in record["timings"].items()
               if k.startswith("notebook ") and "(executed earlier)" not in k}
    runtimes = load_runtimes(root)
    entry = runtimes.setdefault(kind, {"cpu": cpu, "measured": record["date"], "seconds": {}})
    entry["cpu"], entry["measured"] = cpu, f"{record['date']}, python -m helpers.book"
    entry.setdefault("seconds", {}).update(seconds)
    text = (root / RUNTIMES).read_text() if (root / RUNTIMES).is_file() else ""
    comments = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))
    (root / RUNTIMES).write_text(comments + yaml.safe_dump(runtimes, sort_keys=False, width=100))
    return entry


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Build the book: corpus, seed family, notebooks (papermill), HTML.")
    add_preset_options(ap, [])  # the chapters read the preset file themselves: no flag can override it here
    ap.add_argument("--notebook", action="append", default=None, help="execute only these notebooks (name without suffix)")
    ap.add_argument("--skip-html", action="store_true", help="execute notebooks but do not run jupyter-book")
    ap.add_argument("--force", action="store_true", help="re-execute notebooks even if nothing they depend on changed")
    ap.add_argument("--site", default=None, help="output folder of the book (default: the repository for the default "
                                                 "preset, build/book-<preset>/ for any other)")
    ap.add_argument("--executed", default=None, help="folder of chapters already executed on this preset: copy, do not execute")
    ap.add_argument("--readme", action="store_true", help="only rewrite README.md's chapter table (from the notebooks' "
                                                            "titles and book/runtimes.yml)")
    ap.add_argument("--record-runtimes", metavar="KIND", default=None,
                    help="only add the last build's chapter times under KIND in book/runtimes.yml (with --cpu)")
    ap.add_argument("--cpu", default=None, help="with --record-runtimes: the CPU, in words")
    args = ap.parse_args(argv)
    if args.readme:
        print("README.md chapter table " + ("updated" if update_readme() else "already up to date"))
        return
    if args.record_runtimes:
        if not args.cpu:
            raise ValueError("--record-runtimes needs --cpu 'the CPU, in words (model, cores, bf16 support)'")
        print(record_runtimes(args.record_runtimes, args.cpu, args.preset))
        return
    print(build(args.preset, args.notebook, args.skip_html, args.force, args.site, args.executed))


if __name__ == "__main__":
    from helpers.core.cache import run_cli

    run_cli(main)
