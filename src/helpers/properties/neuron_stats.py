"""Per-neuron weight and activation statistics (paper §3 "properties of universal neurons" and
§5(d) "prediction neurons": kurtosis and skew of W_U w_out).

One row per neuron `(layer, neuron)` of one model:

- weight statistics (`weight_statistics`), on the model's processed weights (App. A.1):
  `w_in_norm`, `w_out_norm` (+ `w_lin_norm` for gated MLPs), `input_bias`, `in_out_sim`
  cos(w_in, w_out), `l2_penalty` ||w_in||^2 + ||w_out||^2, the vocabulary moments
  `vocab_mean/var/skew/kurt` of cos(W_U[:, t], w_out) over tokens t (of what the neuron does to
  the logits: the effective direction and unembedding of `helpers.models.effective`), and the
  largest cosine of w_in (`max_cos_w_in`) and of w_out (`max_cos_w_out`) with any other neuron of
  the model;
- activation statistics (`activation_statistics`), one streaming pass over held-out token rows
  with the same token filter as the correlations (BOS/pad and newline dropped): mean, variance,
  skew and kurtosis of the pre-activation (`mlp.hook_pre`) and of the post-activation
  (`mlp.hook_post`), and `act_freq`, the fraction of tokens with a positive pre-activation;
  `act_sign`, the sign of the neuron's typical large activation (`SIGN_RULE`), which turns w_out
  into the direction the neuron actually writes (`activation_signs`, `sign_tensor`; chapters 04-06).

The paper histogrammed activations into 256 bins over [-10, 15] and took moments of the
histogram; `helpers.streaming.accumulators.StreamingMoments` computes the moments exactly instead
(float64, mergeable, checkpointable).

Command line: `python -m helpers.properties.neuron_stats --preset default` (see `--help`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from helpers.core.cache import (Result, atomic_write_csv, atomic_write_parquet, cached_result, open_result,
                                result_dir, run_cli, write_json)
from helpers.core.cli import preset_from_args, preset_parser
from helpers.data.tokens import TokenRows
from helpers.models.effective import effective_unembed, output_directions
from helpers.models.families import load_family, short_name
from helpers.models.loading import neuron_weights, state_sha256
from helpers.streaming.accumulators import SignedLogHistogram, StreamingMoments
from helpers.streaming.activations import ActivationStream

CODE_VERSION = 4  # bump when a change to this module changes its tables
STATE_FILE = "activation_moments.pt"
TABLE_FILE = "neuron_stats.parquet"
MODEL = "model"  # the one model's key in the stream


# --------------------------------------------------------------------------------------------
# The sign of a neuron's typical large activation
# --------------------------------------------------------------------------------------------

SIGN_RULE = ("the sign of the mean activation over the tokens in the top 1% of |activation| "
             "(+1 when that mean is >= 0 or no token was seen)")  # SignedLogHistogram.large_sign


# --------------------------------------------------------------------------------------------
# Weight statistics
# --------------------------------------------------------------------------------------------


def _unit_rows(w: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm (zero rows stay zero)."""
    return w / w.norm(dim=1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)


def _max_cos_other(units: torch.Tensor, block_elems: int) -> torch.Tensor:
    """[N] max over j != i of units[i] . units[j] for unit rows `units` [N, d]; row blocks of
    at most `block_elems` similarities at a time. The similarity matrix is symmetric, so each
    block pairs its rows with themselves and the rows after them only (half the products), and
    updates the maxima of both."""
    n = units.shape[0]
    out = torch.full((n,), float("-inf"), dtype=units.dtype, device=units.device)
    if n == 1:
        return out.fill_(float("nan"))
    rows = max(1, block_elems // n)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        sims = units[start:stop] @ units[start:].T  # [b, N - start]: rows start.. against columns start..
        idx = torch.arange(stop - start, device=units.device)
        sims[idx, idx] = float("-inf")
        torch.maximum(out[start:stop], sims.max(dim=1).values, out=out[start:stop])
        torch.maximum(out[start:], sims.max(dim=0).values, out=out[start:])
    return out


def _row_moments(c: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Population mean, variance, skew, raw kurtosis of each row of `c` [rows, k] (two-pass)."""
    mean = c.mean(1, keepdim=True)
    d = c - mean
    d2 = d * d
    m2 = d2.mean(1)
    m3 = (d2 * d).mean(1)
    m4 = d2.square_().mean(1)
    return mean[:, 0], m2, m3 / m2.pow(1.5), m4 / m2.square()


@torch.no_grad()
def weight_statistics(model, dtype: torch.dtype = torch.float32, block_elems: int = 1 << 24,
                      vocab_neurons: int | None = None) -> pd.DataFrame:
    """Per-neuron weight statistics of `model` (paper §3, Fig. 4; §5(d), Fig. 6), computed on the
    weights as loaded (the families load processed weights: folded LayerNorm, centred writing
    weights and unembedding).

    Returns one row per neuron (`layer`, `neuron`, layers in order) with:
    `w_in_norm` ||w_in||, `w_out_norm` ||w_out||, `w_lin_norm` ||w_lin|| (gated MLPs only: there
    `w_in` is the gate, whose non-linearity makes the neuron fire, and `w_lin` the linear
    branch), `input_bias` b_in, `in_out_sim` cos(w_in, w_out), `l2_penalty` ||w_in||^2 +
    ||w_out||^2; `vocab_mean`, `vocab_var`, `vocab_skew`, `vocab_kurt`: population moments over
    the d_vocab tokens t of c_t = cos(W_U[:, t], w_out) (kurtosis raw, Gaussian = 3), of the
    effective direction (`output_directions`: w_out times the weight of a norm after the MLP) and
    the effective unembedding (`effective_unembed`: diag(g_f) W_U when the final norm keeps its
    weight g_f); without those norms, of w_out and W_U. The other columns describe the weights
    themselves;
    `max_cos_w_in`, `max_cos_w_out`: the largest cosine of w_in (resp. w_out) with that of any
    OTHER neuron of any layer.

    `vocab_neurons`: the four vocab columns for only the first that many neurons of each layer (NaN
    for the others; neuron indices carry no meaning, so it is a sample of each layer). With a large
    vocabulary they are the costly part: Gemma 3's 36,864 neurons against 262k tokens take minutes.

    Per-neuron quantities are float64. The max cosines and the [neurons, d_vocab] cosine blocks
    are matrix products in `dtype` (float32: errors ~1e-7 on a cosine, ~1e-6 relative on a
    kurtosis; pass torch.float64 for exact values), in row blocks of at most `block_elems` entries;
    the moments over the vocabulary are taken in float64. Zero vectors give NaN.
    """
    cfg = model.cfg
    n_layers, d_mlp = cfg.n_layers, cfg.d_mlp
    gated = bool(getattr(cfg, "gated_mlp", False))
    unembed = effective_unembed(model).double()  # [d_model, d_vocab]
    unembed = (unembed / unembed.norm(dim=0, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)).to(dtype)
    cols: dict[str, list[torch.Tensor]] = {k: [] for k in ("w_in_norm", "w_out_norm", "w_lin_norm", "input_bias",
                                                         "in_out_sim", "l2_penalty", "vocab_mean", "vocab_var",
                                                         "vocab_skew", "vocab_kurt")}
    units_in, units_out = [], []
    for layer in range(n_layers):
        nw = neuron_weights(model, layer)
        w_in = nw.w_in.T.double()  # [d_mlp, d_model]
        w_out = nw.w_out.double()  # [d_mlp, d_model]
        in_norm, out_norm = w_in.norm(dim=1), w_out.norm(dim=1)
        cols["w_in_norm"].append(in_norm)
        cols["w_out_norm"].append(out_norm)
        if gated:
            cols["w_lin_norm"].append(nw.w_lin.double().norm(dim=0))
        cols["input_bias"].append(nw.b_in.double())
        cols["in_out_sim"].append((w_in * w_out).sum(1) / (in_norm * out_norm))
        cols["l2_penalty"].append(in_norm.square() + out_norm.square())
        out_unit = _unit_rows(w_out)
        direction = output_directions(model, layer).double()  # w_out without a post-MLP norm
        dir_unit = _unit_rows(direction)
        rows = max(1, block_elems // unembed.shape[1])
        n_vocab = d_mlp if vocab_neurons is None else min(int(vocab_neurons), d_mlp)
        parts = [_row_moments((dir_unit[s : min(s + rows, n_vocab)].to(dtype) @ unembed.to(dir_unit.device)).double())
                 for s in range(0, n_vocab, rows)]
        for k, name in enumerate(("vocab_mean", "vocab_var", "vocab_skew", "vocab_kurt")):
            v = torch.full((d_mlp,), float("nan"), dtype=torch.float64, device=dir_unit.device)
            v[:n_vocab] = torch.cat([p[k] for p in parts])
            cols[name].append(v.masked_fill(direction.norm(dim=1) == 0, float("nan")))
        units_in.append(_unit_rows(w_in).to(dtype))
        units_out.append(out_unit.to(dtype))
    df = pd.DataFrame({"layer": np.repeat(np.arange(n_layers), d_mlp), "neuron": np.tile(np.arange(d_mlp), n_layers)})
    for name, parts in cols.items():
        if parts:
            df[name] = torch.cat(parts).cpu().numpy().astype(np.float64)
    for name, units, norms in (("max_cos_w_in", units_in, cols["w_in_norm"]), ("max_cos_w_out", units_out, cols["w_out_norm"])):
        m = _max_cos_other(torch.cat(units), block_elems).double()
        df[name] = m.masked_fill(torch.cat(norms).to(m.device) == 0, float("nan")).cpu().numpy()
    return df


# --------------------------------------------------------------------------------------------
# Activation statistics (streaming, checkpointed)
# --------------------------------------------------------------------------------------------

ACTIVATION_COLUMNS = ["pre_mean", "pre_var", "pre_skew", "pre_kurt", "act_freq", "post_mean", "post_var", "post_skew",
                      "post_kurt", "post_top_mean", "act_sign"]


def _accumulate_batch(batch, pre: list[StreamingMoments], post: list[StreamingMoments],
                      sign: list[SignedLogHistogram]) -> None:
    """Each layer's `mlp.hook_pre` / `mlp.hook_post` at the batch's valid tokens into that layer's
    accumulators (the post-activation also into its sign histogram)."""
    acts = batch.acts[MODEL]
    for l in range(len(pre)):
        pre[l].update(acts[f"blocks.{l}.mlp.hook_pre"])
        post[l].update(acts[f"blocks.{l}.mlp.hook_post"])
        sign[l].update(acts[f"blocks.{l}.mlp.hook_post"])


def activation_identity(model, rows: TokenRows, drop_ids: Sequence[int]) -> dict:
    """What determines the activation statistics of `model` on `rows`: the weights as loaded
    (sha256 of the state dict), the rows' sha256 and shape, the dropped tokens, the code version."""
    return {"code_version": CODE_VERSION, "weights": state_sha256(model), "rows_sha256": rows.sha256,
            "rows_shape": list(rows.ids.shape), "drop_ids": sorted(int(t) for t in drop_ids),
            "n_layers": model.cfg.n_layers, "d_mlp": model.cfg.d_mlp}


def _moments_table(pre: list[StreamingMoments], post: list[StreamingMoments], sign: list[SignedLogHistogram],
                   d_mlp: int) -> pd.DataFrame:
    n_layers = len(pre)

    def cat(accs, fn):
        return torch.cat([getattr(a, fn)() for a in accs]).cpu().numpy()

    df = pd.DataFrame({"layer": np.repeat(np.arange(n_layers), d_mlp), "neuron": np.tile(np.arange(d_mlp), n_layers)})
    for side, accs in (("pre", pre), ("post", post)):
        df[f"{side}_mean"] = cat(accs, "mean")
        df[f"{side}_var"] = cat(accs, "variance")
        df[f"{side}_skew"] = cat(accs, "skew")
        df[f"{side}_kurt"] = cat(accs, "kurtosis")
        if side == "pre":
            df["act_freq"] = cat(accs, "fraction_positive")
    df["post_top_mean"] = cat(sign, "top_mean")
    df["act_sign"] = cat(sign, "large_sign")
    return df[["layer", "neuron", *ACTIVATION_COLUMNS]]


def activation_statistics(model, rows: torch.Tensor | TokenRows, drop_ids: Sequence[int], out_dir: str | Path | None = None,
                          batch_size: int = 32, checkpoint_every: int = 200_000, verbose: bool = False,
                          identity: dict | None = None,
                          snapshots: Mapping[int, Callable[[pd.DataFrame], None]] | None = None) -> pd.DataFrame:
    """Activation moments of every neuron of `model` over the token rows `rows` [rows, n_ctx]
    (paper §3, Fig. 4: activation frequency, skew and kurtosis), dropping the tokens in
    `drop_ids` (BOS/pad and newline: the same tokens as the correlations).

    Returns one row per neuron (`layer`, `neuron`) with `pre_mean`, `pre_var`, `pre_skew`,
    `pre_kurt` of the pre-activation (`mlp.hook_pre`: the gate for gated MLPs), `act_freq` the
    fraction of tokens where it is > 0, and `post_mean`, `post_var`, `post_skew`, `post_kurt` of
    the post-activation (`mlp.hook_post`), `post_top_mean` the mean post-activation over the top
    1% of its |value| and `act_sign` its sign (`SIGN_RULE`: +1 or -1; the direction the neuron
    writes its w_out in when it acts strongly, which a gated neuron may do with either sign).
    Variances are population variances; kurtoses raw (Gaussian = 3). Exact moments
    (`StreamingMoments`), not the paper's 256-bin histograms; the top 1% from a log-binned
    histogram in the same pass (`SignedLogHistogram`).

    One pass of the streaming driver (`ActivationStream`; a batch's pre- and post-activations of
    every layer are in memory at once). With `out_dir`, the accumulators are saved to
    `out_dir/activation_moments.pt` every `checkpoint_every` valid tokens and at the end, with
    their identity (`identity`, default `activation_identity`); a restarted call resumes at the
    next row (any `batch_size`) and gives the same result as an uninterrupted run. A finished
    state is reused as is; a state of other weights or rows is reported and not resumed.

    `snapshots` {k: callback}: in the same pass, the table over exactly the first `k` rows is
    handed to `callback` as soon as they are consumed (single-process runs; a pass resumed past
    `k` skips it), so the statistics of a prefix of the rows cost no second forward pass.
    """
    cfg = model.cfg
    n_layers, d_mlp = cfg.n_layers, cfg.d_mlp
    rows = TokenRows.of(rows)
    identity = identity or activation_identity(model, rows, drop_ids)
    names = [f"blocks.{l}.mlp.hook_{h}" for l in range(n_layers) for h in ("pre", "post")]

    def accumulators() -> dict:
        return {**{f"{h}{l}": StreamingMoments(d_mlp, cfg.device) for h in ("pre", "post") for l in range(n_layers)},
                **{f"sign{l}": SignedLogHistogram(d_mlp, cfg.device, split_sign=False) for l in range(n_layers)}}

    snapshots = {int(k): cb for k, cb in (snapshots or {}).items() if 0 < int(k) < len(rows)}
    stream = ActivationStream({MODEL: model}, rows, names, batch_size, drop_ids, accumulators, identity,
                              Path(out_dir) / STATE_FILE if out_dir is not None else None, checkpoint_every,
                              save_at_end=True, desc="activation statistics", verbose=verbose, device=cfg.device,
                              split_at=list(snapshots))
    pre = [stream.accs[f"pre{l}"] for l in range(n_layers)]
    post = [stream.accs[f"post{l}"] for l in range(n_layers)]
    sign = [stream.accs[f"sign{l}"] for l in range(n_layers)]
    if not stream.done:
        for batch in stream:
            _accumulate_batch(batch, pre, post, sign)
            if stream.world == 1 and batch.rows.stop in snapshots:
                part = _moments_table(pre, post, sign, d_mlp)
                part.attrs["n_valid_tokens"] = int(pre[0].count)
                snapshots[batch.rows.stop](part)
    accs = stream.merged()
    if accs is None:
        return pd.DataFrame()
    pre = [accs[f"pre{l}"] for l in range(n_layers)]
    post = [accs[f"post{l}"] for l in range(n_layers)]
    sign = [accs[f"sign{l}"] for l in range(n_layers)]
    df = _moments_table(pre, post, sign, d_mlp)
    df.attrs["n_valid_tokens"] = stream.n_tokens
    return df


# --------------------------------------------------------------------------------------------
# The joined table, its cache folder, and the command line
# --------------------------------------------------------------------------------------------


def _write_table(model, weights: pd.DataFrame, acts: pd.DataFrame, rows: TokenRows, drop_ids: Sequence[int], out: Path,
                 batch_size: int, t0: float) -> dict:
    """Join the weight and activation statistics and write the table's files into `out`."""
    n_valid = acts.attrs.get("n_valid_tokens")
    table = weights.merge(acts, on=["layer", "neuron"], how="inner", validate="one_to_one")
    assert len(table) == model.cfg.n_layers * model.cfg.d_mlp
    run = {"n_rows": len(rows), "n_ctx": rows.n_ctx, "n_valid_tokens": n_valid, "drop_ids": [int(t) for t in drop_ids],
           "n_layers": model.cfg.n_layers, "d_mlp": model.cfg.d_mlp, "gated_mlp": bool(getattr(model.cfg, "gated_mlp", False)),
           "processing": getattr(model, "processing", None), "batch_size": batch_size, "seconds": round(time.time() - t0, 1)}
    atomic_write_parquet(table, out / TABLE_FILE)
    atomic_write_csv(table, out / "neuron_stats.csv")
    write_json(out / "run.json", run)
    return run


def _compute_table(model, rows: TokenRows, drop_ids: Sequence[int], out: Path, batch_size: int, checkpoint_every: int,
                   verbose: bool, identity: dict, prefixes: Sequence[tuple[TokenRows, dict, Path]] = (),
                   vocab_neurons: int | None = None) -> dict | None:
    """The table of `model` over `rows` into `out`; `prefixes` [(rows, identity, folder)] are
    tables over the first rows of `rows`, written from the same pass when they are reached;
    `vocab_neurons` as in `weight_statistics`."""
    t0 = time.time()
    weights = weight_statistics(model, vocab_neurons=vocab_neurons)

    def writer(p_rows: TokenRows, p_ident: dict, p_out: Path):
        return lambda part: cached_result("neuron_stats", p_ident,
                                          lambda o: _write_table(model, weights, part, p_rows, drop_ids, o, batch_size, t0),
                                          folder=p_out)

    snapshots = {len(p_rows): writer(p_rows, p_ident, p_out) for p_rows, p_ident, p_out in prefixes}
    acts = activation_statistics(model, rows, drop_ids, out, batch_size, checkpoint_every, verbose, identity, snapshots)
    if not len(acts):  # a torchrun rank other than 0
        return None
    run = _write_table(model, weights, acts, rows, drop_ids, out, batch_size, t0)
    (out / STATE_FILE).unlink(missing_ok=True)
    return run


def neuron_stats_table(model, rows: torch.Tensor | TokenRows, drop_ids: Sequence[int], out_dir: str | Path, batch_size: int = 32,
                       checkpoint_every: int = 200_000, verbose: bool = True, identity: dict | None = None) -> pd.DataFrame:
    """Weight and activation statistics of every neuron of `model`, joined on (`layer`,
    `neuron`) (paper §3 and §5(d)); saved as `out_dir/neuron_stats.parquet` (and `.csv`,
    `run.json`). Cached: a finished table in `out_dir` made with the same `identity` (default
    `activation_identity`) is returned, its files checked; one of other inputs is refused
    (IdentityMismatch); an interrupted activation pass resumes from its checkpoint in `out_dir`."""
    rows = TokenRows.of(rows)
    identity = identity or activation_identity(model, rows, drop_ids)
    res = cached_result("neuron_stats", identity, lambda out: _compute_table(model, rows, drop_ids, out, batch_size,
                                                                               checkpoint_every, verbose, identity),
                        folder=out_dir)
    return res.table(TABLE_FILE) if res.files else pd.DataFrame()


def stats_identity(family, member: str, n_tokens: int, rows: TokenRows | None = None,
                   vocab_neurons: int | None = None) -> dict:
    """What determines a member's neuron statistics, as content: its weights (`family.identity`),
    the token rows' sha256 (so the corpus they come from is in it), the dropped tokens, the code,
    and the W_U moments' sample `vocab_neurons` (when there is one)."""
    rows = rows if rows is not None else family.token_table(n_tokens)
    ident = {"code_version": CODE_VERSION, "family": family.name, "member": member, "weights": family.identity[member],
             "rows_sha256": rows.sha256, "rows_shape": list(rows.ids.shape), "n_tokens": int(n_tokens),
             "drop_ids": sorted(int(t) for t in family.codec.drop_ids)}
    if vocab_neurons is not None:
        ident["vocab_neurons_per_layer"] = int(vocab_neurons)
    return ident


def member_neuron_stats(family, n_tokens: int, artifacts_dir: str | Path, member: str | None = None, batch_size: int = 32,
                        checkpoint_every: int = 200_000, out_dir: str | Path | None = None,
                        verbose: bool = True, prefixes: Sequence[int] = (), vocab_neurons: int | None = None) -> Result:
    """The neuron statistics of `member` (default: the family's reference) over the same `n_tokens`
    held-out rows as the correlations (`family.token_rows`), computed once, then cached: the
    Result (`.table("neuron_stats")`; `.meta` the run record; `.path` its folder,
    `<artifacts>/neuron_stats/<family>-<member>-<hash of stats_identity>` unless `out_dir` is given).

    `prefixes`: smaller token counts whose tables come from the same forward pass (for a
    convergence check): when their rows are the first rows of these ones and they are not cached
    yet, they are written, each under its own cache key, as the pass reaches them, so a later
    `member_neuron_stats(family, k)` reads them instead of running the model again.

    `vocab_neurons`: W_U moments for only the first that many neurons of each layer
    (`weight_statistics`; part of the cache key)."""
    member = member or family.reference
    rows = family.token_table(n_tokens)
    identity = stats_identity(family, member, n_tokens, rows, vocab_neurons)
    prefix = f"{family.name}-{member}"
    out = Path(out_dir) if out_dir else result_dir(artifacts_dir, "neuron_stats", identity, prefix=prefix)
    found = open_result(out, "neuron_stats", identity)
    if found is not None:
        return found
    shared = []
    for k in sorted({int(k) for k in prefixes}):
        p_rows = family.token_table(k)
        if not (0 < len(p_rows) < len(rows) and torch.equal(p_rows.ids, rows.ids[: len(p_rows)])):
            continue  # not a prefix of these rows: computed on its own when asked for
        p_ident = stats_identity(family, member, k, p_rows, vocab_neurons)
        p_out = result_dir(artifacts_dir, "neuron_stats", p_ident, prefix=prefix)
        if open_result(p_out, "neuron_stats", p_ident) is None:
            shared.append((p_rows, p_ident, p_out))
    def compute(folder: Path) -> dict | None:
        return _compute_table(family.load(member), rows, family.codec.drop_ids, folder, batch_size,
                              checkpoint_every, verbose, identity, shared, vocab_neurons)

    return cached_result("neuron_stats", identity, compute, folder=out)


def stats_and_half(family, n_tokens: int, artifacts_dir: str | Path, batch_size: int = 32,
                   verbose: bool = True, vocab_neurons: int | None = None) -> tuple[Result, Result]:
    """The reference's statistics over `n_tokens` and over their first half (`n_tokens // 2`, the
    convergence check), both from one forward pass (`member_neuron_stats` with `prefixes`). The
    half's token count is its Result's `identity["n_tokens"]`; `vocab_neurons` as in `member_neuron_stats`."""
    half = int(n_tokens) // 2
    kw = dict(batch_size=batch_size, verbose=verbose, vocab_neurons=vocab_neurons)
    full = member_neuron_stats(family, n_tokens, artifacts_dir, prefixes=[half], **kw)
    return full, member_neuron_stats(family, half, artifacts_dir, **kw)


def vocab_sample_convergence(table: pd.DataFrame, columns: Sequence[str] = ("vocab_kurt", "vocab_skew")) -> pd.DataFrame:
    """How settled the W_U moments' per-layer medians are on the neurons that have them (all, or a
    per-layer sample: `weight_statistics(vocab_neurons=k)`): the largest and the median over layers
    of |median over the sample - median over its first half| / |median over the sample|, per column.
    attrs: `n_sampled` (neurons per layer with moments) and `d_mlp`."""
    have = table[table[list(columns)].notna().all(axis=1)]
    per_layer = have.groupby("layer").neuron.count()
    n = int(per_layer.min()) if len(per_layer) else 0
    if n < 2:
        raise ValueError(f"{n} neurons per layer have W_U moments: at least 2 are needed to halve the sample")
    ranks = have.groupby("layer").neuron.rank(method="first")
    full = have.groupby("layer")[list(columns)].median()
    half = have[ranks <= n // 2].groupby("layer")[list(columns)].median()
    rel = (full - half).abs() / full.abs().clip(lower=1e-9)
    out = pd.DataFrame({"largest change of a per-layer median, half -> all of the sample (relative)": rel.max(),
                        "median over layers (relative)": rel.median()})
    out.attrs.update(n_sampled=n, d_mlp=int(table.groupby("layer").neuron.count().max()))
    return out


def sign_source(family, params) -> tuple[int, int | None]:
    """The statistics table a family's `act_sign` is read from in chapters 04-06, as (token count,
    W_U moments' sample): for the single real model chapter 02's own table (the preset's
    `properties_single_tokens` and `properties_single_vocab_neurons`: no pass of its own); for the
    embedded families the preset's `n_tokens_aux` and every neuron (a short pass per member:
    chapter 02 streams only the reference)."""
    if family.name == params.single_model:
        return int(params.properties_single_tokens), params.properties_single_vocab_neurons
    return int(params.n_tokens_aux), None


def family_signs(family, params, artifacts_dir: str | Path, batch_size: int = 32, members: Sequence[str] | None = None,
                 verbose: bool = False) -> pd.DataFrame:
    """`activation_signs` of every member (or `members`) from `sign_source`, stacked with a `member` column."""
    n, vocab_neurons = sign_source(family, params)
    return pd.concat([activation_signs(family, m, n, artifacts_dir, batch_size, verbose, vocab_neurons).assign(member=m)
                      for m in (members or family.members)], ignore_index=True)


def activation_signs(family, member: str, n_tokens: int, artifacts_dir: str | Path, batch_size: int = 32,
                     verbose: bool = False, vocab_neurons: int | None = None) -> pd.DataFrame:
    """`layer`, `neuron`, `act_sign` (`SIGN_RULE`) and `post_top_mean` of `member`, from its
    statistics table over `n_tokens` tokens (`member_neuron_stats`: cached, so a table chapter 02
    made costs nothing here)."""
    res = member_neuron_stats(family, n_tokens, artifacts_dir, member, batch_size, verbose=verbose,
                              vocab_neurons=vocab_neurons)
    t = res.table(TABLE_FILE)
    return t[["layer", "neuron", "act_sign", "post_top_mean"]].reset_index(drop=True)


def sign_tensor(signs: pd.DataFrame | None, n_layers: int, d_mlp: int) -> torch.Tensor:
    """[n_layers, d_mlp] float32 of the `act_sign` column of `signs` (rows layer, neuron); +1 where a
    neuron has no row, and everywhere when `signs` is None."""
    out = torch.ones(n_layers, d_mlp)
    if signs is not None and len(signs):
        out[torch.tensor(signs.layer.to_numpy(dtype=np.int64)), torch.tensor(signs.neuron.to_numpy(dtype=np.int64))] = \
            torch.tensor(signs.act_sign.to_numpy(dtype=np.float32))
    return out


def summary(table: pd.DataFrame) -> str:
    """A few lines on the table: per-layer medians of the main statistics."""
    cols = [c for c in ("act_freq", "pre_skew", "pre_kurt", "post_kurt", "w_in_norm", "in_out_sim", "vocab_kurt",
                        "max_cos_w_in") if c in table]
    return table.groupby("layer")[cols].median().to_string(float_format=lambda v: f"{v:.3g}")


def main(argv: list[str] | None = None) -> None:
    ap = preset_parser("Per-neuron weight and activation statistics of one model (paper §3, §5). The family, "
                       "member (the preset's reference), token count, batch size and device come from the preset "
                       "unless a flag overrides them.", ["family", "n_tokens", "device", "batch_size"])
    ap.add_argument("--member", default=None,
                    help="which seed, full or short name (default: the preset's reference)")
    ap.add_argument("--checkpoint-every", type=int, default=200_000, help="tokens between accumulator checkpoints")
    ap.add_argument("--out", default=None, help="output folder (default: a cache folder keyed by the run's inputs); a "
                                                "finished table there made with other inputs is refused")
    ap.add_argument("--debug", action="store_true", help="show tracebacks (also HELPERS_DEBUG=1)")
    args = ap.parse_args(argv)
    params = preset_from_args(args)
    fam = load_family(params.family, params, device=params.device)
    member = args.member or fam.reference
    if member not in fam.members:
        matches = [m for m in fam.members if short_name(m) == member]
        if len(matches) != 1:
            ap.error(f"{member!r} is not a member of {fam.name!r}; members: {fam.members}")
        member = matches[0]
    res = member_neuron_stats(fam, params.n_tokens, params.artifacts_path, member, params.batch_size,
                              args.checkpoint_every, args.out)
    table = res.table(TABLE_FILE)
    print(f"{res.path}: {len(table)} neurons of {fam.name}/{member}; median act_freq "
          f"{table.act_freq.median():.3f}, median post kurtosis {table.post_kurt.median():.2f}, median vocab "
          f"kurtosis {table.vocab_kurt.median():.2f}")
    print(summary(table))


if __name__ == "__main__":
    run_cli(main)
