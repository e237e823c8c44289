"""Per-neuron weight and activation statistics (paper §3 "properties of universal neurons" and
§5(d) "prediction neurons": kurtosis and skew of W_U w_out).

One row per neuron `(layer, neuron)` of one model:

- weight statistics (`weight_statistics`), on the model's processed weights (App. A.1):
  `w_in_norm`, `w_out_norm` (+ `w_lin_norm` for gated MLPs), `input_bias`, `in_out_sim`
  cos(w_in, w_out), `l2_penalty` ||w_in||^2 + ||w_out||^2, the vocabulary moments
  `vocab_mean/var/skew/kurt` of cos(W_U[:, t], w_out) over tokens t, and the largest cosine of
  w_in (`max_cos_w_in`) and of w_out (`max_cos_w_out`) with any other neuron of the model;
- activation statistics (`activation_statistics`), one streaming pass over held-out token rows
  with the same token filter as the correlations (BOS/pad and newline dropped): mean, variance,
  skew and kurtosis of the pre-activation (`mlp.hook_pre`) and of the post-activation
  (`mlp.hook_post`), and `act_freq`, the fraction of tokens with a positive pre-activation;
  `act_sign`, the sign of the neuron's typical large activation (`SIGN_RULE`), which turns w_out
  into the direction the neuron actually writes (`activation_signs`, `sign_tensor`; chapters 04-06).

The paper histogrammed activations into 256 bins over [-10, 15] and took moments of the
histogram; `StreamingMoments` computes the moments exactly instead (float64, mergeable,
checkpointable).

Command line: `python -m helpers.properties.neuron_stats --preset default` (see `--help`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from helpers.streaming.activations import ActivationStream
from helpers.core.cache import atomic_write_csv, atomic_write_parquet, cached_result, open_result, result_dir, run_cli, write_json
from helpers.data.tokens import TokenRows
from helpers.models.loading import neuron_weights

CODE_VERSION = 4  # bump when a change to this module changes its tables
STATE_FILE = "activation_moments.pt"
TABLE_FILE = "neuron_stats.parquet"
MODEL = "model"  # the one model's key in the stream


# --------------------------------------------------------------------------------------------
# Exact streaming moments
# --------------------------------------------------------------------------------------------


class StreamingMoments:
    """Exact streaming mean, variance, skew, kurtosis and positive fraction of `n` variables.

    Feed `update(x)` with `x` [tokens, n] (any float dtype and device; moved to `device`).
    Results, all float64 tensors [n] on `device`: `mean()`, `variance()` (population, 1/N),
    `skew()` = m3 / m2^1.5, `kurtosis()` = m4 / m2^2 (raw standardized fourth moment: a Gaussian
    gives 3, NOT the excess kurtosis), `fraction_positive()` = fraction of values > 0; `count`
    is the number of tokens seen.

    Design (precision): the state is `count`, the running float64 `mean` [n] and the float64
    central sums M2, M3, M4 [n] (sums of (x - mean)^k), plus an exact int64 count of positive
    values. The per-variable shift is therefore the running mean itself: each chunk of
    at most `chunk_elems` elements is reduced in two passes (its own mean, then the sums of
    powers of the deviations from it) and combined with the accumulator by the exact pairwise
    update of Chan et al. / Pébay (2008), with d = mean_b - mean_a and N = n_a + n_b:

        M2 = M2a + M2b + d^2 n_a n_b / N
        M3 = M3a + M3b + d^3 n_a n_b (n_a - n_b) / N^2 + 3 d (n_a M2b - n_b M2a) / N
        M4 = M4a + M4b + d^4 n_a n_b (n_a^2 - n_a n_b + n_b^2) / N^3
                 + 6 d^2 (n_a^2 M2b + n_b^2 M2a) / N^2 + 4 d (n_a M3b - n_b M3a) / N

    Raw power sums are never formed, so there is no catastrophic cancellation even when the
    mean is many standard deviations from zero (e.g. 1000x), and `merge` combines accumulators
    built anywhere, with any chunking, to rounding error (~1e-12 relative). Unlike the paper's
    256-bin histogram over [-10, 15] this is exact: no binning, no clipping of the tails.

    A variable whose variance is at most `dead_rtol` times its raw second moment (constant up to
    float32 resolution) has NaN skew and kurtosis; everything is NaN before any data.
    """

    def __init__(self, n: int, device: str | torch.device = "cpu", chunk_elems: int = 1 << 22, dead_rtol: float = 1e-12):
        if n < 1:
            raise ValueError(f"n must be positive, got {n}")
        self.n = int(n)
        self.device = torch.device(device)
        self.chunk_elems = int(chunk_elems)
        self.dead_rtol = float(dead_rtol)
        f64 = dict(dtype=torch.float64, device=self.device)
        self.count = 0
        self._mean = torch.zeros(self.n, **f64)
        self._m2 = torch.zeros(self.n, **f64)
        self._m3 = torch.zeros(self.n, **f64)
        self._m4 = torch.zeros(self.n, **f64)
        self._pos = torch.zeros(self.n, dtype=torch.int64, device=self.device)

    def __repr__(self) -> str:
        return f"StreamingMoments(n={self.n}, device={self.device}, count={self.count})"

    # ------------------------------------------------------------------ update / merge
    @torch.no_grad()
    def update(self, x: torch.Tensor) -> "StreamingMoments":
        """Accumulate `x` [tokens, n] (a 1-D `x` is taken as one variable when n == 1)."""
        x = torch.as_tensor(x)
        if x.dim() == 1 and self.n == 1:
            x = x[:, None]
        if x.dim() != 2 or x.shape[1] != self.n:
            raise ValueError(f"expected x [tokens, {self.n}], got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be floating point, got {x.dtype}")
        rows = max(1, self.chunk_elems // self.n)
        for start in range(0, x.shape[0], rows):
            self._update_chunk(x[start : start + rows])
        return self

    def _update_chunk(self, x: torch.Tensor) -> None:
        t = x.shape[0]
        if t == 0:
            return
        x = x.to(self.device, torch.float64)
        mean = x.mean(0)
        d = x - mean
        d2 = d * d
        m2 = d2.sum(0)
        m3 = (d2 * d).sum(0)
        m4 = d2.square_().sum(0)
        self._combine(t, mean, m2, m3, m4, (x > 0).sum(0))

    def _combine(self, nb: int, mean_b, m2b, m3b, m4b, pos_b) -> None:
        na = self.count
        if na == 0:
            for dst, src in ((self._mean, mean_b), (self._m2, m2b), (self._m3, m3b), (self._m4, m4b), (self._pos, pos_b)):
                dst.copy_(src)
            self.count = nb
            return
        n = na + nb
        fa, fb, fn = float(na), float(nb), float(n)
        d = mean_b - self._mean
        d2 = d * d
        m2a, m3a = self._m2.clone(), self._m3.clone()
        self._m4.add_(m4b + d2 * d2 * (fa * fb * (fa * fa - fa * fb + fb * fb) / fn**3)
                      + 6.0 * d2 * (fa * fa * m2b + fb * fb * m2a) / (fn * fn) + 4.0 * d * (fa * m3b - fb * m3a) / fn)
        self._m3.add_(m3b + d2 * d * (fa * fb * (fa - fb) / (fn * fn)) + 3.0 * d * (fa * m2b - fb * m2a) / fn)
        self._m2.add_(m2b + d2 * (fa * fb / fn))
        self._mean.add_(d * (fb / fn))
        self._pos.add_(pos_b.to(self._pos))
        self.count = n

    def merge(self, other: "StreamingMoments") -> "StreamingMoments":
        """Add `other`'s statistics into this accumulator (exactly; `other` is unchanged)."""
        if not isinstance(other, StreamingMoments):
            raise TypeError(f"can only merge a StreamingMoments, got {type(other).__name__}")
        if other.n != self.n:
            raise ValueError(f"cannot merge {other.n} variables into {self.n}")
        if other.count:
            dev = self.device
            self._combine(other.count, other._mean.to(dev), other._m2.to(dev), other._m3.to(dev), other._m4.to(dev),
                          other._pos.to(dev))
        return self

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Plain dict (CPU copies of the float64 state) for `torch.save`."""
        return {"n": self.n, "count": self.count, "mean": self._mean.cpu().clone(), "m2": self._m2.cpu().clone(),
                "m3": self._m3.cpu().clone(), "m4": self._m4.cpu().clone(), "n_pos": self._pos.cpu().clone()}

    def load_state_dict(self, state: dict) -> "StreamingMoments":
        """Restore from `state_dict()` (onto this accumulator's device); bit-exact."""
        if int(state["n"]) != self.n:
            raise ValueError(f"state is for {state['n']} variables, accumulator has {self.n}")
        for key, dst in (("mean", self._mean), ("m2", self._m2), ("m3", self._m3), ("m4", self._m4), ("n_pos", self._pos)):
            if tuple(state[key].shape) != (self.n,):
                raise ValueError(f"state[{key!r}] has shape {tuple(state[key].shape)}, expected ({self.n},)")
            dst.copy_(state[key])
        self.count = int(state["count"])
        return self

    # ------------------------------------------------------------------ results
    def _nan_if_empty(self, t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(t, float("nan")) if self.count == 0 else t

    def mean(self) -> torch.Tensor:
        """[n] float64 mean."""
        return self._nan_if_empty(self._mean.clone())

    def variance(self) -> torch.Tensor:
        """[n] float64 population variance (divides by the count)."""
        return self._nan_if_empty(self._m2 / max(self.count, 1))

    def _standardized(self, m: torch.Tensor, power: float) -> torch.Tensor:
        var = self.variance()
        out = (m / max(self.count, 1)) / var.pow(power)
        dead = var <= self.dead_rtol * (var + self._mean.square())
        return out.masked_fill_(dead | var.isnan(), float("nan"))

    def skew(self) -> torch.Tensor:
        """[n] float64 skewness m3 / m2^1.5 (biased, = scipy.stats.skew(bias=True))."""
        return self._standardized(self._m3, 1.5)

    def kurtosis(self) -> torch.Tensor:
        """[n] float64 raw kurtosis m4 / m2^2 (Gaussian = 3; = scipy kurtosis(fisher=False, bias=True))."""
        return self._standardized(self._m4, 2.0)

    def fraction_positive(self) -> torch.Tensor:
        """[n] float64 fraction of the values that are > 0."""
        return self._nan_if_empty(self._pos.double() / max(self.count, 1))


# --------------------------------------------------------------------------------------------
# The sign of a neuron's typical large activation
# --------------------------------------------------------------------------------------------

# "Large" = the top 1% of |activation|. Not the top decile: a sparse GELU neuron sits at its floor
# (about -0.17) on most tokens, and where it fires on fewer than a tenth of them, a decile mixes its
# firing with its floor and can come out negative (177 of the default family's 3,072 neurons did);
# its top 1% is its firing.
TOP_FRACTION = 0.01
SIGN_RULE = ("the sign of the mean activation over the tokens in the top 1% of |activation| "
             "(+1 when that mean is >= 0 or no token was seen)")


class SignedLogHistogram:
    """Streaming log-binned histogram of `n` variables, split by sign, with the sum of the values in
    each bin: the sign of each variable's typical large value (`large_sign`, the rule `SIGN_RULE`),
    the mean over the top fraction of |x| (`top_mean`) and approximate quantiles (`quantile`), from
    one pass.

    Bins: `bins_per_octave` bins per factor 2 of |x| between 2^(min_exp - 1) and 2^max_exp (the end
    bins also hold everything below, zero included, and above), per sign when `split_sign` (needed
    by `quantile` only; `top_mean` needs the signed sums alone). State: `counts` [n, sides, bins]
    int64 and `sums` [n, sides, bins] float64 (with two sides, side 0: x < 0; side 1: x >= 0),
    mergeable (`update / merge / state_dict`).

    Cost and precision: the bin is the float's own exponent (`torch.frexp`), so a token costs a few
    float32 operations (chapter 02 feeds every neuron of every layer through it); counts are exact
    (float32 per chunk of at most `chunk_elems` values, then int64) and values are summed in
    float64 (a bin may hold every token of a neuron). The top-fraction boundary falls inside one bin; that bin's tokens
    are counted in proportion, at the bin's mean value, every bin above it exactly. Quantiles are
    a bin's mean value: within the bin's width (a factor 2^(1/bins_per_octave)) of the true one."""

    def __init__(self, n: int, device: str | torch.device = "cpu", bins_per_octave: int = 1, min_exp: int = -22,
                 max_exp: int = 11, split_sign: bool = True, chunk_elems: int = 1 << 22):
        if n < 1 or bins_per_octave < 1 or min_exp >= max_exp:
            raise ValueError(f"need n >= 1, bins_per_octave >= 1 and min_exp < max_exp (got {n}, {bins_per_octave}, "
                             f"{min_exp}, {max_exp})")
        self.n, self.device = int(n), torch.device(device)
        self.per, self.min_exp, self.max_exp, self.chunk_elems = int(bins_per_octave), int(min_exp), int(max_exp), int(chunk_elems)
        self.nb = (self.max_exp - self.min_exp + 1) * self.per
        self.sides = 2 if split_sign else 1
        self.counts = torch.zeros(self.n, self.sides, self.nb, dtype=torch.int64, device=self.device)
        self.sums = torch.zeros(self.n, self.sides, self.nb, dtype=torch.float64, device=self.device)
        self._offset = (torch.arange(self.n, dtype=torch.int32, device=self.device) * (self.sides * self.nb))[None, :]

    @property
    def count(self) -> int:
        return int(self.counts[0].sum())

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> "SignedLogHistogram":
        """Accumulate `x` [tokens, n]."""
        x = torch.as_tensor(x)
        if x.dim() != 2 or x.shape[1] != self.n:
            raise ValueError(f"expected x [tokens, {self.n}], got {tuple(x.shape)}")
        rows = max(1, self.chunk_elems // self.n)
        size = self.n * self.sides * self.nb
        for s in range(0, x.shape[0], rows):
            c = x[s : s + rows].to(self.device, torch.float32)
            mant, e = torch.frexp(c)  # |c| in [2^(e-1), 2^e); frexp(0) = (0, 0)
            e = e.clamp_(self.min_exp, self.max_exp).masked_fill_(c == 0, self.min_exp)
            b = (e - self.min_exp) * self.per
            if self.per > 1:
                b += ((mant.abs() - 0.5) * (2 * self.per)).clamp_(0, self.per - 1).int()
            idx = b + self._offset
            if self.sides == 2:
                idx += (c >= 0).int() * self.nb
            idx = idx.reshape(-1)
            cnt = torch.zeros(size, device=self.device).index_add_(0, idx, torch.ones(1, device=self.device).expand(idx.numel()))
            sm = torch.zeros(size, dtype=torch.float64, device=self.device).index_add_(0, idx, c.reshape(-1).double())
            self.counts += cnt.view(self.n, self.sides, self.nb).round().long()
            self.sums += sm.view(self.n, self.sides, self.nb)
        return self

    def merge(self, other: "SignedLogHistogram") -> "SignedLogHistogram":
        if other.counts.shape != self.counts.shape:
            raise ValueError(f"cannot merge histograms of shape {tuple(other.counts.shape)} into {tuple(self.counts.shape)}")
        self.counts += other.counts.to(self.device)
        self.sums += other.sums.to(self.device)
        return self

    def state_dict(self) -> dict:
        return {"counts": self.counts.cpu().clone(), "sums": self.sums.cpu().clone()}

    def load_state_dict(self, st: dict) -> "SignedLogHistogram":
        if tuple(st["counts"].shape) != tuple(self.counts.shape):
            raise ValueError(f"state has shape {tuple(st['counts'].shape)}, accumulator {tuple(self.counts.shape)}")
        self.counts.copy_(st["counts"])
        self.sums.copy_(st["sums"])
        return self

    def top_mean(self, frac: float = TOP_FRACTION) -> torch.Tensor:
        """[n] float64 mean of x over the top `frac` of the tokens by |x| (NaN before any data)."""
        if not 0 < frac <= 1:
            raise ValueError(f"frac must be in (0, 1], got {frac}")
        c = self.counts.sum(1).double()  # [n, bins] by |x|, both signs
        s = self.sums.sum(1)
        total = c.sum(1)
        k = frac * total  # tokens wanted from the top
        above = c.flip(1).cumsum(1).flip(1) - c  # tokens in strictly higher bins
        take = (k[:, None] - above).clamp_(min=0)
        take = torch.minimum(take, c)  # tokens taken from each bin
        part = torch.where(c > 0, s * take / c.clamp_min(1), torch.zeros_like(s))
        return torch.where(total > 0, part.sum(1) / k.clamp_min(1e-300), torch.full_like(total, float("nan")))

    def large_sign(self, frac: float = TOP_FRACTION) -> torch.Tensor:
        """[n] float64 +1 or -1: `SIGN_RULE` (the sign of `top_mean(frac)`; +1 where it is >= 0 or NaN)."""
        return torch.where(self.top_mean(frac) < 0, -1.0, 1.0).double()

    def quantile(self, q: float) -> torch.Tensor:
        """[n] float64 approximate `q`-quantile of x: the mean value of the bin where the cumulative
        share reaches `q` (bins ordered from the most negative to the most positive; needs
        `split_sign`)."""
        if self.sides != 2:
            raise ValueError("quantiles need a histogram made with split_sign=True")
        order_c = torch.cat([self.counts[:, 0].flip(1), self.counts[:, 1]], 1).double()
        order_s = torch.cat([self.sums[:, 0].flip(1), self.sums[:, 1]], 1)
        total = order_c.sum(1, keepdim=True)
        cum = order_c.cumsum(1) / total.clamp_min(1)
        idx = (cum < q - 1e-12).sum(1, keepdim=True).clamp_(max=order_c.shape[1] - 1)
        val = order_s.gather(1, idx) / order_c.gather(1, idx).clamp_min(1)
        return torch.where(total[:, 0] > 0, val[:, 0], torch.full_like(total[:, 0], float("nan")))


# --------------------------------------------------------------------------------------------
# Weight statistics
# --------------------------------------------------------------------------------------------


def _unit_rows(w: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm (zero rows stay zero)."""
    return w / w.norm(dim=1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)


def _max_cos_other(units: torch.Tensor, block_elems: int) -> torch.Tensor:
    """[N] max over j != i of units[i] . units[j] for unit rows `units` [N, d]; row blocks of
    at most `block_elems` similarities at a time."""
    n = units.shape[0]
    out = torch.empty(n, dtype=units.dtype, device=units.device)
    if n == 1:
        return out.fill_(float("nan"))
    rows = max(1, block_elems // n)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        sims = units[start:stop] @ units.T  # [b, N]
        idx = torch.arange(stop - start, device=units.device)
        sims[idx, idx + start] = float("-inf")
        out[start:stop] = sims.max(dim=1).values
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
def weight_statistics(model, dtype: torch.dtype = torch.float32, block_elems: int = 1 << 24) -> pd.DataFrame:
    """Per-neuron weight statistics of `model` (paper §3, Fig. 4; §5(d), Fig. 6), computed on the
    weights as loaded (the families load processed weights: folded LayerNorm, centred writing
    weights and unembedding).

    Returns one row per neuron (`layer`, `neuron`, layers in order) with:
    `w_in_norm` ||w_in||, `w_out_norm` ||w_out||, `w_lin_norm` ||w_lin|| (gated MLPs only: there
    `w_in` is the gate, whose non-linearity makes the neuron fire, and `w_lin` the linear
    branch), `input_bias` b_in, `in_out_sim` cos(w_in, w_out), `l2_penalty` ||w_in||^2 +
    ||w_out||^2; `vocab_mean`, `vocab_var`, `vocab_skew`, `vocab_kurt`: population moments over
    the d_vocab tokens t of c_t = cos(W_U[:, t], w_out) (kurtosis raw, Gaussian = 3);
    `max_cos_w_in`, `max_cos_w_out`: the largest cosine of w_in (resp. w_out) with that of any
    OTHER neuron of any layer.

    Per-neuron quantities are float64. The max cosines are matrix products in `dtype` (float32:
    errors ~1e-6; pass torch.float64 for exact values), in row blocks of at most `block_elems`
    entries, as are the [neurons, d_vocab] cosine blocks (float64). Zero vectors give NaN.
    """
    cfg = model.cfg
    n_layers, d_mlp = cfg.n_layers, cfg.d_mlp
    gated = bool(getattr(cfg, "gated_mlp", False))
    unembed = model.W_U.detach().double()  # [d_model, d_vocab]
    unembed = unembed / unembed.norm(dim=0, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
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
        rows = max(1, block_elems // unembed.shape[1])
        parts = [_row_moments(out_unit[s : s + rows] @ unembed.to(out_unit.device)) for s in range(0, d_mlp, rows)]
        for k, name in enumerate(("vocab_mean", "vocab_var", "vocab_skew", "vocab_kurt")):
            v = torch.cat([p[k] for p in parts])
            cols[name].append(v.masked_fill(out_norm == 0, float("nan")))
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
    from helpers.models.families import state_sha256

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
                   verbose: bool, identity: dict, prefixes: Sequence[tuple[TokenRows, dict, Path]] = ()) -> dict | None:
    """The table of `model` over `rows` into `out`; `prefixes` [(rows, identity, folder)] are
    tables over the first rows of `rows`, written from the same pass when they are reached."""
    t0 = time.time()
    weights = weight_statistics(model)

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


def stats_identity(family, member: str, n_tokens: int, rows: TokenRows | None = None) -> dict:
    """What determines a member's neuron statistics, as content: its weights (`family.identity`),
    the token rows' sha256 (so the corpus they come from is in it), the dropped tokens, the code."""
    rows = rows if rows is not None else family.token_table(n_tokens)
    return {"code_version": CODE_VERSION, "family": family.name, "member": member, "weights": family.identity[member],
            "rows_sha256": rows.sha256, "rows_shape": list(rows.ids.shape), "n_tokens": int(n_tokens),
            "drop_ids": sorted(int(t) for t in family.codec.drop_ids)}


def stats_dir(family, member: str, n_tokens: int, artifacts_dir: str | Path) -> Path:
    """Cache folder of the neuron statistics of `member` of `family` over `n_tokens` held-out
    tokens: `<artifacts>/neuron_stats/<family>-<member>-<hash of stats_identity>`."""
    return result_dir(artifacts_dir, "neuron_stats", stats_identity(family, member, n_tokens), prefix=f"{family.name}-{member}")


def member_neuron_stats(family, n_tokens: int, artifacts_dir: str | Path, member: str | None = None, batch_size: int = 32,
                        checkpoint_every: int = 200_000, out_dir: str | Path | None = None,
                        verbose: bool = True, prefixes: Sequence[int] = ()) -> pd.DataFrame:
    """The neuron statistics table of `member` (default: the family's reference) over the same
    `n_tokens` held-out rows as the correlations (`family.token_rows`), computed once, then cached.

    `prefixes`: smaller token counts whose tables come from the same forward pass (for a
    convergence check): when their rows are the first rows of these ones and they are not cached
    yet, they are written, each under its own cache key, as the pass reaches them, so a later
    `member_neuron_stats(family, k)` reads them instead of running the model again."""
    member = member or family.reference
    rows = family.token_table(n_tokens)
    identity = stats_identity(family, member, n_tokens, rows)
    out = Path(out_dir) if out_dir else result_dir(artifacts_dir, "neuron_stats", identity, prefix=f"{family.name}-{member}")
    found = open_result(out, "neuron_stats", identity)
    if found is not None:
        return found.table(TABLE_FILE)
    shared = []
    for k in sorted({int(k) for k in prefixes}):
        p_rows = family.token_table(k)
        if not (0 < len(p_rows) < len(rows) and torch.equal(p_rows.ids, rows.ids[: len(p_rows)])):
            continue  # not a prefix of these rows: computed on its own when asked for
        p_ident = stats_identity(family, member, k, p_rows)
        p_out = result_dir(artifacts_dir, "neuron_stats", p_ident, prefix=f"{family.name}-{member}")
        if open_result(p_out, "neuron_stats", p_ident) is None:
            shared.append((p_rows, p_ident, p_out))
    res = cached_result("neuron_stats", identity, lambda o: _compute_table(family.load(member), rows, family.codec.drop_ids, o,
                                                                            batch_size, checkpoint_every, verbose, identity,
                                                                            shared),
                        folder=out)
    return res.table(TABLE_FILE) if res.files else pd.DataFrame()


SINGLE_MAX_TOKENS = 32_768  # the statistics of a large single model (SmolLM2) use at most this many tokens


def sign_tokens(family, params) -> int:
    """The token count of the statistics table a family's `act_sign` is read from in chapters 04-06:
    for the single real model (SmolLM2) chapter 02's own table (`n_tokens_single` capped at
    `SINGLE_MAX_TOKENS`: no pass of its own); for the embedded families the preset's
    `n_tokens_aux` (a short pass per member: chapter 02 streams only the reference)."""
    if family.name == params.single_model:
        return min(int(params.n_tokens_single), SINGLE_MAX_TOKENS)
    return int(params.n_tokens_aux)


def family_signs(family, params, artifacts_dir: str | Path, batch_size: int = 32, members: Sequence[str] | None = None,
                 verbose: bool = False) -> pd.DataFrame:
    """`activation_signs` of every member (or `members`) at `sign_tokens`, stacked with a `member` column."""
    n = sign_tokens(family, params)
    return pd.concat([activation_signs(family, m, n, artifacts_dir, batch_size, verbose).assign(member=m)
                      for m in (members or family.members)], ignore_index=True)


def activation_signs(family, member: str, n_tokens: int, artifacts_dir: str | Path, batch_size: int = 32,
                     verbose: bool = False) -> pd.DataFrame:
    """`layer`, `neuron`, `act_sign` (`SIGN_RULE`) and `post_top_mean` of `member`, from its
    statistics table over `n_tokens` tokens (`member_neuron_stats`: cached, so a table chapter 02
    made costs nothing here)."""
    t = member_neuron_stats(family, n_tokens, artifacts_dir, member, batch_size, verbose=verbose)
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
    from helpers.correlations.correlate import short_name
    from helpers.models.families import load_family
    from helpers.core.presets import load_preset, resolve_dir

    ap = argparse.ArgumentParser(
        description="Per-neuron weight and activation statistics of one model (paper §3, §5). The family, member "
                    "(the preset's reference), token count, batch size and device come from the preset unless a flag "
                    "overrides them.")
    ap.add_argument("--preset", default="default", help="params/<preset>.yaml (default: %(default)s)")
    ap.add_argument("--family", default=None, help="overrides the preset's family (e.g. embedded-untrained)")
    ap.add_argument("--member", default=None, help="which seed (full or short name; default: the preset's reference, else the family's first)")
    ap.add_argument("--n-tokens", type=int, default=None, help="tokens of held-out text (default: the preset's n_tokens)")
    ap.add_argument("--device", default=None, help="default: the preset's device")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the preset's batch_size (a resumed run may use another)")
    ap.add_argument("--checkpoint-every", type=int, default=200_000, help="tokens between accumulator checkpoints")
    ap.add_argument("--out", default=None, help="output folder (default: a cache folder keyed by the run's inputs); a "
                                                "finished table there made with other inputs is refused")
    ap.add_argument("--debug", action="store_true", help="show tracebacks (also HELPERS_DEBUG=1)")
    args = ap.parse_args(argv)
    params = load_preset(args.preset)
    device = args.device or params.get("device", "cpu")
    fam = load_family(args.family or params["family"], params, device=device)
    member = args.member or params.get("reference") or fam.reference
    if member not in fam.members:
        matches = [m for m in fam.members if short_name(m) == member]
        if len(matches) != 1:
            ap.error(f"{member!r} is not a member of {fam.name!r}; members: {fam.members}")
        member = matches[0]
    n_tokens = args.n_tokens or int(params["n_tokens"])
    art = resolve_dir(params.get("artifacts_dir", "artifacts"))
    out = Path(args.out) if args.out else stats_dir(fam, member, n_tokens, art)
    table = member_neuron_stats(fam, n_tokens, art, member, args.batch_size or int(params.get("batch_size", 32)),
                                args.checkpoint_every, out)
    print(f"{out}: {len(table)} neurons of {fam.name}/{member}; median act_freq {table.act_freq.median():.3f}, "
          f"median post kurtosis {table.post_kurt.median():.2f}, median vocab kurtosis {table.vocab_kurt.median():.2f}")
    print(summary(table))


if __name__ == "__main__":
    run_cli(main)
