"""Chapter 03's "Result vs paper" rows (paper §4.3), from the chapter's computed tables.

Which families appear and where. The paper's depth claims are stated for GPT2-medium's 24 layers;
here they are ranges of relative depth (`explain.DEPTH_CLAIMS`). Every row is scored by
`helpers.core.paper.verdict`, with the untrained control judged by the same rule where it has the
measurement, so a row the control passes too is "not informative"; a family with no neuron to place
is "not measured".
"""

from __future__ import annotations

import pandas as pd

from helpers.core import paper, report
from helpers.taxonomy import explain


def depth_text(row: pd.Series) -> str:
    """A `explain.depth_summary` row in words: where the family's neurons sit."""
    if row.neurons == 0:
        return "no neurons"
    where = (f"quartile layers {row['depth IQR']:.2f} of the depth apart" if row.name == "syntax" else
             f"median layer {row['median layer']:g}, depth {row['depth span']}")
    return f"{where} (layers {row.layers})"


def depth_comparison(family: str, model_label: str, depth: pd.DataFrame, n_neurons: int, n_layers: int,
                     control_depth: pd.DataFrame | None = None) -> paper.Comparison:
    """The row of the paper's depth claim for `family` (`explain.DEPTH_CLAIMS`) on `depth`
    (`explain.depth_summary` of a model of `n_layers` layers and `n_neurons` analysed neurons). With
    no neuron of the family it is "not measured". `control_depth` (the control's summary), where
    given, is judged by the same claim; a control without neurons of the family does not pass."""
    row = depth.loc[family]
    rc = control_depth.loc[family] if control_depth is not None else None
    # a control without neurons of the family, or without a judgement, does not pass
    ctl_holds = None if rc is None else bool(rc.holds is not None and not pd.isna(rc.holds) and rc.holds)
    return paper.Comparison(
        f"{family} neurons: where ({model_label})", row["paper key"], depth_text(row), model=paper.MEDIUM,
        holds=None if row.holds is None or pd.isna(row.holds) else bool(row.holds), measured=bool(row.neurons),
        control=depth_text(rc) if rc is not None else None, control_holds=ctl_holds,
        reason=report.choose(bool(row.neurons), report.sentence(
            "{k} {f} neurons: median layer {ml:g} of {n}, quartile layers {iqr:.2f} of the depth apart",
            k=int(row.neurons), f=family, ml=row["median layer"], n=n_layers, iqr=row["depth IQR"]),
            report.sentence("no {f} neurons among the {n:,} analysed", f=family, n=n_neurons)))


def _set(table: pd.DataFrame, universal: str) -> pd.Series:
    return table[universal].fillna(False).astype(bool)


def comparisons(table: pd.DataFrame, universal: str, letters: pd.DataFrame, n_layers: int, model_label: str,
                n_tokens: int, control=None, single: pd.DataFrame | None = None,
                single_label: str = "") -> list[paper.Comparison]:
    """Chapter 03's rows.

    `table`: the reference model's explanation table (`explain.explain_reference(...).table`) with
    the boolean column `universal` (chapter 01's set; missing values count as outside it); `letters`
    its per-letter VRs; `n_layers` its depth; `n_tokens` the analysed tokens (for the reason).
    `control`: the untrained control's explanations (`.table`, `.letters`) or None; it has no
    universal set, so any of its neurons counts (a looser rule for it, which can only make it pass
    more often). `single`: the explanation table of a sampled deeper model, whose depth claims are
    scored too (no control), named `single_label`.

    Rows: the letters with a universal alphabet neuron (VR at least the paper's cut-off), the
    highest VR of a universal unigram neuron, the position candidates in the set (not scored), the
    depth claim of each family on each model, and the late-layer claim, measured in chapter 04."""
    alpha_cut = paper.value("alphabet_vr_cutoff", paper.MEDIUM)
    uni = _set(table, universal)
    alpha = explain.alphabet_letters(letters, table, alpha_cut, universal=universal)
    n_letters = int(alpha.has_neuron.sum())
    n_letters_ctl = (int(explain.alphabet_letters(control.letters, control.table, alpha_cut).has_neuron.sum())
                     if control is not None else None)
    is_unigram = table.family.eq("unigram")
    top_uni = table[is_unigram & uni].nlargest(1, "best_vr")
    ctl_uni = (control.table[control.table.family.eq("unigram")].nlargest(1, "best_vr")
               if control is not None else None)
    top_text = "; ".join(f"{who}: L{int(r.layer)}.{int(r.neuron)} on {r.best_feature}"
                         for who, d in (("ours", top_uni), ("control", ctl_uni)) if d is not None
                         for r in d.itertuples())
    max_kurt = explain.CUTOFFS["max_kurtosis"]
    depth = explain.depth_summary(table, n_layers)
    depth_ctl = explain.depth_summary(control.table, n_layers) if control is not None else None
    rows = [
        paper.Comparison(
            "letters with an alphabet neuron (of 26)", "alphabet_letters", n_letters, control=n_letters_ctl,
            model=paper.MEDIUM, fmt="d", measured=bool(len(alpha)), reason=report.sentence(
                "{k} letters have a unigram label on {n:,} tokens; {m} of them have a universal neuron whose best "
                "label is the letter's own, with VR ≥ {cut}",
                k=len(alpha), n=n_tokens, m=n_letters, cut=alpha_cut)),
        paper.Comparison(
            "highest VR of a universal unigram neuron (one token's forms; control: any of its neurons)",
            "max_vr_unigram", float(top_uni.best_vr.iloc[0]) if len(top_uni) else None,
            control=float(ctl_uni.best_vr.iloc[0]) if ctl_uni is not None and len(ctl_uni) else None,
            model=paper.MEDIUM, reason=report.choose(
                bool(len(top_uni)), report.sentence(
                    "the best is {top}; {k} of the {n:,} neurons are unigram neurons, {ku} of them universal",
                    top=top_text, k=int(is_unigram.sum()), n=len(table), ku=int((is_unigram & uni).sum())),
                report.sentence("no universal unigram neuron among the {n:,} analysed", n=len(table)))),
        paper.Comparison(
            f"position candidates in the universal set (pre-activation kurtosis < {max_kurt})",
            "position_candidates", int(((table.pre_kurt < max_kurt) & uni).sum()), model=paper.MEDIUM, fmt="d"),
        *[depth_comparison(f, model_label, depth, len(table), n_layers, depth_ctl) for f in explain.DEPTH_CLAIMS],
    ]
    if single is not None:
        n_single = int(single.layer.max()) + 1  # the sample covers every layer
        depth_single = explain.depth_summary(single, n_single)
        rows += [depth_comparison(f, single_label, depth_single, len(single), n_single)
                 for f in explain.DEPTH_CLAIMS]
    rows.append(paper.Comparison("late layers: prediction / suppression neurons", "late_prediction", None,
                                 model=paper.MEDIUM, reason=paper.entry("late_prediction", paper.MEDIUM).note))
    return rows
