"""Why small models have high rotation baselines: the effective dimension of a layer's activations.

The rotation baseline of paper §2 is the largest correlation of a neuron with the `D` units
`R y` of a randomly rotated layer. If the layer's `D` neurons co-vary along only a few common
directions, almost any rotated unit carries those directions, and the maximum is high whatever
the training. Two participation ratios measure how many directions there are:

- of the **covariance** spectrum, `(Σλ)² / Σλ²`: dominated by the neurons with large variance;
- of the **correlation** matrix (each neuron standardised): the number of common modes that the
  neurons share once their scales are removed. Pearson correlation is scale-free, so this is the
  one that sets the baseline.

`predicted_max_correlation` turns a layer's covariance into the baseline it predicts: rotated
units are drawn exactly as the derived baseline draws them and correlated, through the covariance
alone, with the layer's own neurons (the model of a reference neuron that has an exact
counterpart in the layer). `layer_dimensionality` puts both beside the measured baseline of each
layer of a finished run (`helpers.correlations.baselines`), with no new pass over the tokens.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from helpers.correlations.pearson import gaussian_rotation, random_rotation


def participation_ratio(eigenvalues) -> float:
    """`(Σλ)² / Σλ²` of a spectrum: D for D equal eigenvalues, 1 for a single direction."""
    lam = np.clip(np.asarray(eigenvalues, dtype=float), 0.0, None)
    s2 = float((lam ** 2).sum())
    return float(lam.sum() ** 2 / s2) if s2 > 0 else float("nan")


def correlation_from_covariance(cov, dead_rtol: float = 1e-12) -> np.ndarray:
    """`[d, d]` correlation matrix of a covariance; rows and columns of constant units are dropped."""
    c = np.asarray(cov, dtype=float)
    var = np.diag(c).copy()
    live = var > dead_rtol * max(float(var.max(initial=0.0)), 1e-300)
    c = c[np.ix_(live, live)]
    s = np.sqrt(var[live])
    return c / s[:, None] / s[None, :]


def spectrum(cov) -> np.ndarray:
    """Eigenvalues of a symmetric matrix, largest first."""
    c = np.asarray(cov, dtype=float)
    return np.linalg.eigvalsh((c + c.T) / 2)[::-1]


def rotated_unit_correlations(cov, mix) -> np.ndarray:
    """`[k, d]`: Pearson correlation of each mixed unit `z_j = (mix @ y)_j` with each unit `y_i`,
    from `cov = Cov(y)` alone: `(mix Σ)_ji / sqrt((mix Σ mixᵀ)_jj Σ_ii)`; NaN for constant units."""
    c = np.asarray(cov, dtype=float)
    m = np.asarray(mix, dtype=float)
    cross = m @ c
    var_z = np.einsum("jk,jk->j", cross, m)
    var_y = np.diag(c)
    with np.errstate(all="ignore"):
        out = cross / np.sqrt(var_z)[:, None] / np.sqrt(var_y)[None, :]
    out[:, var_y <= 1e-12 * max(float(var_y.max(initial=0.0)), 1e-300)] = np.nan
    return np.clip(out, -1.0, 1.0)


def predicted_max_correlation(cov, n_draws: int = 4, seed: int = 0, kind: str = "rotation") -> np.ndarray:
    """`[d]`: for each unit of a layer with covariance `cov`, the expected (mean over `n_draws`
    seeded draws) maximum correlation with the `d` rotated units of the same layer. `kind`:
    "rotation" (orthogonal, as the book's baseline) or "gaussian" (the paper's row-normalised
    Gaussian matrix)."""
    c = np.asarray(cov, dtype=float)
    d = c.shape[0]
    make = {"rotation": random_rotation, "gaussian": gaussian_rotation}[kind]
    maxima = [np.nanmax(rotated_unit_correlations(c, make(d, seed * 100_003 + k, dtype=torch.float64).numpy()), axis=0)
              if d else np.empty(0) for k in range(n_draws)]
    return np.mean(maxima, axis=0)


def textbook_max_correlation(d: int, k: float) -> float:
    """The isotropic estimate `sqrt(2 ln d / k)` of the largest of `d` random correlations in `k`
    dimensions (overshoots 1 when `k` is small; shown for comparison only)."""
    return math.sqrt(2 * math.log(d) / k) if d > 1 and k > 0 else float("nan")


def layer_dimensionality(run, table: pd.DataFrame, seed: int, kind: str = "rotation", n_draws: int = 4,
                         label: str = "") -> pd.DataFrame:
    """One row per comparison layer (member, layer) of a finished run (`helpers.correlations.baselines.load_run`):

    - `d`, `pr_cov`, `pr_corr`: width and participation ratios of the covariance and of the
      correlation matrix of its activations;
    - `predicted_median`: median over the layer's units of `predicted_max_correlation`;
    - `measured_median`: median, over the reference neurons of the same layer index, of their
      max correlation with this layer's rotated units in the run's own draw (`seed`, `kind`);
    - `textbook`: `sqrt(2 ln d / pr_corr)`.
    `table` is the run's universality table (for the reference neurons' layers)."""
    from helpers.correlations.baselines import layer_baselines
    from helpers.correlations.correlate import baseline_matrices

    members = run.members
    rows = []
    for m in members:
        n_layers = 1 + max(l for mm, l, _ in run.layer_cols if mm == m)
        d = next(c.stop - c.start for mm, l, c in run.layer_cols if mm == m)
        mats = baseline_matrices(m, n_layers, d, seed, kind)
        measured = layer_baselines(run, {(m, l): mats[l].double() for l in range(n_layers)})
        for l in range(n_layers):
            cov = run.layer_covariance(m, l).numpy()
            corr = correlation_from_covariance(cov)
            pred = predicted_max_correlation(cov, n_draws, seed, kind)
            same = (table.layer.to_numpy() == l)
            pr_corr = participation_ratio(spectrum(corr))
            rows.append({"label": label, "member": m, "layer": l, "d": d, "pr_cov": participation_ratio(spectrum(cov)),
                         "pr_corr": pr_corr, "predicted_median": float(np.nanmedian(pred)),
                         "measured_median": float(np.nanmedian(measured[(m, l)][same])),
                         "textbook": textbook_max_correlation(d, pr_corr)})
    return pd.DataFrame(rows)


def families_dimensionality(families: dict, n_tokens: int | dict, artifacts_dir, device: str = "cpu", batch_size: int = 32,
                            seed: int = 0, baseline: str = "rotation", threshold: float = 0.5, n_draws: int = 4) -> pd.DataFrame:
    """`layer_dimensionality` of several families ({label: Family}), each from its own cached
    correlation run over `n_tokens` (an int, or {label: int})."""
    from helpers.correlations.baselines import load_run
    from helpers.correlations.universality import universality_table

    out = []
    for label, fam in families.items():
        n = n_tokens[label] if isinstance(n_tokens, dict) else n_tokens
        table = universality_table(fam, n, artifacts_dir, device, batch_size, seed, baseline, threshold=threshold,
                                   verbose=False).table("universality")
        run = load_run(fam, n, artifacts_dir, device, batch_size, seed, baseline, threshold)
        out.append(layer_dimensionality(run, table, seed, baseline, n_draws, label).assign(n_tokens=n))
    return pd.concat(out, ignore_index=True)
