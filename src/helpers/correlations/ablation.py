"""Do universal neurons matter? Mean ablation of the universal set against random neurons of the same
layers (a follow-up: Nandan et al. 2025, arXiv 2508.00903, "Universal Neurons in GPT-2: Emergence,
Persistence, and Functional Impact").

An **ablation** replaces the post-activation (`blocks.{l}.mlp.hook_post`) of some neurons by their
mean over the valid tokens of the token set, at every position, and measures the next-token
predictions against the unablated (clean) run of the same tokens:

- `dloss`: the change in the loss (cross-entropy of the true next token), in nats;
- `kl`: the KL divergence KL(clean || ablated) of the next-token distributions, in nats.

Both are measured at the valid tokens (`valid_token_mask`, every position but the last), as
`helpers.entropy.interventions` measures its sweeps. The **plan** (`ablation_plan`) holds, for every
layer with neurons in the set, the set's neurons of that layer and `n_draws` random sets of the same
size drawn from the layer's other neurons; and for the whole set, the set and the union of the
per-layer draws (so each whole-set draw has the set's per-layer counts). Every ablation of a plan
runs on the same token rows, in the same batches, against the same clean run.

The ratio set / random (the set's mean effect per token over the mean of the random draws') gets a
percentile bootstrap interval whose unit of resampling is the **token row**: rows are drawn with
replacement and every ablation is summed over the same drawn rows, so the interval covers the
variation over text, not over the random draws (their spread is shown beside it).

Cost. An ablation repeats the batch once per ablated set ("replica"); the runs start at the first
ablated layer from the clean residual stream cached there, deepest first, so a last-layer ablation
costs one block plus the unembedding. Precision: logits in fp32, per-token metrics in fp32, sums per
token row in fp64. Cached by content (model, rows, plan, dropped ids) under `<artifacts>/ablation/`,
and resumable: a killed run continues from the last finished batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from helpers.core import paper, report
from helpers.core.cache import (Result, atomic_write_parquet, cached_result, config_hash, load_checkpoint,
                                save_checkpoint)
from helpers.data.tokens import TokenRows, valid_token_mask
from helpers.streaming.activations import ActivationStream

VERSION = 2
METRICS = ("dloss", "kl")
WHOLE = "all"  # the scope of the whole set (every layer at once)
N_DRAWS = 20
# The section's token rows: 32 rows of 64 tokens (2,048 tokens), spread over the held-out token table.
# On the default family (6 layers, 128 neurons in the set, 20 draws: 147 ablations per model) this
# costs about 13 s per model on two otherwise idle CPU cores; the whole set's KL ratio moves by less
# than its bootstrap interval's half-width when the tokens are doubled.
N_ROWS, N_CTX = 32, 64


@dataclass(frozen=True)
class Ablation:
    """One set of neurons to mean-ablate: `scope` "L<layer>" or `WHOLE`, `kind` "set" (the neuron set
    under study) or "random", `draw` the random draw's number (-1 for the set), `neurons` its
    (layer, neuron) pairs."""

    scope: str
    kind: str
    draw: int
    neurons: tuple[tuple[int, int], ...]

    @property
    def first_layer(self) -> int:
        """The earliest ablated layer (0 for an empty set: the run then starts at the embedding)."""
        return min((l for l, _ in self.neurons), default=0)

    def key(self) -> dict:
        return {"scope": self.scope, "kind": self.kind, "draw": int(self.draw),
                "neurons": [[int(l), int(n)] for l, n in self.neurons]}


def ablation_plan(selected: pd.DataFrame, n_layers: int, d_mlp: int, n_draws: int = N_DRAWS,
                  seed: int = 0) -> list[Ablation]:
    """The ablations of a neuron set: per layer holding neurons of the set, the set's neurons there
    ("set") and `n_draws` random sets of as many neurons, drawn without replacement from the layer's
    neurons outside the set ("random", seeded by `seed` and the layer); then the whole set and
    `n_draws` whole-set draws, each the union of the per-layer draws of the same number.

    `selected`: rows `layer`, `neuron` of the set. A layer whose other neurons are fewer than its
    set's size is an error (no random set of that size exists outside the set)."""
    chosen = {l: sorted(int(n) for n in g.neuron) for l, g in selected.groupby("layer")}
    plan, whole_set, whole_draws = [], [], [[] for _ in range(n_draws)]
    for l in range(n_layers):
        mine = chosen.get(l, [])
        if not mine:
            continue
        if max(mine) >= d_mlp or min(mine) < 0:
            raise ValueError(f"layer {l}: neuron indices {mine} outside 0..{d_mlp - 1}")
        pool = np.setdiff1d(np.arange(d_mlp), mine)
        if len(pool) < len(mine):
            raise ValueError(f"layer {l}: {len(mine)} neurons in the set but only {len(pool)} outside it")
        rng = np.random.default_rng([int(seed), l])
        plan.append(Ablation(f"L{l}", "set", -1, tuple((l, n) for n in mine)))
        whole_set += [(l, n) for n in mine]
        for d in range(n_draws):
            draw = tuple((l, int(n)) for n in np.sort(rng.choice(pool, size=len(mine), replace=False)))
            plan.append(Ablation(f"L{l}", "random", d, draw))
            whole_draws[d] += list(draw)
    if whole_set:
        plan.append(Ablation(WHOLE, "set", -1, tuple(whole_set)))
        plan += [Ablation(WHOLE, "random", d, tuple(whole_draws[d])) for d in range(n_draws)]
    return plan


def plan_table(plan: Sequence[Ablation]) -> pd.DataFrame:
    """One row per ablation: `ablation` (its index in the plan), `scope`, `kind`, `draw`, `n_neurons`."""
    return pd.DataFrame([{"ablation": i, "scope": a.scope, "kind": a.kind, "draw": a.draw,
                          "n_neurons": len(a.neurons)}
                         for i, a in enumerate(plan)])


def spread_rows(rows: TokenRows, n_rows: int, n_ctx: int | None = None) -> TokenRows:
    """`n_rows` rows spread evenly over `rows` (the token table runs through its sources in order, so
    its first rows may all come from one), each cut to its first `n_ctx` tokens (all by default)."""
    rows = TokenRows.of(rows)
    n_rows = min(int(n_rows), len(rows))
    idx = torch.as_tensor(np.unique(np.linspace(0, len(rows) - 1, n_rows).round().astype(np.int64)))
    n_ctx = rows.n_ctx if n_ctx is None else min(int(n_ctx), rows.n_ctx)
    cut = lambda t: None if t is None else t[idx, :n_ctx]  # noqa: E731
    return TokenRows(rows.ids[idx, :n_ctx], cut(rows.gpt2_ids), cut(rows.labels), list(rows.label_names))


def section_rows(family, n_tokens: int, n_rows: int = N_ROWS, n_ctx: int = N_CTX) -> TokenRows:
    """The section's rows: `n_rows` rows spread over the family's `n_tokens` held-out token table
    (the one the correlations ran on), each cut to its first `n_ctx` tokens (`spread_rows`)."""
    return spread_rows(family.token_table(n_tokens), n_rows, n_ctx)


# ---------------------------------------------------------------------------------- the pass
@torch.no_grad()
def neuron_means(model, rows: TokenRows, drop_ids: Sequence[int], batch_size: int = 8,
                 verbose: bool = False) -> torch.Tensor:
    """[n_layers, d_mlp] float64: every neuron's mean post-activation over the valid tokens of
    `rows` (summed in fp64), from one `ActivationStream` pass."""
    names = [f"blocks.{l}.mlp.hook_post" for l in range(model.cfg.n_layers)]
    total = torch.zeros(model.cfg.n_layers, model.cfg.d_mlp, dtype=torch.float64)
    n = 0
    stream = ActivationStream({"m": model}, rows, names, batch_size, drop_ids, dict, desc="neuron means",
                              verbose=verbose)
    for batch in stream:
        for l, name in enumerate(names):
            total[l] += batch.acts["m"][name].double().sum(0).cpu()
        n += batch.n_tokens
    if n == 0:
        raise ValueError("no valid tokens in the rows")
    return total / n


def _ablation_hooks(plan: Sequence[Ablation], means: torch.Tensor, B: int, device) -> list:
    """Hooks that set, in replica r (rows r*B ... (r+1)*B - 1), the neurons of plan[r] to their means:
    per layer, one `where` over a [replicas, d_mlp] mask."""
    R, d_mlp = len(plan), means.shape[1]
    masks: dict[int, torch.Tensor] = {}
    for r, a in enumerate(plan):
        for l, n in a.neurons:
            masks.setdefault(l, torch.zeros(R, d_mlp, dtype=torch.bool))[r, n] = True

    def fix(act, hook, mask, vals):
        return torch.where(mask, vals.to(act.dtype), act.view(R, -1, d_mlp)).view(act.shape)

    return [(f"blocks.{l}.mlp.hook_post", lambda a, hook, m=m.to(device)[:, None, :],
             v=means[l].float().to(device):
             fix(a, hook, m, v)) for l, m in masks.items()]


OVERFLOW = 80.0  # a logit change above this (nats) overflows expm1 in fp32: such replicas take logsumexp


def _log_mean_exp(p: torch.Tensor, delta: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    """log sum_v p[v] exp(delta[r, ..., v]) over the last axis, per replica r: log1p(sum p expm1(delta)),
    exact for small changes and exactly 0 where delta is 0; a replica with a change above `OVERFLOW`
    takes logsumexp(lp + delta) (`lp` = log p) instead. `p`, `lp` [..., V]; `delta` [R, ..., V]
    (overwritten)."""
    big = delta.flatten(1).amax(1) > OVERFLOW
    out = torch.empty(delta.shape[:-1], dtype=delta.dtype, device=delta.device)
    if big.any():
        out[big] = torch.logsumexp(lp + delta[big], -1)
    if (~big).any():
        d = delta[~big] if big.any() else delta
        out[~big] = torch.log1p((d.expm1_() * p).sum(-1))
    return out


@torch.no_grad()
def batch_effects(model, ids: torch.Tensor, plan: Sequence[Ablation], means: torch.Tensor,
                  drop_ids: Sequence[int],
                  max_logit_elems: int = 1 << 25) -> dict[str, np.ndarray]:
    """The ablations of `plan` on one batch `ids` [batch, pos]: {"dloss", "kl", "n"}, each
    [len(plan), batch] float64, the per-row sums over the valid tokens (`n` their count).

    The clean run caches the residual stream before every first ablated layer and after the last
    block; the ablations run in chunks of at most `max_logit_elems` logits, deepest first, each
    chunk starting at its first ablated layer and stopping before the unembedding. With x the
    final normalisation's output (the unembedding's input), the change of the logits is
    delta = (x_ablated - x_clean) W_U, and with p the clean next-token distribution

        KL(clean || ablated) = log sum_v p_v exp(delta_v) - sum_v p_v delta_v
        loss change          = log sum_v p_v exp(delta_v) - delta_target,

    computed as log1p(sum p expm1(delta)): precise for small effects, and exactly 0 when nothing
    changes (ablating nothing gives exactly the clean residual stream)."""
    device = model.cfg.device
    ids = ids.to(device)
    B, pos = ids.shape
    L = model.cfg.n_layers
    mask = valid_token_mask(ids.cpu(), drop_ids)[:, :-1].to(device).double()
    starts = sorted({a.first_layer for a in plan})
    last = f"blocks.{L - 1}.hook_resid_post"
    names = {f"blocks.{l}.hook_resid_pre" for l in starts} | {last}
    _, cache = model.run_with_cache(ids, names_filter=lambda n: n in names, return_type=None)
    W_U = model.W_U.float()
    x_c = model.ln_final(cache[last])[:, :-1].float()  # [batch, pos-1, d_model]
    lp_c = (x_c @ W_U + model.b_U.float()).log_softmax(-1)  # [batch, pos-1, vocab]
    p_c = lp_c.exp()
    u_c = p_c @ W_U.T  # [batch, pos-1, d_model]: sum_v p_v delta_v = dx . u_c
    # [batch, pos-1, d_model]: the change at the true next token is dx . W_U[:, target]
    W_target = W_U.T[ids[:, 1:]]
    R_all = len(plan)
    out = {k: np.zeros((R_all, B)) for k in ("dloss", "kl", "n")}
    out["n"][:] = mask.sum(1).cpu().numpy()[None]
    per_pass = max(1, int(max_logit_elems) // (B * pos * model.cfg.d_vocab))
    order = sorted(range(R_all), key=lambda i: -plan[i].first_layer)
    for c0 in range(0, R_all, per_pass):
        chunk = order[c0:c0 + per_pass]
        sub = [plan[i] for i in chunk]
        R = len(sub)
        start = min(a.first_layer for a in sub)
        x = cache[f"blocks.{start}.hook_resid_pre"].repeat(R, 1, 1)
        resid = model.run_with_hooks(x, start_at_layer=start, stop_at_layer=L,
                                     fwd_hooks=_ablation_hooks(sub, means, B, device))
        dx = (model.ln_final(resid)[:, :-1].float().view(R, B, pos - 1, -1) - x_c[None])
        delta = dx @ W_U  # [R, batch, pos-1, vocab]
        lme = _log_mean_exp(p_c, delta, lp_c)
        del delta
        kl = lme - (dx * u_c[None]).sum(-1)
        dloss = lme - (dx * W_target[None]).sum(-1)
        out["kl"][chunk] = (kl.double() * mask[None]).sum(-1).cpu().numpy()
        out["dloss"][chunk] = (dloss.double() * mask[None]).sum(-1).cpu().numpy()
    return out


def ablation_identity(model_id: str, rows: TokenRows, plan: Sequence[Ablation],
                      drop_ids: Sequence[int]) -> dict:
    return {"model": model_id, "rows": rows.sha256, "n_rows": len(rows), "n_ctx": rows.n_ctx,
            "drop_ids": sorted(int(d) for d in drop_ids), "plan": config_hash([a.key() for a in plan], 16),
            "n_ablations": len(plan), "version": VERSION}


def run_ablations(model, rows: TokenRows | torch.Tensor, plan: Sequence[Ablation], drop_ids: Sequence[int],
                  batch_size: int = 8, max_logit_elems: int = 1 << 25, verbose: bool = True,
                  checkpoint: str | Path | None = None, identity: dict | None = None) -> pd.DataFrame:
    """Every ablation of `plan` on every row of `rows`: a long table with one row per (ablation,
    token row): `ablation` (index into the plan), `row`, `n` (valid tokens), and the per-row sums
    `dloss` and `kl` (nats; means are sums / n). Neuron means come from the same rows
    (`neuron_means`). With `checkpoint`, the means and the finished batches are saved after every
    batch (with `identity`) and a rerun resumes after the last one saved."""
    from tqdm.auto import tqdm

    rows = TokenRows.of(rows)
    if not plan:
        raise ValueError("an empty plan: nothing to ablate")
    ident = {**(identity or {}), "batch_size": int(batch_size)}
    state = load_checkpoint(checkpoint, ident) if checkpoint is not None else None
    if state is None:
        state = {"means": neuron_means(model, rows, drop_ids, batch_size, verbose), "done": 0, "parts": []}
    means = state["means"]
    bar = tqdm(total=len(rows), initial=state["done"], desc="ablations", unit="row", disable=not verbose)
    for b0 in range(state["done"], len(rows), batch_size):
        ids = rows.ids[b0:b0 + batch_size]
        eff = batch_effects(model, ids, plan, means, drop_ids, max_logit_elems)
        state["parts"].append({"b0": b0, **eff})
        state["done"] = b0 + ids.shape[0]
        if checkpoint is not None:
            save_checkpoint(checkpoint, ident, state)
        bar.update(ids.shape[0])
    bar.close()
    frames = []
    for part in state["parts"]:
        R, B = part["kl"].shape
        frames.append(pd.DataFrame({"ablation": np.repeat(np.arange(R), B),
                                    "row": np.tile(np.arange(B) + part["b0"], R),
                                    "n": part["n"].ravel(), "dloss": part["dloss"].ravel(),
                                    "kl": part["kl"].ravel()}))
    return pd.concat(frames, ignore_index=True)


def cached_ablations(model, model_id: str, rows: TokenRows, plan: Sequence[Ablation], drop_ids: Sequence[int],
                     artifacts_dir: str | Path, batch_size: int = 8, max_logit_elems: int = 1 << 25,
                     verbose: bool = True, prefix: str = "") -> Result:
    """`run_ablations`, cached under `<artifacts>/ablation/` by the model's content id, the rows'
    sha256, the plan and the dropped ids, and resumable (a progress file in the result's folder).
    Returns the Result: its tables `ablation` (the long table) and `plan` (`plan_table(plan)`),
    and `meta` with the computing time (`seconds`) and the unablated tokens (`n_tokens`)."""
    rows = TokenRows.of(rows)
    ident = ablation_identity(model_id, rows, plan, drop_ids)

    def compute(folder: Path) -> dict:
        t0 = time.time()
        progress = folder / "progress.pt"
        table = run_ablations(model, rows, plan, drop_ids, batch_size, max_logit_elems, verbose, progress,
                              ident)
        atomic_write_parquet(table, folder / "ablation.parquet")
        atomic_write_parquet(plan_table(plan), folder / "plan.parquet")
        progress.unlink(missing_ok=True)
        return {"seconds": time.time() - t0, "n_tokens": int(table[table.ablation == 0].n.sum())}

    return cached_result("ablation", ident, compute, root=artifacts_dir, prefix=prefix)


# ---------------------------------------------------------------------------------- statistics
def _row_matrix(table: pd.DataFrame, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """[n_ablations, n_rows] per-row sums of `metric` and the [n_rows] valid-token counts."""
    wide = table.pivot(index="ablation", columns="row", values=metric).sort_index()
    n = table[table.ablation == wide.index[0]].set_index("row").n.reindex(wide.columns).to_numpy(dtype=float)
    return wide.to_numpy(dtype=float), n


def bootstrap_weights(n_rows: int, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """[n_boot, n_rows] multiplicities of the token rows in `n_boot` resamples with replacement."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_rows, np.full(n_rows, 1.0 / n_rows), size=n_boot).astype(float)


def ablation_summary(table: pd.DataFrame, plan: pd.DataFrame, n_boot: int = 2000, seed: int = 0,
                     level: float = 0.95) -> pd.DataFrame:
    """One row per (scope, metric): the set's mean effect per valid token (`set`), the random draws'
    mean, smallest, largest and standard deviation (`random_mean`, `random_min`, `random_max`,
    `random_sd`), their count, the ratio set / random_mean with its percentile bootstrap interval
    (`ratio_lo`, `ratio_hi`, `level`; unit of resampling: token rows), `above_all_draws` (the set's
    effect exceeds every draw's), and `matters_more` (the interval lies above 1 and the set beats
    every draw). A ratio whose random mean is not above 0 in the same interval is NaN (no effect to
    compare with: an untrained model's loss can fall as often as it rises).
    Layer scopes get `first_largest_share`: the share of resamples in which that layer's ratio is the
    largest of all layers (the same resamples for every layer).

    `table`: `run_ablations`' long table; `plan`: its `plan_table`."""
    w = bootstrap_weights(table.row.nunique(), n_boot, seed)
    a = (1 - level) / 2
    out, boots = [], {}
    for metric in METRICS:
        sums, n = _row_matrix(table, metric)
        tok = w @ n  # [n_boot] tokens in each resample
        for scope, g in plan.groupby("scope", sort=False):
            s = g[g.kind == "set"].ablation.to_numpy()
            r = g[g.kind == "random"].ablation.to_numpy()
            if len(s) != 1 or not len(r):
                raise ValueError(f"scope {scope}: needs one set and at least one random draw")
            per_draw = sums[r].sum(1) / n.sum()
            set_mean = float(sums[s[0]].sum() / n.sum())
            rnd = float(per_draw.mean())
            b_set = (w @ sums[s[0]]) / tok
            b_rnd = (w @ sums[r].mean(0)) / tok
            ok = rnd > 0 and np.quantile(b_rnd, a) > 0  # random neurons have an effect to compare with
            ratio = set_mean / rnd if ok else np.nan
            b_ratio = np.where(b_rnd > 0, b_set / np.where(b_rnd > 0, b_rnd, 1.0), np.nan)
            finite = ok and np.isfinite(b_ratio).any()
            lo, hi = np.nanquantile(b_ratio, [a, 1 - a]) if finite else (np.nan, np.nan)
            boots[(scope, metric)] = b_ratio
            out.append({"scope": scope, "metric": metric,
                        "n_neurons": int(g[g.kind == "set"].n_neurons.iloc[0]),
                        "n_draws": len(r), "n_tokens": int(n.sum()), "n_rows": len(n), "set": set_mean,
                        "random_mean": rnd,
                        "random_min": float(per_draw.min()), "random_max": float(per_draw.max()),
                        "random_sd": float(per_draw.std(ddof=1)) if len(r) > 1 else np.nan, "ratio": ratio,
                        "ratio_lo": float(lo), "ratio_hi": float(hi), "level": level,
                        "above_all_draws": bool(set_mean > per_draw.max()),
                        "matters_more": bool(ok and lo > 1 and set_mean > per_draw.max())})
    res = pd.DataFrame(out)
    res["first_largest_share"] = np.nan
    for metric in METRICS:
        layers = [s for s in res[res.metric == metric].scope if s != WHOLE]
        if not layers:
            continue
        stack = np.stack([np.nan_to_num(boots[(s, metric)], nan=-np.inf) for s in layers])  # [layers, n_boot]
        best = stack.argmax(0)
        for i, s in enumerate(layers):
            res.loc[(res.scope == s) & (res.metric == metric),
                    "first_largest_share"] = float((best == i).mean())
    return res


def draw_effects(table: pd.DataFrame, plan: pd.DataFrame) -> pd.DataFrame:
    """Every ablation's mean effect per valid token: `scope`, `kind`, `draw`, `n_neurons`, `dloss`,
    `kl` (one row per ablation of the plan; for the figure of the draws' spread)."""
    g = table.groupby("ablation")[["n", *METRICS]].sum()
    out = plan.set_index("ablation").join(g)
    for m in METRICS:
        out[m] = out[m] / out["n"]
    return out.drop(columns="n").reset_index()


def layer_of(scope: str) -> int | None:
    return int(scope[1:]) if scope.startswith("L") else None


def verdicts(summary: pd.DataFrame, metric: str = "kl", share: float = 0.95) -> dict:
    """The computed conclusion of one `ablation_summary`: the layers whose set matters more than
    random neurons (`matters_more` on `metric`), whether the whole set does (on the KL and on the
    loss), and whether the first layer stands out: its set matters more and its ratio is the largest
    of all layers in at least `share` of the bootstrap resamples. The first layer is the model's
    layer 0; where the set has no neuron there, it cannot stand out."""
    s = summary[summary.metric == metric]
    layers = s[s.scope != WHOLE]
    more = [layer_of(x) for x in layers[layers.matters_more].scope]
    whole = summary[summary.scope == WHOLE].set_index("metric")
    l0 = layers[layers.scope == "L0"]
    first = l0.iloc[0] if len(l0) else None
    top = layers.loc[layers.ratio.idxmax()] if layers.ratio.notna().any() else None
    return {"metric": metric, "layers_more": more, "n_layers_tested": len(layers),
            "whole_more": bool(len(whole) == len(METRICS) and whole.matters_more.all()),
            "whole_ratio_kl": float(whole.ratio.get("kl", np.nan)),
            "whole_ratio_loss": float(whole.ratio.get("dloss", np.nan)),
            "first_tested": first is not None,
            "first_ratio": float(first.ratio) if first is not None else np.nan,
            "first_largest_share": float(first.first_largest_share) if first is not None else np.nan,
            "first_stands_out": bool(first is not None and first.matters_more
                                     and first.first_largest_share >= share),
            "largest_layer": layer_of(top.scope) if top is not None else None, "share": share}


def conclusion(summary: pd.DataFrame, metric: str = "kl") -> str:
    """The sentence the section prints, from `verdicts`."""
    v = verdicts(summary, metric)
    s = summary[(summary.metric == metric)].set_index("scope")
    layers = ", ".join(f"L{l} ({s.loc[f'L{l}', 'ratio']:.2f}x)" for l in v["layers_more"]) or "none"
    verdict = report.choose(v["first_stands_out"], "it stands out, as Nandan et al. report",
                            "it does not stand out (Nandan et al. report that it does)")
    first = (report.sentence("The first layer's set moves the KL {r:.2f}x as much as random neurons of its "
                             "layer and has the largest ratio in {p:.0%} of the resamples: {verdict}.",
                             r=v["first_ratio"], p=v["first_largest_share"], verdict=verdict)
             if v["first_tested"] else "The set has no neuron in the first layer: it cannot be compared.")
    w = summary[summary.scope == WHOLE].set_index("metric")
    return report.sentence(
        "Layers whose set moves the {m} more than random neurons of the same layer (interval above 1 "
        "and above every draw): {layers} of {n}. Ablating the whole set: KL ratio {rk:.2f} ({klo:.2f} to "
        "{khi:.2f}), loss ratio {rl:.2f} ({llo:.2f} to {lhi:.2f}); the whole set {verb} more than random "
        "neurons. ",
        m="KL" if metric == "kl" else "loss", layers=layers, n=v["n_layers_tested"], rk=w.ratio.get("kl"),
        klo=w.ratio_lo.get("kl"), khi=w.ratio_hi.get("kl"), rl=w.ratio.get("dloss"),
        llo=w.ratio_lo.get("dloss"),
        lhi=w.ratio_hi.get("dloss"), verb=report.choose(v["whole_more"], "matters",
                                                        "does not matter")) + first


# ---------------------------------------------------------------------------------- one family
def layer_matched_top(table: pd.DataFrame, counts: dict[int, int],
                      column: str = "excess_corr") -> pd.DataFrame:
    """The control's counterpart of a set: in each layer, its `counts[layer]` neurons of largest
    `column` (`layer`, `neuron`). The untrained control has no set of its own (nothing beats its own
    maximum), so its top neurons by excess, as many per layer as the set, are ablated instead."""
    parts = [g.nlargest(int(counts[l]), column)[["layer", "neuron"]] for l,
             g in table.groupby("layer") if counts.get(l)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["layer", "neuron"])


@dataclass
class AblationStudy:
    """One model's ablations: its `plan` (`plan_table`), the long `table`, the `summary`
    (`ablation_summary`) and the computing time (`seconds`; None when the result was cached)."""

    name: str
    set_name: str
    plan: pd.DataFrame
    table: pd.DataFrame
    summary: pd.DataFrame
    seconds: float | None


def study(model, name: str, model_id: str, selected: pd.DataFrame, rows: TokenRows, drop_ids: Sequence[int],
          artifacts_dir: str | Path, set_name: str = "set", n_draws: int = N_DRAWS, seed: int = 0,
          batch_size: int = 8,
          n_boot: int = 2000, verbose: bool = True) -> AblationStudy:
    """Mean-ablate `selected` (layer, neuron) in `model` against `n_draws` random sets per layer
    (`ablation_plan`) on `rows`; cached by content. Returns the plan, table and summary."""
    plan = ablation_plan(selected, model.cfg.n_layers, model.cfg.d_mlp, n_draws, seed)
    res = cached_ablations(model, model_id, rows, plan, drop_ids, artifacts_dir, batch_size, verbose=verbose,
                           prefix=name)
    table, plan_t = res.table("ablation"), res.table("plan")
    return AblationStudy(name, set_name, plan_t, table, ablation_summary(table, plan_t, n_boot, seed),
                         res.meta.get("seconds"))


def family_study(nset, family, rows: TokenRows, artifacts_dir: str | Path, n_draws: int = N_DRAWS,
                 seed: int = 0, batch_size: int = 8, verbose: bool = True) -> dict[str, AblationStudy]:
    """The section's ablations: the chosen set of `nset` in the family's reference member, and, where
    the family has an untrained control, the control's layer-matched top neurons (`layer_matched_top`)
    in the control's member of the same name. {"trained": ..., "control": ...} on the same rows."""
    sel = nset.neurons
    out = {"trained": study(family.load(family.reference), family.name, family.identity[family.reference],
                            sel, rows,
                            family.codec.drop_ids, artifacts_dir, nset.chosen, n_draws, seed, batch_size,
                            verbose=verbose)}
    ctl = nset.control_family
    if ctl is not None and nset.control is not None:
        counts = sel.groupby("layer").size().to_dict()
        member = family.reference if family.reference in ctl.members else ctl.reference
        out["control"] = study(ctl.load(member), ctl.name, ctl.identity[member],
                               layer_matched_top(nset.control, counts),
                               rows, ctl.codec.drop_ids, artifacts_dir, "layer-matched top excess", n_draws,
                               seed,
                               batch_size, verbose=verbose)
    return out


def row_subsets(table: pd.DataFrame, plan: pd.DataFrame, fractions=(0.5, 1.0), n_boot: int = 2000,
                seed: int = 0) -> dict[int, pd.DataFrame]:
    """`ablation_summary` over the first `fraction` of the token rows, for each fraction: {valid
    tokens: summary}, for `convergence` without another pass (the rows are spread over the token
    table, so the first half is a sample of it too)."""
    rows = np.sort(table.row.unique())
    out = {}
    for f in fractions:
        keep = rows[: max(2, int(round(f * len(rows))))]
        sub = table[table.row.isin(keep)]
        out[int(sub[sub.ablation == sub.ablation.iloc[0]].n.sum())] = ablation_summary(sub, plan, n_boot,
                                                                                       seed)
    return out


def convergence(summaries: dict[int, pd.DataFrame], metric: str = "kl") -> pd.DataFrame:
    """The ratio of every scope at several token counts ({n_tokens: `ablation_summary`}), side by
    side with its interval: how far the section's numbers move when the tokens are doubled."""
    cols = {}
    for n, s in sorted(summaries.items()):
        x = s[s.metric == metric].set_index("scope")
        cols[f"ratio @ {n:,}"] = x.ratio
        cols[f"interval @ {n:,}"] = [report.sentence("{lo:.2f} to {hi:.2f}", lo=lo, hi=hi)
                                     for lo, hi in zip(x.ratio_lo, x.ratio_hi)]
    return pd.DataFrame(cols)


# ---------------------------------------------------------------------------------- result vs paper
def comparisons(summary: pd.DataFrame, control: pd.DataFrame | None = None,
                model: str = paper.DEFAULT_MODEL) -> list[paper.Comparison]:
    """The section's rows against Nandan et al. 2025: the whole set matters more than random neurons
    (on the KL and on the loss: `verdicts`' `whole_more`), and the first layer stands out
    (`first_stands_out`). `control`: the untrained control's summary, scored by the same rules."""
    v = verdicts(summary)
    c = verdicts(control) if control is not None else None
    fmt_whole = "ratio to random: KL {k:.2f}, loss {l:.2f}"
    fmt_first = "L0's KL ratio {r:.2f}, the largest in {p:.0%} of resamples"
    return [
        paper.Comparison(
            "ablating the set vs as many random neurons (whole set)", "nandan_ablation_matters",
            report.sentence(fmt_whole, k=v["whole_ratio_kl"], l=v["whole_ratio_loss"]),
            control=report.sentence(fmt_whole, k=c["whole_ratio_kl"], l=c["whole_ratio_loss"]) if c else None,
            model=model, holds=v["whole_more"], control_holds=c["whole_more"] if c else None,
            reason=report.sentence("the bootstrap interval of the KL or the loss ratio reaches 1, or a random "
                                   "draw moves it as much (KL ratio {k:.2f}, loss ratio {l:.2f})",
                                   k=v["whole_ratio_kl"], l=v["whole_ratio_loss"])),
        paper.Comparison(
            "the first layer's set stands out", "nandan_first_layer",
            report.sentence(fmt_first, r=v["first_ratio"], p=v["first_largest_share"]),
            control=report.sentence(fmt_first, r=c["first_ratio"], p=c["first_largest_share"]) if c else None,
            model=model, holds=v["first_stands_out"], control_holds=c["first_stands_out"] if c else None,
            measured=v["first_tested"],
            reason=report.choose(v["first_tested"], report.sentence(
                "the largest ratio is layer {l}'s; L0's is the largest in {p:.0%} of the resamples "
                "(needed: {s:.0%})",
                l=v["largest_layer"], p=v["first_largest_share"], s=v["share"]),
                "the set has no neuron in layer 0")),
    ]
