"""Chapter 04's "Result vs paper" rows (paper §5.1), computed from the chapter's tables, and how its
universal-vs-rest view moves with the size of chapter 01's set.

- `comparisons(...)` -> the chapter's rows (`paper.Comparison`): each claim of §5.1 judged by the
  registry's rule (`paper.verdict`), the untrained control by the same rule, and "not measured"
  where there is nothing to measure (no heavy-tailed neuron where the claim is about them);
- `set_sensitivity(...)` -> the reference member's late-layer classes and W_U kurtosis in chapter
  01's set and in the rest, at several sizes of the set (`NeuronSet.at_share`).

The depth claims are about every neuron (Fig 6 is over all neurons of GPT2-medium a-e), so the
rows do not depend on the set; the sensitivity table shows what the set adds.
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd

from helpers.core import paper, report
from helpers.prediction.vocab import (KURTOSIS_THRESHOLD, classify, depth_pattern, relative_depth,
                                      rise_depth, seed_consistency)

HEAVY = ("prediction", "suppression")  # the heavy-tailed classes (W_U kurtosis above the threshold)
ALPHA = 0.05  # the level of the Fig 24 sign test (after the Bonferroni correction)
LATE_DEPTH = 0.75  # "late": relative depth layer / (layers - 1) at least this (the last quarter)
NO_HEAVY = "no heavy-tailed (W_U kurtosis > {k:g}) neuron in {where} of {m}"


def n_heavy(moments: pd.DataFrame, kurtosis_threshold: float = KURTOSIS_THRESHOLD,
            layer: int | None = None) -> int:
    """Heavy-tailed (prediction or suppression) neurons of one model's W_U moments, in `layer` or in
    all layers."""
    m = moments if layer is None else moments[moments.layer == layer]
    return int(classify(m, kurtosis_threshold).isin(HEAVY).sum()) if len(m) else 0


def paper_rise_depth() -> float:
    """`vocab.rise_depth` applied to the paper's per-layer counts of GPT2-medium-a (the registry's
    `universal_wu_kurt_gt10_by_layer`)."""
    n = paper.value("n_layers", paper.MEDIUM)
    counts = pd.Series(dict(paper.value("universal_wu_kurt_gt10_by_layer", paper.MEDIUM)))
    return rise_depth(counts.reindex(range(n), fill_value=0), n)


def _last_layer_text(p: dict) -> str:
    return f"{p['last_suppression']} suppression vs {p['last_prediction']} prediction neurons"


def _share_text(p: dict) -> str:
    return (f"heavy-tailed share {p['heavy_share_last_quarter']:.2%} in the last quarter vs "
            f"{p['heavy_share_first_half']:.2%} in the first half")


def _why_small(ref: pd.DataFrame, n_layers: int, k: float) -> str:
    heavy = classify(ref, k).isin(HEAVY)
    if heavy.any():
        return report.sentence("{h} of its {n:,} neurons are heavy-tailed (W_U kurtosis > {k:g}); its {L} "
                               "layers place them in relative depth steps of {step:.2f}", h=int(heavy.sum()),
                               n=len(heavy), k=k, L=n_layers, step=1 / max(n_layers - 1, 1))
    return report.sentence("its largest W_U kurtosis is {mx:.1f}: no neuron is heavy-tailed (kurtosis > {k:g}) "
                           "in its {L} layers", mx=float(ref.vocab_kurt.max()), k=k, L=n_layers)


def _sign_test_rows(sign_test, single_name: str, alpha: float) -> paper.Comparison:
    quantity = f"suppression neurons fire more when the next token is in their class ({single_name})"
    if sign_test is None or not sign_test["n"]:
        return paper.Comparison(quantity, "suppression_fires_on_class", None, model=paper.MEDIUM,
                                reason="no suppression neuron was tested")
    k, n, p = int(sign_test["positive"]), int(sign_test["n"]), sign_test["p_bonferroni"]
    return paper.Comparison(quantity, "suppression_fires_on_class",
                            f"{k} of {n} neurons (sign test p = {p:.2g}, Bonferroni)", model=paper.MEDIUM,
                            holds=bool(k > n / 2 and p < alpha),
                            reason=report.sentence("{k} of {n} tested suppression neurons fire more when the "
                                                   "next token is in their class; sign test p = {p:.2g} "
                                                   "(Bonferroni), against {alpha}", k=k, n=n, p=p, alpha=alpha))


def comparisons(moments: pd.DataFrame, single: pd.DataFrame, control: pd.DataFrame | None = None,
                sign_test: dict | pd.Series | None = None, *, reference: str, n_layers: int,
                n_layers_single: int, family: str = "embedded", single_name: str = "smollm2-135m",
                kurtosis_threshold: float = KURTOSIS_THRESHOLD, alpha: float = ALPHA) -> list[paper.Comparison]:
    """The chapter's "Result vs paper" rows, from its tables.

    `moments`: the W_U moments of every seed of the family (`vocab.family_vocab_moments` after
    `vocab.apply_signs`: member, layer, neuron, vocab_kurt, vocab_skew, var_ratio); `single`: the
    same for the single model (no member column); `control`: the untrained control's, or None;
    `sign_test`: `vocab.direction_test` of the single model's suppression neurons (Fig 24), or None.
    Classes are recomputed here with `kurtosis_threshold` (`vocab.classify`). The rows are scored on
    GPT2-medium's entries, as the paper measured §5.1 there."""
    k, M = kurtosis_threshold, paper.MEDIUM
    ref = moments[moments.member == reference]
    ctl = control[control.member == reference] if control is not None else None
    pat_sm, pat = depth_pattern(single, n_layers_single, k), depth_pattern(ref, n_layers, k)
    pat_ctl = depth_pattern(ctl, n_layers, k) if ctl is not None else None
    cons = seed_consistency(moments, n_layers, k)
    cons_ctl = seed_consistency(control, n_layers, k) if control is not None else None
    members = sorted(moments.member.unique())
    name_ref, name_seed = f"{family}-{reference}", f"{family}, seed {reference}"
    why_small = _why_small(ref, n_layers, k)
    why_sm = report.sentence("{m}'s heavy-tailed share is {early:.2%} in the first half of its layers and "
                             "{late:.2%} in the last quarter; the same rule on the paper's per-layer counts "
                             "gives {rise:.2f}",
                             m=single_name, early=pat_sm["heavy_share_first_half"],
                             late=pat_sm["heavy_share_last_quarter"], rise=paper_rise_depth())
    none_in = lambda where, m: report.sentence(NO_HEAVY, k=k, where=where, m=m)  # noqa: E731
    sm_last, ref_last = n_heavy(single, k, n_layers_single - 1), n_heavy(ref, k, n_layers - 1)
    sm_any, ref_any = n_heavy(single, k), n_heavy(ref, k)

    heavy_per_seed = ", ".join(str(n_heavy(moments[moments.member == m], k)) for m in members)
    majorities = ", ".join(sorted(set(cons["last_layer_majority"].values())))
    consistency = (f"95th-pct kurtosis within {cons['max_rel_range_p95_kurt']:.1%} across seeds; last-layer "
                   f"majority: {majorities} ({heavy_per_seed} heavy-tailed neurons per seed)")
    consistency_ctl = None if cons_ctl is None else (
        f"within {cons_ctl['max_rel_range_p95_kurt']:.1%}; "
        f"{', '.join(str(n) for n in cons_ctl['n_heavy'].values())} heavy-tailed")
    why_consistency = report.choose(cons["measured"], report.sentence(
        "the largest seed range of a layer's 95th-percentile W_U kurtosis is {r:.1%} of its mean; last-layer "
        "majorities: {maj}", r=cons["max_rel_range_p95_kurt"],
        maj=", ".join(f"{m} {c}" for m, c in cons["last_layer_majority"].items())),
        none_in("any layer", f"any of the {len(members)} seeds"))

    return [
        paper.Comparison(f"relative depth where prediction neurons rise ({single_name})",
                         "prediction_rise_depth", pat_sm["rise_depth"], model=M, fmt=".2f", reason=why_sm),
        paper.Comparison(f"relative depth where prediction neurons rise ({name_ref})", "prediction_rise_depth",
                         pat["rise_depth"], control=pat_ctl["rise_depth"] if pat_ctl else None, model=M,
                         fmt=".2f", reason=why_small),
        paper.Comparison(f"suppression dominates the last layer ({single_name})", "suppression_last_layer",
                         _last_layer_text(pat_sm), model=M, holds=pat_sm["suppression_dominates_last"],
                         measured=bool(sm_last),
                         reason=report.choose(bool(sm_last), report.sentence(
                             "its last layer has {p} prediction and {s} suppression neurons",
                             p=pat_sm["last_prediction"], s=pat_sm["last_suppression"]),
                             none_in("the last layer", single_name))),
        paper.Comparison(f"suppression dominates the last layer ({name_seed})", "suppression_last_layer",
                         _last_layer_text(pat), control=_last_layer_text(pat_ctl) if pat_ctl else None, model=M,
                         holds=pat["suppression_dominates_last"],
                         control_holds=pat_ctl["suppression_dominates_last"] if pat_ctl else None,
                         measured=bool(ref_last),
                         reason=report.choose(bool(ref_last), why_small, none_in("the last layer", name_ref))),
        paper.Comparison(f"consistency across the {len(members)} seeds ({family})", "wu_seed_consistency",
                         consistency, model=M, control=consistency_ctl, holds=cons["consistent"],
                         measured=cons["measured"],
                         control_holds=None if cons_ctl is None else bool(cons_ctl["consistent"]
                                                                          and cons_ctl["measured"]),
                         reason=why_consistency),
        paper.Comparison(f"late-layer pattern, tied embeddings ({single_name})", "wu_pattern_tied",
                         _share_text(pat_sm), model=M, holds=pat_sm["late_pattern"], measured=bool(sm_any),
                         reason=report.choose(bool(sm_any), why_sm, none_in("any layer", single_name))),
        paper.Comparison(f"late-layer pattern, untied embeddings ({name_seed})", "wu_pattern_untied",
                         _share_text(pat), model=M,
                         control=(f"{pat_ctl['heavy_share_last_quarter']:.2%} vs "
                                  f"{pat_ctl['heavy_share_first_half']:.2%}") if pat_ctl else None,
                         holds=pat["late_pattern"], measured=bool(ref_any),
                         control_holds=bool(pat_ctl["late_pattern"] and n_heavy(ctl, k)) if pat_ctl else None,
                         reason=report.choose(bool(ref_any), why_small + "; so untied vs tied cannot be "
                                              "separated from depth here", none_in("any layer", name_ref))),
        _sign_test_rows(sign_test, single_name, alpha),
    ]


def set_sensitivity(moments: pd.DataFrame, nset, shares: Sequence[float], n_layers: int,
                    kurtosis_threshold: float = KURTOSIS_THRESHOLD) -> pd.DataFrame:
    """How section 5's universal-vs-rest view moves with the set's size: for each share, chapter 01's
    set at that share (`nset.at_share(share)`, aligned with `nset.table`'s layer and neuron) against
    the rest of the reference member's neurons (`moments`: layer, neuron, vocab_kurt, vocab_skew,
    var_ratio of one member).

    One row per share: `set` (neurons in it), `late set` (of them, in the last quarter of the
    layers), the share of the late set neurons that are prediction, suppression or partition
    neurons (`late set: ...`) and the same share among the late rest (`late rest: ...`; NaN where a
    group is empty), and the median W_U kurtosis of the set and of the rest over all layers."""
    cls = classify(moments, kurtosis_threshold)
    t = moments[["layer", "neuron", "vocab_kurt"]].assign(cls=cls.to_numpy())
    late = (relative_depth(t.layer, n_layers) >= LATE_DEPTH).to_numpy()
    median = lambda x: float(x.median()) if len(x) else float("nan")  # noqa: E731
    out = []
    for s in shares:
        member = nset.table[["layer", "neuron"]].assign(in_set=nset.at_share(s).to_numpy())
        joined = t.merge(member, on=["layer", "neuron"], how="left", validate="one_to_one")
        in_set = joined.in_set.fillna(False).astype(bool).to_numpy()
        row = {"share": s, "set": int(in_set.sum()), "late set": int((in_set & late).sum())}
        for side, mask in (("late set", in_set & late), ("late rest", ~in_set & late)):
            for c in ("prediction", "suppression", "partition"):
                row[f"{side}: {c}"] = float((t.cls[mask] == c).mean()) if mask.any() else float("nan")
        row["median W_U kurtosis (set)"] = median(t.vocab_kurt[in_set])
        row["median W_U kurtosis (rest)"] = median(t.vocab_kurt[~in_set])
        out.append(row)
    return pd.DataFrame(out).set_index("share")


def sensitivity_sentence(table: pd.DataFrame) -> str:
    """One computed sentence over `set_sensitivity`'s rows: the median W_U kurtosis of the set
    against the rest, and the late set's share of classified (non-"none") neurons, at each share."""
    late = table[[c for c in table.columns if c.startswith("late set: ")]].sum(axis=1, min_count=1)
    parts = [report.sentence("{s:.0%}: {n} neurons, median W_U kurtosis {a:.2f} vs {b:.2f}, late set {c:.0%} "
                             "classified", s=s, n=int(r["set"]), a=r["median W_U kurtosis (set)"],
                             b=r["median W_U kurtosis (rest)"], c=late.loc[s]) for s, r in table.iterrows()]
    return ("The Result-vs-paper rows are measured over all neurons, as Fig 6 is, so they do not move with "
            "chapter 01's set; the set's own view, by its share of the neurons (set vs rest): "
            + "; ".join(parts) + ".")
