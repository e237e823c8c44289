"""Attention (de)activation neurons (paper §5.3; Figs 8, 26): neurons that switch a later head on or
off by moving its query towards or away from the beginning-of-sequence key.

Three measurements, for any (neuron, later head) pair of a HookedTransformer:

1. **BOS values** (`bos_value_norms`): per head, ‖W_O v_BOS‖ against the mean ‖W_O v‖ over the other
   (valid) tokens. A head that puts its attention on BOS writes little, so attending to BOS is
   "off" (paper: the median head of GPT2-medium-a has a BOS value 19.4x smaller).
2. **The heuristic score** (`heuristic_scores`): h_n = s_n w_outᵀ W_Q k_BOS / sqrt(d_head) for every
   neuron n of an earlier layer and every head of a later one, with w_out unit-normalised,
   k_BOS the head's key at position 0 when the model reads BOS alone, and s_n the sign of the
   neuron's typical large activation (`neuron_stats.SIGN_RULE`): s_n w_out is the direction the
   neuron actually writes. The paper's GELU neurons have s_n = +1; a gated MLP's activation
   silu(gate) * up takes either sign, and without s_n a neuron that fires negatively would have
   the sign of its effect reversed. The score of w_out alone is kept as `score_raw`. TransformerLens stores
   W_Q as [n_heads, d_model, d_head], so W_Q k_BOS is a d_model vector per head (the paper's
   "W_Qᵀ k_BOS" in the x·W convention). The baseline replaces w_out with random unit vectors.
   - **Sign convention (`SIGN`)**: h_n > 0 means the neuron's typical large activation raises the
     head's attention logit on BOS, so the neuron *deactivates* the head; h_n < 0 *activates* it.
   - **Rotary models**: the query at position p is rotated by R_p, the BOS key by R_0 = I, so the
     logit is xᵀ W_Q R_pᵀ k_BOS. The score averages R_pᵀ k_BOS over the given query positions
     (by linearity, the mean over those positions of the exact per-position score).
   - **Grouped-query attention**: query head h reads key/value head h // (n_heads / n_kv_heads),
     TransformerLens's `repeat_interleave` order (`kv_head_of`).
   - Layer norms before the query are left out, as in the paper: they rescale w_out by a positive
     factor per token, so they change the size of the effect, not its sign.
   - **Norms that change directions** (Gemma 2/3, `helpers.models.effective`): a norm after the MLP
     turns w_out into w_out * g (`output_directions`); per-head query and key norms make the query
     x W_Q * g_q (`effective_W_Q`) and the key k_norm(k); the attention scale is the model's
     (`attn.attn_scale`: sqrt(query_pre_attn_scalar) on Gemma, sqrt(d_head) elsewhere). Their
     positive per-token scales are left out like the layer norms'. So h_n is the attention logit's
     change per unit of the neuron's write, with every norm's scale held fixed.
   - **Sliding-window layers**: a query more than `window_size - 1` positions after BOS cannot see
     it; the score refuses such positions for a local layer.
3. **The path ablation** (`path_ablation`): act_n · w_out subtracted from ONE head's query input
   only, through TransformerLens's split query input (`use_split_qkv_input`, hook
   `blocks.L.hook_q_input`, one copy of the residual stream per query head), so keys and values
   are computed from the untouched residual stream. Measured per sampled position: the change in
   the head's attention probability on BOS and the % change of the norm of its output W_O z
   (not of z, which the reference code used). The clean and ablated values come from the same
   block call, so their difference is the ablation alone. Only the head's own block is re-run,
   from the cached residual stream (the query at position p changes only row p of the pattern).
   Under a norm after the MLP the subtracted write is the neuron's exact share of its layer's
   output (`neuron_write`: norm(m) - norm(m - act_n w_out)), and the head's output norm is that of
   W_O z times the post-attention norm's weight (`effective_W_O`), as for the BOS values.

Precision: everything in fp32 (the model's dtype); per-token records are stored in fp32.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from helpers.streaming.activations import ActivationStream
from helpers.core.cache import Result, atomic_write_parquet, cached_result, config_hash
from helpers.data.tokens import TokenRows, valid_token_mask
from helpers.models.effective import (apply_norm, effective_W_O, effective_W_Q, key_norm, neuron_write,
                                      output_directions)

CODE_VERSION = 3  # 3: the BOS table records its rows (`n_rows`), which may come from their own token rows
SIGN = ("h_n > 0: the neuron's typical large activation (of sign s_n) raises the head's attention logit on BOS "
        "(deactivation neuron); h_n < 0: it lowers it (activation neuron)")


# --------------------------------------------------------------------------------------------
# Heads, keys and the rotary query
# --------------------------------------------------------------------------------------------


def n_kv_heads(cfg) -> int:
    """Number of key/value heads (n_heads without grouped-query attention)."""
    n = getattr(cfg, "n_key_value_heads", None)
    return int(n) if n is not None and not getattr(cfg, "ungroup_grouped_query_attention", False) else int(cfg.n_heads)


def kv_head_of(cfg, head: int) -> int:
    """The key/value head that query head `head` reads (TransformerLens's repeat_interleave order)."""
    if not 0 <= head < cfg.n_heads:
        raise ValueError(f"head {head} out of range (n_heads={cfg.n_heads})")
    return int(head) // (int(cfg.n_heads) // n_kv_heads(cfg))


def is_rotary(cfg) -> bool:
    return cfg.positional_embedding_type == "rotary"


@torch.no_grad()
def bos_keys(model, bos_id: int) -> torch.Tensor:
    """k_BOS of every query head: [n_layers, n_heads, d_head], the key at position 0 when the model
    reads the BOS token alone (before rotary, which is the identity at position 0; after the
    per-head key norm where there is one). Under grouped-query attention each query head gets the
    key of its key/value head."""
    names = [f"blocks.{l}.attn.hook_k" for l in range(model.cfg.n_layers)]
    tok = torch.tensor([[int(bos_id)]], device=model.cfg.device)
    _, cache = model.run_with_cache(tok, names_filter=lambda n: n in names, return_type=None)
    idx = torch.tensor([kv_head_of(model.cfg, h) for h in range(model.cfg.n_heads)])
    keys = [apply_norm(key_norm(model, l), cache[n][0, 0]) for l, n in enumerate(names)]
    return torch.stack([k[idx.to(k.device)] for k in keys]).float()


def unrotate(attn, k: torch.Tensor, position: int) -> torch.Tensor:
    """R_pᵀ k for the rotary map R_p of `attn` at query position `position`: [..., d_head].

    TransformerLens rotates x as x·cos_p + J(x)·sin_p on the first rotary_dim dimensions (J:
    `rotate_every_two`, with Jᵀ = -J), so R_pᵀ k = k·cos_p - J(k)·sin_p."""
    rd = attn.cfg.rotary_dim
    if position >= attn.rotary_cos.shape[0]:
        raise ValueError(f"position {position} beyond the rotary table ({attn.rotary_cos.shape[0]} positions)")
    kr, rest = k[..., :rd], k[..., rd:]
    cos, sin = attn.rotary_cos[position].to(k), attn.rotary_sin[position].to(k)
    return torch.cat([kr * cos - attn.rotate_every_two(kr) * sin, rest], dim=-1)


@torch.no_grad()
def query_directions(model, layer: int, k_bos: torch.Tensor, positions: Sequence[int] | None = None) -> torch.Tensor:
    """The d_model direction of each head of `layer` whose dot product with a unit w_out is h_n:
    W_Q[h] · mean_p(R_pᵀ k_BOS[h]) / attn_scale, [n_heads, d_model] (W_Q times the query norm's
    weight where there is one, `effective_W_Q`; attn_scale is sqrt(d_head) unless the model says
    otherwise).

    `k_bos` [n_heads, d_head] (a layer of `bos_keys`); `positions` the query positions averaged over
    for a rotary model (required there; ignored otherwise). In a sliding-window layer every
    position must see BOS (position < window_size), else ValueError."""
    attn = model.blocks[layer].attn
    wq = effective_W_Q(model, layer)
    k = k_bos.to(wq)
    if getattr(attn, "attn_type", "global") == "local" and positions:
        far = [int(p) for p in positions if int(p) >= int(model.cfg.window_size)]
        if far:
            raise ValueError(f"layer {layer} attends within a sliding window of {model.cfg.window_size} tokens: "
                             f"queries at positions {far[:3]}... cannot see BOS")
    if is_rotary(model.cfg):
        if not positions:
            raise ValueError("a rotary model needs the query positions to average the score over")
        k = torch.stack([unrotate(attn, k, int(p)) for p in positions]).mean(0)
    return torch.einsum("hmd,hd->hm", wq, k.float()) / float(attn.attn_scale)


def unit_rows(w: torch.Tensor) -> torch.Tensor:
    return w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def heuristic_scores(model, bos_id: int, positions: Sequence[int] | None = None, seed: int = 0,
                     neuron_layers: Sequence[int] | None = None, head_layers: Sequence[int] | None = None,
                     signs: torch.Tensor | None = None) -> dict:
    """h_n for every neuron of `neuron_layers` and every head of a strictly later layer of
    `head_layers` (default: all), and the same score of random unit vectors (one per neuron,
    Gaussian, seeded by `seed`).

    `signs` [n_layers, d_mlp] (+1/-1, `neuron_stats.sign_tensor`): each neuron's s_n; None takes
    +1 for every neuron (the score of w_out itself). w_out is the direction the neuron writes
    (`output_directions`: w_out * g under a norm after the MLP), unit-normalised.
    Returns {"score": [n_layers, d_mlp, n_layers, n_heads] float32 tensor of s_n times the w_out
    score (NaN where the neuron's layer is not below the head's), "raw": the w_out score,
    "baseline": the same for the random vectors (whose sign is arbitrary), "sign": SIGN}.
    Fig 8a is the histogram of the non-NaN entries of score and baseline."""
    cfg = model.cfg
    nl = list(range(cfg.n_layers)) if neuron_layers is None else list(neuron_layers)
    hl = list(range(cfg.n_layers)) if head_layers is None else list(head_layers)
    kb = bos_keys(model, bos_id)
    dirs = {L: query_directions(model, L, kb[L], positions) for L in hl}  # [n_heads, d_model]
    g = torch.Generator().manual_seed(int(seed))
    score = torch.full((cfg.n_layers, cfg.d_mlp, cfg.n_layers, cfg.n_heads), float("nan"))
    base = score.clone()
    for l in nl:
        w = unit_rows(output_directions(model, l).cpu())  # [d_mlp, d_model]
        r = unit_rows(torch.randn(w.shape, generator=g))
        for L in hl:
            if L > l:
                d = dirs[L].cpu()
                score[l, :, L] = w @ d.T
                base[l, :, L] = r @ d.T
    s = torch.ones(cfg.n_layers, cfg.d_mlp) if signs is None else torch.as_tensor(signs, dtype=torch.float32).cpu()
    if tuple(s.shape) != (cfg.n_layers, cfg.d_mlp):
        raise ValueError(f"signs must be [{cfg.n_layers}, {cfg.d_mlp}], got {tuple(s.shape)}")
    return {"score": score * s[:, :, None, None], "raw": score, "baseline": base, "sign": SIGN}


def score_table(scores: torch.Tensor, raw: torch.Tensor | None = None) -> pd.DataFrame:
    """Long table of the valid pairs of a score tensor: neuron_layer, neuron, head_layer, head, score
    (and `score_raw`, the w_out score, when `raw` is given)."""
    idx = (~torch.isnan(scores)).nonzero()
    vals = scores[tuple(idx.T)]
    cols = idx.numpy().astype(np.int32)
    out = pd.DataFrame({"neuron_layer": cols[:, 0], "neuron": cols[:, 1], "head_layer": cols[:, 2], "head": cols[:, 3],
                        "score": vals.numpy().astype(np.float32)})
    if raw is not None:
        out["score_raw"] = raw[tuple(idx.T)].numpy().astype(np.float32)
    return out


def select_pairs(table: pd.DataFrame, n_top: int, n_random: int, seed: int = 0) -> pd.DataFrame:
    """The pairs for the path ablation: the `n_top` highest and `n_top` lowest scores, and
    `n_random` others drawn at random (seeded); column `why` says which."""
    s = table.sort_values("score")
    low, high = s.head(n_top).assign(why="most negative h_n"), s.tail(n_top).iloc[::-1].assign(why="most positive h_n")
    rest = s.drop(index=low.index.union(high.index))
    rnd = rest.sample(min(n_random, len(rest)), random_state=seed).assign(why="random")
    return pd.concat([high, low, rnd], ignore_index=True)


# --------------------------------------------------------------------------------------------
# BOS values
# --------------------------------------------------------------------------------------------


class ValueNormSums:
    """Streaming sum and count of ‖W_O v‖ per (layer, head) over tokens: update / merge / state_dict."""

    def __init__(self, n_layers: int, n_heads: int):
        self.sum = torch.zeros(n_layers, n_heads, dtype=torch.float64)
        self.n = 0

    def update(self, norms: torch.Tensor) -> None:  # norms [tokens, n_layers, n_heads]
        self.sum += norms.double().sum(0).cpu()
        self.n += int(norms.shape[0])

    def merge(self, other: "ValueNormSums") -> None:
        self.sum += other.sum
        self.n += other.n

    def state_dict(self) -> dict:
        return {"sum": self.sum, "n": self.n}

    def load_state_dict(self, st: dict) -> None:
        self.sum, self.n = st["sum"].double(), int(st["n"])

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.n, 1)


def head_output_norms(model, layer: int, v: torch.Tensor) -> torch.Tensor:
    """‖W_O[h] v_{kv(h)}‖ of values `v` [..., n_kv_heads, d_head] -> [..., n_heads] (W_O times the
    weight of the norm after attention where there is one: `effective_W_O`)."""
    idx = torch.tensor([kv_head_of(model.cfg, h) for h in range(model.cfg.n_heads)], device=v.device)
    out = torch.einsum("...hd,hdm->...hm", v[..., idx, :].float(), effective_W_O(model, layer).to(v.device))
    return out.norm(dim=-1)


def bos_value_norms(model, rows: TokenRows, bos_id: int, drop_ids: Sequence[int], batch_size: int = 8,
                    verbose: bool = False) -> pd.DataFrame:
    """Per head: ‖W_O v_BOS‖ (BOS read alone: the value at position 0 of every row), the mean ‖W_O v‖
    over the valid tokens of `rows` (BOS and newline dropped), and `ratio` = mean / BOS.
    Columns layer, head, bos_norm, mean_norm, ratio, n_tokens, n_rows."""
    cfg = model.cfg
    names = [f"blocks.{l}.attn.hook_v" for l in range(cfg.n_layers)]
    tok = torch.tensor([[int(bos_id)]], device=cfg.device)
    with torch.no_grad():
        _, cache = model.run_with_cache(tok, names_filter=lambda n: n in names, return_type=None)
        bos = torch.stack([head_output_norms(model, l, cache[n][0, 0]) for l, n in enumerate(names)]).cpu()
    stream = ActivationStream({"m": model}, rows, names, batch_size, drop_ids, lambda: {"v": ValueNormSums(cfg.n_layers, cfg.n_heads)},
                              desc="value norms", verbose=verbose, device=cfg.device)
    with torch.no_grad():
        for batch in stream:
            norms = torch.stack([head_output_norms(model, l, batch.acts["m"][n]) for l, n in enumerate(names)], dim=1)
            stream.accs["v"].update(norms)
    acc = stream.merged()["v"]
    mean = acc.mean.float()
    L, H = torch.meshgrid(torch.arange(cfg.n_layers), torch.arange(cfg.n_heads), indexing="ij")
    return pd.DataFrame({"layer": L.flatten().numpy(), "head": H.flatten().numpy(), "bos_norm": bos.flatten().numpy(),
                         "mean_norm": mean.flatten().numpy(), "ratio": (mean / bos.clamp_min(1e-12)).flatten().numpy(),
                         "n_tokens": acc.n, "n_rows": len(rows)})


# --------------------------------------------------------------------------------------------
# Path ablation through the split query input
# --------------------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised after the attention of a block: the MLP of the block is not needed."""


@contextmanager
def split_qkv_input(model):
    """TransformerLens's split query/key/value inputs switched on for the duration (restored after)."""
    old = bool(model.cfg.use_split_qkv_input)
    model.set_use_split_qkv_input(True)
    try:
        yield model
    finally:
        model.set_use_split_qkv_input(old)


@torch.no_grad()
def head_run(model, layer: int, resid_pre: torch.Tensor, head: int, delta: torch.Tensor | None = None,
             capture: Sequence[str] = ("pattern", "z")) -> dict[str, torch.Tensor]:
    """Block `layer`'s attention on the residual stream `resid_pre` [batch, pos, d_model], with
    `delta` [batch, pos, d_model] subtracted from the query input of `head` only (None: no ablation).

    Runs `model.blocks[layer]` with the split query input on, the hook `blocks.L.hook_q_input`
    ([batch, pos, n_heads, d_model], one copy per query head) changing only `head`'s copy, and
    stops before the block's MLP. Returns the captured attention hooks ({"pattern": [batch, n_heads,
    q, k], "z": [batch, pos, n_heads, d_head], also "k", "v", "q" if asked})."""
    if not 0 <= head < model.cfg.n_heads:
        raise ValueError(f"head {head} out of range (n_heads={model.cfg.n_heads})")
    got: dict[str, torch.Tensor] = {}
    pre = f"blocks.{layer}"

    def ablate(q_in, hook):
        q_in = q_in.clone()
        q_in[:, :, head] -= delta.to(q_in)
        return q_in

    def keep(name):
        def fn(t, hook):
            got[name] = t.detach().clone()
        return fn

    def stop(t, hook):
        raise _Stop

    hooks = [(f"{pre}.attn.hook_{c}", keep(c)) for c in capture] + [(f"{pre}.hook_attn_out", stop)]
    if delta is not None:
        hooks.insert(0, (f"{pre}.hook_q_input", ablate))
    with split_qkv_input(model), model.hooks(fwd_hooks=hooks):
        try:
            model.blocks[layer](resid_pre.to(model.cfg.device))
        except _Stop:
            pass
    return got


def head_effects(model, layer: int, head: int, pattern: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention on BOS [batch, pos], ‖W_O z‖ [batch, pos]) of `head` from a block's pattern and z
    (W_O as in `head_output_norms`)."""
    p_bos = pattern[:, head, :, 0]
    out = z[:, :, head].float() @ effective_W_O(model, layer)[head].to(z.device)
    return p_bos, out.norm(dim=-1)


@torch.no_grad()
def path_ablation(model, rows: TokenRows, pairs: pd.DataFrame, drop_ids: Sequence[int], batch_size: int = 8,
                  first_pos: int | None = None, verbose: bool = False) -> pd.DataFrame:
    """Per (pair, sampled token) records of the path ablation of `pairs` (columns neuron_layer,
    neuron, head_layer, head; a `pair` id is their row number).

    The tokens are every valid token (not in `drop_ids`) at position >= `first_pos` (default: the
    second half of the row) of `rows`. Streamed with `ActivationStream` over whole rows (no token
    dropped there: the block needs every position's key and value); one clean forward pass per
    batch caches the neuron activations (`mlp.hook_post`) and the heads' residual streams
    (`hook_resid_pre`), then each head's block is re-run once clean and once per pair.

    Returns columns pair, row, pos, act (the neuron's activation), p_bos, p_bos_ablated,
    d_bos (ablated - clean), norm (‖W_O z‖), norm_ablated, d_norm_pct (100 · (ablated - clean) /
    clean). A deactivation neuron (h_n > 0) firing with its typical sign has d_bos < 0 and d_norm_pct > 0."""
    need = {"neuron_layer", "neuron", "head_layer", "head"}
    if not need <= set(pairs.columns):
        raise ValueError(f"pairs need columns {sorted(need)}; got {list(pairs.columns)}")
    if (pairs.neuron_layer >= pairs.head_layer).any():
        raise ValueError("a pair's neuron must be in an earlier layer than its head")
    rows = TokenRows.of(rows)
    first = rows.n_ctx // 2 if first_pos is None else int(first_pos)
    pairs = pairs.reset_index(drop=True)
    nlayers = sorted(set(pairs.neuron_layer.astype(int)))
    hlayers = sorted(set(pairs.head_layer.astype(int)))
    names = [f"blocks.{l}.mlp.hook_post" for l in nlayers] + [f"blocks.{L}.hook_resid_pre" for L in hlayers]
    stream = ActivationStream({"m": model}, rows, names, batch_size, [], dict, desc="path ablation", verbose=verbose,
                              device=model.cfg.device)
    out = []
    for batch in stream:
        b, n = batch.ids.shape
        acts = {k: v.view(b, n, -1) for k, v in batch.acts["m"].items()}
        keep = valid_token_mask(batch.ids, drop_ids) & (batch.positions >= first)
        r_idx, p_idx = keep.nonzero(as_tuple=True)
        keep = keep.to(model.cfg.device)
        for L in hlayers:
            resid = acts[f"blocks.{L}.hook_resid_pre"]
            clean = head_run(model, L, resid, 0)
            for h in sorted(set(pairs.loc[pairs.head_layer == L, "head"].astype(int))):
                p0, n0 = head_effects(model, L, h, clean["pattern"], clean["z"])
                sel = pairs[(pairs.head_layer == L) & (pairs["head"] == h)]
                for pid, pr in sel.iterrows():
                    l, i = int(pr.neuron_layer), int(pr.neuron)
                    a = acts[f"blocks.{l}.mlp.hook_post"][..., i]  # [b, pos]
                    delta = neuron_write(model, l, acts[f"blocks.{l}.mlp.hook_post"], i)
                    abl = head_run(model, L, resid, h, delta)
                    p1, n1 = head_effects(model, L, h, abl["pattern"], abl["z"])
                    pc, pa, nc, na = (t[keep].float().cpu() for t in (p0, p1, n0, n1))
                    out.append(pd.DataFrame({
                        "pair": pid, "row": (batch.rows.start + r_idx).numpy(), "pos": p_idx.numpy(),
                        "act": a[keep].float().cpu().numpy(), "p_bos": pc.numpy(), "p_bos_ablated": pa.numpy(),
                        "norm": nc.numpy(), "norm_ablated": na.numpy()}))
    rec = pd.concat(out, ignore_index=True) if out else pd.DataFrame(
        columns=["pair", "row", "pos", "act", "p_bos", "p_bos_ablated", "norm", "norm_ablated"])
    rec["d_bos"] = (rec.p_bos_ablated - rec.p_bos).astype(np.float32)
    rec["d_norm_pct"] = (100 * (rec.norm_ablated - rec.norm) / rec.norm.clip(lower=1e-12)).astype(np.float32)
    return rec.sort_values(["pair", "row", "pos"], ignore_index=True)


def fit_line(x: np.ndarray, y: np.ndarray) -> dict:
    """Least-squares line y = slope·x + intercept and Pearson r over all points."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return {"slope": float("nan"), "intercept": float("nan"), "r": float("nan"), "n": len(x)}
    slope, intercept = np.polyfit(x, y, 1)
    return {"slope": float(slope), "intercept": float(intercept), "r": float(np.corrcoef(x, y)[0, 1]), "n": len(x)}


def pair_summary(pairs: pd.DataFrame, records: pd.DataFrame) -> pd.DataFrame:
    """Per pair: its score, the mean activation, the mean BOS-attention contribution of the neuron
    (`effect_bos` = mean of clean - ablated: it has the sign of h_n when the neuron fires with its
    typical sign s_n), the mean % norm change on ablation, and fitted lines of d_bos and d_norm_pct
    against the activation over ALL sampled tokens (slope, r). `predicted` = (w_out score) x (mean
    activation): `score_raw` where the pairs have it (the sign of the activation is in the mean
    activation itself), else `score`."""
    out = []
    for pid, g in records.groupby("pair"):
        fb, fn = fit_line(g.act, g.d_bos), fit_line(g.act, g.d_norm_pct)
        out.append({"pair": pid, "n_tokens": len(g), "mean_act": float(g.act.mean()), "effect_bos": float(-g.d_bos.mean()),
                    "mean_d_norm_pct": float(g.d_norm_pct.mean()), "slope_bos": fb["slope"], "r_bos": fb["r"],
                    "slope_norm": fn["slope"], "r_norm": fn["r"], "mean_p_bos": float(g.p_bos.mean())})
    summ = pd.DataFrame(out)
    res = pairs.reset_index(drop=True).rename_axis("pair").reset_index().merge(summ, on="pair", how="left")
    res["predicted"] = (res.score_raw if "score_raw" in res.columns else res.score) * res.mean_act
    return res


def rank_correlation(x: np.ndarray, y: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Spearman correlation of x and y with a percentile bootstrap interval (resampling the pairs,
    the unit of inference)."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 4:
        return {"rho": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": int(len(x))}
    rho = float(spearmanr(x, y).statistic)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        i = rng.integers(0, len(x), len(x))
        if np.ptp(x[i]) > 0 and np.ptp(y[i]) > 0:
            boots.append(spearmanr(x[i], y[i]).statistic)
    a = (1 - level) / 2
    return {"rho": rho, "lo": float(np.nanquantile(boots, a)), "hi": float(np.nanquantile(boots, 1 - a)), "n": int(len(x))}


# --------------------------------------------------------------------------------------------
# One cached run per model
# --------------------------------------------------------------------------------------------


def score_histogram(score: torch.Tensor, baseline: torch.Tensor, bins: int = 120) -> pd.DataFrame:
    """Fig 8a's counts: shared bins over the valid entries of both; columns left, right, center,
    neurons (count of real pairs), random (count of baseline pairs)."""
    s, r = score[~torch.isnan(score)].numpy(), baseline[~torch.isnan(baseline)].numpy()
    lo, hi = float(min(s.min(), r.min())), float(max(s.max(), r.max()))
    edges = np.linspace(lo, hi, bins + 1)
    return pd.DataFrame({"left": edges[:-1], "right": edges[1:], "center": (edges[:-1] + edges[1:]) / 2,
                         "neurons": np.histogram(s, edges)[0], "random": np.histogram(r, edges)[0]})


def tail_summary(score: torch.Tensor, baseline: torch.Tensor) -> dict:
    s, r = score[~torch.isnan(score)].double(), baseline[~torch.isnan(baseline)].double()
    bmax = float(r.abs().max())
    return {"n_pairs": int(s.numel()), "min": float(s.min()), "max": float(s.max()), "std": float(s.std()),
            "baseline_min": float(r.min()), "baseline_max": float(r.max()), "baseline_std": float(r.std()),
            "share_beyond_baseline": float((s.abs() > bmax).double().mean()),
            "q999_ratio": float(s.abs().quantile(0.999) / r.abs().quantile(0.999))}


def attention_deactivation(family, member: str, rows: TokenRows, artifacts_dir: str | Path, n_top: int = 20,
                           n_random: int = 40, seed: int = 0, batch_size: int = 8, bos_rows: int | None = None,
                           head_layers: Sequence[int] | None = None, verbose: bool = False, model=None,
                           signs: torch.Tensor | None = None, bos_source: TokenRows | None = None,
                           bos_ctx: int | None = None) -> Result:
    """The chapter's measurements on one model, cached under `<artifacts>/attention/` keyed by the
    weights, the rows, the pair selection and this code's version.

    Scores for all pairs (positions averaged: the measured half of the row), their Fig 8a histogram
    and tail summary, the BOS value norms (on the first `bos_ctx` tokens of the first `bos_rows` rows of `bos_source`, default
    `rows`; all of them without `bos_rows`, an error where it has fewer), the path
    ablation of `select_pairs(n_top, n_random)` with per-token records and per-pair summaries.
    Returns the Result (tables "pairs", "records", "bos", "hist", "top_scores"; meta has "tails").
    `model`: the member already loaded (it is loaded only when the result is not cached otherwise).
    `signs` [n_layers, d_mlp]: each neuron's s_n (`heuristic_scores`; None: +1 for all)."""
    rows = TokenRows.of(rows)
    source = rows if bos_source is None else TokenRows.of(bos_source)
    if bos_rows is not None and bos_rows > len(source):
        raise ValueError(f"bos_rows={bos_rows}, but the BOS value norms' token rows hold {len(source)}: "
                         "pass more rows (bos_source) or fewer bos_rows")
    bos_sub = TokenRows(source.ids[:bos_rows, :bos_ctx]) if bos_rows or bos_ctx else source
    first = rows.n_ctx // 2
    positions = list(range(first, rows.n_ctx))
    ident = {"code_version": CODE_VERSION, "weights": family.identity[member], "rows_sha256": rows.sha256,
             "rows_shape": list(rows.ids.shape), "n_top": int(n_top), "n_random": int(n_random), "seed": int(seed),
             "bos_rows_sha256": bos_sub.sha256, "bos_rows_shape": list(bos_sub.ids.shape),
             "drop_ids": sorted(family.codec.drop_ids), "bos_id": int(family.codec.bos_id),
             "head_layers": None if head_layers is None else list(head_layers), "first_pos": first,
             "signs": _signs_key(signs)}

    def compute(folder: Path) -> dict:
        m = model if model is not None else family.load(member)
        sc = heuristic_scores(m, family.codec.bos_id, positions, seed, head_layers=head_layers, signs=signs)
        table = score_table(sc["score"], sc["raw"])
        atomic_write_parquet(score_histogram(sc["score"], sc["baseline"]), folder / "hist.parquet")
        k = min(200, len(table) // 2)
        top = pd.concat([table.nlargest(k, "score"), table.nsmallest(k, "score")], ignore_index=True)
        atomic_write_parquet(top, folder / "top_scores.parquet")
        bos = bos_value_norms(m, bos_sub, family.codec.bos_id, family.codec.drop_ids, batch_size, verbose)
        atomic_write_parquet(bos, folder / "bos.parquet")
        pairs = select_pairs(table, n_top, n_random, seed)
        rec = path_ablation(m, rows, pairs, family.codec.drop_ids, batch_size, first, verbose)
        atomic_write_parquet(rec, folder / "records.parquet")
        atomic_write_parquet(pair_summary(pairs, rec), folder / "pairs.parquet")
        per_member = {"score_quantiles": {str(q): float(table.score.quantile(q)) for q in (0.0001, 0.001, 0.01, 0.5, 0.99, 0.999, 0.9999)}}
        return {"tails": tail_summary(sc["score"], sc["baseline"]), "sign": SIGN, "member": member, "n_rows": len(rows),
                "first_pos": first, **per_member}

    return cached_result("attention", ident, compute, root=artifacts_dir, prefix=f"{family.name}-{member}")


def _signs_key(signs) -> str | None:
    """A cache key for a sign tensor: None for all +1 (or None), else the hash of the -1 positions."""
    if signs is None:
        return None
    neg = (torch.as_tensor(signs) < 0).nonzero().tolist()
    return config_hash(neg, 16) if neg else None


def score_only(family, member: str, rows_n_ctx: int, artifacts_dir: str | Path, seed: int = 0,
               signs: torch.Tensor | None = None) -> Result:
    """Scores of one member without the ablation (for the seed comparison), cached under
    `<artifacts>/attention_scores/`: the result's table `scores` (every pair's score) and its
    `meta["tails"]` (the tail summary). Positions averaged as in `attention_deactivation`; `signs`
    as there."""
    first = rows_n_ctx // 2
    ident = {"code_version": CODE_VERSION, "weights": family.identity[member], "seed": int(seed), "n_ctx": int(rows_n_ctx),
             "bos_id": int(family.codec.bos_id), "signs": _signs_key(signs)}

    def compute(folder: Path) -> dict:
        model = family.load(member)
        sc = heuristic_scores(model, family.codec.bos_id, list(range(first, rows_n_ctx)), seed, signs=signs)
        table = score_table(sc["score"], sc["raw"])
        atomic_write_parquet(table, folder / "scores.parquet")
        return {"tails": tail_summary(sc["score"], sc["baseline"])}

    return cached_result("attention_scores", ident, compute, root=artifacts_dir, prefix=f"{family.name}-{member}")


@torch.no_grad()
def head_patterns(model, tokens: torch.Tensor, neuron_layer: int, neuron: int, head_layer: int, head: int,
                  end: int | None = None, window: int | None = None) -> dict:
    """One row's attention pattern of `head` clean and with the path ablation of the neuron (for
    the circuitsvis view): {"clean", "ablated": [n, n], "act": [n], "positions": [n]}.

    The row `tokens` [pos] is run up to `end` (default its end). With `window`, only the BOS
    column/row and the last `window` query and key positions up to `end` are kept (a sub-block
    of the pattern: its rows need not sum to 1); `positions` says which positions they are."""
    tokens = tokens.reshape(1, -1)[:, : (tokens.numel() if end is None else int(end) + 1)].to(model.cfg.device)
    post, pre = f"blocks.{neuron_layer}.mlp.hook_post", f"blocks.{head_layer}.hook_resid_pre"
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in (post, pre), stop_at_layer=head_layer + 1,
                                    return_type=None)
    a = cache[post][..., neuron]
    delta = neuron_write(model, neuron_layer, cache[post], neuron)
    clean = head_run(model, head_layer, cache[pre], head, None, ("pattern",))["pattern"][0, head]
    abl = head_run(model, head_layer, cache[pre], head, delta, ("pattern",))["pattern"][0, head]
    n = tokens.shape[1]
    keep = torch.arange(n) if window is None or window + 1 >= n else torch.cat([torch.zeros(1, dtype=torch.long),
                                                                               torch.arange(n - window, n)])
    sub = lambda p: p.cpu()[keep][:, keep]  # noqa: E731
    return {"clean": sub(clean), "ablated": sub(abl), "act": a[0].cpu()[keep], "positions": keep}


# --------------------------------------------------------------------------------------------
# Seeds: do the strongest pairs recur?
# --------------------------------------------------------------------------------------------


def neuron_best(table: pd.DataFrame) -> pd.DataFrame:
    """Per neuron, its strongest pair: `best` (the score of largest |h_n| over the later heads),
    `abs_best`, and that head. Neuron indices are not aligned across seeds, so seeds are compared
    through these per-neuron values."""
    t = table.assign(abs_score=table.score.abs())
    i = t.groupby(["neuron_layer", "neuron"]).abs_score.idxmax()
    out = t.loc[i, ["neuron_layer", "neuron", "head_layer", "head", "score", "abs_score"]]
    return out.rename(columns={"score": "best", "abs_score": "abs_best"}).reset_index(drop=True)


BROWSER_COLUMNS = {"best": "attention score h_n (strongest later head)", "head_name": "that head"}


def browser_rows(top_scores: pd.DataFrame) -> pd.DataFrame:
    """The neurons of a model's strongest (neuron, head) pairs as the neuron browser lists them
    (`report.publish_neurons` with `BROWSER_COLUMNS`): `neuron_best` with `layer` and a `head_name`."""
    return (neuron_best(top_scores).rename(columns={"neuron_layer": "layer"})
            .assign(head_name=lambda t: [f"L{l}.H{h}" for l, h in zip(t.head_layer, t["head"])]))


def matched_recurrence(ref: pd.DataFrame, others: dict[str, pd.DataFrame], corr: pd.DataFrame, k: int = 20) -> pd.DataFrame:
    """For the `k` neurons of the reference with the largest |h_n| (`neuron_best` tables), the
    neuron each other member matches it with in chapter 01's correlation table (`corr`: columns
    layer, neuron, max_corr_<m>, match_layer_<m>, match_neuron_<m>), and where that neuron's own
    |h_n| stands among its member's neurons (`percentile`, 0-100; 50 is what chance gives) and
    whether its strongest score has the same sign. One row per (reference neuron, member)."""
    top = ref.nlargest(k, "abs_best")
    c = corr.set_index(["layer", "neuron"])
    out = []
    for m, o in others.items():
        if f"match_neuron_{m}" not in c.columns:
            continue
        oi = o.set_index(["neuron_layer", "neuron"])
        pct = oi.abs_best.rank(pct=True) * 100
        for _, r in top.iterrows():
            key = (int(r.neuron_layer), int(r.neuron))
            if key not in c.index:
                continue
            ml, mn = int(c.loc[key, f"match_layer_{m}"]), int(c.loc[key, f"match_neuron_{m}"])
            hit = (ml, mn) in oi.index
            out.append({"neuron_layer": key[0], "neuron": key[1], "best": r.best, "member": m,
                        "max_corr": float(c.loc[key, f"max_corr_{m}"]), "match": f"L{ml}.{mn}",
                        "match_best": float(oi.loc[(ml, mn), "best"]) if hit else float("nan"),
                        "percentile": float(pct.loc[(ml, mn)]) if hit else float("nan"),
                        "same_sign": bool(np.sign(oi.loc[(ml, mn), "best"]) == np.sign(r.best)) if hit else None})
    return pd.DataFrame(out)


def convergence(pairs: pd.DataFrame, records: pd.DataFrame, fractions: Sequence[float] = (0.25, 0.5, 1.0), seed: int = 0) -> pd.DataFrame:
    """How the heuristic-vs-effect rank correlation moves with the number of rows: the per-pair
    summaries recomputed on the first `fraction` of the ablated rows (`pairs`: the columns of
    `select_pairs`; `records`: `path_ablation`'s). Columns fraction, rows, tokens_per_pair, rho, lo, hi."""
    rows_all = np.sort(records.row.unique())
    out = []
    for f in fractions:
        keep = rows_all[: max(1, int(round(f * len(rows_all))))]
        rec = records[records.row.isin(keep)]
        cols = ["neuron_layer", "neuron", "head_layer", "head", "score", *(["score_raw"] if "score_raw" in pairs else []), "why"]
        s = pair_summary(pairs[cols], rec)
        rc = rank_correlation(s.predicted, s.effect_bos, seed=seed, n_boot=500)
        out.append({"fraction": f, "rows": len(keep), "tokens_per_pair": int(s.n_tokens.iloc[0]), **rc})
    return pd.DataFrame(out)
