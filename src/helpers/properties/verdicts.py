"""Chapter 02's "Result vs paper" rows (paper §4.2), from the chapter's computed tables.

The paper reports, from its released tables, the median of five properties over its universal
neurons (`paper.PROPERTY_MEDIAN_KEYS`). Each row takes the same median over the set chapter 01
chose and scores it with the registry's tolerance; the untrained control's set goes through the
same test, so a row the control passes too is "not informative".
"""

from __future__ import annotations

import pandas as pd

from helpers.core import paper
from helpers.properties.compare import FIG3_METRICS


def comparisons(df: pd.DataFrame, selected: str, model: str,
                control: pd.DataFrame | None = None) -> list[paper.Comparison]:
    """One row per property of `paper.PROPERTY_MEDIAN_KEYS`: its median over the neurons of `df`
    (the statistics table joined with the universality table) where `selected` is true, scored
    against the paper's median for `model` (a paper model; `paper.model_for` maps a family onto one).
    `control` is the untrained control's table with its own `selected` column (its set); its medians
    are judged by the same tolerance. An empty set is "not measured". The reason (shown where a row
    differs) is the median over the other neurons of the model, which says whether the set sits
    apart from them at all."""
    sel = df[selected].fillna(False).astype(bool)
    csel = control[selected].fillna(False).astype(bool) if control is not None else None
    rows = []
    for col, key in paper.PROPERTY_MEDIAN_KEYS.items():
        ours = float(df.loc[sel, col].median()) if sel.any() else float("nan")
        ctl = (None if control is None else
               float(control.loc[csel, col].median()) if csel.any() else float("nan"))
        rest = float(df.loc[~sel, col].median()) if (~sel).any() else float("nan")
        reason = (f"the set's {int(sel.sum()):,} neurons against a median of {rest:.3f} over the other "
                  f"{int((~sel).sum()):,}" if sel.any() else f"the set ({selected}) is empty")
        rows.append(paper.Comparison(f"median {FIG3_METRICS[col][0]} over the set ({selected})", key, ours,
                                     control=ctl, model=model, measured=bool(sel.any()), reason=reason))
    return rows
