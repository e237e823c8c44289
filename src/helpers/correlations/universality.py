"""Analyses of the per-neuron universality table (paper §2, Figs 2, 11, 12, 13).

The table comes from `helpers.correlations.correlate.correlate_family` (`universality_table` returns
that cached run); these functions turn it into the quantities the chapter plots and compares with
the paper. No loops live in the notebooks: runs over several families or checkpoints are here too.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from helpers.core import paper
from helpers.core.cache import Result, config_hash, read_json, run_cli, write_json
from helpers.core.cli import preset_from_args, preset_parser
from helpers.core.presets import Preset, repo_root
from helpers.correlations.correlate import correlate_family
from helpers.models.families import embedded_family, load_family
from helpers.models.weights import saved_checkpoint_steps


def universality_table(family, n_tokens: int, artifacts_dir: str | Path, device: str = "cpu", batch_size: int = 32,
                       seed: int = 0, baseline: str = "rotation", precision: str = "fp32", threshold: float = 0.5,
                       verbose: bool = True) -> Result:
    """The correlation run of `family` over `n_tokens` held-out tokens, computed once, then cached
    under `artifacts_dir` (`correlate_family`): `.table("universality")` the per-neuron table,
    `.table("convergence")`, `.meta` the run record."""
    return correlate_family(family, n_tokens, batch_size=batch_size, device=device, precision=precision,
                            baseline=baseline, seed=seed, threshold=threshold, verbose=verbose,
                            artifacts_dir=artifacts_dir)


def comparison_members(table: pd.DataFrame) -> list[str]:
    return [c.removeprefix("max_corr_") for c in table.columns if c.startswith("max_corr_") and c != "max_corr_"]


def excess_summary(table: pd.DataFrame, thresholds=(0.1, 0.2, 0.3, 0.5)) -> dict:
    """Threshold-free and thresholded views of the excess-correlation distribution."""
    e = table.excess_corr.dropna()
    out = {"neurons": len(table), "dead": int(table.is_dead.sum()), "median": e.median(), "p90": e.quantile(0.9),
           "p99": e.quantile(0.99), "max": e.max(), "mean_corr_median": table.mean_corr.median(),
           "mean_baseline_median": table.mean_baseline.median()}
    for t in thresholds:
        out[f"share>{t}"] = float((e > t).sum() / len(table))
    return out


def share_by_layer(table: pd.DataFrame, column: str = "is_universal") -> pd.Series:
    """Share (0-1) of each layer's neurons for which `column` is true."""
    return table.groupby("layer")[column].mean()


def best_match_layers(table: pd.DataFrame, n_layers: int | None = None) -> pd.DataFrame:
    """Fig 2c: fraction of layer-l neurons whose best match in another seed is in layer l',
    averaged over the comparison seeds; rows l (reference layer), columns l'.

    Each seed's table is reindexed over every layer before the average, so a layer in which one
    seed has no best match counts as 0 for that seed (not as missing): every row sums to 1.
    `n_layers` defaults to the reference model's layer count (the members share an architecture)."""
    n_layers = int(table.layer.max()) + 1 if n_layers is None else int(n_layers)
    layers = range(n_layers)
    mats = []
    for m in comparison_members(table):
        valid = table[f"match_layer_{m}"] >= 0
        ct = pd.crosstab(table.layer[valid], table[f"match_layer_{m}"][valid], normalize="index")
        # a reference layer without any valid neuron stays NaN (no data from this seed)
        mats.append(ct.reindex(columns=layers, fill_value=0.0).reindex(index=layers))
    full = pd.concat(mats).groupby(level=0).mean()
    full = full.reindex(index=layers, columns=layers)
    full.index.name, full.columns.name = "reference layer", "layer of best match"
    return full


def depth_specialisation(heat: pd.DataFrame) -> dict:
    """Fig 2c in numbers: the mean share of best matches in the reference neuron's own layer
    (`diagonal`), the same share if matches fell in layers at random (`chance` = 1 / n_layers),
    and whether the diagonal is the largest entry of every row (`diagonal_is_row_max`)."""
    m = heat.to_numpy(dtype=float)
    diag = np.diag(m)
    ok = ~np.isnan(diag)
    return {"diagonal": float(np.nanmean(diag)) if ok.any() else float("nan"), "chance": 1.0 / m.shape[1],
            "diagonal_is_row_max": bool(ok.any() and all(m[i, i] >= np.nanmax(m[i]) for i in np.flatnonzero(ok)))}


def seed_spread(table: pd.DataFrame, column: str = "is_universal") -> dict:
    """Mean over neurons of (max over seeds - min over seeds) of the max correlation: over all
    neurons and over the neurons where `column` is true (paper: 0.049 and 0.105)."""
    spread = table.max_corr - table.min_corr
    sel = table[column].astype(bool)
    return {"all": float(spread.mean()), "selected": float(spread[sel].mean()) if sel.any() else float("nan"),
            "n_selected": int(sel.sum())}


# The set later chapters use is sized like the paper's: its share of neurons is GPT2-small's share
# of universal neurons (the larger of the paper's two GPT-2 shares: 4.16% small, 1.23% medium).
SET_SHARE = paper.UNIVERSAL_SHARE[paper.SMALL]
SENSITIVITY_SHARES = (0.01, 0.04, 0.10)  # each chapter shows how its headline moves with the set's size


def sized_mask(excess: np.ndarray, control_max: float | None, share: float) -> np.ndarray:
    """[neurons] bool: above `control_max` (the untrained control's maximum excess correlation)
    **and** in the top `share` by `excess` (the top `share` alone when `control_max` is None). NaN
    excess is never in the set. Ties at the cut are kept, so the set can be a few neurons larger than
    `share`; it is smaller where fewer neurons than that beat the control."""
    e = np.asarray(excess, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        mask = e >= np.nanquantile(e, 1 - share)
        if control_max is not None:
            mask &= e > control_max
    return mask


def sized_set(table: pd.DataFrame, control: pd.DataFrame | None, share: float) -> pd.Series:
    """The paper-sized set of a family's table (`sized_mask` of its excess correlation, against the
    maximum of the `control` table's), as a boolean Series on the table's index."""
    cmax = float(control.excess_corr.max()) if control is not None else None
    return pd.Series(sized_mask(table.excess_corr.to_numpy(), cmax, share), index=table.index)


def add_calibrated_sets(table: pd.DataFrame, control: pd.DataFrame | None, top_fraction: float = 0.01,
                        share: float = SET_SHARE) -> pd.DataFrame:
    """Neuron sets that do not rest on the paper's 0.5 threshold, which was set on GPT-2:
    - `above_control`: excess correlation above the **maximum** excess of any neuron of the untrained
      control family (what no random network reaches); all False without a control;
    - `paper_sized`: `above_control` and in the top `share` by excess (`sized_set`): a set of the
      paper's order of size (1-5% of neurons) that no random network reaches;
    - `top_excess`: the top `top_fraction` of neurons by excess correlation."""
    out = table.copy()
    out["above_control"] = (out.excess_corr > control.excess_corr.max()) if control is not None else False
    out["paper_sized"] = sized_set(out, control, share)
    cut = out.excess_corr.quantile(1 - top_fraction)
    out["top_excess"] = out.excess_corr >= cut
    return out


def checkpoint_emergence(params: Preset, n_tokens: int, artifacts_dir: str | Path, device: str = "cpu",
                         batch_size: int = 32, seed: int = 0, threshold: float = 0.5, baseline: str = "rotation",
                         control_family: str = "embedded-untrained") -> pd.DataFrame:
    """Universality at every saved training checkpoint of the embedded family (the same step in every
    seed): one row per step with the excess-correlation summary.

    Like is compared with like: the untrained control is correlated on the **same** `n_tokens`
    held-out tokens with the same `baseline` as the checkpoints (fewer tokens give noisier, more
    extreme maxima), and `share_above_control` uses that run's maximum. The control's summary is in
    the `control_*` columns. Every step, and the control, uses the same members: those whose
    checkpoints were saved."""
    steps = saved_checkpoint_steps(params)
    members = embedded_family(params, device=device, checkpoint=steps[0]).members  # the same seeds at every step
    ctl = load_family(control_family, params, device=device, members=members)
    ctl_table = universality_table(ctl, n_tokens, artifacts_dir, device, batch_size, seed, baseline=baseline,
                                   threshold=threshold, verbose=False).table("universality")
    c = excess_summary(ctl_table)
    rows = []
    for step in steps:
        fam = embedded_family(params, device=device, checkpoint=step)
        t = universality_table(fam, n_tokens, artifacts_dir, device, batch_size, seed, baseline=baseline, threshold=threshold,
                               verbose=False).table("universality")
        s = excess_summary(t)
        s["step"] = step
        s["tokens_trained"] = step * fam.info["recipe"]["batch_size"] * fam.info["arch"]["n_ctx"]
        s["share_above_control"] = float((t.excess_corr > c["max"]).mean())
        s.update({"control_median": c["median"], "control_p99": c["p99"], "control_max": c["max"],
                  "n_tokens": int(n_tokens), "baseline": baseline})
        rows.append(s)
    return pd.DataFrame(rows).set_index("step")


def plateau(emergence: pd.DataFrame, column: str = "p99", tolerance: float = 0.05) -> dict:
    """Where a statistic of `checkpoint_emergence` stops moving: the first checkpoint from which every
    later value (the last included) lies within `tolerance` of the last value. Returns its step and
    training tokens, the values from there on, and the total rise from the initialisation."""
    e = emergence.sort_values("tokens_trained")
    vals = e[column].to_numpy(dtype=float)
    final = vals[-1]
    within = np.abs(vals - final) <= tolerance
    first = len(vals) - 1
    while first > 0 and within[first - 1]:
        first -= 1
    return {"step": int(e.index[first]), "tokens_trained": int(e.tokens_trained.iloc[first]), "tolerance": tolerance,
            "values_from_there": [float(v) for v in vals[first:]], "rise_from_init": float(final - vals[0]),
            "rise_from_there": float(final - vals[first])}


def like_for_like_medians(table: pd.DataFrame, column: str) -> dict:
    """The medians the paper reports over its universal neurons, over the neurons where `column`
    is true: `mean_corr` (mean over seeds of the max correlation) and `mean_baseline`; NaN for an
    empty set. PAPER.md §2: about 0.75 and 0.155, medians over universal neurons, not all neurons."""
    sel = table[table[column].astype(bool)]
    return {"mean_corr": float(sel.mean_corr.median()) if len(sel) else float("nan"),
            "mean_baseline": float(sel.mean_baseline.median()) if len(sel) else float("nan"), "n": int(len(sel))}


def top_neurons(table: pd.DataFrame, k: int = 8, column: str = "excess_corr") -> pd.DataFrame:
    cols = ["layer", "neuron", "excess_corr", "mean_corr", "mean_baseline", "min_corr", "max_corr"]
    t = table.dropna(subset=[column]).nlargest(k, column)[cols].copy()
    t.insert(0, "name", [f"L{l}.{n}" for l, n in zip(t.layer, t.neuron)])
    return t.reset_index(drop=True)


def context_visualisation(model, codec, rows, neurons: pd.DataFrame, k: int = 3, window: int = 16):
    """circuitsvis view of the top-activating contexts of each neuron in `neurons` (layer, neuron):
    the contexts are concatenated; a selector picks whose activations colour the tokens."""
    import circuitsvis as cv
    import torch

    from helpers.streaming.activations import mlp_activations, top_activating_contexts

    labels = [f"L{l}.{n}" for l, n in zip(neurons.layer, neurons.neuron)]
    d = model.cfg.d_mlp
    cols = torch.tensor([int(l) * d + int(n) for l, n in zip(neurons.layer, neurons.neuron)])
    strings, values = [], []
    for l, n in zip(neurons.layer, neurons.neuron):
        for ctx in top_activating_contexts(model, rows, int(l), int(n), k=k, window=window):
            row = rows[ctx["row"] : ctx["row"] + 1]
            acts = mlp_activations(model, row)[:, cols]  # every selected neuron, in the original context
            lo = ctx["pos"] + 1 - len(ctx["tokens"])
            strings += ["\n[…] "] + [codec.decode([t]) for t in ctx["tokens"]]
            values.append(torch.cat([torch.zeros(1, len(cols)), acts[lo : ctx["pos"] + 1]]))
    return cv.tokens.colored_tokens_multi(tokens=strings, values=torch.cat(values), labels=labels)


def choose_set(table: pd.DataFrame, min_count: int = 20) -> str:
    """The neuron set later chapters use: the paper's threshold set (excess > 0.5) when it has at
    least `min_count` neurons, else the paper-sized control-calibrated set (`paper_sized`), else the
    top 1% by excess correlation."""
    for column in ("is_universal", "paper_sized"):
        if column in table and int(table[column].sum()) >= min_count:
            return column
    return "top_excess"


SET_COLUMNS = ("is_universal", "above_control", "paper_sized", "top_excess")


@dataclass
class NeuronSet:
    """The control-calibrated neuron set of a family (chapters 01 onwards).

    `table`: the per-neuron universality table with the boolean set columns `is_universal`,
    `above_control`, `top_excess`; `chosen`: the column later chapters use (`choose_set`);
    `control`: the untrained control's table and `control_family` the control (None for families
    without one)."""

    table: pd.DataFrame
    chosen: str
    control: pd.DataFrame | None
    control_family: object = None

    @property
    def size(self) -> int:
        return int(self.table[self.chosen].sum())

    @property
    def neurons(self) -> pd.DataFrame:
        return self.table.loc[self.table[self.chosen], ["layer", "neuron"]].reset_index(drop=True)

    def at_share(self, share: float) -> pd.Series:
        """The paper-sized rule (`sized_set`) at another share of the neurons: for the chapters'
        sensitivity rows (`SENSITIVITY_SHARES`)."""
        return sized_set(self.table, self.control, share)

    def sized_sets(self, shares=SENSITIVITY_SHARES) -> pd.DataFrame:
        """`layer`, `neuron` and one boolean column per share (named by `share_label`, e.g. "4%"):
        `at_share` at each share, then the chosen set under its own column name. One row per neuron
        of `table`, in its order; the chapters merge it on (layer, neuron) for their sensitivity rows."""
        out = self.table[["layer", "neuron"]].reset_index(drop=True)
        for s in shares:
            out[share_label(s)] = self.at_share(s).to_numpy()
        out[self.chosen] = self.table[self.chosen].fillna(False).astype(bool).to_numpy()
        return out

    def describe(self) -> str:
        """One sentence, computed: which set later chapters use, its size, and its rule."""
        n, total = self.size, len(self.table)
        head = f"`{self.chosen}`: {n:,} of {total:,} neurons ({n / total:.1%})"
        if self.chosen == "is_universal":
            return head + ", the paper's rule (excess correlation above its threshold)."
        if self.chosen == "paper_sized":
            if self.control is None:
                return head + f", the top {SET_SHARE:.2%} by excess correlation (no untrained control)."
            n_above = int(self.table.above_control.sum())
            return (head + f": above the untrained control's maximum excess correlation "
                    f"({self.control.excess_corr.max():.3f}; {n_above:,} neurons pass it) and in the top "
                    f"{SET_SHARE:.2%} by excess correlation (GPT2-small's share of universal neurons).")
        return head + ": the top 1% by excess correlation (fewer neurons beat the control)."


def share_label(share: float) -> str:
    """How a share of the neurons names a set column: 0.04 -> "4%", 0.0416 -> "4.16%"."""
    return f"{share:.0%}" if round(share * 100, 6) == round(share * 100) else f"{share:.2%}"


def top_count(table: pd.DataFrame, k: int, column: str = "excess_corr") -> pd.Series:
    """Boolean Series: the `k` neurons of `table` with the largest `column` (ties broken by order;
    NaN never selected). The untrained control's counterpart of a set of `k` neurons."""
    r = table[column].rank(ascending=False, method="first", na_option="bottom")
    return (r <= k) & table[column].notna()


def same_layer_share(table: pd.DataFrame, selected: pd.Series | None = None) -> float:
    """Fig 2c's diagonal for a set of neurons: the share of (neuron, comparison seed) pairs whose
    best match lies in the neuron's own layer, over the neurons where `selected` is true (all
    neurons without it) and the seeds where the neuron has a best match; NaN for an empty set."""
    sel = pd.Series(True, index=table.index) if selected is None else selected.reindex(table.index).fillna(False)
    hits = total = 0
    for m in comparison_members(table):
        ml = table.loc[sel.astype(bool), f"match_layer_{m}"]
        valid = ml >= 0
        hits += int((ml[valid] == table.loc[ml.index[valid], "layer"]).sum())
        total += int(valid.sum())
    return hits / total if total else float("nan")


def set_sensitivity(nset: "NeuronSet", shares=SENSITIVITY_SHARES) -> pd.DataFrame:
    """How chapter 01's headline moves with the size of the set: one row per share of the neurons
    (`NeuronSet.at_share`) and one for the chosen set, with the set's size, the smallest and the
    median excess correlation in it, the medians the paper reports over its universal neurons
    (`like_for_like_medians`), the mean seed spread (`seed_spread`) and the share of its best matches
    in the neuron's own layer (`same_layer_share`; chance: 1 / n_layers). Reuses the table; no pass."""
    t = nset.table
    sized = nset.sized_sets(shares)
    chance = 1.0 / (int(t.layer.max()) + 1)
    rows = []
    for col in [c for c in sized.columns if c not in ("layer", "neuron")]:
        sel = pd.Series(sized[col].to_numpy(), index=t.index)
        x = t.assign(_set=sel)
        med = like_for_like_medians(x, "_set")
        e = t.excess_corr[sel]
        rows.append({"set": col if col != nset.chosen else f"{col} (chosen)", "neurons": int(sel.sum()),
                     "share of neurons": float(sel.mean()),
                     "smallest excess": float(e.min()) if len(e) else np.nan,
                     "median excess": float(e.median()) if len(e) else np.nan,
                     "median mean_corr": med["mean_corr"], "median mean_baseline": med["mean_baseline"],
                     "mean seed spread": seed_spread(x, "_set")["selected"],
                     "same-layer best matches": same_layer_share(t, sel), "chance": chance})
    return pd.DataFrame(rows).set_index("set")


def set_table(nset: "NeuronSet", threshold: float = 0.5) -> pd.DataFrame:
    """The candidate sets beside the untrained control: per set column, its rule, size, share of the
    neurons, smallest excess correlation in it, how many of the control's neurons reach that
    smallest excess (None without a control), and whether later chapters use it."""
    rules = {"is_universal": f"excess correlation > {threshold:g} (the paper's rule)",
             "above_control": "excess above the untrained control's maximum",
             "paper_sized": f"above the control's maximum and in the top {share_label(SET_SHARE)} by excess",
             "top_excess": "the top 1% by excess correlation"}
    t, c = nset.table, nset.control
    rows = []
    for col, rule in rules.items():
        if col not in t:
            continue
        sel = t[col].fillna(False).astype(bool)
        e = t.excess_corr[sel]
        low = float(e.min()) if len(e) else np.nan
        reach = None if c is None or not len(e) else int((c.excess_corr >= low).sum())
        rows.append({"set": col, "rule": rule, "neurons": int(sel.sum()), "share of neurons": float(sel.mean()),
                     "smallest excess": low, "control neurons reaching it": reach,
                     "used later": col == nset.chosen})
    out = pd.DataFrame(rows).set_index("set")
    return out.astype({"control neurons reaching it": "Int64"})


def default_control(family) -> str | None:
    """The untrained control family of `family`, or None where there is none (hub families)."""
    return "embedded-untrained" if family.name == "embedded" else None


def neuron_set(family, control_family, params: Preset, n_tokens: int, artifacts_dir: str | Path, device: str = "cpu",
               batch_size: int = 32, seed: int = 0, baseline: str = "rotation", threshold: float = 0.5,
               min_count: int = 20, top_fraction: float = 0.01, share: float = SET_SHARE,
               verbose: bool = False) -> NeuronSet:
    """One helper for the neuron set every chapter uses: the universality tables of `family` and of
    its untrained `control_family` (a Family, a family name, "auto" for `default_control`, or None)
    over the same `n_tokens` tokens and `baseline`, the calibrated sets (`add_calibrated_sets`) and
    the chosen one (`choose_set`). The correlation tables are cached by `helpers.correlations.correlate`; the
    set table is cached under `<artifacts>/neuron_sets/`, keyed by both runs and the set rules."""
    if isinstance(control_family, str):
        name = default_control(family) if control_family == "auto" else control_family
        control_family = None if name is None else load_family(name, params, device=device)
    run = universality_table(family, n_tokens, artifacts_dir, device, batch_size, seed, baseline,
                             threshold=threshold, verbose=verbose)
    ctl_run = None if control_family is None else universality_table(
        control_family, n_tokens, artifacts_dir, device, batch_size, seed, baseline, threshold=threshold,
        verbose=verbose)
    fam_dir, ctl_dir = run.path, None if ctl_run is None else ctl_run.path
    key = config_hash({"family": fam_dir.name, "control": None if ctl_dir is None else ctl_dir.name, "min_count": min_count,
                       "top_fraction": top_fraction, "share": share, "version": 2})
    cache = Path(artifacts_dir) / "neuron_sets" / f"{family.name}-{key}"
    table = run.table("universality")
    control = None if ctl_run is None else ctl_run.table("universality")
    if (cache / "sets.parquet").is_file():
        sets = pd.read_parquet(cache / "sets.parquet")
        chosen = read_json(cache / "set.json")["chosen"]
    else:
        sets = add_calibrated_sets(table, control, top_fraction, share)[["layer", "neuron", *SET_COLUMNS]]
        chosen = choose_set(sets, min_count)
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / "sets.tmp.parquet"
        sets.to_parquet(tmp)
        write_json(cache / "set.json", {"chosen": chosen, "family_run": fam_dir.name,
                                         "control_run": None if ctl_dir is None else ctl_dir.name,
                                         "min_count": min_count, "top_fraction": top_fraction, "share": share, "sizes": {
                                             c: int(sets[c].sum()) for c in SET_COLUMNS}})
        tmp.replace(cache / "sets.parquet")
    out = table.drop(columns=[c for c in SET_COLUMNS if c != "is_universal"], errors="ignore").merge(
        sets.drop(columns=["is_universal"]), on=["layer", "neuron"], validate="one_to_one")
    return NeuronSet(out, chosen, control, control_family)


def checkpoint_families(params: Preset, device: str = "cpu") -> dict:
    """{"step N": Family} for every saved training checkpoint of the preset's embedded family."""
    return {f"step {s}": embedded_family(params, device=device, checkpoint=s) for s in saved_checkpoint_steps(params)}


# --------------------------------------------------------------------------------------------
# One row per family: the depth comparison of chapter 01 (the two-layer family beside the default)
# --------------------------------------------------------------------------------------------

RECORD_FILE = "sweeps/families.csv"  # recorded rows of families the book no longer ships


def family_record(nset: NeuronSet, family, n_tokens: int, threshold: float = 0.5) -> dict:
    """The universality of one trained family and its untrained control on `n_tokens` held-out
    tokens, in one row: architecture and training budget, held-out loss, the excess-correlation
    tail (median, p99, max, neurons above `threshold`), the rotation baseline, the control's tail,
    the share above the control's maximum and the Fig 2c diagonal."""
    t, c = nset.table, nset.control
    if c is None:
        raise ValueError(f"family {family.name!r} has no untrained control: a record compares a family with its control")
    s, cs = excess_summary(t), excess_summary(c)
    spec = depth_specialisation(best_match_layers(t))
    arch, recipe = family.info["arch"], family.info["recipe"]
    return {"n_layers": int(arch["n_layers"]), "d_model": int(arch["d_model"]), "d_mlp": int(arch["d_mlp"]),
            "neurons": len(t), "train_tokens": int(recipe["train_tokens"]),
            "val_loss_mean": float(np.mean(list(family.info["val_loss"].values()))), "n_tokens": int(n_tokens),
            "baseline_median": float(s["mean_baseline_median"]), "excess_median": float(s["median"]),
            "excess_p99": float(s["p99"]), "excess_max": float(s["max"]),
            "n_above_threshold": int((t.excess_corr > threshold).sum()), "threshold": float(threshold),
            "control_p99": float(cs["p99"]), "control_max": float(cs["max"]),
            "share_above_control_max": float(t.above_control.mean()),
            "same_layer_share": spec["diagonal"], "same_layer_chance": spec["chance"]}


def record_family(params: Preset, out_csv: str | Path, command: str = "", verbose: bool = True) -> pd.DataFrame:
    """Compute `family_record` for the preset's embedded family over its `n_tokens` and write it into
    `out_csv`, one row per (preset, n_tokens), replacing an older row of the same key. Returns the
    file's table."""
    n, device = params.n_tokens, params.device
    fam = load_family(params.family, params, device=device)
    nset = neuron_set(fam, "auto", params, n, params.artifacts_path, device=device, batch_size=params.batch_size,
                      seed=params.baseline_seed, baseline=params.baseline, threshold=params.threshold, verbose=verbose)
    row = {"preset": params.preset, **family_record(nset, fam, n, params.threshold),
           "weights": fam.info.get("source", ""), "command": command}
    out_csv = Path(out_csv)
    old = pd.read_csv(out_csv) if out_csv.is_file() else pd.DataFrame(columns=list(row))
    old = old[~((old.preset == row["preset"]) & (old.n_tokens == row["n_tokens"]))]
    table = pd.concat([old, pd.DataFrame([row])], ignore_index=True).sort_values(["n_layers", "n_tokens"])
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_csv, index=False)
    return table


def recorded_families(root: Path | None = None) -> pd.DataFrame | None:
    """The committed rows of `RECORD_FILE` (None if absent)."""
    path = (root or repo_root()) / RECORD_FILE
    return pd.read_csv(path) if path.is_file() else None


# Quantities compared between two families, and the smallest change that counts as a change: for
# correlations, 0.05 (a tenth of the paper's 0.5 threshold); for the held-out loss, 0.05 nats; for
# the same-layer share of best matches, its ratio to chance (1 / n_layers), 0.25.
DEPTH_QUANTITIES = {
    "val_loss_mean": ("held-out loss (nats)", 0.05),
    "baseline_median": ("median rotation baseline", 0.05),
    "excess_median": ("median excess correlation", 0.05),
    "excess_p99": ("p99 excess correlation", 0.05),
    "excess_max": ("largest excess correlation", 0.05),
    "control_p99": ("untrained control's p99 excess", 0.05),
    "same_layer_over_chance": ("share of best matches in the same layer, over chance (Fig 2c)", 0.25),
}


def compare_families(before: dict, after: dict) -> pd.DataFrame:
    """One row per quantity of `DEPTH_QUANTITIES` (and the count above the threshold): the value in
    `before` and `after`, the change, and whether it counts as changed (|change| above the stated
    smallest change; for the count: any change)."""
    rows = []
    for key, (label, tol) in DEPTH_QUANTITIES.items():
        if key == "same_layer_over_chance":  # chance is 1 / n_layers: raw shares of two depths do not compare
            a, b = (float(r["same_layer_share"]) / float(r["same_layer_chance"]) for r in (before, after))
        else:
            a, b = float(before[key]), float(after[key])
        rows.append({"quantity": label, "key": key, "before": a, "after": b, "change": b - a, "smallest_change": tol,
                     "changed": bool(abs(b - a) > tol)})
    a, b = int(before["n_above_threshold"]), int(after["n_above_threshold"])
    rows.append({"quantity": f"neurons with excess > {after['threshold']:g}", "key": "n_above_threshold", "before": a,
                 "after": b, "change": b - a, "smallest_change": 0.0, "changed": a != b})
    return pd.DataFrame(rows).set_index("quantity")


def depth_conclusion(cmp: pd.DataFrame, before: str, after: str) -> str:
    """The sentence chapter 01 prints: which quantities moved from `before` to `after`, which did not."""
    fmt = lambda r: f"{r.before:.3g} → {r.after:.3g}"  # noqa: E731
    moved = [f"{q} ({fmt(r)})" for q, r in cmp.iterrows() if r.changed]
    held = [f"{q} ({fmt(r)})" for q, r in cmp.iterrows() if not r.changed]
    return (f"From {before} to {after}, these changed by more than the stated smallest change: "
            f"{'; '.join(moved) if moved else 'none'}. These did not: {'; '.join(held) if held else 'none'}.")


def main(argv: list[str] | None = None) -> None:
    ap = preset_parser("Record a preset's family in one row (chapter 01's comparison of families).",
                       ["n_tokens", "device"], default_preset=None)
    ap.add_argument("--record", default=RECORD_FILE, help=f"the CSV to write into (default {RECORD_FILE})")
    ap.add_argument("--command", default=None, help="the command to record as having made the row (default: this one)")
    args = ap.parse_args(argv)
    params = preset_from_args(args)
    given = argv if argv is not None else sys.argv[1:]
    command = args.command or "python -m helpers.correlations.universality " + " ".join(given)
    table = record_family(params, args.record, command)
    print(table.to_string())


if __name__ == "__main__":
    run_cli(main)
