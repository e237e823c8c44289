"""Statistics for "a neuron set differs from the rest of its layer" (paper §4.2, Fig 3).

The paper compares universal neurons with the other neurons **of their own layer** (Fig 3 plots
within-layer percentiles). The tests here do the same:

- `permutation_test`: for each metric, the statistic is the median within-layer percentile of the
  set's neurons (the effect size too, so direction, effect and test measure one quantity). Its null
  distribution comes from shuffling set membership **within each layer** (the set keeps its size in
  every layer), so a set concentrated in a layer whose neurons all have high values is not "unusual"
  merely because of its layer. Two-sided p-values, Holm-corrected across the metrics tested together.
- `bootstrap_ci`: a percentile bootstrap interval for the effect size (the set's neurons resampled).
- Metrics that measure the same thing are grouped (`METRIC_GROUPS`): activation frequency,
  pre-activation mean and input bias all say how often the neuron fires; skew and kurtosis both
  describe the tail. A group is one hypothesis (`group_scores`: the mean of its metrics' within-layer
  percentiles, each turned so that higher is the paper's direction), so collinear metrics are not
  counted as separate agreements. Holm-corrected across the groups.

**Unit of inference.** The neurons of one reference model. A p-value says how unusual the set is
among random same-layer sets of this model's neurons; it says nothing about another seed, which
would need the comparison repeated with that seed as the reference.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats as sps

# What each group of Fig 3's metrics measures; a group counts once.
METRIC_GROUPS = {
    "firing rate": ("act_freq", "pre_mean", "input_bias"),
    "activation tail": ("pre_skew", "pre_kurt"),
    "weight norm": ("l2_penalty",),
    "input-output alignment": ("in_out_sim",),
    "vocabulary effect": ("vocab_kurt",),
}

UNIT_OF_INFERENCE = ("the neurons of one reference model: a p-value says how unusual the set is among random "
                     "sets of the same size drawn within the same layers of this model; it does not generalise "
                     "to other seeds")


# --------------------------------------------------------------------------------------------
# Percentiles, the permutation test, Holm, the bootstrap
# --------------------------------------------------------------------------------------------


def layer_percentiles(df: pd.DataFrame, columns: list[str], by: str | None = "layer") -> pd.DataFrame:
    """Percentile (0-100; average rank / count, as scipy's `percentileofscore(kind="rank")`) of each
    neuron's value among the neurons of its `by` group (its layer), or among all neurons when
    `by` is None. NaN values stay NaN and are not counted. [neurons, columns]."""
    if by is None:
        return df[columns].rank(pct=True, method="average") * 100
    return df.groupby(by)[columns].rank(pct=True, method="average") * 100


def holm(pvalues) -> np.ndarray:
    """Holm-Bonferroni step-down adjusted p-values (same order as given; NaN stays NaN and is
    not counted among the tests)."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = len(ok)
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    adj = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out[order] = np.minimum(adj, 1.0)
    return out


def _null_draws(strata: np.ndarray, selected: np.ndarray, n_perm: int, rng: np.random.Generator) -> np.ndarray:
    """[n_perm, set size] row indices: in each stratum, as many neurons as the set has there,
    drawn without replacement."""
    parts = []
    for s in np.unique(strata):
        rows = np.flatnonzero(strata == s)
        k = int(selected[rows].sum())
        if k:
            keys = rng.random((n_perm, len(rows)))
            parts.append(rows[np.argpartition(keys, k - 1, axis=1)[:, :k]] if k < len(rows)
                         else np.broadcast_to(rows, (n_perm, k)))
    return np.concatenate(parts, axis=1) if parts else np.empty((n_perm, 0), dtype=int)


def bootstrap_ci(values, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the median of `values` (NaN dropped); NaN with < 2 values."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) < 2 or np.ptp(x) == 0:
        return (float(np.median(x)), float(np.median(x))) if len(x) >= 2 else (np.nan, np.nan)
    res = sps.bootstrap((x,), np.median, n_resamples=n_boot, confidence_level=confidence, method="percentile",
                        vectorized=True, rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def permutation_test(df: pd.DataFrame, columns: list[str], selected: str, by: str | None = "layer", n_perm: int = 4000,
                     n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """For each of `columns`: does the set (`df[selected]` true) sit higher or lower in its layer
    than random same-layer sets of the same size?

    `by="layer"` ranks within layers and shuffles membership within layers; `by=None` is the pooled
    version (ranks among all neurons, membership shuffled across all of them), shown only to make
    the difference visible. Returns one row per column: `n_set`, `effect` (median percentile of the
    set's neurons, 0-100), `ci_low`/`ci_high` (bootstrap 95% interval of it), `null_median` (centre
    of the permutation distribution, ~50), `direction` ("higher"/"lower" than that centre), `p`
    (two-sided permutation p-value, (1 + #as extreme) / (1 + n_perm)) and `p_holm` (Holm across
    `columns`). The same permutations serve every column.
    """
    sel = df[selected].fillna(False).astype(bool).to_numpy()
    strata = df[by].to_numpy() if by is not None else np.zeros(len(df), dtype=int)
    pct = layer_percentiles(df, columns, by)
    rng = np.random.default_rng(seed)
    draws = _null_draws(strata, sel, n_perm, rng)
    rows = []
    for col in columns:
        v = pct[col].to_numpy()
        obs = v[sel]
        effect = float(np.nanmedian(obs)) if np.isfinite(obs).any() else np.nan
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN draws of a metric with NaNs
            null = np.nanmedian(v[draws], axis=1) if draws.shape[1] else np.full(n_perm, np.nan)
        null = null[np.isfinite(null)]
        if np.isfinite(effect) and len(null):
            hi = (1 + np.sum(null >= effect - 1e-9)) / (1 + len(null))
            lo = (1 + np.sum(null <= effect + 1e-9)) / (1 + len(null))
            p = min(1.0, 2 * min(hi, lo))
            centre = float(np.median(null))
        else:
            p, centre = np.nan, np.nan
        ci = bootstrap_ci(obs, n_boot=n_boot, seed=seed)
        direction = "same" if not np.isfinite(effect) or effect == centre else ("higher" if effect > centre else "lower")
        rows.append({"column": col, "n_set": int(np.isfinite(obs).sum()), "effect": effect, "ci_low": ci[0],
                     "ci_high": ci[1], "null_median": centre, "direction": direction, "p": p})
    out = pd.DataFrame(rows).set_index("column")
    out["p_holm"] = holm(out.p)
    return out


# --------------------------------------------------------------------------------------------
# Groups of metrics, verdicts, the whole comparison
# --------------------------------------------------------------------------------------------


def group_scores(df: pd.DataFrame, groups: dict[str, tuple[str, ...]], directions: dict[str, int],
                 by: str | None = "layer") -> pd.DataFrame:
    """One score per group and neuron: the mean of the group's within-layer percentiles, each metric
    turned (100 - percentile) where the paper's direction is "lower", so that a high score is the
    paper's direction for every metric of the group (metrics with no stated direction are kept as
    they are). Returns `df[[by]]` plus one column per group."""
    cols = sorted({c for cs in groups.values() for c in cs})
    pct = layer_percentiles(df, cols, by)
    out = df[[by]].copy() if by is not None else pd.DataFrame(index=df.index)
    for name, members in groups.items():
        turned = [100 - pct[c] if directions.get(c, 0) < 0 else pct[c] for c in members]
        out[name] = pd.concat(turned, axis=1).mean(axis=1, skipna=False)
    return out


def verdict(direction: str, p_holm: float, paper_direction: int, alpha: float = 0.05) -> str:
    """"agrees" (significant after Holm, in the paper's direction), "opposite" (significant, the
    other way), "not significant", or "no paper direction"."""
    if paper_direction == 0:
        return "no paper direction"
    if not np.isfinite(p_holm) or p_holm >= alpha:
        return "not significant"
    return "agrees" if direction == ("higher" if paper_direction > 0 else "lower") else "opposite"


@dataclass
class PropertyTests:
    """The result of `property_tests`: per-metric and per-group tables, and what they rest on."""

    metrics: pd.DataFrame
    groups: pd.DataFrame
    selected: str
    n_set: int
    n_neurons: int
    n_layers: int
    alpha: float
    unit: str = UNIT_OF_INFERENCE
    extra: dict = field(default_factory=dict)

    def agreeing_groups(self) -> list[str]:
        return list(self.groups.index[self.groups.verdict == "agrees"])

    def tested_groups(self) -> list[str]:
        return list(self.groups.index[self.groups.verdict != "no paper direction"])


def property_tests(df: pd.DataFrame, selected: str, directions: dict[str, int],
                   groups: dict[str, tuple[str, ...]] | None = None, by: str | None = "layer", n_perm: int = 4000,
                   n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> PropertyTests:
    """The whole comparison of the set `df[selected]` with the rest of its layers.

    `directions`: metric column -> the paper's direction for the set (+1 higher, -1 lower, 0 not
    stated). `groups` (default `METRIC_GROUPS`, restricted to the metrics in `directions`): metrics
    that measure the same thing. Per metric: `permutation_test` (Holm across the metrics) and a
    verdict. Per group: the same test on `group_scores` (Holm across the groups); the group's effect
    is in "paper-direction percentiles" (above 50: the paper's direction), and its verdict is the
    one that counts as an agreement.
    """
    groups = groups if groups is not None else METRIC_GROUPS
    groups = {g: tuple(c for c in cs if c in directions) for g, cs in groups.items()}
    groups = {g: cs for g, cs in groups.items() if cs}
    metrics = list(directions)
    m = permutation_test(df, metrics, selected, by, n_perm, n_boot, seed)
    m.insert(0, "group", [next((g for g, cs in groups.items() if c in cs), "") for c in m.index])
    m["paper"] = [{1: "higher", -1: "lower", 0: "not stated"}[int(np.sign(directions[c]))] for c in m.index]
    m["verdict"] = [verdict(d, p, directions[c], alpha) for c, d, p in zip(m.index, m.direction, m.p_holm)]
    gdf = group_scores(df, groups, directions, by).assign(**{selected: df[selected].to_numpy()})
    g = permutation_test(gdf, list(groups), selected, by, n_perm, n_boot, seed)
    g.index.name = "group"
    g.insert(0, "metrics", [", ".join(cs) for cs in groups.values()])
    gdir = {name: (1 if any(directions[c] != 0 for c in cs) else 0) for name, cs in groups.items()}
    g["verdict"] = [verdict(d, p, gdir[n], alpha) for n, d, p in zip(g.index, g.direction, g.p_holm)]
    return PropertyTests(m, g, selected, int(df[selected].fillna(False).astype(bool).sum()), len(df),
                         int(df[by].nunique()) if by is not None else 1, alpha)


# --------------------------------------------------------------------------------------------
# The untrained control, side by side
# --------------------------------------------------------------------------------------------


def top_k_set(table: pd.DataFrame, k: int, column: str = "excess_corr") -> pd.Series:
    """Boolean Series: the `k` neurons with the largest `column` (ties broken by order; NaN never
    selected)."""
    r = table[column].rank(ascending=False, method="first", na_option="bottom")
    return (r <= k) & table[column].notna()


def side_by_side(trained: PropertyTests, control: PropertyTests) -> pd.DataFrame:
    """Per group: the trained family's set and the control's set, effect [interval], Holm p and
    verdict, and whether a trained agreement with the paper also shows in the control."""
    def block(t: PropertyTests) -> pd.DataFrame:
        g = t.groups
        return pd.DataFrame({"effect [95% CI]": [f"{e:.1f} [{lo:.1f}, {hi:.1f}]" for e, lo, hi in zip(g.effect, g.ci_low, g.ci_high)],
                             "p (Holm)": g.p_holm, "verdict": g.verdict}, index=g.index)

    out = pd.concat({f"trained ({trained.n_set} neurons)": block(trained),
                     f"untrained control ({control.n_set} neurons)": block(control)}, axis=1)
    agree_t = trained.groups.verdict == "agrees"
    agree_c = control.groups.verdict.reindex(trained.groups.index) == "agrees"
    out[("", "trained agreement also in control")] = np.where(agree_t, np.where(agree_c, "yes", "no"), "")
    return out


def _names(items: list[str]) -> str:
    return ", ".join(items) if items else "none"


def agreement_sentence(t: PropertyTests, label: str) -> str:
    """One markdown sentence with the counts of `t`'s group verdicts."""
    tested, agree = t.tested_groups(), t.agreeing_groups()
    opposite = list(t.groups.index[t.groups.verdict == "opposite"])
    s = (f"For {label} ({t.n_set} of {t.n_neurons} neurons), {len(agree)} of {len(tested)} groups of properties "
         f"with a direction in the paper differ from the rest of their layer in the paper's direction after Holm "
         f"correction (alpha = {t.alpha:g}): {_names(agree)}")
    if opposite:
        s += f"; {len(opposite)} differ in the opposite direction: {_names(opposite)}"
    return s + "."


def control_sentence(trained: PropertyTests, control: PropertyTests) -> str:
    """What the control says about the trained family's agreements with the paper (markdown)."""
    agree = trained.agreeing_groups()
    ctrl = set(control.agreeing_groups())
    shared = [g for g in agree if g in ctrl]
    only = [g for g in agree if g not in ctrl]
    if not agree:
        s = "The trained family's set agrees with the paper on no group of properties, so the control has nothing to explain"
        if ctrl:
            s += f"; the control's top-excess set itself shows {_names(sorted(ctrl))}"
        return s + "."
    s = (f"Of the {len(agree)} groups on which the trained family agrees with the paper, {len(shared)} "
         f"({_names(shared)}) also show in the untrained control's top-excess set of the same size")
    if shared:
        s += (": there the property comes with high excess correlation in a network that never learned, so it is a "
              "property of the metric, not of learning")
    if only:
        s += (f". {len(only)} ({_names(only)}) show only in the trained family: the metric alone does not produce "
              "them, so they are candidates for properties that come with learning")
    return s + "."


def medians_line(frames: dict[str, pd.DataFrame], columns: dict[str, str]) -> str:
    """One markdown sentence of medians: for each column label, the median in each named table."""
    parts = [f"{label}: " + ", ".join(f"{name} {frame[col].median():.3g}" for name, frame in frames.items() if col in frame)
             for col, label in columns.items()]
    return "; ".join(parts) + "."


# --------------------------------------------------------------------------------------------
# Build checks that can fail, and disclosed quantities
# --------------------------------------------------------------------------------------------

# Minimum of each activation function over the reals (a post-activation mean below it is impossible).
ACTIVATION_MINIMUM = {"gelu": -0.1700, "gelu_new": -0.1700, "gelu_fast": -0.1700, "silu": -0.2785, "relu": 0.0}


def check_join(df: pd.DataFrame, n_layers: int, d_mlp: int) -> None:
    """Every (layer, neuron) of the model exactly once (a join that drops or duplicates fails)."""
    expected = pd.MultiIndex.from_product([range(n_layers), range(d_mlp)], names=["layer", "neuron"])
    got = pd.MultiIndex.from_frame(df[["layer", "neuron"]].astype(int))
    if got.has_duplicates:
        raise AssertionError(f"{int(got.duplicated().sum())} neurons appear more than once")
    missing = expected.difference(got)
    if len(missing) or len(got) != len(expected):
        raise AssertionError(f"{len(missing)} of {len(expected)} neurons missing; {len(got)} rows")


def check_activation_floor(stats: pd.DataFrame, act_fn: str, tol: float = 1e-3) -> None:
    """The post-activation mean of every neuron is at least the activation function's minimum,
    while its pre-activation mean is not bounded: fails when the pre/post hooks or columns are
    mixed up (a neuron with a negative mean pre-activation below the floor shows as a post mean).
    GPT-2-style MLPs only: a gated MLP's post-activation is act(gate) times the linear branch, which
    has no floor, so a table with `w_lin_norm` values raises ValueError."""
    if "w_lin_norm" in stats and stats["w_lin_norm"].notna().any():
        raise ValueError("a gated MLP's post-activation (act(gate) * linear branch) has no floor")
    floor = ACTIVATION_MINIMUM.get(act_fn)
    if floor is None:
        raise ValueError(f"no known minimum for activation {act_fn!r}")
    bad = stats.post_mean.dropna() < floor - tol
    if bad.any():
        raise AssertionError(f"{int(bad.sum())} neurons have a mean post-activation below {act_fn}'s minimum {floor}")


def check_detects_planted(df: pd.DataFrame, column: str, by: str = "layer", fraction: float = 0.1, n_perm: int = 1000,
                          alpha: float = 0.05, seed: int = 0) -> dict:
    """The test on this very table, with known answers: (1) the top `fraction` of every layer by
    `column` must come out "higher" with p < `alpha`; (2) a set made of whole layers has no
    within-layer effect, so its p-value must be 1. Returns both results; raises if either fails."""
    top = df.groupby(by)[column].rank(ascending=False, method="first") <= np.ceil(fraction * df.groupby(by)[column].transform("count"))
    layers = sorted(df[by].unique())
    whole = df[by].isin(layers[: max(1, len(layers) // 2)])
    t = permutation_test(df.assign(_top=top, _whole=whole), [column], "_top", by, n_perm, n_boot=200, seed=seed).iloc[0]
    w = permutation_test(df.assign(_top=top, _whole=whole), [column], "_whole", by, n_perm, n_boot=200, seed=seed).iloc[0]
    if not (t.direction == "higher" and t.p < alpha):
        raise AssertionError(f"the planted top {fraction:.0%} by {column} is not detected: {t.to_dict()}")
    if w.p < 1.0:
        raise AssertionError(f"a set of whole layers shows a within-layer effect (p = {w.p}): the test is not within layers")
    return {"planted_p": float(t.p), "planted_effect": float(t.effect), "whole_layers_p": float(w.p)}


def full_l2_penalty(stats: pd.DataFrame) -> pd.Series:
    """The weight-decay penalty of each neuron including, for a gated MLP, the linear branch:
    ||w_gate||^2 + ||w_lin||^2 + ||w_out||^2. `l2_penalty` (||w_in||^2 + ||w_out||^2, with w_in
    the gate) leaves the linear branch out; for GPT-2-style MLPs the two are equal."""
    extra = stats["w_lin_norm"].fillna(0.0) ** 2 if "w_lin_norm" in stats else 0.0
    return stats["l2_penalty"] + extra


def binned_positive_cutoff(lo: float = -10.0, hi: float = 15.0, bins: int = 256) -> float:
    """The pre-activation above which the paper's code counts a token as "active": it bins the
    pre-activations into `bins` bins over [lo, hi] and counts the bins whose upper edge is >= 0,
    i.e. everything above the lower edge of the bin that holds 0."""
    edges = np.linspace(lo, hi, bins + 1)
    return float(edges[np.searchsorted(edges, 0.0, side="left") - 1])
