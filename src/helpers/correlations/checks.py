"""Build checks for chapter 01 that a broken analysis would fail, on every preset.

- `copy_checks`: the reference model correlated with an exact copy of itself must give a max
  correlation of 1 for every live neuron, and the derived baseline of the rotated copy must equal
  its value computed directly from the activations (explicitly rotated, correlated in float64).
- `trained_exceeds_control`: the trained family's 99th-percentile excess correlation must exceed
  the untrained control's, measured the same way.

Each returns a table with one row per check (value, the condition, passed) for the page to show
and assert on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from helpers.core.cache import config_hash
from helpers.core.presets import repo_root
from helpers.correlations.correlate import baseline_matrices, correlate_family
from helpers.data.tokens import valid_token_mask
from helpers.models.families import short_name
from helpers.streaming.activations import mlp_activations


@dataclass
class CopyFamily:
    """`family`'s reference model and an exact copy of it, as a two-member family."""

    base: object
    copy_suffix: str = "copy"
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        self.name = f"{self.base.name}-selfcopy"
        self.reference = self.base.reference
        self.copy = f"{self.reference}-{self.copy_suffix}"
        self.members = [self.reference, self.copy]
        self._model = None

    def load(self, member: str):
        if member not in self.members:
            raise KeyError(member)
        if self._model is None:
            self._model = self.base.load(self.reference)
        return self._model

    @property
    def codec(self):
        return self.base.codec

    @property
    def identity(self) -> dict:
        ref = self.base.identity[self.reference]
        return {self.reference: ref, self.copy: ref}

    def token_rows(self, n_tokens: int, split: str = "val") -> torch.Tensor:
        return self.base.token_rows(n_tokens, split)

    def token_table(self, n_tokens: int, split: str = "val"):
        return self.base.token_table(n_tokens, split)


def direct_copy_baseline(model, rows: torch.Tensor, drop_ids, mats: list[torch.Tensor], batch_size: int = 32,
                         neurons: np.ndarray | None = None) -> np.ndarray:
    """Max over all rotated units `R_l y_l` (every layer `l` of the copy) of the Pearson correlation
    with each reference neuron, computed directly: the activations are collected, rotated
    explicitly and correlated in float64 (no streaming accumulator). `neurons`: indices of the
    reference neurons to check (default all). Returns `[len(neurons)]`."""
    acts = torch.cat([mlp_activations(model, rows[i : i + batch_size], valid_token_mask(rows[i : i + batch_size], drop_ids))
                      for i in range(0, len(rows), batch_size)]).double()
    n_layers, d = model.cfg.n_layers, model.cfg.d_mlp
    x = acts if neurons is None else acts[:, torch.as_tensor(neurons)]
    x = x - x.mean(0)
    x = x / x.norm(dim=0)
    best = torch.full((x.shape[1],), -torch.inf, dtype=torch.float64)
    for l in range(n_layers):
        z = acts[:, l * d:(l + 1) * d] @ mats[l].double().T
        z = z - z.mean(0)
        z = z / z.norm(dim=0)
        best = torch.maximum(best, torch.nan_to_num(x.T @ z, nan=-torch.inf).max(1).values)
    return best.numpy()


def copy_checks(family, n_tokens: int, artifacts_dir: str | Path, device: str = "cpu", batch_size: int = 32, seed: int = 0,
                baseline: str = "rotation", n_check: int = 256, tol_max: float = 1e-4, tol_baseline: float = 1e-4) -> pd.DataFrame:
    """Correlate `family`'s reference model with an exact copy of itself over `n_tokens` tokens
    (`helpers.correlations.correlate`, cached) and check:
    - every live reference neuron has max correlation >= 1 - `tol_max` with the copy;
    - the derived baseline of the rotated copy equals `direct_copy_baseline` (within `tol_baseline`)
      on `n_check` reference neurons drawn from `seed`."""
    cf = CopyFamily(family)
    out = Path(artifacts_dir) / "checks" / f"{cf.name}-{config_hash({'id': cf.identity, 'n': int(n_tokens), 'b': baseline, 's': seed})}"
    rows = family.token_rows(n_tokens)
    table = correlate_family(cf, n_tokens, out, batch_size=batch_size, device=device, baseline=baseline, seed=seed, rows=rows,
                             verbose=False).table("universality")
    live = ~table.is_dead.to_numpy()
    mc = table[f"max_corr_{short_name(cf.copy)}"].to_numpy()
    model = cf.load(cf.reference)
    mats = baseline_matrices(cf.copy, model.cfg.n_layers, model.cfg.d_mlp, seed, baseline)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(np.flatnonzero(live), size=min(n_check, int(live.sum())), replace=False))
    direct = direct_copy_baseline(model, rows, family.codec.drop_ids, mats, batch_size, pick)
    derived = table[f"baseline_{short_name(cf.copy)}"].to_numpy()[pick]
    err = float(np.nanmax(np.abs(direct - derived))) if len(pick) else float("nan")
    return pd.DataFrame([
        {"check": "reference vs exact copy: min over live neurons of the max correlation", "value": float(np.nanmin(mc[live])),
         "condition": f">= {1 - tol_max}", "passed": bool(live.any() and np.nanmin(mc[live]) >= 1 - tol_max)},
        {"check": f"rotated copy: max |derived - direct| baseline over {len(pick)} neurons", "value": err,
         "condition": f"<= {tol_baseline}", "passed": bool(err <= tol_baseline)},
    ]).set_index("check").assign(required=True, **{"required because": "always"})


def sweep_control_gap(results_csv: str | Path | None = None) -> dict:
    """What the recorded sweep (`sweeps/results.csv`) says about the trained-vs-control gap: the
    smallest training budget it measured, and whether every configuration at that budget or more
    had its p99 excess above its untrained control's."""
    df = pd.read_csv(results_csv or repo_root() / "sweeps" / "results.csv")
    return {"min_train_tokens": int(df.train_tokens.min()), "all_above": bool((df.excess_p99 > df.control_p99).all()),
            "n_configs": len(df)}


def trained_exceeds_control(trained: dict, control: dict, statistic: str = "p99", train_tokens: int | None = None,
                            results_csv: str | Path | None = None) -> pd.DataFrame:
    """One-row check: the trained family's `statistic` of the excess correlation (an
    `universality.excess_summary`) exceeds the untrained control's.

    `required` says whether the build should stop when it fails: with `train_tokens` given, when
    the recorded sweep found the gap in every configuration trained on at least that budget and
    this family was trained on as many tokens or more (a family trained on fewer tokens may
    genuinely show no gap); without it, always."""
    a, b = float(trained[statistic]), float(control[statistic])
    required, why = True, "always"
    if train_tokens is not None:
        gap = sweep_control_gap(results_csv)
        required = bool(gap["all_above"] and train_tokens >= gap["min_train_tokens"])
        why = (f"trained on {train_tokens:,} tokens; the sweep found the gap in all {gap['n_configs']} configurations "
               f"trained on {gap['min_train_tokens']:,} or more" if gap["all_above"] else "the sweep did not find the gap everywhere")
    return pd.DataFrame([{"check": f"trained {statistic} excess > untrained control's", "value": a - b,
                          "condition": f"{a:.3f} > {b:.3f}", "passed": bool(a > b), "required": required,
                          "required because": why}]).set_index("check")
