"""Token-frequency neurons (Stolfo et al. 2024, "Confidence regulation neurons", arXiv 2406.16254): the
partners of entropy neurons that move the output towards or away from the unigram distribution.

**The log-frequency direction.** The unigram distribution q is counted over the corpus's training
tokens (`unigram_log_probs`: every next token of the token rows, add-`alpha` smoothed so tokens the
sample misses keep a finite log-frequency). Its centred log-frequencies f = log q - mean(log q) are a
pattern over the vocabulary; the residual direction whose logit effect best matches it is the
least-squares solution d* = argmin_d || W_U^T d - f ||^2 = pinv(W_U^T) f, with W_U centred over the
vocabulary (a constant logit shift changes nothing; after `center_unembed` this is a no-op). The
pseudo-inverse drops W_U's exact zero directions (the all-ones direction that a folded, centring
LayerNorm removes), so d* lies in the residual subspace the unembedding reads: the **live
subspace**, of dimension k. `r2` says how much of f any residual direction can produce at all.
W_U here is the effective unembedding (`effective.effective_unembed`: diag(g_f) W_U when the final
norm keeps its weight g_f; W_U itself when it is folded in).

**Alignment.** A neuron writes s * w_out when it acts (s = `act_sign`, `neuron_stats.SIGN_RULE`;
w_out its effective direction, `effective.output_directions`: times the weight of a norm after the
MLP where the model has one).
Its alignment is the cosine of s * w_out (its part in the live subspace) with d* (`freq_cos`);
positive means its typical activation raises frequent tokens' logits, i.e. pulls the output towards
the unigram distribution. A random direction of the k-dimensional live subspace has cos^2 ~
Beta(1/2, (k - 1)/2), which gives every neuron's chance probability (`p_random`, |cos| at least as
large) exactly; `random_cosines` draws such directions for the figure.

**Intervention.** The top candidates and random late neurons are fixed at activations along their
natural grid (`candidates.natural_grid`, as for entropy neurons) with `interventions.cached_sweep`,
whose extra metric here is the KL divergence of the output from the unigram distribution,
KL(p || q) in nats (`kl_unigram`); the total effect and the direct one (final scale frozen) are
separated as for entropy neurons.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from scipy.stats import beta

from helpers.core import paper, report
from helpers.data.tokens import TokenRows
from helpers.entropy import interventions as iv
from helpers.entropy.candidates import grid_points, natural_grid
from helpers.models.effective import effective_unembed, output_directions

KL_NAME = "kl_unigram"


# ---------------------------------------------------------------------------------- the direction
def unigram_counts(rows: TokenRows | torch.Tensor, d_vocab: int) -> np.ndarray:
    """[d_vocab] int64: how often each token is a next token in `rows` (positions 1.. of every row,
    so the BOS each row starts with is not counted)."""
    ids = TokenRows.of(rows).ids[:, 1:].reshape(-1).numpy()
    if ids.size and (ids.min() < 0 or ids.max() >= d_vocab):
        raise ValueError(f"token ids outside 0..{d_vocab - 1}")
    return np.bincount(ids, minlength=d_vocab).astype(np.int64)


def unigram_log_probs(counts: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """[d_vocab] float64 log q of the add-`alpha` smoothed unigram distribution of `counts`."""
    c = np.asarray(counts, dtype=np.float64) + float(alpha)
    if (c <= 0).any():
        raise ValueError("a token with no count and no smoothing has log-frequency -inf")
    return np.log(c / c.sum())


def family_log_q(family, n_tokens: int, d_vocab: int, alpha: float = 1.0) -> np.ndarray:
    """[d_vocab] smoothed unigram log-probabilities of a family's tokens, counted over the first
    `n_tokens` tokens of its **training** split (`Family.token_table(n, "train")`): the unigram
    distribution the model was trained towards, not the held-out rows the interventions run on."""
    return unigram_log_probs(unigram_counts(family.token_table(int(n_tokens), "train"), d_vocab), alpha)


def log_probs_sha256(log_q: np.ndarray) -> str:
    """The content id of a reference distribution (for cache keys)."""
    return hashlib.sha256(np.ascontiguousarray(np.asarray(log_q, dtype=np.float64)).tobytes()).hexdigest()


@dataclass
class FrequencyDirection:
    """The log-frequency direction of one model: `log_q` [V] and the centred target f [V]; `coef`
    [d_model] the least-squares d* (W_U^T d* ~ f); `direction` its unit vector; `live` [d_model, k]
    an orthonormal basis of the subspace W_U reads (the pseudo-inverse's kept directions); `r2` the
    share of f's variance that W_U^T d* explains; `unembed` the centred W_U [d_model, V] (float64);
    W_U the effective unembedding."""

    log_q: np.ndarray
    target: np.ndarray
    coef: torch.Tensor
    direction: torch.Tensor
    live: torch.Tensor
    r2: float
    unembed: torch.Tensor

    @property
    def k(self) -> int:
        """The live dimension."""
        return int(self.live.shape[1])

    def logit_effect(self) -> np.ndarray:
        """[V] W_U^T d* (centred): the logit pattern the direction writes, to set beside `target`."""
        return (self.unembed.T @ self.coef).numpy()


def frequency_direction(model, log_q: np.ndarray, rtol: float = 1e-3) -> FrequencyDirection:
    """The least-squares residual direction of the centred log-frequencies through the effective
    unembedding (see the module's docstring). Singular values of the centred W_U below `rtol` x the
    largest are exact zeros of weight processing and left out (as `candidates.unembed_spectrum`
    does)."""
    W = effective_unembed(model).double().cpu()
    if W.shape[1] != len(log_q):
        raise ValueError(f"log_q has {len(log_q)} tokens, W_U {W.shape[1]}")
    Wc = W - W.mean(1, keepdim=True)
    f = torch.as_tensor(np.asarray(log_q, dtype=np.float64) - np.mean(log_q))
    U, S, Vh = torch.linalg.svd(Wc, full_matrices=False)
    keep = S > rtol * S.max()
    # d* = pinv(Wc^T) f = U_k S_k^-1 V_k^T f
    coef = U[:, keep] @ ((Vh[keep] @ f) / S[keep])
    fit = Wc.T @ coef
    r2 = float(1 - ((fit - f).square().sum() / f.square().sum()))
    return FrequencyDirection(np.asarray(log_q, dtype=np.float64), f.numpy(), coef, coef / coef.norm(),
                              U[:, keep], r2, Wc)


# ---------------------------------------------------------------------------------- alignment
def chance_p(cos: np.ndarray | float, k: int) -> np.ndarray:
    """P(|cos| >= |`cos`|) for a uniformly random unit vector of a k-dimensional space against a fixed
    direction: cos^2 ~ Beta(1/2, (k - 1)/2)."""
    c2 = np.square(np.asarray(cos, dtype=np.float64))
    return beta(0.5, (k - 1) / 2).sf(np.clip(c2, 0, 1))


def random_cosines(fd: FrequencyDirection, n: int, seed: int = 0) -> np.ndarray:
    """[n] cosines of uniformly random directions of the live subspace with the direction."""
    g = torch.Generator().manual_seed(int(seed))
    x = torch.randn(n, fd.k, generator=g, dtype=torch.float64) @ fd.live.T
    return ((x @ fd.direction) / x.norm(dim=1)).numpy()


def frequency_table(model, fd: FrequencyDirection, signs: pd.DataFrame | None = None,
                    layers: Sequence[int] | None = None,
                    n_last: int = 2) -> pd.DataFrame:
    """One row per neuron of `layers` (default all): `act_sign` (from `signs`: layer, neuron, act_sign;
    +1 without a row), `freq_cos` the cosine of s w_out (its live part; w_out the effective direction,
    `output_directions`) with the direction,
    `freq_share` its square (the share of the effective direction along it), `p_random` the chance
    probability of so large an |cos| (`chance_p`), `freq_rank` (1 = largest |cos| among these
    neurons) and `late` (in the last `n_last` layers)."""
    d_mlp, L = model.cfg.d_mlp, model.cfg.n_layers
    layers = list(range(L)) if layers is None else sorted(int(l) for l in layers)
    # [neurons, d_model]
    W = torch.cat([output_directions(model, l).double().cpu() for l in layers])
    t = pd.DataFrame({"layer": np.repeat(layers, d_mlp), "neuron": np.tile(np.arange(d_mlp), len(layers))})
    if signs is not None:
        t = t.merge(signs[["layer", "neuron", "act_sign"]], on=["layer", "neuron"], how="left")
    t["act_sign"] = (t.act_sign if "act_sign" in t else pd.Series(1.0, index=t.index)).fillna(1.0)
    t.loc[t.act_sign == 0, "act_sign"] = 1.0
    w = W * torch.tensor(t.act_sign.to_numpy(dtype=np.float64))[:, None]
    live = w @ fd.live  # coordinates in the live subspace
    cos = (live @ (fd.live.T @ fd.direction)) / live.norm(dim=1).clamp_min(1e-300)
    t["freq_cos"] = cos.numpy()
    t["freq_share"] = t.freq_cos ** 2
    t["p_random"] = chance_p(t.freq_cos.to_numpy(), fd.k)
    t["freq_rank"] = t.freq_cos.abs().rank(ascending=False, method="min").astype(int)
    t["late"] = t.layer >= L - n_last
    return t


def candidates(table: pd.DataFrame, k: int = 2) -> pd.DataFrame:
    """The `k` late neurons most aligned with the direction (largest |freq_cos|), either sign: towards
    the unigram distribution (cos > 0) or away from it (cos < 0)."""
    late = table[table.late]
    return late.reindex(late.freq_cos.abs().sort_values(ascending=False).index).head(k)


def alignment_test(table: pd.DataFrame, alpha: float = 0.01) -> dict:
    """The top late neuron's |cos| against chance over as many random directions as there are late
    neurons (Bonferroni: n_late x `p_random` < `alpha`), and how many late neurons pass the same bar."""
    late = table[table.late]
    top = late.loc[late.freq_cos.abs().idxmax()]
    n = len(late)
    return {"neuron": f"L{int(top.layer)}.{int(top.neuron)}", "cos": float(top.freq_cos),
            "p_random": float(top.p_random),
            "p_bonferroni": float(min(1.0, n * top.p_random)), "n_late": n,
            "n_beyond": int((late.p_random * n < alpha).sum()), "holds": bool(n * top.p_random < alpha),
            "alpha": alpha}


# ---------------------------------------------------------------------------------- intervention
def kl_metric(log_q: np.ndarray):
    """fn(log p [..., V]) -> KL(p || q) [...] in nats, for `interventions.token_metrics`."""
    ref = torch.as_tensor(np.asarray(log_q), dtype=torch.float32)

    def kl(logp: torch.Tensor) -> torch.Tensor:
        return (logp.exp() * (logp - ref.to(logp.device))).sum(-1)

    return kl


@dataclass
class FrequencyStudy:
    """One model's token-frequency study: the direction, the late neurons' table, the swept neurons
    (`neurons`: layer, neuron, role, freq_cos, the grid's columns) and the sweep (with `kl_unigram`)."""

    name: str
    direction: FrequencyDirection
    table: pd.DataFrame
    neurons: pd.DataFrame
    sweep: pd.DataFrame
    seconds: float | None = None


def study(model, name: str, model_id: str, rows, drop_ids, artifacts_dir: str | Path, log_q: np.ndarray,
          n_candidates: int = 2, n_random: int = 20, seed: int = 0, n_last: int = 2, batch_size: int = 4,
          random_grid: Sequence[float] = (0.0, 6.0), random_modes: Sequence[str] = iv.MODES,
          verbose: bool = True) -> FrequencyStudy:
    """Find the token-frequency candidates of `model` and sweep them (see the module's docstring).

    One activation pass over the last `n_last` layers on `rows` gives every late neuron's natural
    sign and range (`interventions.activation_ranges`, `candidates.natural_grid`). The `n_candidates`
    most aligned late neurons ("frequency", "candidate 2", ...) are swept over their whole grid, in
    both modes; `n_random` other late neurons ("random", seeded with `seed`) at `random_grid` (paper
    units: 0 and the top, the two points the effect compares), in `random_modes` (default both).
    Cached by content."""
    import time

    t0 = time.time()
    rows = TokenRows.of(rows)
    late = list(range(max(0, model.cfg.n_layers - n_last), model.cfg.n_layers))
    fd = frequency_direction(model, log_q)
    ranges = natural_grid(iv.activation_ranges(model, rows, late, drop_ids, batch_size))
    table = frequency_table(model, fd, ranges, layers=late, n_last=n_last).merge(
        ranges.drop(columns=["act_sign"]), on=["layer", "neuron"])
    active = table[table.grid_scale > 0]
    cand = candidates(active, n_candidates)
    pool = active.drop(index=cand.index)
    if len(pool) < n_random:
        raise ValueError(f"only {len(pool)} other late neurons with an activation range; "
                         f"asked for {n_random}")
    rand = pool.sample(n=n_random, random_state=np.random.RandomState(seed)).sort_values(["layer", "neuron"])
    roles = ["frequency"] + [f"candidate {i + 2}" for i in range(len(cand) - 1)]
    chosen = pd.concat([cand.assign(role=roles),
                        rand.assign(role="random")], ignore_index=True)

    def target(r, g, modes):
        g = np.asarray(g, dtype=np.float64)
        return iv.Target(int(r.layer), int(r.neuron),
                         g * (r.grid_scale / 6.0) * (1.0 if r.act_sign >= 0 else -1.0), g,
                         r.role, tuple(modes))

    targets = [target(r, grid_points(r.other_ratio), iv.MODES) if r.role != "random" else
               target(r, random_grid, random_modes) for r in chosen.itertuples()]
    sweep = iv.cached_sweep(model, model_id, rows, targets, drop_ids, artifacts_dir, batch_size,
                            verbose=verbose,
                            prefix=f"{name}-frequency", extra_metrics={KL_NAME: kl_metric(log_q)},
                            extra_identity={KL_NAME: log_probs_sha256(log_q)}).table("sweep")
    return FrequencyStudy(name, fd, table, chosen, sweep, time.time() - t0)


def effects(s: FrequencyStudy) -> pd.DataFrame:
    """Per swept neuron and mode: its role, `freq_cos`, and the change of KL(output || unigram),
    entropy and loss from activation 0 to its typical large activation (`d_kl_unigram`, ...)."""
    eff = iv.effect_summary(s.sweep)
    cols = ["layer", "neuron", "role", "mode", "value_top", f"d_{KL_NAME}", "d_entropy", "d_loss", "d_scale"]
    return eff[cols].merge(s.neurons[["layer", "neuron", "freq_cos"]], on=["layer", "neuron"])


def summary(studies: dict[str, FrequencyStudy]) -> pd.DataFrame:
    """One row per model: the direction's fit (`r2`, `k`), the alignment test (`alignment_test`), and
    the top candidate's change of KL(output || unigram) in the total and direct modes beside the
    largest |change| of the random neurons in each mode; `towards` when the candidate's typical
    activation lowers the KL, `sign_agrees` when that matches the sign of its cosine (cos > 0:
    towards), `effect_beyond_random` when its total |change| exceeds every random neuron's."""
    out = []
    d = f"d_{KL_NAME}"
    for name, s in studies.items():
        a = alignment_test(s.table)
        e = effects(s)
        top = s.neurons[s.neurons.role == "frequency"].iloc[0]
        mine = e[(e.layer == top.layer) & (e.neuron == top.neuron)].set_index("mode")
        rnd = e[e.role == "random"].groupby("mode")[d].apply(lambda x: float(x.abs().max()))
        tot, dire = float(mine.loc["total", d]), float(mine.loc["direct", d])
        out.append({"model": name, "r2": s.direction.r2, "k": s.direction.k, "top_aligned": a["neuron"],
                    "cos": a["cos"], "p_bonferroni": a["p_bonferroni"], "n_late": a["n_late"],
                    "n_beyond": a["n_beyond"],
                    "aligned": a["holds"], "swept": f"L{int(top.layer)}.{int(top.neuron)}",
                    "swept_cos": float(top.freq_cos),
                    "d_kl_total": tot, "d_kl_direct": dire,
                    "random_max_total": float(rnd.get("total", np.nan)),
                    "random_max_direct": float(rnd.get("direct", np.nan)), "towards": tot < 0,
                    "sign_agrees": bool((tot < 0) == (top.freq_cos > 0)),
                    "effect_beyond_random": bool(abs(tot) > rnd.get("total", np.inf))})
    return pd.DataFrame(out).set_index("model")


def conclusion(row: pd.Series) -> str:
    """One model's sentence, from its `summary` row."""
    return report.sentence(
        "{m}: the log-frequency direction explains {r2:.0%} of the centred log-frequencies through W_U. The "
        "most aligned late neuron, {n}, has cos {c:+.2f} (Bonferroni p {p:.2g} over {nl:,} random directions; "
        "{nb} late neurons pass p < 0.01). Fixing {s} at its typical activation moves KL(output || unigram) by "
        "{t:+.3f} nats in total and {d:+.3f} directly (final scale frozen), {rel} the largest random "
        "neuron's {rm:.3f}: {way}.",
        m=row.name, r2=row.r2, n=row.top_aligned, c=row.cos, p=row.p_bonferroni, nl=row.n_late,
        nb=row.n_beyond,
        s=row.swept, t=row.d_kl_total, d=row.d_kl_direct, rm=row.random_max_total,
        rel=report.choose(row.effect_beyond_random, "beyond", "not beyond"),
        way=report.choose(row.towards, "towards the unigram distribution",
                          "away from the unigram distribution"))


def comparisons(row: pd.Series, control: pd.Series | None = None,
                model: str = paper.DEFAULT_MODEL) -> list[paper.Comparison]:
    """The section's rows against Stolfo et al. 2024 for one model (`summary` row, whose name labels
    the rows), the untrained control's row scored by the same rules."""
    fmt_a = "{n} cos {c:+.2f}, Bonferroni p {p:.2g}"
    fmt_e = "ΔKL {t:+.3f} (random ≤ {r:.3f})"
    return [
        paper.Comparison(
            f"a late neuron writes along the log-frequency direction ({row.name})", "stolfo_frequency_direction",
            report.sentence(fmt_a, n=row.top_aligned, c=row.cos, p=row.p_bonferroni),
            control=report.sentence(fmt_a, n=control.top_aligned, c=control.cos, p=control.p_bonferroni)
            if control is not None else None,
            model=model, holds=bool(row.aligned),
            control_holds=bool(control.aligned) if control is not None else None,
            reason=report.sentence("the most aligned of {n:,} late neurons is within what as many random "
                                   "directions reach "
                                   "(p {p:.2g})", n=row.n_late, p=row.p_bonferroni)),
        paper.Comparison(
            f"fixing it moves the output's KL from the unigram distribution ({row.name})",
            "stolfo_frequency_effect",
            report.sentence(fmt_e, t=row.d_kl_total, r=row.random_max_total),
            control=report.sentence(fmt_e, t=control.d_kl_total, r=control.random_max_total)
            if control is not None else None,
            model=model, holds=bool(row.effect_beyond_random),
            control_holds=bool(control.effect_beyond_random) if control is not None else None,
            reason=report.sentence("its total change {t:+.3f} is within the random neurons' largest {r:.3f}",
                                   t=row.d_kl_total, r=row.random_max_total)),
    ]
