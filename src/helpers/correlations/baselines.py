"""The rotation baseline redrawn from a finished correlation run (paper §2, eq. 3), at no new pass.

`helpers.correlations.correlate` keeps, beside each small run's table, its accumulators: the reference
neurons against every comparison neuron, and one covariance per comparison layer
(`accumulators_block*.pt`). A correlation with rotated units `R y` is a linear function of those
(`helpers.correlations.pearson.mixed_correlation`), so any number of new rotations, or the paper's
row-normalised Gaussian matrix, gives an exact new baseline without streaming the tokens again.

- `load_run` reads them back (recomputing the run once, into a sub-folder, when an older cache
  lacks them);
- `redraw_baselines` gives the per-neuron baseline of each draw;
- `baseline_variability` summarises the spread of each neuron's baseline and of the neuron sets
  across draws (sizes, Jaccard index).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from helpers.correlations.correlate import baseline_matrices, correlate_family
from helpers.correlations.pearson import max_correlation, mixed_correlation
from helpers.correlations.universality import SET_SHARE, sized_mask
from helpers.models.families import short_name
from helpers.streaming.accumulators import StreamingPearson


@dataclass
class RunAccumulators:
    """A finished run's accumulators: per block, the reference rows it covers, the cross accumulator
    and one covariance accumulator per (member, layer, columns)."""

    blocks: list[tuple[slice, StreamingPearson, list[StreamingPearson]]]
    layer_cols: list[tuple[str, int, slice]]
    n_ref: int

    @property
    def members(self) -> list[str]:
        return list(dict.fromkeys(m for m, _, _ in self.layer_cols))

    def layer_covariance(self, member: str, layer: int) -> torch.Tensor:
        """`[d_mlp, d_mlp]` float64 covariance of one comparison layer's activations."""
        for (m, l, _), g in zip(self.layer_cols, self.blocks[0][2]):
            if m == member and l == layer:
                return g.covariance()
        raise KeyError(f"no layer {layer} of {member!r} in this run")


def _restore(state: dict) -> StreamingPearson:
    st = dict(state)
    if st.get("block") is None:
        st["block"] = torch.zeros(int(st["n_a"]), int(st["n_b"]), dtype=torch.float32)
    acc = StreamingPearson(int(st["n_a"]), int(st["n_b"]))
    acc.load_state_dict(st)
    return acc


def read_accumulators(folder: str | Path) -> RunAccumulators | None:
    """The accumulators kept in a run folder, or None if it has none."""
    files = sorted(Path(folder).glob("accumulators_block*.pt"), key=lambda p: int(p.stem.removeprefix("accumulators_block")))
    if not files:
        return None
    blocks, layer_cols = [], None
    for f in files:
        st = torch.load(f, map_location="cpu", weights_only=False)
        layer_cols = [(m, l, slice(a, b)) for m, l, (a, b) in st["layer_cols"]]
        blocks.append((slice(*st["rows"]), _restore(st["acc"]), [_restore(g) for g in st["grams"]]))
    return RunAccumulators(blocks, layer_cols, max(sl.stop for sl, _, _ in blocks))


def load_run(family, n_tokens: int, artifacts_dir: str | Path, device: str = "cpu", batch_size: int = 32, seed: int = 0,
             baseline: str = "rotation", threshold: float = 0.5) -> RunAccumulators:
    """The accumulators of `family`'s correlation run over `n_tokens` (chapter 01's run). A cache
    written before runs kept them is recomputed once into its `accumulators/` sub-folder."""
    res = correlate_family(family, n_tokens, batch_size=batch_size, device=device, baseline=baseline, seed=seed,
                           threshold=threshold, verbose=False, artifacts_dir=artifacts_dir)
    run = read_accumulators(res.path)
    if run is None:
        sub = res.path / "accumulators"
        correlate_family(family, n_tokens, sub, batch_size=batch_size, device=device, baseline=baseline, seed=seed,
                         threshold=threshold, verbose=False)
        run = read_accumulators(sub)
    if run is None:
        raise ValueError(f"the accumulators of {family.name!r} over {n_tokens:,} tokens are too large to keep "
                         "(helpers.correlations.correlate.KEEP_ACCUMULATORS_BYTES): baselines cannot be redrawn without a new pass")
    return run


def layer_baselines(run: RunAccumulators, mixes: dict[tuple[str, int], torch.Tensor]) -> dict[tuple[str, int], np.ndarray]:
    """{(member, layer): [n_ref] max correlation of each reference neuron with the units `mix @ y`
    of that layer}, for the layers given a mixing matrix."""
    out = {}
    for m, l, cols in run.layer_cols:
        if (m, l) not in mixes:
            continue
        v = np.full(run.n_ref, np.nan)
        for sl, acc, grams in run.blocks:
            g = grams[[k for k, (mm, ll, _) in enumerate(run.layer_cols) if (mm, ll) == (m, l)][0]]
            v[sl] = max_correlation(mixed_correlation(acc, cols, g, mixes[(m, l)]))[0].double().numpy()
        out[(m, l)] = v
    return out


def baseline_table(run: RunAccumulators, seed: int, kind: str = "rotation") -> pd.DataFrame:
    """The per-neuron baseline of one draw: `baseline_<member>` (max over the member's layers, as
    in chapter 01's table) and `mean_baseline` (mean over members). `seed` and `kind` name the draw
    exactly as `helpers.correlations.correlate.baseline_matrices` does, so (seed, kind) of the run reproduces it."""
    members = run.members
    n_layers = {m: 1 + max(l for mm, l, _ in run.layer_cols if mm == m) for m in members}
    d = {(m, l): c.stop - c.start for m, l, c in run.layer_cols}
    mixes = {}
    for m in members:
        mats = baseline_matrices(m, n_layers[m], d[(m, 0)], seed, kind)
        mixes.update({(m, l): mats[l].double() for l in range(n_layers[m])})
    per_layer = layer_baselines(run, mixes)
    df = pd.DataFrame({f"baseline_{short_name(m)}": np.fmax.reduce([per_layer[(m, l)] for l in range(n_layers[m])])
                       for m in members})
    with np.errstate(all="ignore"):
        df["mean_baseline"] = np.nanmean(df.to_numpy(), axis=1) if len(members) else np.nan
    return df


def draws(seeds: list[int], gaussian_seeds: list[int] | None = None) -> list[tuple[str, int]]:
    """The draws of a variability study: seeded orthogonal rotations plus the paper's Gaussian variant."""
    return [("rotation", s) for s in seeds] + [("gaussian", s) for s in (gaussian_seeds or [])]


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|A ∩ B| / |A ∪ B| of two boolean masks (1 for two empty sets)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = (a | b).sum()
    return 1.0 if union == 0 else float((a & b).sum() / union)


def mean_pairwise_jaccard(masks: list[np.ndarray]) -> float:
    pairs = list(combinations(range(len(masks)), 2))
    return float(np.mean([jaccard(masks[i], masks[j]) for i, j in pairs])) if pairs else float("nan")


def baseline_variability(table: pd.DataFrame, run: RunAccumulators, control_table: pd.DataFrame | None = None,
                         control_run: RunAccumulators | None = None, seeds=(1, 2, 3, 4, 5), gaussian_seeds=(1,),
                         threshold: float = 0.5, top_fraction: float = 0.01,
                         share: float = SET_SHARE) -> dict:
    """Redraw the baseline (orthogonal rotations from `seeds`, Gaussian matrices from `gaussian_seeds`)
    for the family's run and, if given, its control's run over the same tokens; recompute the excess
    correlation and the neuron sets of every draw.

    Returns a dict of tables:
    - `per_neuron`: each neuron's baseline over the draws (mean, std, max - min), rotation draws only;
    - `draws`: per draw, the baseline median, the sizes of the sets `is_universal` (excess >
      `threshold`), `above_control` (above the control's maximum excess **of the same draw**),
      `paper_sized` (above it and in the top `share`, the rule of `universality.sized_set`; the top
      `share` alone without a control) and `top_excess` (top `top_fraction`): every set
      `universality.choose_set` can choose;
    - `stability`: per set, the mean pairwise Jaccard index across the rotation draws, and across
      all draws including the Gaussian ones."""
    plan = draws(list(seeds), list(gaussian_seeds))
    rows, base, sets = [], [], {c: [] for c in ("is_universal", "above_control", "paper_sized", "top_excess")}
    for kind, s in plan:
        b = baseline_table(run, s, kind)
        excess = table.mean_corr.to_numpy() - b.mean_baseline.to_numpy()
        ctl_max = np.nan
        if control_run is not None and control_table is not None:
            cb = baseline_table(control_run, s, kind)
            ctl_max = float(np.nanmax(control_table.mean_corr.to_numpy() - cb.mean_baseline.to_numpy()))
        e = np.nan_to_num(excess, nan=-np.inf)
        masks = {"is_universal": e > threshold,
                 "above_control": e > ctl_max if np.isfinite(ctl_max) else np.zeros(len(e), bool),
                 "paper_sized": sized_mask(excess, ctl_max if np.isfinite(ctl_max) else None, share),
                 "top_excess": e >= np.nanquantile(excess, 1 - top_fraction)}
        for c, mk in masks.items():
            sets[c].append((kind, mk))
        if kind == "rotation":
            base.append(b.mean_baseline.to_numpy())
        rows.append({"draw": f"{kind} seed {s}", "kind": kind, "seed": s, "baseline_median": float(np.nanmedian(b.mean_baseline)),
                     "excess_p99": float(np.nanquantile(excess, 0.99)), "control_max_excess": ctl_max,
                     **{f"n_{c}": int(mk.sum()) for c, mk in masks.items()}})
    B = np.stack(base, axis=1) if base else np.empty((len(table), 0))
    with np.errstate(all="ignore"):
        per_neuron = pd.DataFrame({"layer": table.layer.to_numpy(), "neuron": table.neuron.to_numpy(),
                                   "baseline_mean": np.nanmean(B, 1), "baseline_std": np.nanstd(B, 1, ddof=1) if B.shape[1] > 1 else np.nan,
                                   "baseline_range": np.nanmax(B, 1) - np.nanmin(B, 1)})
    stability = pd.DataFrame([{"set": c, "jaccard_rotations": mean_pairwise_jaccard([m for k, m in v if k == "rotation"]),
                               "jaccard_all_draws": mean_pairwise_jaccard([m for _, m in v]),
                               "size_min": int(min(m.sum() for _, m in v)), "size_max": int(max(m.sum() for _, m in v))}
                              for c, v in sets.items()]).set_index("set")
    return {"per_neuron": per_neuron, "draws": pd.DataFrame(rows).set_index("draw"), "stability": stability}
