"""Do universal neurons persist over training? The universal set at every saved checkpoint of the
embedded family, and its overlap from one checkpoint to the next (a follow-up: Nandan et al. 2025,
arXiv 2508.00903, who follow five GPT-2 small seeds over their checkpoints).

A neuron is the same neuron at every checkpoint: (layer, index) of the reference member, whose
weights move by training. At each checkpoint the set is taken by one rule (`checkpoint_sets`): the
book's paper-sized rule (above the untrained control's maximum excess correlation, on the same
tokens, and in the top `SET_SHARE` by excess), or the top share alone (the same size at every
checkpoint, so that overlaps do not move with the set's size).

**Chance.** Random sets with the same per-layer sizes as the two sets compared overlap by a sum of
independent hypergeometric counts (one per layer), whose distribution is computed exactly
(`overlap_distribution`); from it the expected Jaccard index, the expected overlap and the
probability that random sets overlap at least as much as the observed ones (`p_value`). Matching
the per-layer sizes is the stricter baseline: universal neurons crowd into some layers, and sets
drawn from the same few layers overlap more than sets drawn from all neurons.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import hypergeom

from helpers.core import paper, report
from helpers.correlations.universality import SET_SHARE, sized_set, universality_table

RULES = ("paper_sized", "top_share")


@dataclass
class CheckpointRun:
    """The universality tables of the checkpoints (`tables`, {label: table}, in training order), the
    tokens each checkpoint was trained on (`tokens`, {label: int}) and the untrained control's table
    on the same tokens and members (`control`)."""

    tables: dict[str, pd.DataFrame]
    tokens: dict[str, int]
    control: pd.DataFrame | None


def checkpoint_run(params, n_tokens: int, artifacts_dir: str | Path, device: str = "cpu",
                   batch_size: int = 32,
                   seed: int = 0, baseline: str = "rotation", threshold: float = 0.5,
                   control_family: str | None = "embedded-untrained") -> CheckpointRun:
    """The tables `universality.checkpoint_emergence` correlates (the same keys, so cached ones are
    reused): every saved checkpoint of the preset's embedded family (step 0 is each member's own
    initialisation, rebuilt from its training seed) and the untrained control with the same members
    (other seeds), all on `n_tokens` held-out tokens."""
    from helpers.correlations.universality import checkpoint_families
    from helpers.models.families import load_family

    fams = checkpoint_families(params, device=device)
    tables, tokens = {}, {}
    for label, fam in fams.items():
        tables[label] = universality_table(fam, n_tokens, artifacts_dir, device, batch_size, seed, baseline,
                                           threshold=threshold, verbose=False).table("universality")
        step = int(label.split()[-1])
        tokens[label] = step * int(fam.info["recipe"]["batch_size"]) * int(fam.info["arch"]["n_ctx"])
    control = None
    if control_family is not None:
        members = next(iter(fams.values())).members
        ctl = load_family(control_family, params, device=device, members=members)
        control = universality_table(ctl, n_tokens, artifacts_dir, device, batch_size, seed, baseline,
                                     threshold=threshold, verbose=False).table("universality")
    return CheckpointRun(tables, tokens, control)


def checkpoint_sets(tables: dict[str, pd.DataFrame], control: pd.DataFrame | None = None,
                    share: float = SET_SHARE,
                    rule: str = "paper_sized") -> pd.DataFrame:
    """`layer`, `neuron` and one boolean column per checkpoint (the keys of `tables`, in order): the
    set at that checkpoint by `rule` ("paper_sized": `sized_set` with the control; "top_share": the
    top `share` by excess alone). Every table must list the same neurons."""
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; use one of {RULES}")
    labels = list(tables)
    base = tables[labels[0]][["layer", "neuron"]].reset_index(drop=True)
    out = base.copy()
    for label in labels:
        t = tables[label].reset_index(drop=True)
        if not (t[["layer", "neuron"]].to_numpy() == base.to_numpy()).all():
            raise ValueError(f"checkpoint {label!r} lists other neurons than {labels[0]!r}")
        out[label] = sized_set(t, control if rule == "paper_sized" else None, share).to_numpy()
    return out


def jaccard(a: pd.Series | np.ndarray, b: pd.Series | np.ndarray) -> float:
    """|a & b| / |a | b| of two boolean masks; NaN when both are empty."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = int((a | b).sum())
    return float((a & b).sum() / union) if union else float("nan")


def overlap_distribution(a_counts, b_counts, layer_sizes) -> np.ndarray:
    """The distribution of |A & B| for random sets A, B drawn independently and uniformly within each
    layer, with `a_counts[l]` and `b_counts[l]` neurons out of `layer_sizes[l]`: the convolution of
    one hypergeometric distribution per layer. Returns the pmf over 0 .. sum(min(a_l, b_l))."""
    pmf = np.ones(1)
    for a, b, n in zip(a_counts, b_counts, layer_sizes):
        a, b, n = int(a), int(b), int(n)
        if a > n or b > n:
            raise ValueError(f"a set of {max(a, b)} neurons in a layer of {n}")
        k = np.arange(min(a, b) + 1)
        pmf = np.convolve(pmf, hypergeom(n, a, b).pmf(k))
    return pmf


def _layer_counts(sets: pd.DataFrame, column: str, layers) -> np.ndarray:
    return sets.groupby("layer")[column].sum().reindex(layers, fill_value=0).to_numpy()


@dataclass(frozen=True)
class Chance:
    """What random sets of the same per-layer sizes give: the expected overlap, the expected Jaccard
    index (NaN when both sets are empty) and the probability of an overlap at least `observed`."""

    overlap: float
    jaccard: float
    p_value: float


def chance(a_counts, b_counts, layer_sizes, observed: int) -> Chance:
    pmf = overlap_distribution(a_counts, b_counts, layer_sizes)
    k = np.arange(len(pmf))
    union = int(np.sum(a_counts)) + int(np.sum(b_counts)) - k
    jac = float(np.sum(pmf * np.where(union > 0, k / np.where(union > 0, union, 1),
                                      0))) if union.max() > 0 else np.nan
    return Chance(float(np.sum(pmf * k)), jac,
                  float(pmf[int(observed):].sum()) if observed < len(pmf) else 0.0)


def persistence_table(sets: pd.DataFrame, tokens: dict[str, int] | None = None) -> pd.DataFrame:
    """One row per consecutive pair of checkpoints (the boolean columns of `checkpoint_sets`, in
    order): the sets' sizes, their overlap, the Jaccard index and what random sets of the same
    per-layer sizes give (`chance`), the share of the earlier set that is in the later one
    (`retained`, and its chance value), and the training tokens of both checkpoints."""
    labels = [c for c in sets.columns if c not in ("layer", "neuron")]
    layers = sorted(sets.layer.unique())
    sizes = sets.groupby("layer").size().reindex(layers).to_numpy()
    rows = []
    for a, b in zip(labels[:-1], labels[1:]):
        inter = int((sets[a] & sets[b]).sum())
        ca, cb = _layer_counts(sets, a, layers), _layer_counts(sets, b, layers)
        c = chance(ca, cb, sizes, inter)
        na = int(ca.sum())
        rows.append({"from": a, "to": b, "tokens_from": (tokens or {}).get(a),
                     "tokens_to": (tokens or {}).get(b),
                     "n_from": na, "n_to": int(cb.sum()), "overlap": inter,
                     "jaccard": jaccard(sets[a], sets[b]),
                     "random_jaccard": c.jaccard, "random_overlap": c.overlap, "p_value": c.p_value,
                     "retained": inter / na if na else np.nan,
                     "random_retained": c.overlap / na if na else np.nan})
    return pd.DataFrame(rows)


def share_of_final(sets: pd.DataFrame, tokens: dict[str, int] | None = None) -> pd.DataFrame:
    """One row per checkpoint: the share of the final checkpoint's set already in the set at that
    checkpoint (`share`), what random sets of the checkpoint's per-layer sizes give (`chance`), the
    probability of at least that overlap by chance (`p_value`), and the set's size."""
    labels = [c for c in sets.columns if c not in ("layer", "neuron")]
    final = labels[-1]
    layers = sorted(sets.layer.unique())
    sizes = sets.groupby("layer").size().reindex(layers).to_numpy()
    cf = _layer_counts(sets, final, layers)
    nf = int(cf.sum())
    rows = []
    for a in labels:
        inter = int((sets[a] & sets[final]).sum())
        c = chance(_layer_counts(sets, a, layers), cf, sizes, inter)
        rows.append({"checkpoint": a, "tokens": (tokens or {}).get(a), "n": int(sets[a].sum()),
                     "in_final": inter,
                     "share": inter / nf if nf else np.nan, "chance": c.overlap / nf if nf else np.nan,
                     "p_value": c.p_value})
    return pd.DataFrame(rows)


def persistence_by_layer(sets: pd.DataFrame) -> pd.DataFrame:
    """The Jaccard index of consecutive checkpoints within each layer, beside random sets of the same
    sizes in that layer (`random_jaccard`): which layers keep their universal neurons."""
    labels = [c for c in sets.columns if c not in ("layer", "neuron")]
    rows = []
    for l, g in sets.groupby("layer"):
        for a, b in zip(labels[:-1], labels[1:]):
            inter = int((g[a] & g[b]).sum())
            c = chance([g[a].sum()], [g[b].sum()], [len(g)], inter)
            rows.append({"layer": int(l), "from": a, "to": b, "n_from": int(g[a].sum()),
                         "n_to": int(g[b].sum()),
                         "jaccard": jaccard(g[a], g[b]), "random_jaccard": c.jaccard, "p_value": c.p_value})
    return pd.DataFrame(rows)


def main_rule(tables: dict[str, pd.DataFrame], control: pd.DataFrame | None, share: float = SET_SHARE) -> str:
    """The rule the section scores: the book's paper-sized rule where it finds neurons at the final
    checkpoint, else the top share alone (a family none of whose neurons beats its control)."""
    final = tables[list(tables)[-1]]
    return "paper_sized" if control is not None and sized_set(final, control, share).any() else "top_share"


def trained_pairs(table: pd.DataFrame, tokens_col: str = "tokens_from") -> pd.DataFrame:
    """The rows of `persistence_table` between two trained checkpoints (the earlier one trained on
    more than 0 tokens; the initialisation's row is left out; without token counts, all rows but
    the first) whose two sets are not empty."""
    t = table[table[tokens_col] > 0] if table[tokens_col].notna().all() else table.iloc[1:]
    return t[(t.n_from > 0) & (t.n_to > 0)]


def verdicts(table: pd.DataFrame, alpha: float = 0.01, retained: float = 0.5) -> dict:
    """Whether the set persists: every pair of trained checkpoints keeps more than `retained` of the
    earlier set and overlaps beyond chance (`p_value` < `alpha`). Pairs with an empty set are left
    out; `n_pairs` 0: not measured."""
    t = trained_pairs(table)
    ok = bool(len(t) and (t.retained > retained).all() and (t.p_value < alpha).all())
    return {"persists": ok, "n_pairs": len(t), "min_retained": float(t.retained.min()) if len(t) else np.nan,
            "max_p": float(t.p_value.max()) if len(t) else np.nan,
            "min_jaccard": float(t.jaccard.min()) if len(t) else np.nan,
            "max_random_jaccard": float(t.random_jaccard.max()) if len(t) else np.nan, "alpha": alpha,
            "retained": retained}


def conclusion(table: pd.DataFrame, final: pd.DataFrame) -> str:
    """The sentence the section prints, from `persistence_table` and `share_of_final`."""
    v = verdicts(table)
    pair = "{a} → {b}: Jaccard {j:.2f} (random {r:.2f}), {k:.0%} of the earlier set kept"
    pairs = "; ".join(report.sentence(pair,
                                      a=r["from"], b=r["to"], j=r.jaccard, r=r.random_jaccard, k=r.retained)
                      for _, r in table.iterrows())
    early = final.iloc[:-1]
    if not final.n.iloc[-1]:
        return f"{pairs}. The final checkpoint's set is empty: there is nothing to persist."
    shares = ", ".join(report.sentence("{c} {s:.0%} (chance {ch:.0%})", c=r.checkpoint, s=r.share,
                                       ch=r.chance)
                       for _, r in early.iterrows())
    return (f"{pairs}. Share of the final set already in the set at each earlier checkpoint: {shares}. "
            + report.choose(not v["n_pairs"], "No two trained checkpoints both have a non-empty set.", "")
            + report.choose(not v["n_pairs"], "", report.choose(
                v["persists"], "Between trained checkpoints the set persists beyond chance.",
                "Between trained checkpoints the set does not persist by this rule (more than half kept and "
                "an overlap beyond chance at every step).")))


def comparisons(table: pd.DataFrame, model: str = paper.DEFAULT_MODEL) -> list[paper.Comparison]:
    """The section's row against Nandan et al. 2025 (`verdicts`). There is no untrained counterpart
    of a training run: chance is the random-set overlap the rule already tests against."""
    v = verdicts(table)
    return [paper.Comparison(
        "universal neurons persist from one trained checkpoint to the next", "nandan_persistence",
        report.sentence("at least {k:.0%} of the set kept, Jaccard >= {j:.2f} (random <= {r:.2f}), "
                        "p <= {p:.1g}",
                        k=v["min_retained"], j=v["min_jaccard"], r=v["max_random_jaccard"], p=v["max_p"]),
        model=model, holds=v["persists"], measured=v["n_pairs"] > 0,
        reason=report.choose(v["n_pairs"] > 0, "; ".join(
            ([report.sentence("the least kept share is {k:.0%} (needed: over {need:.0%})",
                              k=v["min_retained"],
                              need=v["retained"])] if not v["min_retained"] > v["retained"] else [])
            + ([report.sentence("the largest p is {p:.2g} (needed: below {a})", p=v["max_p"], a=v["alpha"])]
               if not v["max_p"] < v["alpha"] else [])),
            "no two trained checkpoints with a non-empty set each"))]
