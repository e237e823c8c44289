"""Summary text from computed numbers: chapters state results in sentences whose numbers are read
from their computed tables and formatted here, never typed.

    report.summary(["{n} of {total} neurons ({share:.1%}) exceed the control's maximum."],
                   n=..., total=..., share=...)

returns an `IPython.display.Markdown` bullet list. Missing numbers (None, NaN) print as "n/a".
"""

from __future__ import annotations

import math
import string
import time
from pathlib import Path
from typing import Any, Iterable

from helpers.core.cache import write_json
from helpers.core.presets import Preset


class _Formatter(string.Formatter):
    def format_field(self, value: Any, format_spec: str) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "n/a"
        return super().format_field(value, format_spec)


_FMT = _Formatter()


def sentence(template: str, **values: Any) -> str:
    """`template.format(**values)` with None/NaN shown as "n/a"; a missing name is a KeyError."""
    return _FMT.format(template, **values)


def summary_markdown(lines: Iterable[str], **values: Any) -> str:
    """A markdown bullet list, each line a `sentence` over `values`."""
    return "\n".join("- " + sentence(t, **values) for t in lines)


def summary(lines: Iterable[str], **values: Any):
    """`summary_markdown` as an IPython Markdown object for `display`."""
    from IPython.display import Markdown

    return Markdown(summary_markdown(lines, **values))


def choose(condition: bool, if_true: str, if_false: str) -> str:
    """A clause picked by a computed condition (so the wording follows the data)."""
    return if_true if condition else if_false


def results_folder(params: Preset) -> Path:
    """Where a preset's chapters publish their results for the book: `<artifacts>/results/<preset>/`."""
    return params.artifacts_path / "results" / str(params.preset)


# The title of a chapter's table of rows scored against the paper's follow-ups (sections beyond the
# paper): published beside "Result vs paper", counted apart from it on the front page.
BEYOND_TITLE = "Beyond the paper: result vs follow-up"


def publish(chapter: str, params: Preset, tables: dict) -> Path:
    """Save a chapter's computed "Result vs paper" tables ({title: DataFrame}) for the book's front
    page (`helpers.book` gathers them into `book/_generated/headline.md`). Values are stored as
    the text the chapter shows; the file is `<artifacts>/results/<preset>/<chapter>.json`."""
    path = results_folder(params) / f"{chapter}.json"
    out = {"chapter": chapter, "preset": str(params.preset),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "tables": {}}
    for title, df in tables.items():
        flat = df.reset_index() if df.index.name or any(df.index.names) else df
        # columns and rows as lists: the JSON writer sorts mapping keys, and the column order matters
        out["tables"][title] = {"columns": [str(c) for c in flat.columns],
                                "rows": [[_cell(v) for v in row] for row in flat.itertuples(index=False)]}
    write_json(path, out)
    return path


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def model_label(family, member: str | None = None) -> str:
    """How pages and the neuron browser name one model: `embedded-a`, `stanford-gpt2-small-a`,
    `smollm2-135m` (a member already named after its family keeps its name)."""
    m = family.member(member) if member else family.reference
    return m if m.startswith(family.name) else f"{family.name}-{m}"


def publish_neurons(chapter: str, params: Preset, table, model: str, columns: dict) -> Path:
    """Save per-neuron results of a chapter for the neuron browser (`helpers.book.browser`): `table`
    holds `layer`, `neuron` and the `columns` to keep ({column: label shown in the browser});
    `model` names the model (e.g. "embedded-a", "smollm2-135m"). Written to
    `<artifacts>/results/<preset>/neurons/<chapter>--<model>.csv`."""
    missing = [c for c in ("layer", "neuron", *columns) if c not in table.columns]
    if missing:
        raise KeyError(f"publish_neurons({chapter!r}): the table has no column(s) {missing}")
    out = table[["layer", "neuron", *columns]].rename(columns=columns).assign(model=model)
    folder = results_folder(params) / "neurons"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{chapter}--{model}.csv"
    out.to_csv(path, index=False)
    return path
