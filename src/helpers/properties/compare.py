"""What makes universal neurons different (paper §3, Figs 3, 9, 10, 14): comparisons of the
per-neuron statistics table (`helpers.properties.neuron_stats`) between a neuron set and the rest."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats as sps

from helpers.core import paper

# Fig 3's metrics: column of the statistics table -> label; direction the paper reports for
# universal neurons relative to the rest (+1 higher, -1 lower, 0 not stated).
FIG3_METRICS = {
    "act_freq": ("activation frequency", -1),
    "pre_mean": ("pre-activation mean", -1),
    "pre_skew": ("pre-activation skew", +1),
    "pre_kurt": ("pre-activation kurtosis", +1),
    "input_bias": ("input bias", -1),
    "in_out_sim": ("cos(w_in, w_out)", 0),
    "l2_penalty": ("L2 penalty", +1),
    "vocab_kurt": ("W_U kurtosis", +1),
}

# Medians over universal neurons computed from the paper's released tables (PAPER.md §3), read
# from the paper registry: {model: {statistics column: median}}.
PAPER_MEDIANS = {m: paper.property_medians(m) for m in paper.PAPER_MODELS}


def within_layer_percentiles(df: pd.DataFrame, metrics: list[str], selected: str) -> pd.DataFrame:
    """Fig 3: for every neuron with `selected` true, the percentile (0-100) of each metric among
    all neurons of its own layer. Long table: layer, neuron, metric, percentile."""
    ranks = df.groupby("layer")[metrics].rank(pct=True, method="average") * 100
    out = pd.concat([df[["layer", "neuron"]], ranks], axis=1)[df[selected].astype(bool)]
    return out.melt(id_vars=["layer", "neuron"], value_vars=metrics, var_name="metric", value_name="percentile")


def compare_sets(df: pd.DataFrame, metrics: dict, selected: str) -> pd.DataFrame:
    """Median of each metric in the selected set and in the rest, the difference's direction, the
    paper's direction, and a Mann-Whitney U test p-value."""
    sel = df[selected].astype(bool)
    rows = []
    for col, (label, paper_dir) in metrics.items():
        a, b = df.loc[sel, col].dropna(), df.loc[~sel, col].dropna()
        p = sps.mannwhitneyu(a, b).pvalue if len(a) > 1 and len(b) > 1 else np.nan
        diff = a.median() - b.median()
        ours = int(np.sign(diff)) if np.isfinite(diff) else 0
        rows.append({"metric": label, "column": col, "median (set)": a.median(), "median (rest)": b.median(),
                     "direction": {1: "higher", -1: "lower", 0: "same"}[ours],
                     "paper": {1: "higher", -1: "lower", 0: "not stated"}[paper_dir],
                     "agrees": "n/a" if paper_dir == 0 else ("yes" if ours == paper_dir and p < 0.05 else "no"),
                     "p (Mann-Whitney)": p})
    return pd.DataFrame(rows).set_index("metric")


def linear_fit(x: pd.Series, y: pd.Series) -> dict:
    """Least-squares line y = slope x + intercept and Pearson r (Fig 9)."""
    ok = x.notna() & y.notna()
    res = sps.linregress(x[ok], y[ok])
    return {"slope": res.slope, "intercept": res.intercept, "r": res.rvalue, "n": int(ok.sum())}


def per_layer_long(df: pd.DataFrame, metrics: list[str], selected: str) -> pd.DataFrame:
    """Fig 14: long table (layer, neuron, set, metric, value) of EVERY neuron's metric values, the
    set being "selected" or "rest". Nothing is dropped: the tails are where universal neurons sit."""
    return df.assign(set=np.where(df[selected].fillna(False).astype(bool), "selected", "rest")).melt(
        id_vars=["layer", "neuron", "set"], value_vars=metrics, var_name="metric", value_name="value")


def axis_ranges(long: pd.DataFrame, clip: tuple[float, float] = (0.0025, 0.9975)) -> dict[str, tuple[float, float]]:
    """Fig 14's y-axis range of each metric: the `clip` quantiles of its values over all neurons
    (the paper clipped its axes at the 0.25th/99.75th percentiles; only the view is clipped)."""
    q = long.groupby("metric")["value"].quantile(list(clip)).unstack()
    return {m: (float(q.loc[m, clip[0]]), float(q.loc[m, clip[1]])) for m in q.index}


def per_layer_boxes(long: pd.DataFrame, whiskers: tuple[float, float] = (0.01, 0.99)) -> pd.DataFrame:
    """Fig 14's boxes, computed from all values: per (metric, layer, set) the count `n`, the
    `whiskers` quantiles (`lo`, `hi`), the quartiles `q1`, `median`, `q3`."""
    g = long.dropna(subset=["value"]).groupby(["metric", "layer", "set"])["value"]
    q = g.quantile([whiskers[0], 0.25, 0.5, 0.75, whiskers[1]]).unstack()
    q.columns = ["lo", "q1", "median", "q3", "hi"]
    return q.assign(n=g.size()).reset_index()


def set_sensitivity(df: pd.DataFrame, sized: pd.DataFrame, columns: dict | None = None) -> pd.DataFrame:
    """How chapter 02's headline moves with the size of the set: for each boolean set column of
    `sized` (layer, neuron and one column per set, e.g. `NeuronSet.sized_sets()`), the set's size and
    the median of each property over the set and over the rest of the neurons of `df`. `columns`
    ({statistics column: label}) defaults to the properties the paper reports medians of
    (`paper.PROPERTY_MEDIAN_KEYS`). Rows: the sets; columns: (label, "set" / "rest")."""
    columns = columns or {c: FIG3_METRICS[c][0] for c in paper.PROPERTY_MEDIAN_KEYS}
    sets = [c for c in sized.columns if c not in ("layer", "neuron")]
    m = df.drop(columns=[c for c in sets if c in df]).merge(sized, on=["layer", "neuron"], how="left",
                                                             validate="one_to_one")
    rows = {}
    for s in sets:
        sel = m[s].fillna(False).astype(bool)
        row = {("neurons", ""): int(sel.sum())}
        for col, label in columns.items():
            row[(label, "set")] = float(m.loc[sel, col].median()) if sel.any() else np.nan
            row[(label, "rest")] = float(m.loc[~sel, col].median()) if (~sel).any() else np.nan
        rows[s] = row
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.columns = pd.MultiIndex.from_tuples(out.columns)
    out.index.name = "set"
    return out
