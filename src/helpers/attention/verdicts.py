"""Chapter 06's "Result vs paper" rows (paper §5.3), computed from the chapter's cached runs, and how the
neurons of chapter 01's set score against the rest at several sizes of the set.

- `Measured`, `from_run(label, run)` -> one model's BOS value norms, score tails, ablated pairs and
  the rank correlation of the heuristic with the measured effect;
- `comparisons(model, single, control)` -> the rows (`paper.Comparison`), the untrained control
  judged by the same rules, "not measured" where there is nothing to judge (no ablated top pair,
  too few pairs for a rank correlation);
- `set_sensitivity(best, nset, shares)` -> |h_n| of the set's neurons against the rest's.

The rows are about every (neuron, later head) pair, as Fig 8 is, so they do not depend on the set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from helpers.attention.heads import rank_correlation
from helpers.core import paper, report

MIN_BEYOND = 10  # the heavy-tail claim: at least this many pairs beyond the random vectors' largest |score|


@dataclass
class Measured:
    """One model's measurements: `bos` (`heads.bos_value_norms`), `tails` (`heads.tail_summary`),
    `pairs` (`heads.pair_summary` of the ablated pairs, with `why`), `rank` (`heads.rank_correlation`
    of `predicted` with `effect_bos` across the pairs)."""

    label: str
    bos: pd.DataFrame
    tails: dict
    pairs: pd.DataFrame
    rank: dict


def from_run(label: str, run, seed: int = 0, rank: dict | None = None) -> Measured:
    """`Measured` from a cached `heads.attention_deactivation` result (`rank` computed if not given)."""
    pairs = run.table("pairs")
    rank = rank if rank is not None else rank_correlation(pairs.predicted, pairs.effect_bos, seed=seed)
    return Measured(label, run.table("bos"), run.meta["tails"], pairs, dict(rank))


def n_beyond(tails: dict) -> int:
    """Pairs whose |h_n| exceeds the largest |score| of the random vectors."""
    return int(round(tails["share_beyond_baseline"] * tails["n_pairs"]))


def heavy(tails: dict) -> bool:
    return n_beyond(tails) >= MIN_BEYOND


def example(pairs: pd.DataFrame) -> tuple[pd.Series | None, bool | None]:
    """The ablated pair of highest h_n and whether it behaves as a deactivation pair (Fig 8b,c): per
    unit of the neuron's natural activation, the fitted slope of Δp(BOS) is negative and that of the
    norm change positive. (None, None) where no such pair was ablated or its slopes are undefined."""
    top = pairs[pairs.why == "most positive h_n"]
    if not len(top):
        return None, None
    top = top.iloc[0]
    if not (np.isfinite(top.slope_bos) and np.isfinite(top.slope_norm)):
        return top, None
    b, n = natural_slopes(top)
    return top, bool(b < 0 and n > 0)


def natural_slopes(e: pd.Series) -> tuple[float, float]:
    """The slopes of Δp(BOS) and of the norm change (%) of an ablated pair per unit of the neuron's
    natural activation (the fitted slopes are per unit of signed activation; a gated neuron whose
    natural direction is negative has them flipped)."""
    raw = e.score_raw if "score_raw" in e.index else e.score
    s = float(np.sign(e.score * raw))
    return s * float(e.slope_bos), s * float(e.slope_norm)


def _pair_name(e: pd.Series) -> str:
    return f"L{int(e.neuron_layer)}.{int(e.neuron)} → L{int(e.head_layer)}.H{int(e['head'])}"


def _rank_text(r: dict) -> str:
    return f"ρ {r['rho']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}] (n={int(r['n'])})"


def _why_tails(t: dict) -> str:
    return report.sentence("{n} pairs beyond the random maximum (the test asks for {k}); largest |h_n| {s:.2f} "
                           "against {b:.2f} for random vectors", n=n_beyond(t), k=MIN_BEYOND,
                           s=max(-t["min"], t["max"]), b=max(-t["baseline_min"], t["baseline_max"]))


def _why_slopes(e: pd.Series | None) -> str:
    if e is None:
        return "no pair of positive h_n was ablated"
    b, n = natural_slopes(e)
    return report.sentence("per unit of natural activation, slope of Δp(BOS) {b:+.2g} (predicted < 0), of the "
                           "norm change {n:+.2g}% (predicted > 0), over {t:,} tokens", b=b, n=n, t=int(e.n_tokens))


def _why_rank(r: dict) -> str:
    if not np.isfinite(r["lo"]):
        return report.sentence("{n} pairs with a measured effect: too few for a rank correlation", n=int(r["n"]))
    return report.sentence("the 95% interval [{lo:.2f}, {hi:.2f}] over {n} pairs includes 0", lo=r["lo"],
                           hi=r["hi"], n=int(r["n"]))


def _why_bos(m: Measured) -> str:
    return report.sentence("{share:.0%} of its {n} heads have a smaller BOS value than the other tokens' mean; "
                           "its ablated heads put {p:.4f} of their attention on BOS",
                           share=float((m.bos.ratio > 1).mean()), n=len(m.bos),
                           p=float(m.pairs.mean_p_bos.mean()))


def _rank_ok(r: dict | None) -> bool:
    return r is not None and bool(np.isfinite(r["lo"]))


def _model_rows(m: Measured, c: Measured | None) -> dict[str, paper.Comparison]:
    M, has_ctl = paper.MEDIUM, c is not None
    ex, ok = example(m.pairs)
    ex_c, ok_c = example(c.pairs) if has_ctl else (None, None)
    ctl_ex, ctl_rank = ok_c is not None, has_ctl and _rank_ok(c.rank)
    slopes = ": natural slopes {:+.2g}, {:+.2g}%".format(*natural_slopes(ex)) if ex is not None else ""
    pairs_text = lambda t: f"{n_beyond(t)} of {t['n_pairs']:,}"  # noqa: E731
    return {
        "bos": paper.Comparison(f"median head: mean ‖W_O v‖ / ‖W_O v_BOS‖ ({m.label})",
                                "bos_value_ratio_median", float(m.bos.ratio.median()),
                                control=float(c.bos.ratio.median()) if has_ctl else None, model=M, fmt=".2f",
                                reason=_why_bos(m)),
        "min": paper.Comparison(f"most negative h_n ({m.label})", "attn_score_min", m.tails["min"],
                                control=c.tails["min"] if has_ctl else None, model=M, fmt=".2f"),
        "tails": paper.Comparison(f"heavier tails than random ({m.label}: pairs beyond the random maximum)",
                                  "attn_score_heavy_tails", pairs_text(m.tails), model=M, holds=heavy(m.tails),
                                  measured=bool(m.tails["n_pairs"]),
                                  control=pairs_text(c.tails) if has_ctl else None,
                                  control_holds=heavy(c.tails) if has_ctl else None, reason=_why_tails(m.tails)),
        "example": paper.Comparison(f"top-h_n pair is a deactivation pair ({m.label}{slopes})",
                                    "attn_example_deactivation", _pair_name(ex) if ex is not None else None,
                                    control=(_pair_name(ex_c) + ": natural slopes {:+.2g}, {:+.2g}%".format(
                                        *natural_slopes(ex_c))) if ctl_ex else None,
                                    model=M, holds=ok, control_holds=ok_c if ctl_ex else None,
                                    measured=ok is not None, reason=_why_slopes(ex)),
        "points": paper.Comparison(f"tokens in the example scatter ({m.label})", "attn_example_points",
                                   int(ex.n_tokens) if ex is not None else None, model=M, fmt="d"),
        "rank": paper.Comparison(f"heuristic predicts the mean effect ({m.label})", "attn_heuristic_predicts",
                                 _rank_text(m.rank), model=M, holds=bool(m.rank["lo"] > 0),
                                 measured=_rank_ok(m.rank), control=_rank_text(c.rank) if ctl_rank else None,
                                 control_holds=bool(c.rank["lo"] > 0) if ctl_rank else None,
                                 reason=_why_rank(m.rank)),
    }


def comparisons(model: Measured, single: Measured | None = None,
                control: Measured | None = None, more: Sequence[Measured] = ()) -> list[paper.Comparison]:
    """The chapter's "Result vs paper" rows: for `model` (beside its untrained `control`, measured the
    same way), for `single` and for each of `more` (other real models), each of: the median head's
    BOS value ratio, the most negative h_n, heavier tails than random, the top pair as a deactivation
    pair, the example's token count (the trained family only), and the heuristic's rank correlation
    with the measured effect."""
    a = _model_rows(model, control)
    others = [_model_rows(m, None) for m in ([single] if single is not None else []) + list(more)]
    out = []
    for key in ("bos", "min", "tails", "example", "points", "rank"):
        out.append(a[key])
        if key != "points":  # the example's token count is the trained family's only
            out += [rows[key] for rows in others]
    return out


def set_sensitivity(best: pd.DataFrame, nset, shares: Sequence[float], top: int = 20) -> pd.DataFrame:
    """h_n of chapter 01's set against the rest, at each share of the neurons (`nset.at_share`).
    `best`: `heads.neuron_best` of the reference (neuron_layer, neuron, best, abs_best: each neuron's
    strongest later head); neurons without a later head (the last layer) have no score and are
    left out of both groups.

    One row per share: `set` (its scored neurons), the median |h_n| of the set and of the rest, the
    median signed h_n of both, and `set in top <top>`: how many of the `top` neurons of largest
    |h_n| are in the set (against `expected`, the set's share of the scored neurons times `top`)."""
    b = best.rename(columns={"neuron_layer": "layer"})
    strongest = b.nlargest(top, "abs_best").set_index(["layer", "neuron"]).index
    out = []
    for s in shares:
        member = nset.table[["layer", "neuron"]].assign(in_set=nset.at_share(s).to_numpy())
        t = b.merge(member, on=["layer", "neuron"], how="left", validate="one_to_one")
        in_set = t.in_set.fillna(False).astype(bool).to_numpy()
        keys = pd.MultiIndex.from_frame(t[["layer", "neuron"]])
        med = lambda x: float(np.median(x)) if len(x) else float("nan")  # noqa: E731
        out.append({"share": s, "set": int(in_set.sum()), "median |h_n| (set)": med(t.abs_best[in_set]),
                    "median |h_n| (rest)": med(t.abs_best[~in_set]), "median h_n (set)": med(t.best[in_set]),
                    "median h_n (rest)": med(t.best[~in_set]),
                    f"set in top {top}": int(keys[in_set].isin(strongest).sum()),
                    "expected": float(in_set.mean() * min(top, len(t))) if len(t) else float("nan")})
    return pd.DataFrame(out).set_index("share")


def sensitivity_sentence(table: pd.DataFrame) -> str:
    """One computed sentence over `set_sensitivity`'s rows."""
    top = next(c for c in table.columns if c.startswith("set in top "))
    parts = [report.sentence("{s:.0%}: {n} neurons, median |h_n| {a:.3f} vs {b:.3f}, {k} of the {top} strongest "
                             "({e:.1f} expected by their number)", s=s, n=int(r["set"]),
                             a=r["median |h_n| (set)"],
                             b=r["median |h_n| (rest)"], k=int(r[top]), top=top.removeprefix("set in top "),
                             e=r["expected"]) for s, r in table.iterrows()]
    return ("The Result-vs-paper rows are over all (neuron, later head) pairs, as Fig 8 is, so they do not move "
            "with chapter 01's set; the set against the rest, by its share of the neurons: "
            + "; ".join(parts) + ".")
