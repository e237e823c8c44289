"""Analyses of the per-neuron universality table (paper §2, Figs 2, 11, 12, 13).

The table comes from `helpers.correlate.correlate_family`; these functions turn it into the
quantities the chapter plots and compares with the paper. No loops live in the notebooks: runs over
several families or checkpoints are here too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .correlate import correlate_family, results_dir, short_name


def universality_table(family, n_tokens: int, artifacts_dir: str | Path, device: str = "cpu", batch_size: int = 32,
                       seed: int = 0, baseline: str = "rotation", precision: str = "fp32", threshold: float = 0.5,
                       verbose: bool = True) -> pd.DataFrame:
    """The per-neuron table of `family` over `n_tokens` held-out tokens (computed once, then cached)."""
    out = results_dir(family, n_tokens, artifacts_dir, None, baseline, seed, precision, threshold)
    return correlate_family(family, n_tokens, out, batch_size=batch_size, device=device, precision=precision,
                            baseline=baseline, seed=seed, threshold=threshold, verbose=verbose)


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


def best_match_layers(table: pd.DataFrame) -> pd.DataFrame:
    """Fig 2c: fraction of layer-l neurons whose best match in another seed is in layer l',
    averaged over the comparison seeds; rows l (reference layer), columns l'."""
    mats = []
    for m in comparison_members(table):
        valid = table[f"match_layer_{m}"] >= 0
        ct = pd.crosstab(table.layer[valid], table[f"match_layer_{m}"][valid], normalize="index")
        mats.append(ct)
    full = pd.concat(mats).groupby(level=0).mean().fillna(0.0)
    full.index.name, full.columns.name = "reference layer", "layer of best match"
    return full


def seed_spread(table: pd.DataFrame, column: str = "is_universal") -> dict:
    """Mean over neurons of (max over seeds - min over seeds) of the max correlation: over all
    neurons and over the neurons where `column` is true (paper: 0.049 and 0.105)."""
    spread = table.max_corr - table.min_corr
    sel = table[column].astype(bool)
    return {"all": float(spread.mean()), "selected": float(spread[sel].mean()) if sel.any() else float("nan"),
            "n_selected": int(sel.sum())}


def add_calibrated_sets(table: pd.DataFrame, control: pd.DataFrame, top_fraction: float = 0.01) -> pd.DataFrame:
    """Neuron sets that do not rest on the paper's 0.5 threshold, which was set on GPT-2:
    - `above_control`: excess correlation above the **maximum** excess of any neuron of the untrained
      control family (what no random network reaches);
    - `top_excess`: the top `top_fraction` of neurons by excess correlation."""
    out = table.copy()
    out["above_control"] = out.excess_corr > control.excess_corr.max()
    cut = out.excess_corr.quantile(1 - top_fraction)
    out["top_excess"] = out.excess_corr >= cut
    return out


def checkpoint_emergence(params: dict, n_tokens: int, artifacts_dir: str | Path, device: str = "cpu", batch_size: int = 32,
                         seed: int = 0, threshold: float = 0.5, control_max: float | None = None) -> pd.DataFrame:
    """Universality at every saved training checkpoint of the embedded family (the same step in every
    seed): one row per step with the excess-correlation summary."""
    from .families import embedded_family
    from .train import saved_checkpoint_steps

    rows = []
    for step in saved_checkpoint_steps(params):
        fam = embedded_family(params, device=device, checkpoint=step)
        t = universality_table(fam, n_tokens, artifacts_dir, device, batch_size, seed, threshold=threshold, verbose=False)
        s = excess_summary(t)
        s["step"] = step
        s["tokens_trained"] = step * fam.info["recipe"]["batch_size"] * fam.info["arch"]["n_ctx"]
        if control_max is not None:
            s["share_above_control"] = float((t.excess_corr > control_max).mean())
        rows.append(s)
    return pd.DataFrame(rows).set_index("step")


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

    from .activations import mlp_activations, top_activating_contexts

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
    """The neuron set later chapters use: the paper's threshold set when it has at least
    `min_count` neurons, else the control-calibrated set, else the top 1% by excess correlation."""
    for column in ("is_universal", "above_control"):
        if column in table and int(table[column].sum()) >= min_count:
            return column
    return "top_excess"
