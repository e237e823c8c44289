"""Chapter 02's "Result vs paper" rows (paper §4.2), from the chapter's computed tables.

The paper reports, from its released tables, the median of five properties over its universal
neurons (`paper.PROPERTY_MEDIAN_KEYS`). Each row takes the same median over the set chapter 01
chose and scores it with the registry's tolerance; the untrained control's set goes through the
same test, so a row the control passes too is "not informative". `frequency_alignment` scores
the Fig 9 relation (activation frequency against cos(w_in, w_out)) over every neuron of a model,
the real model's included: it needs no universality, so it is the chapter's row for a single model.
"""

from __future__ import annotations

import numpy as np
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


FIG9_MAX_R = -0.3  # the Pearson r between activation frequency and cos(w_in, w_out) must be at most this
FIG9_MAX_COS = -0.3  # and the most frequent neurons' median cos(w_in, w_out) below this
FIG9_TOP_SHARE = 0.01  # the share of neurons that fire most often


def frequency_alignment_stats(df: pd.DataFrame) -> dict:
    """Over every neuron of a statistics table (`act_freq`, `in_out_sim`): the Pearson r of the two,
    the median cos(w_in, w_out) over the `FIG9_TOP_SHARE` of neurons that fire most often, the
    neuron count, and whether both pass this book's rule (`FIG9_MAX_R`, `FIG9_MAX_COS`)."""
    t = df[["act_freq", "in_out_sim"]].dropna()
    if len(t) < 3:
        raise ValueError(f"frequency_alignment needs act_freq and in_out_sim of at least 3 neurons; got {len(t)}")
    r = float(np.corrcoef(t.act_freq, t.in_out_sim)[0, 1])
    top = t.nlargest(max(1, int(round(FIG9_TOP_SHARE * len(t)))), "act_freq")
    cos_top = float(top.in_out_sim.median())
    return {"r": r, "cos_top": cos_top, "n": len(t), "n_top": len(top),
            "holds": bool(r <= FIG9_MAX_R and cos_top < FIG9_MAX_COS)}


def frequency_alignment(df: pd.DataFrame, label: str, model: str, control: pd.DataFrame | None = None,
                        gated: bool = False) -> paper.Comparison:
    """The Fig 9 row of one model (`label`): `frequency_alignment_stats` of its table, scored as the
    claim `freq_inout_relation` of the paper model `model`; `control` (an untrained control's
    table) goes through the same rule. `gated`: the model's MLP is gated, so w_in is the gate's
    weights and the frequency that of the gate's pre-activation (said in the reason)."""
    s = frequency_alignment_stats(df)
    c = frequency_alignment_stats(control) if control is not None else None
    reason = (f"Pearson r {s['r']:+.2f} over {s['n']:,} neurons; median cos(w_in, w_out) {s['cos_top']:+.2f} over "
              f"the {s['n_top']:,} that fire most often (rule: r ≤ {FIG9_MAX_R}, cos < {FIG9_MAX_COS})"
              + ("; a gated MLP: w_in is the gate" if gated else ""))
    return paper.Comparison(f"activation frequency vs cos(w_in, w_out), Fig 9 ({label}: Pearson r)",
                            "freq_inout_relation", s["r"], control=None if c is None else c["r"], model=model,
                            holds=s["holds"], control_holds=None if c is None else c["holds"], reason=reason,
                            fmt="+.2f")
