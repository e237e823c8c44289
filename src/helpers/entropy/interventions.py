"""Fixed-activation interventions on single neurons (paper §5.2, Figs 7c-f, 25, 1f), with the total
effect separated from the direct one (Stolfo et al. 2024, "Confidence regulation neurons").

A neuron's post-activation (`blocks.{l}.mlp.hook_post`) is set to one value at every position of a
token set, and the next-token distribution is measured token by token:

- the final normalisation's scale (`ln_final.hook_scale`: the LayerNorm standard deviation of
  GPT-2-style models, the root-mean-square of RMSNorm models such as SmolLM2; after weight
  processing the normalisation weights are folded into W_U, so this scale is all that is left of it);
- the entropy of softmax(logits), in nats;
- the loss (cross-entropy of the true next token), in nats;
- the reciprocal rank of the true next token (1 when it is the top prediction);
- whether the top-1 token is the same as in the unintervened run;
- any extra metric of the next-token log-probabilities the caller names (`extra_metrics`), such as
  the KL divergence from the unigram distribution (`helpers.entropy.frequency`).

Two ways: the **total** effect (everything downstream of the neuron recomputed) and the **direct**
effect, where the final scale is frozen at its unintervened value, token by token. The difference is
the part of the effect that goes through the final normalisation: an entropy neuron acts almost
entirely through it, since its output lies in the unembedding's (near) null space.

Cost. One intervened run repeats the batch once per (neuron, value) "replica", so several neurons and
grid values share one forward pass. The runs start at the first intervened layer, from the
unintervened residual stream cached there (`blocks.{L}.hook_resid_pre`): intervening in the last
layers of a 30-layer model costs a few blocks plus the unembedding, not a whole forward pass. The
token rows are batched as `activations.ActivationStream` batches them (the same valid-token mask), and
the activation ranges that scale the grid come from the stream itself.

Precision: metrics per token are computed in fp32 from fp32 logits and summed per row in fp64; the
table keeps per-row sums so means, halves and row-level statistics are exact to fp64.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from helpers.core import paper
from helpers.streaming.activations import ActivationStream
from helpers.core.cache import Result, atomic_write_parquet, cached_result
from helpers.data.tokens import TokenRows, valid_token_mask
from helpers.streaming.accumulators import SignedLogHistogram

SCALE_HOOK = "ln_final.hook_scale"
METRICS = ("scale", "entropy", "loss", "rr", "top1_same")
MODES = ("total", "direct")
# The columns of a sweep table that are not metrics (`metric_columns`).
ID_COLUMNS = ("row", "layer", "neuron", "role", "mode", "grid", "value", "n")
# An extra metric: log-probabilities [N, pos-1, d_vocab] -> one value per token [N, pos-1].
MetricFn = Callable[[torch.Tensor], torch.Tensor]
VERSION = 1


def paper_grid() -> np.ndarray:
    """The paper's fixed activations for GELU neurons (−0.17, 0, 1, ..., 6), from the registry."""
    return np.asarray(paper.value("entropy_grid", paper.MEDIUM), dtype=np.float64)


def scaled_grid(max_activation: float, grid: Sequence[float] | None = None) -> np.ndarray:
    """The paper's grid scaled to a neuron's observed range: every value times `max_activation /
    max(grid)`, so the grid's top (6) is the largest activation the neuron reached on the token set
    and its bottom keeps the paper's ratio to it (−0.17/6 of it; for GELU neurons −0.17 is the
    activation function's minimum on the paper's scale). Returns [len(grid)] float64."""
    g = paper_grid() if grid is None else np.asarray(grid, dtype=np.float64)
    if not np.isfinite(max_activation) or max_activation <= 0:
        raise ValueError(f"cannot scale the grid to a neuron whose largest activation is {max_activation!r} (needs > 0)")
    return g * (float(max_activation) / g.max())


def check_final_scale(model) -> str:
    """The hook that gives the final normalisation's scale (`ln_final.hook_scale`), checked to exist
    on `model`; a model without a final normalisation (or with one TransformerLens folds away) is an
    error that says so."""
    if SCALE_HOOK not in model.hook_dict:
        raise ValueError(f"{type(model).__name__} has no {SCALE_HOOK!r} (normalization_type="
                         f"{model.cfg.normalization_type!r}): the final-scale intervention needs a LayerNorm/RMSNorm "
                         "before the unembedding")
    return SCALE_HOOK


# ---------------------------------------------------------------------------------- one batch
@torch.no_grad()
def intervened_logits(model, tokens: torch.Tensor, specs: Sequence[tuple[int, int, float | torch.Tensor]],
                      frozen_scale: torch.Tensor | None = None, start_layer: int = 0,
                      start_resid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and final scales of `tokens` [batch, pos] with one neuron fixed per replica.

    `specs` [(layer, neuron, value)]: replica r sets `blocks.{layer}.mlp.hook_post[..., neuron]` to
    `value` (a float, or a [batch, pos] tensor of per-token values) at every position; a spec whose
    layer is None leaves the model alone (an unintervened replica). The replicas are stacked
    replica-major: rows `r*batch ... (r+1)*batch - 1` of the outputs belong to spec r.
    `frozen_scale` [batch, pos, 1]: if given, `ln_final.hook_scale` is replaced by it in every
    replica (the direct effect). `start_resid` [batch, pos, d_model]: the unintervened
    `blocks.{start_layer}.hook_resid_pre`; the run then starts at `start_layer` (every intervened
    layer must be >= it). Returns (logits [R*batch, pos, d_vocab] fp32, scale [R*batch, pos, 1])."""
    R, B = len(specs), tokens.shape[0]
    if R == 0:
        raise ValueError("no intervention specs given")
    by_layer: dict[int, list[tuple[int, int, float | torch.Tensor]]] = {}
    for r, (layer, neuron, value) in enumerate(specs):
        if layer is None:
            continue
        if not 0 <= layer < model.cfg.n_layers or not 0 <= neuron < model.cfg.d_mlp:
            raise ValueError(f"neuron L{layer}.{neuron} is not in a model of {model.cfg.n_layers} layers x {model.cfg.d_mlp}")
        if start_resid is not None and layer < start_layer:
            raise ValueError(f"L{layer}.{neuron} lies before the start layer {start_layer}")
        by_layer.setdefault(layer, []).append((r, neuron, value))

    def fix(act, hook, items):
        for r, neuron, value in items:
            v = value.to(act.device, act.dtype) if isinstance(value, torch.Tensor) else value
            act[r * B:(r + 1) * B, :, neuron] = v
        return act

    scale_name = check_final_scale(model)
    seen = {}

    def scale_hook(scale, hook):
        if frozen_scale is not None:
            scale = frozen_scale.to(scale.device, scale.dtype).repeat(R, 1, 1)
        seen["scale"] = scale
        return scale

    hooks = [(f"blocks.{l}.mlp.hook_post", lambda a, hook, items=items: fix(a, hook, items)) for l, items in by_layer.items()]
    hooks.append((scale_name, scale_hook))
    if start_resid is not None:
        x = start_resid.to(model.cfg.device).repeat(R, 1, 1)
        logits = model.run_with_hooks(x, start_at_layer=start_layer, fwd_hooks=hooks)
    else:
        logits = model.run_with_hooks(tokens.to(model.cfg.device).repeat(R, 1), fwd_hooks=hooks)
    return logits.float(), seen["scale"]


# ------------------------------------------------------------------ the last layer, without its unembedding
# A neuron of the last layer reaches the logits through nothing but its layer's output norm (if any),
# the final norm and W_U. Fixing it changes the residual stream at a token by a multiple of one
# vector, so every replica's logits are a per-token combination of three rows computed once per batch:
#
#   x'      = resid_mid + c * (e1 + d * e2)       d = value - a (a: its activation), e1 = g2 * m,
#                                                  e2 = g2 * w_out[n], c = 1 / s2(m + d w_out[n])
#   logits' = const + (A + c * B1 + c * d * r) / s_f(x')
#
# with m the MLP's output before its norm (post @ W_out + b_out), g2 and s2 that norm's weight and
# RMS (Gemma's `ln2_post`; without one g2 = 1 and c = 1), A = resid_mid @ U, B1 = e1 @ U,
# r = e2 @ U, U = diag(g_f) W_U (centred over d_model under a LayerNorm), const = b_U (+ b_f @ W_U)
# and s_f the final norm's scale (held at its unintervened value for the direct effect). Exact up to
# float32 rounding; it saves a [tokens, d_model] x [d_model, d_vocab] product per replica, most of
# an intervened pass when the vocabulary is large (262,144 tokens for Gemma 3).
LAST_LAYER_PER_CALL = 64  # replicas per shortcut call (they cost no logits memory: see `_LastLayerLogits`)


def last_layer_shortcut_applies(model) -> bool:
    """Whether `_last_layer_logits` is exact for `model`: a final LayerNorm/RMSNorm before the
    unembedding, a block whose MLP output is added to the residual stream after at most an RMSNorm
    (no parallel attention and MLP, no post-norm block)."""
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    from helpers.models.effective import post_mlp_norm

    cfg = model.cfg
    if cfg.normalization_type not in ("LN", "LNPre", "RMS", "RMSPre") or cfg.attn_only or cfg.parallel_attn_mlp:
        return False
    if cfg.original_architecture in POST_NORM_ARCHITECTURES:
        return False
    norm = post_mlp_norm(model, cfg.n_layers - 1)
    return norm is None or "LayerNorm" not in type(norm).__name__


def _final_scale(model, x: torch.Tensor) -> torch.Tensor:
    """The final norm's scale of residual vectors `x` [..., d_model] -> [...] (what
    `ln_final.hook_scale` records)."""
    if model.cfg.normalization_type in ("LN", "LNPre"):
        x = x - x.mean(-1, keepdim=True)
    return (x.pow(2).mean(-1) + model.ln_final.eps).sqrt()


class _LastLayerLogits:
    """The logits of R replicas of a batch of B rows, [R*B, pos, d_vocab], made a block of positions
    at a time when indexed as `logits[n, p0:p1]` (the only indexing `token_metrics` does), so no
    [R*B, pos, d_vocab] tensor is ever held."""

    def __init__(self, A, B1, c, k, r, inv_s, const, softcap):
        self.A, self.B1, self.c, self.k, self.r, self.inv_s, self.const, self.softcap = A, B1, c, k, r, inv_s, const, softcap
        self.B = A.shape[0]
        self.shape = (c.shape[0] * self.B, *A.shape[1:])
        self.device = A.device

    def __getitem__(self, idx):
        n, pos = idx
        j, i = divmod(int(n), self.B)
        x = torch.addcmul(self.A[i, pos], self.c[j, i, pos, None], self.B1[i, pos])
        x.addcmul_(self.k[j, i, pos, None], self.r[j])
        x.mul_(self.inv_s[j, i, pos, None]).add_(self.const)
        if self.softcap:
            x = self.softcap * torch.tanh(x / self.softcap)
        return x


def _final_unembed(model) -> tuple[torch.Tensor, torch.Tensor]:
    """(U [d_model, d_vocab], const [d_vocab]) with logits = const + (x @ U) / s_f(x) for a residual
    vector x: U the effective unembedding (`effective.effective_unembed`: the final norm's weight
    multiplied in), centred over d_model under a LayerNorm (the norm removes x's mean, so x @ U must
    not see it), and const = b_U plus the final norm's bias through W_U where it has one."""
    from helpers.models.effective import effective_unembed

    u = effective_unembed(model)
    if model.cfg.normalization_type in ("LN", "LNPre"):
        u = u - u.mean(0, keepdim=True)
    const = model.b_U.detach().float()
    b_f = getattr(model.ln_final, "b", None)
    if b_f is not None:
        const = const + b_f.detach().float() @ model.W_U.detach().float()
    return u, const


class _LastLayerBatch:
    """What `_last_layer_logits` needs of one batch's unintervened run: built from its cache (the last
    block's `hook_resid_mid` and `mlp.hook_post`) and `_final_unembed` (computed once per sweep), with
    the two [B, pos, d_vocab] logit rows A and B1."""

    def __init__(self, model, cache, unembed: tuple[torch.Tensor, torch.Tensor]):
        from helpers.models import effective
        from helpers.models.loading import neuron_weights

        L = model.cfg.n_layers - 1
        self.model = model
        self.resid_mid = cache[f"blocks.{L}.hook_resid_mid"].float()
        self.post = cache[f"blocks.{L}.mlp.hook_post"].float()
        self.w_out = neuron_weights(model, L).w_out.float()
        self.m = m = self.post @ self.w_out + model.blocks[L].mlp.b_out.float()  # the MLP's output before its norm
        norm = effective.post_mlp_norm(model, L)
        self.eps2 = None if norm is None else norm.eps
        g2 = effective._norm_weight(norm)
        self.g2 = None if g2 is None else g2.float()
        self.e1 = e1 = m if self.g2 is None else m * self.g2
        self.U, self.const = unembed
        self.A = self.resid_mid @ self.U
        self.B1 = e1 @ self.U


@torch.no_grad()
def _last_layer_logits(batch: _LastLayerBatch, specs: Sequence[tuple[int, int, float | torch.Tensor]],
                       frozen_scale: torch.Tensor | None = None) -> tuple[_LastLayerLogits, torch.Tensor]:
    """`intervened_logits` for neurons of the last layer, without running the model: (logits
    [R*B, pos, d_vocab] as `_LastLayerLogits`, final scales [R*B, pos, 1]). Same arguments as
    `intervened_logits` (every spec's layer is the last)."""
    model = batch.model
    cs, ks, rs, scales = [], [], [], []
    for layer, neuron, value in specs:
        if layer != model.cfg.n_layers - 1:
            raise ValueError(f"L{layer}.{neuron} is not in the last layer: the shortcut does not apply")
        a = batch.post[..., neuron]
        v = value.to(a) if isinstance(value, torch.Tensor) else torch.full_like(a, float(value))
        d = v - a  # [B, pos]
        w = batch.w_out[neuron]
        if batch.g2 is None:
            c = torch.ones_like(d)
            e2 = w
        else:
            m2 = batch.m + d[..., None] * w
            c = 1.0 / (m2.pow(2).mean(-1) + batch.eps2).sqrt()
            e2 = batch.g2 * w
        if frozen_scale is None:
            x = batch.resid_mid + c[..., None] * (batch.e1 + d[..., None] * e2)
            s = _final_scale(model, x)
        else:
            s = frozen_scale[..., 0].to(d)
        cs.append(c)
        ks.append(c * d)
        rs.append(e2 @ batch.U)
        scales.append(s)
    c, k, s = torch.stack(cs), torch.stack(ks), torch.stack(scales)  # [R, B, pos]
    cap = float(model.cfg.output_logits_soft_cap or 0.0)  # TransformerLens: <= 0 means none
    logits = _LastLayerLogits(batch.A, batch.B1, c, k, torch.stack(rs), 1.0 / s, batch.const, max(cap, 0.0))
    return logits, s.reshape(-1, s.shape[-1], 1)


@torch.no_grad()
def token_metrics(logits: torch.Tensor, tokens: torch.Tensor, nominal_top1: torch.Tensor | None = None,
                  extra: Mapping[str, MetricFn] | None = None, chunk: int | None = None) -> dict[str, torch.Tensor]:
    """Per-token metrics of the next-token predictions: `logits` [N, pos, d_vocab], `tokens` [N, pos]
    (the true next token of position p is tokens[:, p+1]). Returns {name: [N, pos-1]}: `entropy`
    and `loss` in nats, `rr` the reciprocal rank of the true next token (ties counted in its
    favour), `top1` the argmax token, and `top1_same` (1.0 where it equals `nominal_top1`).
    `extra` {name: fn}: fn(log-probabilities [1, n, d_vocab] fp32) -> [1, n], one more metric each
    (a per-token function: it is called on `chunk` positions at a time).

    The positions are processed `chunk` at a time (default: about 2M logits, at least 8 positions),
    so each intermediate [chunk, d_vocab] tensor stays in the CPU cache: with a 262,144-token
    vocabulary this is several times faster than whole-batch tensors (`benchmarks/token_metrics.py`),
    and a small vocabulary takes whole rows at once. `logits` may also be any object with `shape`,
    `device` and indexing `logits[n, p0:p1]` (`_LastLayerLogits`). Entropy uses H = log S - sum(e z) / S with
    z = logits - max, e = exp(z), S = sum(e)."""
    target = tokens[:, 1:].to(logits.device)
    N, P = target.shape
    dev = logits.device
    chunk = chunk or max(8, (1 << 21) // int(logits.shape[-1]))
    ent, loss, rr = (torch.empty(N, P, device=dev) for _ in range(3))
    top1 = torch.empty(N, P, dtype=torch.long, device=dev)
    ex = {k: torch.empty(N, P, device=dev) for k in (extra or {})}
    for n in range(N):
        for p0 in range(0, P, chunk):
            p1 = min(p0 + chunk, P)
            x = logits[n, p0:p1].float()
            t = target[n, p0:p1, None]
            m, top1[n, p0:p1] = x.max(-1)
            true = x.gather(-1, t)
            rr[n, p0:p1] = 1.0 / ((x > true).sum(-1) + 1).float()
            z = x - m[:, None]
            e = z.exp()
            s = e.sum(-1)
            log_s = s.log()
            ent[n, p0:p1] = log_s - (e * z).sum(-1) / s
            loss[n, p0:p1] = log_s - (true[:, 0] - m)
            if ex:
                logp = (z - log_s[:, None])[None]
                for k, fn in extra.items():
                    ex[k][n, p0:p1] = fn(logp)[0]
    out = {"entropy": ent, "loss": loss, "rr": rr, "top1": top1}
    if nominal_top1 is not None:
        out["top1_same"] = (top1 == nominal_top1.to(dev)).float()
    out.update(ex)
    return out


# ---------------------------------------------------------------------------------- the sweep
@dataclass
class Target:
    """One neuron to intervene on, its grid and its role (e.g. "entropy", "anti-entropy", "random")."""

    layer: int
    neuron: int
    values: np.ndarray  # [n_grid] activations to fix
    grid: np.ndarray  # [n_grid] the same values in the paper's units (the unscaled grid)
    role: str = ""
    modes: tuple[str, ...] = MODES

    def key(self) -> dict:
        return {"layer": int(self.layer), "neuron": int(self.neuron), "role": self.role, "modes": list(self.modes),
                "values": [round(float(v), 7) for v in self.values], "grid": [round(float(g), 7) for g in self.grid]}


RANGE_QUANTILES = (0.005, 0.995)  # the low and high quantiles of a neuron's activation that its grid spans


def activation_ranges(model, rows: TokenRows, layers: Sequence[int], drop_ids: Sequence[int], batch_size: int = 8,
                      verbose: bool = False, quantiles: tuple[float, float] = RANGE_QUANTILES) -> pd.DataFrame:
    """Min, max, mean, low and high quantiles and the natural sign of the post-activation of every
    neuron of `layers` over the valid tokens of `rows`, from one `ActivationStream` pass.

    Returns one row per neuron (`layer`, `neuron`, `act_min`, `act_max`, `act_mean`, `act_q_lo`,
    `act_q_hi` (the `quantiles`, from a histogram with 8 bins per factor 2: within 9% of the exact
    ones), `act_top_mean` the mean over the top 1% of |activation| and `act_sign` its sign
    (`neuron_stats.SIGN_RULE`: the direction the neuron naturally moves in when it acts))."""
    layers = sorted({int(l) for l in layers})
    names = [f"blocks.{l}.mlp.hook_post" for l in layers]
    lo = {l: None for l in layers}
    hi, tot, n = dict(lo), dict(lo), 0
    hist = {l: SignedLogHistogram(model.cfg.d_mlp, bins_per_octave=8) for l in layers}
    stream = ActivationStream({"m": model}, rows, names, batch_size, drop_ids, dict, desc="activation ranges", verbose=verbose)
    for batch in stream:
        for l, name in zip(layers, names):
            a = batch.acts["m"][name].double()
            lo[l] = a.min(0).values if lo[l] is None else torch.minimum(lo[l], a.min(0).values)
            hi[l] = a.max(0).values if hi[l] is None else torch.maximum(hi[l], a.max(0).values)
            tot[l] = a.sum(0) if tot[l] is None else tot[l] + a.sum(0)
            hist[l].update(a.cpu())
        n += batch.n_tokens
    if n == 0:
        raise ValueError("no valid tokens in the rows")
    d = model.cfg.d_mlp

    def cat(fn):
        return torch.cat([fn(hist[l]) for l in layers]).cpu().numpy()

    out = pd.DataFrame({"layer": np.repeat(layers, d), "neuron": np.tile(np.arange(d), len(layers)),
                        "act_min": torch.cat([lo[l] for l in layers]).cpu().numpy(),
                        "act_max": torch.cat([hi[l] for l in layers]).cpu().numpy(),
                        "act_mean": (torch.cat([tot[l] for l in layers]) / n).cpu().numpy(),
                        "act_q_lo": cat(lambda h: h.quantile(quantiles[0])), "act_q_hi": cat(lambda h: h.quantile(quantiles[1])),
                        "act_top_mean": cat(lambda h: h.top_mean()), "act_sign": cat(lambda h: h.large_sign())})
    # a bin's mean can stray past the observed extremes by rounding only; keep the quantiles inside them
    out["act_q_lo"] = out.act_q_lo.clip(out.act_min, out.act_max)
    out["act_q_hi"] = out.act_q_hi.clip(out.act_min, out.act_max)
    return out


def _sums(metrics: dict[str, torch.Tensor], scale: torch.Tensor, mask: torch.Tensor, R: int, B: int,
          extra: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Per-(replica, row) sums over the valid tokens: {metric: [R, B]} float64, with `n`."""
    m = mask.to(scale.device).repeat(R, 1).double()
    vals = {"scale": scale[:, :-1, 0].double(),
            **{k: metrics[k].double() for k in ("entropy", "loss", "rr", "top1_same", *extra)}}
    out = {k: (v * m).sum(1).view(R, B).cpu().numpy() for k, v in vals.items()}
    out["n"] = m.sum(1).view(R, B).cpu().numpy()
    return out


@torch.no_grad()
def intervention_sweep(model, rows: TokenRows | torch.Tensor, targets: Sequence[Target], drop_ids: Sequence[int],
                       batch_size: int = 4, max_logit_elems: int = 1 << 26, verbose: bool = True,
                       extra_metrics: Mapping[str, MetricFn] | None = None, shortcut: bool = True) -> pd.DataFrame:
    """Fix each target neuron at each of its values over all `rows` and record the metrics (Figs 7c-f).

    `rows` [rows, n_ctx]; valid tokens are those `valid_token_mask(ids, drop_ids)` keeps, at every
    position but the last (which has no next token). Each batch of `batch_size` rows is run once
    unintervened (mode "nominal"), then with the (target, value, mode) replicas in chunks of at most
    `max_logit_elems` logits (fp32) per forward pass, deepest layer first, each pass starting at the
    first layer it intervenes on (from the cached unintervened residual stream). With `shortcut`
    (where `last_layer_shortcut_applies`), replicas of last-layer neurons skip the forward pass and
    the unembedding: their logits are combined from three rows per token (`_last_layer_logits`;
    exact up to float32 rounding, `shortcut=False` runs them through the model).

    Returns a long table with one row per (token row, target, mode, grid point): `row`, `layer`,
    `neuron`, `role`, `mode` ("nominal", "total", "direct"), `grid` (paper units; NaN for nominal),
    `value` (the fixed activation), `n` (valid tokens) and the per-row sums `scale`, `entropy`,
    `loss`, `rr`, `top1_same` (means are sums / n), and one column per `extra_metrics` name
    (`token_metrics`)."""
    rows = TokenRows.of(rows)
    extra = dict(extra_metrics or {})
    clash = set(extra) & (set(METRICS) | set(ID_COLUMNS) | {"top1"})
    if clash:
        raise ValueError(f"extra metrics {sorted(clash)} clash with the sweep's own columns")
    if not targets:
        raise ValueError("no targets")
    for t in targets:
        bad = set(t.modes) - set(MODES)
        if bad:
            raise ValueError(f"unknown modes {sorted(bad)}; use {MODES}")
    # Deepest layers first, so a forward pass holds replicas of one layer where it can and starts there.
    jobs = sorted(((t, m, j) for t in targets for m in t.modes for j in range(len(t.values))), key=lambda x: -int(x[0].layer))
    layers = sorted({int(t.layer) for t in targets})
    per_pass = max(1, max_logit_elems // (batch_size * rows.n_ctx * model.cfg.d_vocab))
    last = model.cfg.n_layers - 1
    fast = shortcut and last in layers and last_layer_shortcut_applies(model)
    quick = [x for x in jobs if fast and int(x[0].layer) == last]
    slow = [x for x in jobs if not (fast and int(x[0].layer) == last)]
    passes = [(True, quick[i:i + LAST_LAYER_PER_CALL]) for i in range(0, len(quick), LAST_LAYER_PER_CALL)]
    passes += [(False, slow[i:i + per_pass]) for i in range(0, len(slow), per_pass)]
    from tqdm.auto import tqdm

    out = []
    n_batches = (len(rows) + batch_size - 1) // batch_size
    bar = tqdm(total=n_batches * (1 + len(passes)), desc="interventions", unit="pass", disable=not verbose)
    scale_name = check_final_scale(model)
    resid_names = {f"blocks.{l}.hook_resid_pre" for l in layers}
    if quick:
        resid_names |= {f"blocks.{last}.hook_resid_mid", f"blocks.{last}.mlp.hook_post"}
        unembed = _final_unembed(model)
    for b0 in range(0, len(rows), batch_size):
        ids = rows.ids[b0:b0 + batch_size]
        B = ids.shape[0]
        mask = valid_token_mask(ids, drop_ids)[:, :-1]
        logits, cache = model.run_with_cache(ids.to(model.cfg.device), names_filter=lambda n: n == scale_name or n in resid_names)
        nominal_scale = cache[scale_name]
        nom = token_metrics(logits, ids, extra=extra)
        nom["top1_same"] = torch.ones_like(nom["entropy"])
        s = _sums(nom, nominal_scale, mask, 1, B, tuple(extra))
        for i in range(B):
            out.append({"row": b0 + i, "layer": -1, "neuron": -1, "role": "nominal", "mode": "nominal", "grid": np.nan,
                        "value": np.nan, **{k: float(v[0, i]) for k, v in s.items()}})
        bar.update(1)
        del logits
        rows_last = _LastLayerBatch(model, cache, unembed) if quick else None
        for is_quick, chunk in passes:
            for mode in MODES:  # one pass per mode: the frozen scale applies to the whole pass
                part = [(t, j) for t, m, j in chunk if m == mode]
                if not part:
                    continue
                specs = [(int(t.layer), int(t.neuron), float(t.values[j])) for t, j in part]
                frozen = nominal_scale if mode == "direct" else None
                if is_quick:
                    lg, sc = _last_layer_logits(rows_last, specs, frozen)
                else:
                    start = min(l for l, _, _ in specs)
                    lg, sc = intervened_logits(model, ids, specs, frozen, start, cache[f"blocks.{start}.hook_resid_pre"])
                met = token_metrics(lg, ids.repeat(len(specs), 1), nom["top1"].repeat(len(specs), 1), extra)
                s = _sums(met, sc, mask, len(specs), B, tuple(extra))
                for r, (t, j) in enumerate(part):
                    for i in range(B):
                        out.append({"row": b0 + i, "layer": int(t.layer), "neuron": int(t.neuron), "role": t.role, "mode": mode,
                                    "grid": float(t.grid[j]), "value": float(t.values[j]),
                                    **{k: float(v[r, i]) for k, v in s.items()}})
                del lg
            bar.update(1)
    bar.close()
    return pd.DataFrame(out)


def sweep_identity(model_id: str, rows: TokenRows, targets: Sequence[Target], drop_ids: Sequence[int],
                   extra: dict | None = None) -> dict:
    """What a sweep's result depends on; `extra` (the identity of the extra metrics: their names and
    what they are computed from) is added only when given, so sweeps without them keep their keys."""
    out = {"model": model_id, "rows": rows.sha256, "n_rows": len(rows), "n_ctx": rows.n_ctx,
           "drop_ids": sorted(int(d) for d in drop_ids), "targets": [t.key() for t in targets],
           "version": VERSION}
    return {**out, "extra": extra} if extra else out


def cached_sweep(model, model_id: str, rows: TokenRows, targets: Sequence[Target], drop_ids: Sequence[int],
                 artifacts_dir: str | Path, batch_size: int = 4, max_logit_elems: int = 1 << 26, verbose: bool = True,
                 prefix: str = "", extra_metrics: Mapping[str, MetricFn] | None = None,
                 extra_identity: dict | None = None) -> Result:
    """`intervention_sweep`, cached under `<artifacts>/entropy_intervention/` keyed by the model's content
    id, the rows' sha256, the targets (neurons, values, modes) and the dropped ids; with
    `extra_metrics`, also by `extra_identity` (required then: the metrics' names and the content
    they are computed from, e.g. the sha256 of a reference distribution). Returns the Result: its
    table `sweep`, and `meta` with the computing time (`seconds`) and the unintervened tokens."""
    rows = TokenRows.of(rows)
    if extra_metrics and not extra_identity:
        raise ValueError("extra metrics need an extra_identity (what they are computed from) for the cache "
                         "key")

    def compute(folder: Path) -> dict:
        import time

        t0 = time.time()
        table = intervention_sweep(model, rows, targets, drop_ids, batch_size, max_logit_elems, verbose,
                                   extra_metrics)
        atomic_write_parquet(table, folder / "sweep.parquet")
        return {"seconds": time.time() - t0, "n_tokens": int(table[table["mode"] == "nominal"].n.sum())}

    ident = sweep_identity(model_id, rows, targets, drop_ids, extra_identity if extra_metrics else None)
    return cached_result("entropy_intervention", ident, compute, root=artifacts_dir, prefix=prefix)


# ---------------------------------------------------------------------------------- summaries
def metric_columns(table: pd.DataFrame) -> list[str]:
    """The metric columns of a sweep table: `METRICS`, then any extra metrics, in table order."""
    return [*METRICS, *(c for c in table.columns if c not in ID_COLUMNS and c not in METRICS)]


def curves(table: pd.DataFrame, by: Sequence[str] = ()) -> pd.DataFrame:
    """Token-weighted means of the metrics per (layer, neuron, role, mode, grid, value) (+ `by`):
    the curves of Figs 7c-f. Nominal rows are kept with grid NaN."""
    keys = ["layer", "neuron", "role", "mode", "grid", "value", *by]
    metrics = [k for k in metric_columns(table) if k not in by]
    g = table.groupby(keys, dropna=False)[["n", *metrics]].sum().reset_index()
    for k in metrics:
        g[k] = g[k] / g["n"]
    return g


def aligned_curves(table: pd.DataFrame) -> pd.DataFrame:
    """`curves`, with neurons swept on a second token set (whose unintervened rows are labelled
    "nominal (random rows)") shifted by the difference of the two sets' unintervened means, so that
    every curve starts from the same unintervened level in a plot; their shapes are unchanged."""
    c = curves(table)
    other = table[table["mode"] == "nominal (random rows)"]
    if len(other) == 0:
        return c
    metrics = metric_columns(table)
    shift = nominal(table) - other[metrics].sum() / other["n"].sum()
    main_rows = set(table[table["mode"] == "nominal"].row)
    on_other = {(l, n) for l, n, r in zip(table.layer, table.neuron, table.row) if r not in main_rows and l >= 0}
    mask = [(l, n) in on_other for l, n in zip(c.layer, c.neuron)]
    for k in metrics:
        c.loc[mask, k] = c.loc[mask, k] + shift[k]
    return c


def nominal(table: pd.DataFrame) -> pd.Series:
    """The unintervened token-weighted means of the metrics."""
    t = table[table["mode"] == "nominal"]
    return t[metric_columns(table)].sum() / t["n"].sum()


def _extra(table: pd.DataFrame) -> list[str]:
    return [k for k in metric_columns(table) if k not in METRICS]


def halves(table: pd.DataFrame) -> pd.DataFrame:
    """Convergence check: the effect curves (metric minus its value at grid 0) on the first and
    second half of the token rows: the largest absolute difference between the halves per (neuron,
    mode, metric), and the range of the effect on all rows. A curve has converged where the halves
    differ by little compared with how much it moves."""
    out = []
    for (l, n, role, mode), g in table[~table["mode"].str.startswith("nominal")].groupby(["layer", "neuron", "role", "mode"]):
        rows = np.sort(g.row.unique())
        first = g.row.isin(rows[: len(rows) // 2])
        a, b, whole = (curves(x).set_index("grid").sort_index() for x in (g[first], g[~first], g))
        for k in ("scale", "entropy", "loss", "rr", *_extra(table)):
            ea, eb, ew = (x[k] - x[k].iloc[int(np.argmin(np.abs(x.index.to_numpy())))] for x in (a, b, whole))
            out.append({"layer": l, "neuron": n, "role": role, "mode": mode, "metric": k,
                        "max_half_diff": float((ea - eb).abs().max()), "effect_range": float(ew.max() - ew.min())})
    return pd.DataFrame(out)


def effect_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per (neuron, role, mode): the metric at the grid's top minus at 0 (`d_<metric>`; the grid runs
    in the neuron's natural direction, so this is the effect of its typical large activation),
    whether the scale and entropy move monotonically along the WHOLE grid, both signs of the
    activation (`scale_monotone`, `entropy_monotone`: every step >= 0, or every step <= 0 for a
    falling curve; `*_direction` +1/-1, from the grid's bottom to its top), and the share of tokens
    whose top-1 token stays as unintervened (`top1_same_min`: the lowest over the grid)."""
    c = curves(table)
    c = c[~c["mode"].str.startswith("nominal")].sort_values("grid")
    out = []
    for (l, n, role, mode), g in c.groupby(["layer", "neuron", "role", "mode"]):
        top, zero = g.iloc[-1], g.iloc[(g.grid - 0).abs().argmin()]
        row = {"layer": l, "neuron": n, "role": role, "mode": mode, "value_top": top.value}
        for k in ("scale", "entropy", "loss", "rr", *_extra(table)):
            row[f"d_{k}"] = float(top[k] - zero[k])
        for k in ("scale", "entropy"):
            steps = np.diff(g[k].to_numpy())
            direction = 1 if g[k].iloc[-1] >= g[k].iloc[0] else -1
            row[f"{k}_direction"] = direction
            row[f"{k}_monotone"] = bool((steps * direction >= -1e-9).all())
        row["top1_same_min"] = float(g["top1_same"].min())
        out.append(row)
    return pd.DataFrame(out)
