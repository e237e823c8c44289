"""Chapter 05's "Result vs paper" rows (paper §5.2), computed from the chapter's studies, and where its
candidates stand in chapter 01's set.

- `flag_candidates(summary, chance)` -> `candidates.seed_summary` with the chapter's two rules:
  `has entropy neuron` and `top candidate is anti-entropy`;
- `claims(study, row)` -> the paper's claims judged on one model, by the same rules for a trained
  model and for its untrained control;
- `comparisons(name, study, row, control_study, control_row)` -> the rows (`paper.Comparison`);
- `set_membership(neurons, nset, shares)` -> each candidate's excess correlation, its percentile,
  and whether it is in chapter 01's set at each share (`NeuronSet.at_share`).

The candidates come from the weights (`candidates.candidates`), not from chapter 01's set, so no
verdict depends on the set; `set_membership` says where they stand in it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from helpers.core import paper, report
from helpers.entropy.candidates import Study, opposite_effects
from helpers.entropy.interventions import curves, effect_summary

MIN_TOP1_SAME = 0.9  # the top-1 token stays as unintervened for at least this share of tokens
FLAT_RR = 0.25  # "rank nearly flat": |Δ reciprocal rank| below this multiple of |Δ entropy|
NULL_MULTIPLE = 2.0  # the null-space claim needs more than this multiple of a random direction's share


def flag_candidates(summary: pd.DataFrame, chance: float | pd.Series) -> pd.DataFrame:
    """`candidates.seed_summary` rows with two flags. A model *has* an entropy neuron when its top
    candidate's total effect, acting in its natural direction, raises the scale and the entropy
    monotonically over its two-sided grid (`direction` +1), by more than `chance` (the largest
    |Δ entropy| of a random neuron), with the top-1 token unchanged for at least `MIN_TOP1_SAME` of
    tokens; its top candidate *is anti-entropy* when both fall monotonically by as much."""
    s = summary.copy()
    keep = s.monotone & (s.top1_same_min >= MIN_TOP1_SAME)
    s["has entropy neuron"] = keep & (s.direction == 1) & (s.d_entropy > chance)
    s["top candidate is anti-entropy"] = keep & (s.direction == -1) & (-s.d_entropy > chance)
    return s


def anti_effect(study: Study) -> float:
    """The anti-entropy partner's total Δ entropy (grid top vs 0); NaN where it was not swept."""
    e = effect_summary(study.sweep)
    e = e[(e.role == "anti-entropy") & (e["mode"] == "total")]
    return float(e.d_entropy.iloc[0]) if len(e) else float("nan")


def delta_at(study: Study, grid: float = 5.0, role: str = "entropy") -> float:
    """The total-effect entropy at grid point `grid` minus at 0 (the paper's 5 vs 0); NaN off the grid."""
    c = curves(study.sweep)
    c = c[(c.role == role) & (c["mode"] == "total")].set_index("grid").entropy
    return float(c.loc[grid] - c.loc[0.0]) if grid in c.index and 0.0 in c.index else float("nan")


def null_beats_random(study: Study) -> tuple[float, float]:
    """(the top candidate's null-space share as a multiple of a random direction's, the largest of
    the random neurons'); both NaN without a null space, the second without random neurons."""
    if not study.spectrum.has_null_space:
        return float("nan"), float("nan")
    top = study.role("entropy").iloc[0]
    tab = study.table.set_index(["layer", "neuron"])
    rnd = tab.loc[list(zip(study.role("random").layer, study.role("random").neuron))]
    return (float(tab.loc[(top.layer, top.neuron), "null_ratio"]),
            float(rnd.null_ratio.max()) if len(rnd) else float("nan"))


def claims(study: Study, row: pd.Series) -> dict:
    """The paper's claims judged on one model (`row`: its `flag_candidates` row): the same rules for
    a trained model and for the untrained control. A claim is None where there is nothing to judge it
    by: `monotone` and `anti_partner` without the random neurons' effect (the chance level), or the
    partner's, `null_space` where W_U has a null space but there are no random neurons."""
    flat_rr = bool(abs(row.d_rr) < FLAT_RR * abs(row.d_entropy)) if row.d_entropy else False
    ae = anti_effect(study)
    mine, rnd_max = null_beats_random(study)
    sp = study.spectrum
    chance = row.random_max_abs_d_entropy
    judged = bool(np.isfinite(chance) and np.isfinite(ae))
    return {"monotone": bool(row["has entropy neuron"] and flat_rr) if np.isfinite(chance) else None,
            "anti_partner": opposite_effects(row.d_entropy, ae, chance) if judged else None,
            "null_space": (None if sp.has_null_space and not np.isfinite(rnd_max) else
                           bool(sp.has_null_space and mine > rnd_max and mine > NULL_MULTIPLE)),
            "has_null_space": bool(sp.has_null_space), "anti_effect": ae, "null": mine,
            "null_random_max": rnd_max, "spectrum": sp}


def spectrum_ratio(spectrum) -> float:
    """W_U's smallest non-zero singular value over the median (the zeros of weight processing left out)."""
    live = spectrum.values[: spectrum.d - spectrum.n_zero]
    return float(live[-1] / np.median(live))


def null_text(c: dict) -> str:
    if c["has_null_space"]:
        return f"{c['null']:.2f}x (random neurons up to {c['null_random_max']:.2f}x)"
    return ("no null space (flat W_U spectrum: smallest / median singular value "
            f"{spectrum_ratio(c['spectrum']):.2f})")


def claim_text(row: pd.Series) -> str:
    return (f"{row.neuron}: scale {row.d_scale:+.3f}, entropy {row.d_entropy:+.3f} nats, reciprocal rank "
            f"{row.d_rr:+.3f} (grid 6 vs 0); monotone: {row.monotone}")


def _why_partner(ours: dict, row: pd.Series) -> str:
    if ours["anti_partner"] is None:
        return "the partner's or the random neurons' effect was not measured"
    if np.sign(ours["anti_effect"]) == np.sign(row.d_entropy):
        return "both move the entropy the same way when they act naturally"
    return report.sentence("one of the two effects is within the random neurons' range (up to {rnd:.3f} nats)",
                           rnd=row.random_max_abs_d_entropy)


def comparisons(name: str, study: Study, row: pd.Series, control_study: Study | None = None,
                control_row: pd.Series | None = None) -> list[paper.Comparison]:
    """The "Result vs paper" rows of one model, `name` (`study` from `candidates.study`, `row` its
    `flag_candidates` row), with the untrained control's study and row where there is one."""
    ours = claims(study, row)
    has_ctl = control_study is not None and control_row is not None
    c = claims(control_study, control_row) if has_ctl else None
    ctl = control_row if has_ctl else None
    ae, mine, rnd_max = ours["anti_effect"], ours["null"], ours["null_random_max"]
    ctl_pair = has_ctl and c["anti_partner"] is not None
    ctl_null = has_ctl and c["null_space"] is not None
    ctl_mono = has_ctl and c["monotone"] is not None
    M = paper.MEDIUM
    why_monotone = report.sentence("the top weight candidate {n} changes the entropy by {de:+.3f} nats "
                                   "(random neurons: up to {rnd:.3f}) and the reciprocal rank by {rr:+.3f}; "
                                   "monotone: {m}", n=row.neuron, de=row.d_entropy,
                                   rnd=row.random_max_abs_d_entropy, rr=row.d_rr, m=row.monotone)
    if not ours["has_null_space"]:
        why_null = "W_U has no null space for the output to lie in"
    elif ours["null_space"] is None:
        why_null = "no random neurons to compare the null-space share with"
    else:
        why_null = report.sentence("{mine:.2f}x against up to {rnd:.2f}x for random neurons (the test asks for "
                                   "more than both and more than {k:g}x)", mine=mine, rnd=rnd_max, k=NULL_MULTIPLE)
    return [
        paper.Comparison(f"entropy neuron raises scale and entropy, rank nearly flat ({name})",
                         "entropy_monotone", claim_text(row), control=claim_text(ctl) if ctl_mono else None,
                         model=M, holds=ours["monotone"], measured=ours["monotone"] is not None,
                         control_holds=c["monotone"] if ctl_mono else None, reason=why_monotone),
        paper.Comparison(f"cos(w_out) of the anti-entropy partner ({name})", "entropy_anti_cos",
                         float(row.partner_cos), control=float(ctl.partner_cos) if has_ctl else None, model=M,
                         reason=report.sentence("the most opposite late neuron's effective direction s·w_out "
                                                "has cos {c:.2f} with the candidate's",
                                                c=float(row.partner_cos))),
        paper.Comparison(f"the partner has the opposite effect on the entropy ({name})", "entropy_anti_partner",
                         f"partner {ae:+.3f} nats vs top candidate {row.d_entropy:+.3f} (each acting naturally: "
                         "grid 6 vs 0)", control=f"{c['anti_effect']:+.3f} vs {ctl.d_entropy:+.3f}" if ctl_pair
                         else None, model=M, holds=ours["anti_partner"],
                         control_holds=bool(c["anti_partner"]) if ctl_pair else None,
                         measured=ours["anti_partner"] is not None, reason=_why_partner(ours, row)),
        paper.Comparison(f"null-space fraction, multiple of a random direction's ({name})", "entropy_null_space",
                         null_text(ours), control=null_text(c) if ctl_null else None, model=M,
                         holds=ours["null_space"], measured=ours["null_space"] is not None,
                         control_holds=c["null_space"] if ctl_null else None, reason=why_null),
        paper.Comparison(f"L2-penalty rank of the entropy neuron ({name})", "entropy_neuron_l2_rank",
                         int(row.l2_rank), control=int(ctl.l2_rank) if has_ctl else None, model=M, fmt="d"),
        paper.Comparison(f"vocab-variance rank of the entropy neuron ({name})", "entropy_neuron_vocab_var_rank",
                         int(row.vocab_var_rank), control=int(ctl.vocab_var_rank) if has_ctl else None, model=M,
                         fmt="d"),
        paper.Comparison(f"Δ entropy, grid 5 vs 0 (nats; {name})", "entropy_delta_entropy", delta_at(study),
                         control=delta_at(control_study) if has_ctl else None, model=M),
    ]


def set_membership(neurons: pd.DataFrame, nset, shares: Sequence[float]) -> pd.DataFrame:
    """Where the chapter's neurons (`neurons`: layer, neuron, role; e.g. a study's candidates and
    partner) stand in chapter 01's set of the same model (`nset`: `table` with layer, neuron,
    excess_corr; `at_share(share)` aligned with it): their excess correlation, its percentile among
    all neurons (100 = the highest), and whether each is in the set at each share (`in set at 1%`, ...).
    A neuron missing from the table gets NaN and False."""
    t = nset.table[["layer", "neuron", "excess_corr"]].copy()
    t["percentile"] = t.excess_corr.rank(pct=True) * 100
    for s in shares:
        t[f"in set at {s:.0%}"] = nset.at_share(s).to_numpy()
    out = neurons[["layer", "neuron", "role"]].merge(t, on=["layer", "neuron"], how="left")
    flags = [c for c in out.columns if c.startswith("in set at ")]
    out[flags] = out[flags].fillna(False).astype(bool)
    out.insert(0, "name", [f"L{int(l)}.{int(n)}" for l, n in zip(out.layer, out.neuron)])
    return out


def membership_sentence(table: pd.DataFrame) -> str:
    """One computed sentence over `set_membership`: that the verdicts do not use the set, and where
    each neuron stands in it."""
    flags = [c for c in table.columns if c.startswith("in set at ")]
    parts = []
    for _, r in table.iterrows():
        where = [c.removeprefix("in set at ") for c in flags if r[c]]
        parts.append(report.sentence("the {role} neuron {n} has excess correlation {e:.3f} (percentile {p:.0f}) "
                                     "and is in the set at {where}", role=r.role, n=r["name"], e=r.excess_corr,
                                     p=r.percentile, where=", ".join(where) if where else "none of these sizes"))
    return ("The candidates come from the weights, not from chapter 01's set, so no verdict here moves with the "
            "set's size; " + "; ".join(parts) + ".")
