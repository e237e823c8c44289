"""Neuron families by variance reduction (paper §4.3, eq. 4; Figs 1a-d, 4, 15-21).

For a neuron with activations v over the analysed tokens and a binary label y (`helpers.taxonomy.features`),

    VR = 1 - [(1 - beta) var(v | y=0) + beta var(v | y=1)] / var(v),   beta = share of y=1,

the share of the neuron's activation variance that the label explains (population variances). With
n tokens, n1 of them labelled, this equals 1 - (SS0 + SS1) / SS with SS the sums of squared
deviations (total, and within each side), so it follows from grouped sums: the count n1, the sum
s1 and the sum of squares q1 of the activations on the labelled tokens. `GroupedMoments` gets them
for every neuron and every label at once, with one matrix product of the batch's activations
`[tokens, neurons]` with its label matrix `[tokens, labels]` per batch, streamed by
`ActivationStream`.

Each neuron's best label (highest VR) and its group assign a family: unigram (one token's forms:
a unigram label such as `unigram_to`, for " to", "to", " To"), alphabet (a single letter's own
unigram label, `unigram_a`), token class (a class of tokens: whitespace, a symbol, numbers, a word
group such as prepositions, "starts with a", ...), previous-token (either kind for the token
before), position, syntax, context, or unexplained (best VR below a cut-off). A dead neuron (no
activation variance, so no VR) has no best label. Position neurons follow the paper:
sub-Gaussian pre-activations (`mlp.hook_pre` kurtosis below 2) whose firing (activation > 0)
carries information about the position, scored by the mutual information between firing and
position (Miller-Madow corrected) divided by the entropy of firing (0: none, 1: position fixes
firing).

Command line: `python -m helpers.taxonomy.explain --preset smoke` writes the table of the preset family's
reference model (see `--help`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from helpers.core.cache import Result, atomic_write_parquet, cached_result, run_cli
from helpers.core.cli import preset_from_args, preset_parser
from helpers.data.tokens import TokenRows
from helpers.models.families import load_family
from helpers.streaming.accumulators import GroupedMoments, StreamingMoments
from helpers.streaming.activations import ActivationStream
from helpers.taxonomy.features import FeatureSet, build_feature_set, feature_set_key, letter_of, vocab_strings_gpt2

CODE_VERSION = 3
MODEL = "model"
CUTOFFS = {"min_vr": 0.2, "max_kurtosis": 2.0, "min_position_score": 0.1}
CUTOFF_TEXT = {"min_vr": "best VR at least this, else unexplained",
               "max_kurtosis": "position candidates: pre-activation kurtosis below this",
               "min_position_score": "position: firing-position MI (bias-corrected) / firing entropy at least this"}
FAMILIES = ("unigram", "alphabet", "token class", "previous-token", "position", "syntax", "context", "unexplained")
FAMILY_OF_GROUP = {"token": "token class", "unigram": "unigram", "prev_token": "previous-token",
                   "prev_unigram": "previous-token", "position": "position", "syntax": "syntax", "context": "context"}
MAX_POSITION_GROUPS = 256


# --------------------------------------------------------------------------------------------
# Variance reduction (eq. 4), directly: the check of `GroupedMoments`
# --------------------------------------------------------------------------------------------


def variance_reduction_direct(v: np.ndarray, y: np.ndarray) -> float:
    """Eq. 4 for one neuron and one label, directly with pandas (population variances)."""
    s = pd.Series(np.asarray(v, dtype=np.float64))
    lab = pd.Series(np.asarray(y).astype(bool))
    beta = lab.mean()
    return 1 - ((1 - beta) * s[~lab].var(ddof=0) + beta * s[lab].var(ddof=0)) / s.var(ddof=0)


# --------------------------------------------------------------------------------------------
# Streaming one model over the token set
# --------------------------------------------------------------------------------------------


def position_groups(n_ctx: int) -> tuple[int, int]:
    """(width, number) of the position groups of the position accumulator: single positions up to
    `MAX_POSITION_GROUPS`, else equal bins of `width` positions."""
    width = max(1, math.ceil(n_ctx / MAX_POSITION_GROUPS))
    return width, math.ceil(n_ctx / width)


def hook_columns(model, neurons: pd.DataFrame | None) -> tuple[list[str], dict[int, torch.Tensor], pd.DataFrame]:
    """The hooks to record (each layer's `mlp.hook_post` and `mlp.hook_pre`), each layer's neuron
    indices, and the (layer, neuron) table in column order."""
    d = model.cfg.d_mlp
    if neurons is None:
        neurons = pd.DataFrame({"layer": np.repeat(np.arange(model.cfg.n_layers), d), "neuron": np.tile(np.arange(d), model.cfg.n_layers)})
    neurons = neurons[["layer", "neuron"]].astype(int).sort_values(["layer", "neuron"]).reset_index(drop=True)
    cols = {int(l): torch.tensor(g.neuron.to_numpy()) for l, g in neurons.groupby("layer")}
    return [f"blocks.{l}.mlp.{h}" for l in cols for h in ("hook_post", "hook_pre")], cols, neurons


def stream_explanations(model, rows: TokenRows, fs: FeatureSet, drop_ids: Sequence[int], neurons: pd.DataFrame | None = None,
                        batch_size: int = 32, dtype: torch.dtype = torch.float32, verbose: bool = False,
                        checkpoint: str | Path | None = None, identity: dict | None = None,
                        checkpoint_every: int = 200_000) -> dict:
    """One streaming pass of `model` over `rows`: the grouped moments of the post-activations of
    `neurons` (all by default) against every label of `fs` (`labels`), against the position
    groups with firing counts (`position`), their exact moments (`moments`), and the exact moments
    of the pre-activations (`pre_moments`: the kurtosis that selects position candidates), both
    hooks read in the same forward pass.
    Returns {"accs": accumulators, "neurons": (layer, neuron) in column order, "n_tokens": ...}.
    With `checkpoint`, the sums are saved every `checkpoint_every` valid tokens; a killed run resumes
    there, and the file is removed once the pass is complete."""
    names, cols, table = hook_columns(model, neurons)
    n = len(table)
    width, n_pos = position_groups(rows.n_ctx)
    dev = model.cfg.device

    def make() -> dict:
        return {"labels": GroupedMoments(n, fs.n_features, dev, dtype), "position": GroupedMoments(n, n_pos, dev, dtype, firing=True),
                "moments": StreamingMoments(n, dev), "pre_moments": StreamingMoments(n, dev)}

    stream = ActivationStream({MODEL: model}, rows, names, batch_size, drop_ids, make, identity, checkpoint,
                              checkpoint_every, save_at_end=False, desc="variance reduction", verbose=verbose, device=dev)
    if not stream.done:
        for batch in stream:
            x = torch.cat([batch.acts[MODEL][f"blocks.{l}.mlp.hook_post"][:, cols[l].to(dev)] for l in cols], dim=1).float()
            pre = torch.cat([batch.acts[MODEL][f"blocks.{l}.mlp.hook_pre"][:, cols[l].to(dev)] for l in cols], dim=1).float()
            y = fs.labels(batch)
            pos = batch.valid(batch.positions) // width
            onehot = torch.nn.functional.one_hot(pos, n_pos)
            stream.accs["labels"].update(x, y)
            stream.accs["position"].update(x, onehot)
            stream.accs["moments"].update(x)
            stream.accs["pre_moments"].update(pre)
    accs = stream.merged()
    stream.discard_checkpoint()
    return {"accs": accs, "neurons": table, "n_tokens": stream.n_tokens, "position_width": width}


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def family_of(best_feature: pd.Series, best_group: pd.Series) -> pd.Series:
    """The family named by each neuron's best label (no cut-offs applied): a single letter's own
    unigram label (`unigram_a`) makes an alphabet neuron, any other unigram label a unigram neuron,
    a token-feature label (a class of tokens) a token-class neuron; no label (a dead neuron),
    unexplained."""
    fam = best_group.map(FAMILY_OF_GROUP).fillna("unexplained")
    letter = best_feature.map(lambda f: bool(pd.notna(f) and letter_of(str(f)) is not None))
    return fam.mask(letter & fam.eq("unigram"), "alphabet")


def assign_families(table: pd.DataFrame, cutoffs: dict | None = None) -> pd.Series:
    """Each neuron's family under `cutoffs` (default `CUTOFFS`): position when its pre-activation
    kurtosis (`pre_kurt`) is below `max_kurtosis` and its position score reaches
    `min_position_score`; else unexplained when its best VR is below `min_vr` (or it has no best
    label); else the family of its best label."""
    c = {**CUTOFFS, **(cutoffs or {})}
    fam = family_of(table.best_feature, table.best_group)
    fam = fam.mask(table.best_vr.fillna(0) < c["min_vr"], "unexplained")
    pos = (table["pre_kurt"] < c["max_kurtosis"]) & (table["position_score"] >= c["min_position_score"])
    return fam.mask(pos, "position")


def cutoff_sensitivity(table: pd.DataFrame, cutoffs: dict | None = None, factors: Sequence[float] = (0.5, 1.0, 2.0)) -> pd.DataFrame:
    """Family counts with each cut-off at `factors` times its value (the others unchanged): rows
    (cut-off, value), columns the families."""
    c = {**CUTOFFS, **(cutoffs or {})}
    out = []
    for name in c:
        for f in factors:
            counts = assign_families(table, {**c, name: c[name] * f}).value_counts()
            out.append({"cut-off": name, "factor": f, "value": c[name] * f, **{k: int(counts.get(k, 0)) for k in FAMILIES}})
    return pd.DataFrame(out).set_index(["cut-off", "factor"])


def explanation_tables(res: dict, fs: FeatureSet, min_positive: int, cutoffs: dict | None = None) -> dict[str, pd.DataFrame]:
    """The per-neuron table and the profiles the figures need, from `stream_explanations`' result.

    Labels with fewer than `min_positive` positive (or negative) tokens are dropped. The table has
    one row per neuron: `family`, `best_feature`, `best_group`, `best_vr`, `runner_up`,
    `runner_up_vr`, the best VR within each label group (`vr_<group>`), the activation's mean and
    std with and without the best label, `act_kurt` (kurtosis of the post-activation), `pre_kurt`
    (of the pre-activation), `position_score`, `position_mi_bits`. A neuron with no VR on any
    label (a dead one: constant activation) has no best label (`best_feature`, `best_group`
    None, `best_vr` NaN), and a neuron with a VR on one label only has no runner-up."""
    accs, neurons = res["accs"], res["neurons"]
    lab = accs["labels"]
    vr = lab.variance_reduction()
    n1 = lab.n1
    keep = (n1 >= min_positive) & (lab.count - n1 >= min_positive)
    vr = vr.masked_fill(~keep[None, :], float("nan"))
    names, groups = np.array(fs.names), np.array(fs.groups)
    v = torch.nan_to_num(vr, nan=-1.0)
    top = v.topk(min(2, v.shape[1]), dim=1)
    m1, m0 = lab.means()
    s1, s0 = lab.stds()
    best = top.indices[:, 0]
    idx = torch.arange(len(best))
    has = (top.values[:, 0] > -0.5).numpy()  # NaN VR on every label: a dead neuron, no best label
    t = neurons.copy()
    t["best_feature"] = np.where(has, names[best.numpy()], None)
    t["best_group"] = np.where(has, groups[best.numpy()], None)
    t["best_vr"] = top.values[:, 0].numpy()
    if v.shape[1] > 1:
        t["runner_up"] = np.where((top.values[:, 1] > -0.5).numpy(), names[top.indices[:, 1].numpy()], None)
        t["runner_up_vr"] = top.values[:, 1].numpy()
    else:
        t["runner_up"], t["runner_up_vr"] = None, np.nan
    for col in ("best_vr", "runner_up_vr"):
        t.loc[t[col] < -0.5, col] = np.nan
    t["best_n_pos"] = np.where(has, n1[best].numpy(), 0).astype(np.int64)
    t["mean_pos"], t["mean_neg"] = np.where(has, m1[idx, best].numpy(), np.nan), np.where(has, m0[idx, best].numpy(), np.nan)
    t["std_pos"], t["std_neg"] = np.where(has, s1[idx, best].numpy(), np.nan), np.where(has, s0[idx, best].numpy(), np.nan)
    for g in dict.fromkeys(fs.groups):
        sel = torch.from_numpy(groups == g)
        t[f"vr_{g}"] = v[:, sel].max(1).values.clamp_min(0).numpy() if sel.any() else 0.0
    mom = accs["moments"]
    t["act_mean"], t["act_var"] = mom.mean().cpu().numpy(), mom.variance().cpu().numpy()
    t["act_kurt"] = mom.kurtosis().cpu().numpy()
    t["pre_kurt"] = accs["pre_moments"].kurtosis().cpu().numpy()
    mi, score = accs["position"].firing_information()
    t["position_mi_bits"], t["position_score"] = mi.numpy(), score.numpy()
    t["family"] = assign_families(t, cutoffs)
    # Profiles: activation by position (most position-informative neurons), by source, by letter.
    pos = accs["position"]
    pm, _ = pos.means()
    ps, _ = pos.stds()
    width = res["position_width"]
    chosen = t.position_score.fillna(0).rank(ascending=False, method="first") <= 40
    rows_p = np.flatnonzero(chosen.to_numpy() | t.family.eq("position").to_numpy())
    valid_pos = (pos.n1 > 0).numpy()
    positions = pd.DataFrame([{"layer": int(t.layer[i]), "neuron": int(t.neuron[i]), "position": p * width,
                               "mean": float(pm[i, p]), "std": float(ps[i, p]),
                               "fire_rate": float(pos.f1[i, p] / pos.n1[p])}
                              for i in rows_p for p in np.flatnonzero(valid_pos)])
    src = [j for j, g in enumerate(fs.groups) if g == "context"]
    sources = pd.DataFrame([{"layer": int(t.layer[i]), "neuron": int(t.neuron[i]), "source": names[j].removeprefix("source_"),
                             "mean": float(m1[i, j]), "std": float(s1[i, j]), "vr": float(vr[i, j]), "n": int(n1[j])}
                            for i in range(len(t)) for j in src if n1[j] > 0])
    let = [j for j, f in enumerate(fs.names) if fs.groups[j] == "unigram" and letter_of(f)]
    letters = pd.DataFrame([{"layer": int(t.layer[i]), "neuron": int(t.neuron[i]), "letter": letter_of(names[j]),
                             "vr": float(vr[i, j]), "mean_pos": float(m1[i, j]), "mean_neg": float(m0[i, j])}
                            for i in range(len(t)) for j in let])
    features = pd.DataFrame({"feature": names, "group": groups, "n_positive": n1.numpy().astype(np.int64),
                             "kept": keep.numpy()})
    return {"table": t, "positions": positions, "sources": sources, "letters": letters, "features": features}


@dataclass
class Explanations:
    """A cached explanation run read from its Result (`of`): the per-neuron `table`, the profiles
    (`positions`, `sources`, `letters`), the label list with positive counts and whether kept
    (`features`), `meta`, and the `result` itself (its folder and checked files)."""

    table: pd.DataFrame
    positions: pd.DataFrame
    sources: pd.DataFrame
    letters: pd.DataFrame
    features: pd.DataFrame
    meta: dict
    result: Result | None = None

    @classmethod
    def of(cls, result: Result) -> "Explanations":
        return cls(*(result.table(k) for k in TABLES), result.meta, result)

    @property
    def n_dropped(self) -> int:
        return int((~self.features.kept).sum())


TABLES = ("table", "positions", "sources", "letters", "features")


def explain_model(family, member: str, rows: TokenRows, artifacts_dir: str | Path, neurons: pd.DataFrame | None = None,
                  batch_size: int = 32, min_positive: int = 20, cutoffs: dict | None = None, syntax: bool = True,
                  sample: dict | None = None, verbose: bool = False) -> Result:
    """Variance reduction of `neurons` (all by default) of `family`'s `member` against every label
    of the token set `rows`, cached under `<artifacts>/explanations/` keyed by the member's weights,
    the rows' sha256, the labels, the neuron list and the cut-offs. Returns the Result (tables
    `TABLES`; `Explanations.of` reads them)."""
    use_gpt2 = rows.gpt2_ids is not None
    strings = vocab_strings_gpt2() if use_gpt2 else family.codec.token_strings()
    strings_id = "gpt2" if use_gpt2 else f"{family.name}:{family.identity[member]}"
    fs = build_feature_set(rows, strings, use_gpt2, artifacts_dir, strings_id, min_positive, syntax=syntax, verbose=verbose)
    c = {**CUTOFFS, **(cutoffs or {})}
    nid = None if neurons is None else pd.util.hash_pandas_object(neurons[["layer", "neuron"]], index=False).sum().item()
    ident = {"code_version": CODE_VERSION, "weights": family.identity[member], "rows_sha256": rows.sha256,
             "rows_shape": list(rows.ids.shape), "labels": feature_set_key(fs), "neurons": nid, "cutoffs": c,
             "min_positive": int(min_positive), "drop_ids": sorted(family.codec.drop_ids), "sample": sample}

    def compute(folder: Path) -> dict:
        model = family.load(member)
        res = stream_explanations(model, rows, fs, family.codec.drop_ids, neurons, batch_size, verbose=verbose,
                                  checkpoint=folder / "stream.pt", identity=ident)
        tabs = explanation_tables(res, fs, min_positive, c)
        for k, df in tabs.items():
            atomic_write_parquet(df, folder / f"{k}.parquet")
        return {"n_tokens": int(res["n_tokens"]), "n_neurons": len(tabs["table"]), "features": fs.info,
                "n_features": fs.n_features, "n_dropped": int((~tabs["features"].kept).sum()),
                "family": family.name, "member": member, "position_width": res["position_width"]}

    return cached_result("explanations", ident, compute, root=artifacts_dir, prefix=f"{family.name}-{member}")


def sample_neurons(stats: pd.DataFrame, n_top: int = 64, n_random: int = 64, seed: int = 0, column: str = "act_kurt") -> pd.DataFrame:
    """Per layer: the `n_top` neurons of highest `column` and `n_random` others drawn at random
    (seeded); columns layer, neuron, why ("top kurtosis" / "random")."""
    rng = np.random.default_rng(seed)
    out = []
    for layer, g in stats.groupby("layer"):
        g = g.sort_values(column, ascending=False, na_position="last")
        top = g.head(n_top)
        rest = g.iloc[n_top:]
        pick = rest.iloc[np.sort(rng.choice(len(rest), size=min(n_random, len(rest)), replace=False))]
        out += [top.assign(why=f"top {column}"), pick.assign(why="random")]
    return pd.concat(out)[["layer", "neuron", "why"]].reset_index(drop=True)


def explain_sampled(family, member: str, rows: TokenRows, artifacts_dir: str | Path, n_select_rows: int = 1,
                    n_top: int = 64, n_random: int = 64, seed: int = 0, batch_size: int = 8, min_positive: int = 20,
                    cutoffs: dict | None = None, verbose: bool = False) -> Explanations:
    """For a deep model: choose a per-layer sample (`sample_neurons`) by the post-activation
    kurtosis measured on the first `n_select_rows` rows, then explain the sample on the other rows
    (so the choice is not fitted to the tokens it is scored on)."""
    from helpers.properties.neuron_stats import activation_statistics

    sel = TokenRows(rows.ids[:n_select_rows], None, None if rows.labels is None else rows.labels[:n_select_rows], rows.label_names)
    rest = TokenRows(rows.ids[n_select_rows:], None if rows.gpt2_ids is None else rows.gpt2_ids[n_select_rows:],
                     None if rows.labels is None else rows.labels[n_select_rows:], rows.label_names)
    ident = {"weights": family.identity[member], "rows_sha256": sel.sha256, "version": 1}

    def compute(folder: Path) -> dict:
        stats = activation_statistics(family.load(member), sel, family.codec.drop_ids, batch_size=batch_size, verbose=verbose)
        atomic_write_parquet(stats, folder / "stats.parquet")
        return {"n_tokens": int(stats.attrs.get("n_valid_tokens", 0))}

    stats = cached_result("selection_stats", ident, compute, root=artifacts_dir, prefix=family.name).table("stats")
    sample = sample_neurons(stats.rename(columns={"post_kurt": "act_kurt"}), n_top, n_random, seed)
    ex = Explanations.of(explain_model(
        family, member, rest, artifacts_dir, sample, batch_size, min_positive, cutoffs,
        sample={"n_select_rows": n_select_rows, "n_top": n_top, "n_random": n_random, "seed": seed}, verbose=verbose))
    ex.table = ex.table.merge(sample, on=["layer", "neuron"], how="left")
    return ex


def family_counts(table: pd.DataFrame, by: str | Sequence[str] = "layer") -> pd.DataFrame:
    """Number of neurons of each family per `by` group (columns in `FAMILIES` order)."""
    out = table.groupby(by).family.value_counts().unstack(fill_value=0)
    return out.reindex(columns=list(FAMILIES), fill_value=0)


def family_layers(table: pd.DataFrame, min_count: int = 1) -> dict[str, list[int]]:
    """{family: the layers holding at least `min_count` of its neurons} (unexplained left out)."""
    c = family_counts(table)
    return {f: [int(l) for l in c.index[c[f] >= min_count]] for f in FAMILIES if f != "unexplained" and c[f].sum() >= min_count}


def alphabet_letters(letters: pd.DataFrame, table: pd.DataFrame, min_vr: float, universal: str | None = None) -> pd.DataFrame:
    """Fig 1a and the paper's count of letters with a universal alphabet neuron: for each letter
    with a unigram label (`letters`, from `explain_model`), the neuron with the highest VR on that
    letter's own unigram label among the neurons credited to it, and whether that VR reaches
    `min_vr` (the paper: 0.37). A neuron is credited to a letter only when its best label
    (`table.best_feature`) is that letter's own unigram label (`unigram_a` for "a"): not when it is
    another letter's, the "starts with" class, or another label whose runner-up is the letter
    (an article neuron is not an alphabet neuron for "a"); with `universal` (a boolean column of
    `table`), only universal neurons are credited. A letter with no credited neuron has `vr` NaN."""
    cols = ["letter", "layer", "neuron", "vr", "has_neuron"]
    if letters.empty:
        return pd.DataFrame(columns=cols)
    keep = ["layer", "neuron", "best_feature"] + ([universal] if universal else [])
    m = letters.merge(table[keep], on=["layer", "neuron"], how="left", validate="many_to_one")
    ok = m.best_feature.eq("unigram_" + m.letter)
    if universal:
        ok &= m[universal].fillna(False).astype(bool)
    credited = m[ok]
    best = credited.loc[credited.groupby("letter").vr.idxmax().dropna()] if len(credited) else credited
    out = pd.DataFrame({"letter": sorted(letters.letter.unique())}).merge(best[["letter", "layer", "neuron", "vr"]], on="letter", how="left")
    out[["layer", "neuron"]] = out[["layer", "neuron"]].astype("Int64")
    return out.assign(has_neuron=out.vr.fillna(-np.inf) >= min_vr)[cols]


def set_sensitivity(table: pd.DataFrame, sized: pd.DataFrame) -> pd.DataFrame:
    """How chapter 03's headline moves with the size of the set: for each boolean set column of
    `sized` (layer, neuron and one column per set, e.g. `NeuronSet.sized_sets()`), the set's size,
    the share of its neurons with a family (not unexplained, as dead neurons are) and
    the same share over the rest, the median best VR of the set and of the rest, and the set's
    largest family with its share of the set. `table` is an explanation table (family, best_vr)."""
    sets = [c for c in sized.columns if c not in ("layer", "neuron")]
    m = table.drop(columns=[c for c in sets if c in table], errors="ignore").merge(
        sized, on=["layer", "neuron"], how="left", validate="one_to_one")
    explained = m.family.ne("unexplained")
    rows = []
    for s in sets:
        sel = m[s].fillna(False).astype(bool)
        fams = m.family[sel & explained].value_counts()
        rows.append({"set": s, "neurons": int(sel.sum()),
                     "explained (set)": float(explained[sel].mean()) if sel.any() else np.nan,
                     "explained (rest)": float(explained[~sel].mean()) if (~sel).any() else np.nan,
                     "median best VR (set)": float(m.best_vr[sel].median()) if sel.any() else np.nan,
                     "median best VR (rest)": float(m.best_vr[~sel].median()) if (~sel).any() else np.nan,
                     "largest family of the set": fams.index[0] if len(fams) else "none",
                     "its share of the set": float(fams.iloc[0] / sel.sum()) if len(fams) else np.nan})
    return pd.DataFrame(rows).set_index("set")


def top_by_family(table: pd.DataFrame, family: str, k: int = 6, score: str = "best_vr") -> pd.DataFrame:
    """The `k` neurons of `family` with the highest `score`."""
    return table[table.family == family].sort_values(score, ascending=False).head(k)


def gallery_long(table: pd.DataFrame) -> pd.DataFrame:
    """Figs 15-21 from the grouped moments: each neuron's mean ± std activation on tokens with
    and without its best label, in long form (neuron, side, mean, std)."""
    t = table.assign(name=[f"L{l}.{n}: {f}" for l, n, f in zip(table.layer, table.neuron, table.best_feature)])
    pos = t.assign(side="label = 1", mean=t.mean_pos, std=t.std_pos)
    neg = t.assign(side="label = 0", mean=t.mean_neg, std=t.std_neg)
    return pd.concat([pos, neg])[["name", "layer", "neuron", "family", "best_vr", "side", "mean", "std"]]


# The paper's depth claims (§4.3), made to apply to a model of any depth. The paper places the
# families in layers of 24-layer GPT2-medium (unigram: 0-1; previous-token: mostly 4-6; position:
# 0-2; syntax: spread out). Here layer l of an n-layer model is the slice [l / n, (l + 1) / n] of the
# network's depth, and a claim is a range of depth (`where`) that holds when the slice of the
# family's median layer overlaps it: a layer stands for all the depth it spans (layer 0 of a
# 2-layer model is the first half of it; layers 4-6 of 24 are [0.17, 0.29]). The spread claim holds
# when the first- and third-quartile layers lie more than `spread` of the depth apart (their
# interquartile range divided by n). A model of one layer has no depth to place anything in.
DEPTH_CLAIMS = {
    "unigram": ("unigram_depth", {"where": (0.0, 1 / 3)}),
    "previous-token": ("previous_token_depth", {"where": (0.1, 0.5)}),
    "position": ("position_depth", {"where": (0.0, 1 / 4)}),
    "syntax": ("syntax_depth", {"spread": 0.25}),
}
_DEPTH_EPS = 1e-9  # a slice that only touches a range's end does not overlap it


def layer_slice(layer: float, n_layers: int) -> tuple[float, float]:
    """The share of the network's depth that `layer` (0-based; a median may fall between two
    layers) of an `n_layers`-layer model spans: (layer / n_layers, (layer + 1) / n_layers)."""
    return float(layer) / n_layers, (float(layer) + 1) / n_layers


def depth_claim_holds(family: str, layers, n_layers: int) -> bool | None:
    """Whether the paper's depth claim for `family` (`DEPTH_CLAIMS`) holds for neurons in `layers`
    (one entry per neuron) of an `n_layers`-layer model; None for a family without a claim, no
    neurons, or a model of fewer than 2 layers."""
    claim = DEPTH_CLAIMS.get(family)
    layers = pd.Series(np.asarray(layers, dtype=float))
    if claim is None or len(layers) == 0 or n_layers < 2:
        return None
    rule = claim[1]
    if "where" in rule:
        lo, hi = rule["where"]
        start, end = layer_slice(layers.median(), n_layers)
        return bool(start < hi - _DEPTH_EPS and end > lo + _DEPTH_EPS)
    return bool((layers.quantile(0.75) - layers.quantile(0.25)) / n_layers > rule["spread"] + _DEPTH_EPS)


def depth_summary(table: pd.DataFrame, n_layers: int) -> pd.DataFrame:
    """Per family: count, median layer, its relative depth (layer / (n_layers - 1): 0 first, 1 last)
    and the slice of depth it spans (`layer_slice`), the interquartile range of the layers as a share
    of the depth (IQR / n_layers), the layers, and whether the paper's depth claim for it holds
    (`depth_claim_holds`; None for families without one or no neurons)."""
    out = []
    for fam in FAMILIES[:-1]:
        lay = table.layer[table.family == fam].astype(float)
        claim = DEPTH_CLAIMS.get(fam)
        med = lay.median() if len(lay) else np.nan
        span = layer_slice(med, n_layers) if len(lay) else (np.nan, np.nan)
        out.append({"family": fam, "neurons": len(lay), "median layer": med,
                    "median depth": med / max(n_layers - 1, 1) if len(lay) else np.nan,
                    "depth span": f"{span[0]:.2f}-{span[1]:.2f}" if len(lay) else "",
                    "depth IQR": (lay.quantile(0.75) - lay.quantile(0.25)) / n_layers if len(lay) else np.nan,
                    "layers": ", ".join(str(int(l)) for l in sorted(lay.unique())),
                    "paper key": claim[0] if claim else None,
                    "holds": depth_claim_holds(fam, lay, n_layers)})
    return pd.DataFrame(out).set_index("family")


# --------------------------------------------------------------------------------------------
# The chapter's runs and the command line
# --------------------------------------------------------------------------------------------


def explain_reference(family, n_tokens: int, artifacts_dir: str | Path, batch_size: int = 32, min_positive: int = 20,
                      verbose: bool = False) -> Explanations:
    """Every neuron of `family`'s reference model on `n_tokens` held-out tokens."""
    return Explanations.of(explain_model(family, family.reference, family.token_table(n_tokens), artifacts_dir,
                                         batch_size=batch_size, min_positive=min_positive, verbose=verbose))


def main(argv: list[str] | None = None) -> None:
    ap = preset_parser(__doc__.split("\n\n")[0], ["family", "device", "batch_size"],
                       prog="python -m helpers.taxonomy.explain")
    ap.add_argument("--n-tokens", type=int, default=None,
                    help="analysed tokens (default: the preset's n_tokens; for smollm2-135m its n_tokens_single)")
    ap.add_argument("--min-positive", type=int, default=20)
    args = ap.parse_args(argv)
    params = preset_from_args(args)
    art = params.artifacts_path
    fam = load_family(params.family, params, device=params.device)
    if params.family == "smollm2-135m":
        n = args.n_tokens or params.n_tokens_single
        ex = explain_sampled(fam, fam.reference, fam.token_table(n), art, min_positive=args.min_positive,
                             batch_size=min(params.batch_size, 8), verbose=True)
    else:
        n = args.n_tokens or params.n_tokens
        ex = explain_reference(fam, n, art, params.batch_size, args.min_positive, verbose=True)
    print(f"{fam.name}-{fam.reference}: {len(ex.table):,} neurons explained on {ex.meta['n_tokens']:,} tokens with "
          f"{ex.meta['n_features'] - ex.n_dropped:,} labels ({ex.n_dropped:,} dropped with fewer than "
          f"{args.min_positive} positives)")
    print(family_counts(ex.table).to_string())


if __name__ == "__main__":
    run_cli(main)
