"""Chapter 01's "Result vs paper" rows (paper §2 and §4.1), from the chapter's computed tables.

Every row is scored by `helpers.core.paper.verdict`: the paper's number comes from the registry,
and the untrained control goes through the same test, so a row the control passes too is "not
informative". The medians the paper reports over its universal neurons are compared with the same
medians over the set later chapters use (`NeuronSet.chosen`); the control's counterpart is its own
top neurons by excess correlation, as many as in that set (`universality.top_count`).
"""

from __future__ import annotations

import pandas as pd

from helpers.core import paper, report
from helpers.correlations import universality


def spectrum_summary(dims: pd.DataFrame | None, label: str) -> dict:
    """The medians over the layers of `label` in the dimensionality table
    (`dimensionality.families_dimensionality`): the participation ratio of the correlation matrix
    (`pr_corr`), the baseline it predicts (`predicted`), the measured baseline (`measured`) and the
    layer width (`d`); NaN (None for `d`) without the table or the label."""
    sel = dims[dims.label == label] if dims is not None else None
    if sel is None or sel.empty:
        return {"pr_corr": float("nan"), "predicted": float("nan"), "measured": float("nan"), "d": None}
    return {"pr_corr": float(sel.pr_corr.median()), "predicted": float(sel.predicted_median.median()),
            "measured": float(sel.measured_median.median()), "d": int(sel.d.iloc[0])}


def comparisons(nset: universality.NeuronSet, model: str = paper.DEFAULT_MODEL, dims: pd.DataFrame | None = None,
                label: str = "") -> list[paper.Comparison]:
    """Chapter 01's rows: the share of neurons above the paper's threshold (the registry's
    `excess_threshold`, at which its share was counted), the median max correlation and baseline
    over the set, the seed spread over all neurons and over the set, and the depth specialisation of
    Fig 2c. `nset` holds the family's table, the chosen set and the untrained control's table (None:
    no control column). `model` is the paper model compared with; `dims` and `label` (the family's
    label in `dims`) give the reason of the baseline row."""
    t, chosen, ctl = nset.table, nset.chosen, nset.control
    threshold = float(paper.value("excess_threshold", model))
    sel = t[chosen].fillna(False).astype(bool)
    share = float((t.excess_corr > threshold).sum() / len(t))
    ctl_share = float((ctl.excess_corr > threshold).sum() / len(ctl)) if ctl is not None else None
    med = universality.like_for_like_medians(t.assign(_set=sel), "_set")
    spread_all = universality.seed_spread(t, chosen)["all"]
    spread_set = universality.seed_spread(t.assign(_set=sel), "_set")
    if ctl is not None:
        c = ctl.assign(_set=universality.top_count(ctl, int(sel.sum())))
        ctl_med, ctl_spread = universality.like_for_like_medians(c, "_set"), universality.seed_spread(c, "_set")
    else:
        ctl_med, ctl_spread = {}, {}
    spec = universality.depth_specialisation(universality.best_match_layers(t))
    ctl_spec = universality.depth_specialisation(universality.best_match_layers(ctl)) if ctl is not None else None
    holds = lambda s: bool(s["diagonal"] > s["chance"] and s["diagonal_is_row_max"])  # noqa: E731
    base = float(t.mean_baseline.median())
    spec_sum = spectrum_summary(dims, label)
    n_comp = len(universality.comparison_members(t))
    spread_why = ("range (max - min) over {k} comparison seeds, averaged over {n:,} neurons whose median max "
                  "correlation is {mc:.2f}")
    share_why = ("the median baseline is {b:.2f}, so an excess above {t:g} needs a max correlation above "
                 "{need:.2f}")
    set_why = ("the set holds {n} neurons chosen by excess over a median baseline of {b:.2f}, not by "
               "excess > {t:g}")
    base_why = ("the layers' correlation matrices have a median participation ratio of {pr:.1f}, which predicts "
                "a baseline of {pred:.2f} (section 12)")
    empty = "the set is empty"
    return [
        paper.Comparison(
            f"share of neurons with excess > {threshold:g}", "universal_share", share, control=ctl_share,
            model=model, fmt=".2%",
            reason=report.sentence(share_why, b=base, t=threshold, need=base + threshold)),
        paper.Comparison(
            f"median mean_corr over the set ({chosen})", "median_mean_corr_universal", med["mean_corr"],
            control=ctl_med.get("mean_corr"), model=model, measured=bool(med["n"]), reason=report.choose(
                bool(med["n"]), report.sentence(set_why, n=med["n"], b=base, t=threshold), empty)),
        paper.Comparison(
            f"median mean_baseline over the set ({chosen})", "median_baseline_universal", med["mean_baseline"],
            control=ctl_med.get("mean_baseline"), model=model, measured=bool(med["n"]), reason=report.choose(
                bool(med["n"]), report.sentence(base_why, pr=spec_sum["pr_corr"], pred=spec_sum["predicted"]),
                empty)),
        paper.Comparison(
            "mean seed spread of max corr, all neurons", "seed_spread_all", spread_all,
            control=ctl_spread.get("all"), model=paper.MEDIUM,
            reason=report.sentence(spread_why, k=n_comp, n=len(t), mc=float(t.mean_corr.median()))),
        paper.Comparison(
            f"mean seed spread of max corr, set ({chosen})", "seed_spread_universal", spread_set["selected"],
            control=ctl_spread.get("selected"), model=paper.MEDIUM, measured=bool(spread_set["n_selected"]),
            reason=report.choose(bool(spread_set["n_selected"]), report.sentence(
                spread_why, k=n_comp, n=spread_set["n_selected"], mc=med["mean_corr"]), empty)),
        paper.Comparison(
            "depth specialisation (Fig 2c)", "depth_specialisation",
            report.sentence("{d:.2f} of best matches in the same layer (chance {ch:.2f})", d=spec["diagonal"],
                            ch=spec["chance"]),
            control=report.sentence("{d:.2f}", d=ctl_spec["diagonal"]) if ctl_spec else None, model=model,
            holds=holds(spec), control_holds=holds(ctl_spec) if ctl_spec else None,
            reason=report.sentence("diagonal share {d:.2f} against chance {ch:.2f}; the diagonal is the largest "
                                   "entry of every row: {rm}", d=spec["diagonal"], ch=spec["chance"],
                                   rm=spec["diagonal_is_row_max"])),
    ]
