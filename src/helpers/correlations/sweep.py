"""A recorded configuration sweep of the embedded seed family, scored by universality.

Small models trained for minutes on a CPU barely show the paper's phenomenon; which architecture
and budget shows it best is an empirical question. For each configuration of a grid
(`sweeps/embedded.yaml`) this trains 3 seeds, correlates seed `a` with the others on held-out
tokens (`helpers.correlations.correlate`), does the same for an untrained control family, and records the
excess-correlation distribution per CPU-minute of training. Results are written to
`sweeps/results.csv` and the book's appendix page `book/appendix_sweep.md`, both committed.

Command line: `python -m helpers.correlations.sweep --preset two-layer --grid sweeps/embedded.yaml` (the grid's base is
the two-layer family, the book's default until the six-layer family trained on a GPU replaced it).
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import yaml

from helpers.core.cache import run_cli
from helpers.core.cli import preset_from_args, preset_parser
from helpers.core.presets import Preset, load_preset, repo_root
from helpers.correlations.dimensionality import families_dimensionality
from helpers.correlations.universality import excess_summary, universality_table
from helpers.models.families import embedded_family
from helpers.models.training import ensure_family
from helpers.models.weights import training_table


def _merge_rows(path: Path | None, new: pd.DataFrame, key: str, order: list[str]) -> pd.DataFrame:
    """`new` rows replace those of `path` (a CSV) with the same `key`; rows ordered as in `order`."""
    old = pd.read_csv(path) if path is not None and Path(path).is_file() else pd.DataFrame(columns=new.columns)
    out = pd.concat([old[~old[key].isin(new[key])], new], ignore_index=True)
    rank = {name: i for i, name in enumerate(order)}
    return out.sort_values(key, key=lambda c: c.map(rank).fillna(len(rank)), kind="stable").reset_index(drop=True)


def run_sweep(base: Preset, grid_file: str | Path, out_csv: str | Path | None = None,
              only: list[str] | None = None, dims_csv: str | Path | None = None) -> pd.DataFrame:
    """Train and score every configuration of the grid on the preset `base` (its device; the grid
    overrides its `embedded` block), or those named in `only`, merged into the existing `out_csv`.
    With `dims_csv`, also record each configuration's per-layer effective dimensionality and its
    predicted vs measured rotation baseline (medians over its members), the sweep's points of
    chapter 01's dimensionality figure."""
    grid = yaml.safe_load(Path(grid_file).read_text())
    art, device = base.artifacts_path, base.device
    names = [c["name"] for c in grid["configs"]]
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise ValueError(f"{unknown} name no configuration of {grid_file}; its configurations: {names}")
    rows, dims = [], []
    for cfg in grid["configs"]:
        if only and cfg["name"] not in only:
            continue
        params = base.replace(embedded={**base["embedded"], **grid.get("common", {}), **cfg.get("overrides", {})},
                              n_seeds=int(grid.get("n_seeds", 3)))
        print(f"== {cfg['name']}: {params['embedded']}", flush=True)
        folder = ensure_family(params, device=device)
        fam = embedded_family(params, device=device, train=False)
        ctl = embedded_family(params, untrained=True, device=device, train=False)
        t0 = time.time()
        t = universality_table(fam, grid["n_tokens"], art, device, verbose=False).table("universality")
        trained = excess_summary(t)
        ctl_table = universality_table(ctl, grid["n_tokens"], art, device, verbose=False).table("universality")
        control = excess_summary(ctl_table)
        tt = training_table(folder).loc[fam.members]
        minutes = float(tt.train_seconds.sum()) / 60
        row = {"config": cfg["name"], **{k: params["embedded"][k] for k in ("n_layers", "d_model", "d_mlp", "d_vocab", "lr", "train_tokens")},
               "seeds": len(fam.members), "val_loss_mean": tt.val_loss.mean(), "val_loss_spread": tt.val_loss.max() - tt.val_loss.min(),
               "train_cpu_minutes": minutes, "excess_median": trained["median"], "excess_p99": trained["p99"], "excess_max": trained["max"],
               "share>0.3": trained["share>0.3"], "share>0.5": trained["share>0.5"], "baseline_median": trained["mean_baseline_median"],
               "control_p99": control["p99"], "control_max": control["max"],
               "share_above_control_max": float((t.excess_corr > control["max"]).mean()),
               "analysis_seconds": time.time() - t0}
        row["p99_gain_over_control"] = row["excess_p99"] - row["control_p99"]
        row["p99_gain_per_cpu_minute"] = row["p99_gain_over_control"] / max(minutes, 1e-9)
        rows.append(row)
        print(pd.Series(row).to_string(), flush=True)
        if dims_csv:
            per_member = families_dimensionality({cfg["name"]: fam}, grid["n_tokens"], art, device, seed=base["baseline_seed"],
                                                 baseline=base["baseline"], threshold=base["threshold"])
            dims.append(per_member.groupby(["label", "layer"], as_index=False)[
                ["d", "pr_cov", "pr_corr", "predicted_median", "measured_median", "textbook", "n_tokens"]].median()
                .assign(d_model=row["d_model"], n_layers=row["n_layers"], train_tokens=row["train_tokens"]))
            _merge_rows(Path(dims_csv), pd.concat(dims, ignore_index=True), "label", names).to_csv(dims_csv, index=False)
        if out_csv:  # after every configuration, so an interrupted sweep keeps what it measured
            Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
            _merge_rows(Path(out_csv) if only else None, pd.DataFrame(rows), "config", names).to_csv(out_csv, index=False)
    return _merge_rows(Path(out_csv) if (out_csv and only) else None, pd.DataFrame(rows), "config", names)


def default_config(df: pd.DataFrame, preset: str = "two-layer") -> str | None:
    """The grid row whose architecture and recipe match the preset's `embedded` block (ignoring train_tokens)."""
    emb = load_preset(preset)["embedded"]
    keys = ["n_layers", "d_model", "d_mlp", "d_vocab", "lr"]
    if not set(keys + ["train_tokens"]) <= set(df.columns):
        return None
    hit = df[(df[keys] == pd.Series({k: emb[k] for k in keys})).all(axis=1)]
    hit = hit[hit.train_tokens == hit.train_tokens.min()] if len(hit) else hit
    return None if hit.empty else str(hit.iloc[0]["config"])


SWEEP_KNOBS = ("n_layers", "d_model", "d_mlp", "d_vocab", "lr", "train_tokens")


def one_change_effects(df: pd.DataFrame, base: str) -> pd.DataFrame:
    """For every configuration that differs from `base` in exactly one knob (`SWEEP_KNOBS`), the
    change of the excess-correlation tail: rows `knob`, `from`, `to`, the configuration, and the
    differences (that configuration minus `base`) of the p99 excess, of the share above the
    control's maximum, of the baseline median and of the per-minute score."""
    knobs = [k for k in SWEEP_KNOBS if k in df.columns]
    b = df.set_index("config").loc[base]
    rows = []
    for r in df[df.config != base].itertuples(index=False):
        r = pd.Series(r._asdict())
        diff = [k for k in knobs if r[k] != b[k]]
        if len(diff) != 1:
            continue
        k = diff[0]
        rows.append({"knob": k, "from": b[k], "to": r[k], "config": r["config"],
                     "delta_excess_p99": r["excess_p99"] - b["excess_p99"],
                     "delta_share_above_control_max": r["share_above_control_max"] - b["share_above_control_max"],
                     "delta_baseline_median": r["baseline_median"] - b["baseline_median"],
                     "delta_p99_gain_over_control": (r["excess_p99"] - r["control_p99"]) - (b["excess_p99"] - b["control_p99"]),
                     "delta_p99_gain_per_cpu_minute": r["p99_gain_per_cpu_minute"] - b["p99_gain_per_cpu_minute"]})
    return pd.DataFrame(rows)


def recorded(root: Path | None = None) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """The committed sweep: `sweeps/results.csv` (one row per configuration) and
    `sweeps/dimensionality.csv` (per configuration and layer, medians over its seeds); None where missing."""
    root = root or repo_root()
    res, dims = root / "sweeps" / "results.csv", root / "sweeps" / "dimensionality.csv"
    return (pd.read_csv(res) if res.is_file() else None), (pd.read_csv(dims) if dims.is_file() else None)


def effects_sentence(effects: pd.DataFrame, column: str = "delta_p99_gain_over_control") -> str:
    """One computed sentence over `one_change_effects`: each knob's change of the p99 excess, of its
    gain over the configuration's own untrained control, and of the share above the control's
    maximum; and the knob with the largest rise of `column` (the gain over the control: a knob
    that lifts the control's tail as much as the trained one's moves nothing)."""
    if effects is None or effects.empty:
        return "the recorded sweep changes no single knob"
    def num(v) -> str:
        return f"{v:,.0f}" if float(v).is_integer() else f"{v:g}"

    parts = [f"{r.knob} {num(r['from'])} → {num(r.to)}: p99 {r.delta_excess_p99:+.3f} (over its control "
             f"{r.delta_p99_gain_over_control:+.3f}), share above the control's maximum {r.delta_share_above_control_max:+.3f}"
             for _, r in effects.iterrows()]
    best = effects.loc[effects[column].idxmax()]
    what = "p99 excess over the untrained control" if column == "delta_p99_gain_over_control" else column
    return "; ".join(parts) + f". The largest rise of the {what} came from {best.knob} {num(best['from'])} → {num(best.to)}"


def write_appendix(df: pd.DataFrame, command: str, path: str | Path, decision: str = "", tie: float = 0.05,
                   preset: str = "two-layer") -> None:
    cols = ["config", "val_loss_mean", "val_loss_spread", "train_cpu_minutes", "baseline_median", "excess_median", "excess_p99",
            "excess_max", "share>0.3", "share>0.5", "control_p99", "control_max", "share_above_control_max", "p99_gain_per_cpu_minute"]
    show = df[cols].copy()
    for c in cols[1:]:
        digits = 4 if c == "p99_gain_per_cpu_minute" else 3
        show[c] = show[c].map(lambda v, d=digits: f"{v:.{d}f}" if abs(v) < 100 else f"{v:.0f}")
    lines = ["# Appendix · tuning the embedded seed family", "",
             "Which small configuration shows universality best per CPU-minute? Each row trained 3 seeds with the",
             "same budget, correlated seed `a` with the other two on held-out tokens against a rotation baseline",
             "(chapter 01's method), and did the same for an untrained control family of the same configuration.",
             "`share_above_control_max` is the share of neurons whose excess correlation exceeds the largest excess",
             "of any untrained-control neuron; `p99_gain_per_cpu_minute` is the gain of the 99th percentile of",
             "the excess distribution over the control's, per minute of training (3 seeds). Validation losses",
             "are in nats per token of each configuration's own vocabulary, so they compare only between rows",
             "with the same `v`.", "",
             "Produced by:", "", "```bash", command, "```", "",
             "The grid is `sweeps/embedded.yaml`; the raw table is `sweeps/results.csv`.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in r) + " |" for r in show.itertuples(index=False)]
    ranked = df.sort_values("p99_gain_per_cpu_minute", ascending=False)
    best = ranked.iloc[0]
    tied = ranked[ranked.p99_gain_per_cpu_minute >= (1 - tie) * best.p99_gain_per_cpu_minute]
    top = df.sort_values("excess_p99", ascending=False).iloc[0]
    lines += ["", f"- Best per CPU-minute: **{best['config']}** ({best.p99_gain_per_cpu_minute:.4f}).",
              f"- Within {tie:.0%} of it: " + ", ".join(f"{r.config} ({r.p99_gain_per_cpu_minute:.4f})" for r in tied.itertuples()) + ".",
              f"- Highest 99th percentile of the excess correlation: **{top['config']}** ({top.excess_p99:.3f}, "
              f"{top.train_cpu_minutes:.1f} training minutes for 3 seeds)."]
    chosen = default_config(df, preset)
    lines += [f"- `params/{preset}.yaml` uses the architecture and recipe of **{chosen}**, trained on more tokens per seed."
              if chosen else f"- `params/{preset}.yaml` uses a configuration that is not in this grid."]
    if chosen:
        rank = int((df.p99_gain_per_cpu_minute > df.set_index("config").loc[chosen, "p99_gain_per_cpu_minute"]).sum()) + 1
        within = chosen in set(tied.config)
        lines += [f"- Computed from the table: **{chosen}** ranks {rank} of {len(df)} per CPU-minute and is "
                  + ("" if within else "not ") + f"within {tie:.0%} of the best."]
        eff = one_change_effects(df, chosen)
        if len(eff):
            lines += ["", f"Configurations that change one knob of **{chosen}** (differences: that row minus {chosen}):", "",
                      "| knob | from | to | config | Δ excess_p99 | Δ share_above_control_max | Δ baseline_median | Δ p99_gain_per_cpu_minute |",
                      "|---|---|---|---|---|---|---|---|"]
            lines += [f"| {e.knob} | {e._1:g} | {e.to:g} | {e.config} | {e.delta_excess_p99:+.3f} | {e.delta_share_above_control_max:+.3f} | "
                      f"{e.delta_baseline_median:+.3f} | {e.delta_p99_gain_per_cpu_minute:+.4f} |" for e in eff.itertuples(index=False)]
    if preset != "default":
        emb = load_preset("default")["embedded"]
        lines += [f"- The book's default preset (`params/default.yaml`) is not in this grid: {emb['n_layers']} layers x d_model "
                  f"{emb['d_model']}, d_mlp {emb['d_mlp']}, {emb['train_tokens'] / 1e6:.0f}M training tokens per seed, "
                  "trained on a GPU and shipped in `weights/`; chapter 01 compares it with the two-layer family."]
    if decision:
        lines += ["", "**The authors' reasoning** (written by hand from an earlier run of this table, kept as written; "
                  "not computed, and not updated when the table is re-run):", "", "> " + decision.strip()]
    lines += ["", "Training minutes are wall-clock minutes on a 2-core machine and vary with its load, so differences "
              "of a few percent in the per-minute score are not meaningful.", ""]
    Path(path).write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    ap = preset_parser("Sweep embedded-family configurations, scored by universality.", ["device"],
                       default_preset="two-layer")
    ap.add_argument("--grid", default="sweeps/embedded.yaml")
    ap.add_argument("--only", action="append", default=None, metavar="CONFIG",
                    help="run only this configuration of the grid (repeatable); its rows replace those in the CSVs")
    ap.add_argument("--appendix-only", action="store_true",
                    help="re-render book/appendix_sweep.md from sweeps/results.csv without running anything")
    args = ap.parse_args(argv)
    params = preset_from_args(args)
    root = repo_root()
    grid = yaml.safe_load(Path(args.grid).read_text())
    command = "python -m helpers.correlations.sweep --preset " + args.preset + " --grid " + args.grid
    if args.appendix_only:
        df = pd.read_csv(root / "sweeps" / "results.csv")
    else:
        df = run_sweep(params, args.grid, root / "sweeps" / "results.csv", args.only,
                       root / "sweeps" / "dimensionality.csv")
    write_appendix(df, command, root / "book" / "appendix_sweep.md", decision=grid.get("decision", ""),
                   preset=params.preset)
    print(df.to_string())


if __name__ == "__main__":
    run_cli(main)
