"""Prediction, suppression and partition neurons: what a neuron writes into the next-token logits
(paper §5.1; Figs 5, 6, 22, 23, 24).

A neuron's **vocabulary effect** is W_U w_out, one number per token: how much one unit of its
activation raises that token's logit (the direct path through the unembedding, ignoring the final
normalisation's scale). The paper's histograms (Fig 5) show the raw product; its moment statistics
(Fig 6) use the cosine cos(W_U[:, t], w_out), whose distribution over tokens does not depend on the
norms. Both are taken of what the neuron does to the logits: its direction is the row of
`effective.output_directions` (w_out times the weight of a norm after the MLP, as in Gemma) and the
unembedding is `effective.effective_unembed` (diag(g_f) W_U when the final norm keeps its weight
g_f). Without a post-MLP norm and with the final norm folded into W_U (GPT-2, the embedded family,
SmolLM2) these are w_out and W_U themselves; W_U w_out below stands for the effective product.
This module gives both, over the **real next tokens** only (`real_token_mask`): columns that can
never be a next token, or that stand for no string (the reduced vocabulary's `<unk>`, BOS/EOS, chat
special tokens, padding columns), are left out and listed.

The API, in the order a chapter uses it:

- `real_token_mask(family_or_codec, model)` -> `RealTokens` (kept ids, their strings, what was excluded);
- `vocab_effect(model, layer, real)` -> raw W_U w_out `[neurons, kept tokens]` (Fig 5);
- `vocab_cosines(model, layer, real)` -> cos(W_U, w_out) `[neurons, kept tokens]`;
- `vocab_moments(model, real)` -> DataFrame (layer, neuron, vocab_mean/var/skew/kurt, var_ratio):
  population moments of the cosines, streamed layer by layer (Fig 6a,b);
- `apply_signs(moments, signs)` -> the moments of each neuron's **effective** output direction
  (`EFFECTIVE_RULE`): w_out times the sign of its typical large activation;
- `classify(moments, kurtosis_threshold=10, partition_ratio=4)` -> prediction / suppression /
  partition / none, with the rule in `CLASS_RULE`; `class_counts` at other thresholds;
- `token_classes(real)` -> the token features of chapter 03 (`helpers.taxonomy.features.token_feature_table`)
  applied to the vocabulary strings (GPT-2 strings for the embedded family's reduced vocabulary);
- `explain_effects(effect, classes)` -> each neuron's best class by variance reduction of W_U w_out,
  with the mean difference (in-class minus out-of-class; > 0: it predicts the class) (Figs 5, 23);
- `ensembles(table, ...)` -> per class, how many neurons predict and suppress it, and the antipodal
  pairs among them (cos(w_out_i, w_out_j) < -0.8) (§5.1, the ensemble hypothesis);
- `next_token_conditioning(...)` -> each chosen neuron's activation (`mlp.hook_post`, times its
  sign) split by whether the NEXT token is in its class, streamed with `ActivationStream` and
  cached (Fig 24).

**The effective output direction.** One unit of activation adds w_out to the residual stream, but
a gated MLP's activation silu(gate) * up takes both signs, and a neuron whose large activations are
negative writes -w_out: W_U w_out alone would call a neuron that lowers a class of tokens a
prediction neuron. Every statistic here is therefore taken of s * w_out, where s is the sign of
the neuron's typical large activation (`EFFECTIVE_RULE`; `neuron_stats.act_sign`, from chapter 02's
streaming pass). For GELU models s is +1 for almost every neuron, and where it is +1 nothing
changes. (Under a norm after the MLP, w_out in all of this is the row of `output_directions`.)

Precision: the products W_U w_out are taken in float32 (the weights are float32; one product has
d_model terms) and the moments over tokens in float64 (fourth powers of ~1e-1 cosines over 50k
tokens lose nothing there).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from helpers.streaming.activations import ActivationStream
from helpers.core.cache import Result, atomic_write_parquet, cached_result, config_hash
from helpers.streaming.accumulators import GroupedMoments
from helpers.taxonomy.features import PRONOUNS, SYMBOLS, WORD_GROUPS, token_feature_table, vocab_strings_gpt2
from helpers.models.effective import effective_unembed, output_directions

CODE_VERSION = 4
MODEL = "model"
EFFECTIVE_RULE = ("effective output direction = s * w_out, s = the sign of the neuron's mean activation over the "
                  "tokens in the top 1% of |activation| (neuron_stats.SIGN_RULE)")
KURTOSIS_THRESHOLD = 10.0  # the reference code's `vocab_kurt > 10` (PAPER.md §5a)
PARTITION_RATIO = 4.0
CLASS_RULE = {
    "prediction": "W_U kurtosis > k and skew > 0 (heavy right tail: a few tokens boosted), of the effective direction",
    "suppression": "W_U kurtosis > k and skew < 0 (heavy left tail: a few tokens suppressed), of the effective direction",
    "partition": "W_U kurtosis <= k and variance of cos(W_U, w_out) >= r x that of a random direction "
                 "(most tokens shifted, one group up and the other down)",
    "none": "everything else",
}
CLASSES = ("prediction", "suppression", "partition", "none")
ANTIPODAL_COS = -0.8


# --------------------------------------------------------------------------------------------
# Which columns are real next tokens
# --------------------------------------------------------------------------------------------


@dataclass
class RealTokens:
    """The vocabulary columns kept as real next tokens.

    `mask` [d_vocab] bool (True: kept); `strings` [d_vocab] the string of every model id used for
    the token classes (GPT-2's string for the embedded family's reduced vocabulary, the model's own
    tokenizer's otherwise); `excluded` DataFrame (id, string, reason) of the columns left out."""

    mask: np.ndarray
    strings: list[str]
    excluded: pd.DataFrame

    @property
    def ids(self) -> np.ndarray:
        return np.flatnonzero(self.mask)

    @property
    def kept_strings(self) -> list[str]:
        return [self.strings[i] for i in self.ids]

    @property
    def n_kept(self) -> int:
        return int(self.mask.sum())

    def key(self) -> str:
        return config_hash({"mask": np.flatnonzero(~self.mask).tolist(), "n": len(self.mask)}, 16)


def real_token_mask(source, model=None, extra_excluded: Sequence[int] = ()) -> RealTokens:
    """The real next tokens of a model's vocabulary (Fig 5, 6 and every statistic here).

    `source`: a Family (its codec is used) or a codec. Excluded, with the reason recorded:
    - the reduced vocabulary's `<unk>` (a `VocabCodec` whose GPT-2 id is -1): it stands for every
      rare token at once, not for one string;
    - the BOS/EOS token (`<|endoftext|>` in GPT-2, the codec's `bos_id`) and any pad token;
    - for a Hugging Face tokenizer (SmolLM2), every added special token (`<|im_start|>`,
      `<|im_end|>`, `<repo_name>`, ...);
    - model columns beyond the tokenizer's length (padding of the unembedding), when `model` is given;
    - `extra_excluded` ids, if any."""
    codec = getattr(source, "codec", source)
    d_vocab = int(model.cfg.d_vocab) if model is not None else int(codec.d_vocab)
    reasons: dict[int, str] = {}
    vocab = getattr(codec, "vocab", None)
    if vocab is not None and hasattr(vocab, "gpt2_ids"):  # the embedded family's reduced vocabulary
        gpt2 = np.asarray(vocab.gpt2_ids)
        all_strings = vocab_strings_gpt2()
        strings = [all_strings[int(g)] if g >= 0 else "<unk>" for g in gpt2]
        for i in np.flatnonzero(gpt2 < 0):
            reasons[int(i)] = "<unk>: stands for every token outside the reduced vocabulary"
    else:
        strings = list(codec.token_strings())
    tok = getattr(codec, "tokenizer", None)
    if tok is not None:
        for i, added in getattr(tok, "added_tokens_decoder", {}).items():
            if getattr(added, "special", True):
                reasons.setdefault(int(i), f"special token {str(added)!r}")
        if getattr(tok, "pad_token_id", None) is not None:
            reasons.setdefault(int(tok.pad_token_id), "padding token")
    bos = getattr(codec, "bos_id", None)
    if bos is not None:
        reasons.setdefault(int(bos), "BOS/EOS (document separator, never predicted as text)")
    for i in extra_excluded:
        reasons.setdefault(int(i), "excluded by the caller")
    if len(strings) < d_vocab:
        for i in range(len(strings), d_vocab):
            reasons.setdefault(i, "padding column (beyond the tokenizer)")
        strings = strings + [""] * (d_vocab - len(strings))
    strings = strings[:d_vocab]
    mask = np.ones(d_vocab, dtype=bool)
    ids = sorted(i for i in reasons if i < d_vocab)
    mask[ids] = False
    excluded = pd.DataFrame({"id": ids, "string": [strings[i] for i in ids], "reason": [reasons[i] for i in ids]})
    return RealTokens(mask, strings, excluded)


# --------------------------------------------------------------------------------------------
# The vocabulary effect and its moments
# --------------------------------------------------------------------------------------------


def _layers(model, layer: int | None) -> list[int]:
    if layer is None:
        return list(range(model.cfg.n_layers))
    if not 0 <= int(layer) < model.cfg.n_layers:
        raise ValueError(f"layer {layer} is out of range for a model of {model.cfg.n_layers} layers")
    return [int(layer)]


def _w_out(model, layer: int | None, neurons: Sequence[int] | None) -> torch.Tensor:
    """[neurons, d_model] float32 output directions of `neurons` of `layer` (all layers when None):
    `output_directions`, w_out times the post-MLP norm's weight (w_out without one)."""
    ws = [output_directions(model, l) for l in _layers(model, layer)]
    w = torch.cat(ws).float()
    if neurons is not None:
        w = w[torch.as_tensor(np.asarray(neurons), dtype=torch.long, device=w.device)]
    return w


def vocab_effect(model, layer: int | None = None, real_tokens: RealTokens | None = None,
                 neurons: Sequence[int] | None = None, signs: Sequence[float] | None = None) -> torch.Tensor:
    """Raw vocabulary effect W_U w_out (Fig 5): `[neurons, kept tokens]` float32, logit units per
    unit of activation, of the effective direction through the effective unembedding (see the
    module's docstring). Under norms that keep their weights, the units are per unit of the
    post-MLP and final norms' scales: with both scales held fixed, a change da of the activation
    changes the logits by da * effect / (s_mlp * s_f). `layer` None takes every layer (rows ordered
    layer-major: row l * d_mlp + i; mind the size on a large model); `neurons` selects rows within
    that order; `real_tokens` keeps its columns (all columns when None). `signs` [rows] (+1/-1): the effect of the effective
    direction s * w_out instead (`EFFECTIVE_RULE`), in logit units per unit of |activation|."""
    w = _w_out(model, layer, neurons)
    if signs is not None:
        w = w * torch.as_tensor(np.asarray(signs, dtype=np.float32), device=w.device)[:, None]
    wu = effective_unembed(model)
    if real_tokens is not None:
        wu = wu[:, torch.from_numpy(real_tokens.ids).to(wu.device)]
    return w @ wu


def _unit_unembed(model, real_tokens: RealTokens | None) -> torch.Tensor:
    """[d_model, kept tokens] float32: the effective unembedding's columns scaled to unit norm."""
    wu = effective_unembed(model)
    if real_tokens is not None:
        wu = wu[:, torch.from_numpy(real_tokens.ids).to(wu.device)]
    return wu / wu.norm(dim=0, keepdim=True).clamp_min(1e-30)


def vocab_cosines(model, layer: int | None = None, real_tokens: RealTokens | None = None,
                  neurons: Sequence[int] | None = None) -> torch.Tensor:
    """cos(W_U[:, t], w_out) `[neurons, kept tokens]` float32 (the statistic of Fig 6, chapter 02), of
    the effective direction and the effective unembedding."""
    w = _w_out(model, layer, neurons)
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return w @ _unit_unembed(model, real_tokens)


def row_moments(c: torch.Tensor) -> dict[str, np.ndarray]:
    """Population mean, variance, skew and raw kurtosis (Gaussian: 3) of each row of `c`
    `[rows, tokens]`. Powers are formed in float32 (cosines are O(0.1), their fourth powers O(1e-4):
    far from float32's limits) and every mean over tokens is accumulated in float64."""
    c = c.float()
    mean = c.mean(1, keepdim=True, dtype=torch.float64)
    d = c - mean.float()
    d2 = d * d
    m2 = d2.mean(1, dtype=torch.float64)
    m3 = (d2 * d).mean(1, dtype=torch.float64)
    m4 = (d2 * d2).mean(1, dtype=torch.float64)
    safe = m2.clamp_min(1e-300)
    return {"vocab_mean": mean[:, 0].cpu().numpy(), "vocab_var": m2.cpu().numpy(),
            "vocab_skew": (m3 / safe ** 1.5).cpu().numpy(), "vocab_kurt": (m4 / safe ** 2).cpu().numpy()}


def random_direction_variance(model, real_tokens: RealTokens | None = None, n: int = 512, seed: int = 0) -> float:
    """The median over `n` random unit directions of the residual stream of the variance (over the
    kept tokens) of their cosine with the effective unembedding: the variance a neuron with no
    vocabulary structure would show, given this unembedding's anisotropy. The partition rule compares with it."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(n, model.cfg.d_model, generator=g).to(model.W_U.device)
    d = d / d.norm(dim=1, keepdim=True)
    return float(np.median(row_moments(d @ _unit_unembed(model, real_tokens))["vocab_var"]))


@torch.no_grad()
def vocab_moments(model, real_tokens: RealTokens | None = None, block: int = 512, null_seed: int = 0,
                  neurons_per_layer: int | None = None, verbose: bool = False) -> pd.DataFrame:
    """Moments of cos(W_U, w_out) over the kept tokens for every neuron (Fig 6a,b), of the effective
    direction and the effective unembedding: DataFrame with layer, neuron, vocab_mean, vocab_var,
    vocab_skew, vocab_kurt, var_ratio (vocab_var over `random_direction_variance`), w_out_norm (the
    effective direction's norm: ||w_out|| without a post-MLP norm). Streamed in blocks of `block`
    neurons, so a 30-layer model never holds its [neurons, vocab] matrix. `neurons_per_layer`: only the first
    that many neurons of each layer (a cheaper slice for CI; neuron indices carry no meaning)."""
    from tqdm.auto import tqdm

    unit = _unit_unembed(model, real_tokens)
    null = random_direction_variance(model, real_tokens, seed=null_seed)
    parts = []
    for layer in tqdm(range(model.cfg.n_layers), desc="W_U moments", disable=not verbose):
        w = output_directions(model, layer)
        if neurons_per_layer is not None:
            w = w[: int(neurons_per_layer)]
        norm = w.norm(dim=1)
        w = w / norm[:, None].clamp_min(1e-30)
        rows = [row_moments(w[s : s + block] @ unit) for s in range(0, len(w), block)]
        df = pd.DataFrame({k: np.concatenate([r[k] for r in rows]) for k in rows[0]})
        df.insert(0, "neuron", np.arange(len(w)))
        df.insert(0, "layer", layer)
        df["w_out_norm"] = norm.cpu().numpy()
        parts.append(df)
    out = pd.concat(parts, ignore_index=True)
    out["var_ratio"] = out.vocab_var / null
    out.attrs["null_var"] = null
    return out


def apply_signs(moments: pd.DataFrame, signs: pd.DataFrame | None) -> pd.DataFrame:
    """The moments of each neuron's effective output direction s * w_out (`EFFECTIVE_RULE`).

    `signs`: columns layer, neuron, act_sign (+ member, when both tables have one), e.g.
    `neuron_stats.activation_signs`. Flipping w_out flips every cosine, so `vocab_mean` and
    `vocab_skew` change sign where s = -1 and the variance, kurtosis and variance ratio do not; the
    raw values stay as `w_out_mean` and `w_out_skew`. Adds `act_sign` (+1 for a neuron without a
    row in `signs`, and for every neuron when `signs` is None). Rows with s = +1 are unchanged."""
    out = moments.copy()
    keys = [k for k in ("member", "layer", "neuron") if k in out.columns and signs is not None and k in signs.columns]
    if "act_sign" in out.columns:
        out = out.drop(columns="act_sign")
    if signs is None:
        out["act_sign"] = 1.0
    else:
        s = signs[keys + ["act_sign"]].drop_duplicates(keys)
        out = out.merge(s, on=keys, how="left", validate="many_to_one")
        out["act_sign"] = out.act_sign.fillna(1.0).astype(float)
    out["w_out_mean"], out["w_out_skew"] = moments.vocab_mean.to_numpy(), moments.vocab_skew.to_numpy()
    out["vocab_mean"] = out.w_out_mean * out.act_sign
    out["vocab_skew"] = out.w_out_skew * out.act_sign
    out.attrs = dict(moments.attrs)
    return out


# --------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------


def classify(moments: pd.DataFrame, kurtosis_threshold: float = KURTOSIS_THRESHOLD,
             partition_ratio: float = PARTITION_RATIO) -> pd.Series:
    """Each neuron's class from its W_U moments (`CLASS_RULE`, with k = `kurtosis_threshold`,
    r = `partition_ratio`): "prediction", "suppression", "partition" or "none".

    The paper's threshold is kurtosis > 10 for prediction and suppression; the paper gives no
    operational rule for partition neurons ("high variance"), so this book's is: not heavy-tailed,
    and a variance of the cosines at least `partition_ratio` times that of a random direction.
    The skew is the table's `vocab_skew`: that of the effective direction after `apply_signs`
    (`EFFECTIVE_RULE`), so a neuron is classified by what its typical large activation does to the
    logits; on a table without signs, that of w_out."""
    if kurtosis_threshold <= 0 or partition_ratio <= 0:
        raise ValueError("thresholds must be positive")
    heavy = moments.vocab_kurt > kurtosis_threshold
    out = np.where(heavy & (moments.vocab_skew > 0), "prediction",
                   np.where(heavy & (moments.vocab_skew < 0), "suppression",
                            np.where(~heavy & (moments.var_ratio >= partition_ratio), "partition", "none")))
    return pd.Series(out, index=moments.index, name="vocab_class")


def class_counts(moments: pd.DataFrame, kurtosis_thresholds: Sequence[float] = (5, 10, 20, 50),
                 partition_ratios: Sequence[float] = (2, 4, 8)) -> pd.DataFrame:
    """Class counts at other thresholds: rows (kurtosis threshold, partition ratio), columns the classes."""
    rows = []
    for k in kurtosis_thresholds:
        for r in partition_ratios:
            c = classify(moments, k, r).value_counts()
            rows.append({"kurtosis >": k, "variance ratio >=": r, **{x: int(c.get(x, 0)) for x in CLASSES}})
    return pd.DataFrame(rows).set_index(["kurtosis >", "variance ratio >="])


def per_layer_percentiles(moments: pd.DataFrame, columns=("vocab_kurt", "vocab_skew"),
                          q: Sequence[float] = (0.05, 0.10, 0.50, 0.90, 0.95), by: Sequence[str] = ("layer",)) -> pd.DataFrame:
    """Fig 6a,b: per-layer percentiles of the W_U kurtosis and skew (long: *by, statistic, percentile, value)."""
    g = moments.groupby(list(by))[list(columns)].quantile(list(q))
    g.index = g.index.set_names([*by, "percentile"])
    long = g.reset_index().melt(id_vars=[*by, "percentile"], var_name="statistic", value_name="value")
    long["percentile"] = (long.percentile * 100).round().astype(int)
    return long


def class_shares_by_layer(moments: pd.DataFrame, kurtosis_threshold: float = KURTOSIS_THRESHOLD,
                          partition_ratio: float = PARTITION_RATIO, by: Sequence[str] = ("layer",)) -> pd.DataFrame:
    """Share of each layer's neurons in each class (rows *by, columns the classes), plus n."""
    cls = classify(moments, kurtosis_threshold, partition_ratio)
    t = moments[list(by)].assign(cls=cls.to_numpy())
    out = t.groupby(list(by)).cls.value_counts(normalize=True).unstack(fill_value=0.0).reindex(columns=list(CLASSES), fill_value=0.0)
    out["n"] = t.groupby(list(by)).size()
    return out


def rise_depth(counts: pd.Series, n_layers: int, fraction: float = 0.1) -> float:
    """Where prediction neurons rise (Fig 6a): the relative depth (layer / (n_layers - 1)) of the
    first layer whose count (or share) of prediction neurons reaches `fraction` of the largest
    per-layer value; NaN when no layer has any. The rule needs only per-layer counts, so it applies
    to the paper's published counts as well as to ours."""
    s = pd.Series(counts).sort_index()
    if len(s) == 0 or not np.isfinite(s.max()) or s.max() <= 0:
        return float("nan")
    return float(s.index[np.argmax((s >= fraction * s.max()).to_numpy())]) / max(n_layers - 1, 1)


def relative_depth(layer, n_layers: int):
    """layer / (n_layers - 1): 0 for the first layer, 1 for the last."""
    return layer / max(n_layers - 1, 1)


def depth_pattern(moments: pd.DataFrame, n_layers: int, kurtosis_threshold: float = KURTOSIS_THRESHOLD) -> dict:
    """The paper's depth claims measured on one model's W_U moments (Fig 6): the share of heavy-tailed
    (kurtosis > threshold) neurons in the first half (relative depth < 0.5) and the last quarter
    (>= 0.75) of the layers, whether the late share exceeds the early one (`late_pattern`), the
    counts of prediction and suppression neurons in the last layer and whether suppression
    dominates there, and `rise_depth` of the prediction share."""
    cls = classify(moments, kurtosis_threshold)
    depth = relative_depth(moments.layer, n_layers)
    heavy = cls.isin(["prediction", "suppression"])
    early, late = heavy[depth < 0.5], heavy[depth >= 0.75]
    last = cls[moments.layer == n_layers - 1]
    shares = class_shares_by_layer(moments, kurtosis_threshold)
    return {"heavy_share_first_half": float(early.mean()) if len(early) else float("nan"),
            "heavy_share_last_quarter": float(late.mean()) if len(late) else float("nan"),
            "late_pattern": bool(late.mean() > early.mean()) if len(early) and len(late) else None,
            "last_prediction": int((last == "prediction").sum()), "last_suppression": int((last == "suppression").sum()),
            "suppression_dominates_last": bool((last == "suppression").sum() > (last == "prediction").sum()),
            "rise_depth": rise_depth(shares["prediction"].reindex(range(n_layers), fill_value=0.0), n_layers)}


def seed_consistency(moments: pd.DataFrame, n_layers: int, kurtosis_threshold: float = KURTOSIS_THRESHOLD,
                     max_rel_range: float = 0.25) -> dict:
    """Fig 6's consistency across seeds (`moments` with a `member` column): the largest, over
    layers, seed range (max - min) of the 95th-percentile W_U kurtosis divided by its seed mean;
    each seed's majority class among heavy-tailed last-layer neurons ("prediction", "suppression",
    "tie" when equal, including none at all); `consistent` when the range is at most
    `max_rel_range` and every seed has the same majority class; `n_heavy` each seed's count of
    heavy-tailed (prediction or suppression) neurons over all layers, and `measured` whether any
    seed has one (with none anywhere, agreement on "tie" is vacuous)."""
    p95 = moments.groupby(["member", "layer"]).vocab_kurt.quantile(0.95).unstack("member")
    rel = float(((p95.max(axis=1) - p95.min(axis=1)) / p95.mean(axis=1)).max())
    major = {}
    for m, g in moments[moments.layer == n_layers - 1].groupby("member"):
        c = classify(g, kurtosis_threshold).value_counts()
        p, s_ = int(c.get("prediction", 0)), int(c.get("suppression", 0))
        major[m] = "prediction" if p > s_ else "suppression" if s_ > p else "tie"
    heavy = {m: int(classify(g, kurtosis_threshold).isin(["prediction", "suppression"]).sum())
             for m, g in moments.groupby("member")}
    return {"max_rel_range_p95_kurt": rel, "last_layer_majority": major,
            "consistent": bool(rel <= max_rel_range and len(set(major.values())) == 1),
            "n_heavy": heavy, "measured": any(heavy.values())}


# --------------------------------------------------------------------------------------------
# Token classes and explanations of the vocabulary effect
# --------------------------------------------------------------------------------------------


def token_classes(real_tokens: RealTokens, min_members: int = 5) -> pd.DataFrame:
    """Chapter 03's token features applied to the kept vocabulary: `[kept tokens, classes]` bool
    (index the model ids). Classes with fewer than `min_members` tokens in or out are dropped."""
    tab = token_feature_table(real_tokens.kept_strings)
    tab.index = real_tokens.ids
    n = tab.sum()
    keep = (n >= min_members) & (len(tab) - n >= min_members)
    return tab.loc[:, keep[keep].index]


_WORDS = {"is_all_caps": "all-caps words", "is_lower": "lower-case words", "is_alpha": "alphabetic tokens",
          "is_numeric": "numbers", "is_symbolic": "symbol-only tokens", "is_whitespace": "whitespace tokens",
          "contains_digit": "tokens containing a digit", "is_year": "years (1490-2200)", "is_number_word": "number words",
          "starts_w_space": "tokens starting with a space", "starts_w_capital": "capitalised tokens",
          "starts_w_vowel": "tokens starting with a vowel", "starts_w_letter_no_space": "tokens starting with a letter (no space)",
          "is_single_letter": "single letters"}


def describe_class(name: str) -> str:
    """A token class in words: "years (1490-2200)", "tokens containing '('", ..."""
    if name in _WORDS:
        return _WORDS[name]
    if m := re.fullmatch(r"contains_(\w+)", name):
        if m.group(1) in SYMBOLS:
            return f"tokens containing '{SYMBOLS[m.group(1)]}'"
    if m := re.fullmatch(r"is_(\d)_digit", name):
        return f"{m.group(1)}-digit numbers"
    if m := re.fullmatch(r"pronoun_(\w+)", name):
        if m.group(1) in PRONOUNS:
            return f"{m.group(1).replace('_', ' ')} pronouns"
    if m := re.fullmatch(r"prefix_(\w+)", name):
        return f"words starting with '{m.group(1)}-'"
    if m := re.fullmatch(r"suffix_(\w+)", name):
        return f"words ending in '-{m.group(1)}'"
    if m := re.fullmatch(r"start_w_([a-z])", name):
        return f"tokens starting with '{m.group(1)}'"
    if m := re.fullmatch(r"group_(\w+)", name):
        if m.group(1) in WORD_GROUPS:
            return f"{m.group(1).replace('_', ' ')} words"
    return name


def explain_effects(effect: torch.Tensor, classes: pd.DataFrame, neurons: pd.DataFrame | None = None,
                    block: int = 1024, sign: np.ndarray | None = None) -> pd.DataFrame:
    """Each neuron's best token class for its vocabulary effect (Figs 5, 23).

    `effect` `[neurons, kept tokens]` (raw W_U w_out, columns in the order of `classes.index`);
    `classes` `[kept tokens, classes]` bool (`token_classes`). For each neuron and class the variance
    reduction (eq. 4, over tokens instead of activations) and the mean difference of the effect
    (in-class minus out-of-class mean, logit units). The best class is the one of highest VR;
    `direction` is "predicts" when its mean difference is positive, else "suppresses". `sign`
    [neurons] (+1, -1 or 0) restricts a neuron's candidates to the classes it raises (+1: a
    prediction neuron's class is one it predicts) or lowers (-1); 0 leaves them all (see
    `class_sign`).
    Returns `neurons` (or a 0..n-1 `row` column) with best_class, best_vr, mean_diff, direction,
    runner_up, runner_up_vr, class_words."""
    if effect.shape[1] != len(classes):
        raise ValueError(f"effect has {effect.shape[1]} token columns, classes {len(classes)} rows")
    y = torch.from_numpy(np.array(classes.to_numpy(), dtype=np.float64))
    names = np.array(classes.columns)
    out = []
    for s in range(0, effect.shape[0], block):
        acc = GroupedMoments(min(block, effect.shape[0] - s), y.shape[1], dtype=torch.float64)
        acc.update(effect[s : s + block].T.double().cpu(), y)
        vr = torch.nan_to_num(acc.variance_reduction(), nan=-1.0)
        m1, m0 = acc.means()
        if sign is not None:
            sg = torch.as_tensor(np.asarray(sign)[s : s + block], dtype=torch.float64)[:, None]
            vr = vr.masked_fill((sg != 0) & (sg * (m1 - m0) <= 0), -1.0)
        top = vr.topk(min(2, vr.shape[1]), dim=1)
        best = top.indices[:, 0]
        idx = torch.arange(len(best))
        df = pd.DataFrame({"best_class": names[best.numpy()], "best_vr": top.values[:, 0].numpy(),
                           "mean_diff": (m1 - m0)[idx, best].numpy()})
        df["runner_up"] = names[top.indices[:, 1].numpy()] if vr.shape[1] > 1 else None
        df["runner_up_vr"] = top.values[:, 1].numpy() if vr.shape[1] > 1 else np.nan
        out.append(df)
    res = pd.concat(out, ignore_index=True)
    res["direction"] = np.where(res.mean_diff > 0, "predicts", "suppresses")
    res["class_words"] = res.best_class.map(describe_class)
    base = neurons.reset_index(drop=True) if neurons is not None else pd.DataFrame({"row": np.arange(len(res))})
    return pd.concat([base, res], axis=1)


def class_sign(vocab_class) -> np.ndarray:
    """+1 for prediction neurons, -1 for suppression neurons, 0 otherwise (for `explain_effects`)."""
    c = np.asarray(vocab_class)
    return np.where(c == "prediction", 1, np.where(c == "suppression", -1, 0))


def ensembles(table: pd.DataFrame, w_out_cos=None, min_vr: float = 0.0, antipodal: float = ANTIPODAL_COS) -> pd.DataFrame:
    """Per token class, the ensemble of neurons acting on it (§5.1): among the prediction and
    suppression neurons of `table` (columns vocab_class, best_class, direction, best_vr) whose best
    class it is with VR >= `min_vr`, how many predict and how many suppress it; with
    `w_out_cos(rows_a, rows_b)` (a function giving the cosine matrix of the w_out of the given table
    rows) also the number of antipodal pairs (cos < `antipodal`) among them."""
    t = table[table.vocab_class.isin(["prediction", "suppression"]) & (table.best_vr >= min_vr)]
    rows = []
    for cls, g in t.groupby("best_class"):
        r = {"class": cls, "words": describe_class(cls), "predict": int((g.direction == "predicts").sum()),
             "suppress": int((g.direction == "suppresses").sum()), "neurons": len(g)}
        if w_out_cos is not None and len(g) > 1:
            c = w_out_cos(g.index.to_numpy())
            iu = np.triu_indices(len(g), 1)
            r["antipodal_pairs"] = int((c[iu] < antipodal).sum())
        elif w_out_cos is not None:
            r["antipodal_pairs"] = 0
        rows.append(r)
    cols = ["class", "words", "predict", "suppress", "neurons"] + (["antipodal_pairs"] if w_out_cos is not None else [])
    return pd.DataFrame(rows, columns=cols).sort_values("neurons", ascending=False).reset_index(drop=True)


def w_out_cosine_fn(model, table: pd.DataFrame):
    """A `w_out_cos(rows)` for `ensembles`: cosines of the effective directions (`output_directions`,
    times `act_sign` where the table has one) of the table rows (layer, neuron)."""
    def fn(rows: np.ndarray) -> np.ndarray:
        sub = table.loc[rows]
        w = _directions(model, sub)
        w = w * _row_signs(sub).to(w.device)[:, None]
        w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-30)
        return (w @ w.T).cpu().numpy()
    return fn


def _directions(model, table: pd.DataFrame) -> torch.Tensor:
    """[len(table), d_model] float32: the `output_directions` rows of the table's (layer, neuron)."""
    layers = {int(l): output_directions(model, int(l)) for l in set(table.layer)}
    return torch.stack([layers[int(l)][int(n)] for l, n in zip(table.layer, table.neuron)])


def _row_signs(table: pd.DataFrame) -> torch.Tensor:
    """[rows] float32: the table's `act_sign` column, +1 without one."""
    if "act_sign" not in table.columns:
        return torch.ones(len(table))
    return torch.as_tensor(table.act_sign.fillna(1.0).to_numpy(dtype=np.float32))


def vocab_effect_rows(model, table: pd.DataFrame, real_tokens: RealTokens | None = None) -> torch.Tensor:
    """W_U w_out of the neurons in the rows of `table` (columns layer, neuron), in row order:
    `[len(table), kept tokens]` float32, as `vocab_effect` (effective direction and unembedding);
    of s * w_out where the table has an `act_sign` column (`apply_signs`)."""
    if len(table) == 0:
        return torch.zeros(0, real_tokens.n_kept if real_tokens is not None else model.cfg.d_vocab)
    w = _directions(model, table)
    w = w * _row_signs(table).to(w.device)[:, None]
    wu = effective_unembed(model)
    if real_tokens is not None:
        wu = wu[:, torch.from_numpy(real_tokens.ids).to(wu.device)]
    return w @ wu


def class_masks(table: pd.DataFrame, classes: pd.DataFrame, d_vocab: int, column: str = "best_class") -> np.ndarray:
    """`[len(table), d_vocab]` bool over model ids: the token class named in each row's `column`
    (`classes` from `token_classes`, indexed by model id)."""
    m = np.zeros((len(table), d_vocab), dtype=bool)
    for i, c in enumerate(table[column]):
        m[i, classes.index[classes[c].to_numpy()]] = True
    return m


def effect_by_class(model, table: pd.DataFrame, real_tokens: RealTokens, classes: pd.DataFrame,
                    column: str = "best_class") -> pd.DataFrame:
    """Figs 23 and 24 (left): for each neuron of `table`, W_U w_out on the tokens of its class
    (`column`) and on the rest: long table (row, side, mean, std, q5, q25, q50, q75, q95)."""
    eff = vocab_effect_rows(model, table, real_tokens).double().cpu().numpy()
    out = []
    for i, c in enumerate(table[column]):
        inc = classes[c].to_numpy()
        for side, v in (("in class", eff[i, inc]), ("other", eff[i, ~inc])):
            q = np.quantile(v, [0.05, 0.25, 0.5, 0.75, 0.95])
            out.append({"row": i, "side": side, "mean": v.mean(), "std": v.std(),
                        **dict(zip(["q5", "q25", "q50", "q75", "q95"], q))})
    return pd.DataFrame(out)


def effect_histograms(effect: torch.Tensor, in_class: np.ndarray, bins: int = 60) -> pd.DataFrame:
    """Fig 5 from counts: histogram of one neuron's W_U w_out `[kept tokens]`, split by `in_class`
    [kept tokens] bool (long: bin centre, side, count)."""
    e = effect.detach().double().cpu().numpy()
    edges = np.linspace(e.min(), e.max() + 1e-12, bins + 1)
    centre = (edges[:-1] + edges[1:]) / 2
    a, _ = np.histogram(e[in_class], edges)
    b, _ = np.histogram(e[~in_class], edges)
    return pd.concat([pd.DataFrame({"effect": centre, "tokens": "in class", "count": a}),
                      pd.DataFrame({"effect": centre, "tokens": "other", "count": b})], ignore_index=True)


# --------------------------------------------------------------------------------------------
# Next-token conditioning (Fig 24)
# --------------------------------------------------------------------------------------------


class SplitHistogram:
    """Streaming histograms and moments of `n` variables, each split in two by its own binary label
    (side 1: label true). `update(x [tokens, n], y [tokens, n] bool)`; fixed bins over
    [`lo`, `hi`] with the outliers in the end bins (as the paper's activation histograms), and exact
    float64 count / sum / sum of squares per side for means and standard deviations. Mergeable."""

    def __init__(self, n: int, lo: float = -10.0, hi: float = 15.0, bins: int = 250):
        self.n, self.lo, self.hi, self.bins = int(n), float(lo), float(hi), int(bins)
        self.counts = torch.zeros(self.n, 2, self.bins, dtype=torch.int64)
        self.sums = torch.zeros(self.n, 2, 3, dtype=torch.float64)  # count, sum, sum of squares

    @torch.no_grad()
    def update(self, x: torch.Tensor, y: torch.Tensor) -> "SplitHistogram":
        if x.shape != y.shape or x.dim() != 2 or x.shape[1] != self.n:
            raise ValueError(f"expected x and y [tokens, {self.n}], got {tuple(x.shape)} and {tuple(y.shape)}")
        x = x.detach().cpu().double()
        y = y.detach().cpu().bool()
        b = ((x - self.lo) / (self.hi - self.lo) * self.bins).floor().clamp(0, self.bins - 1).long()
        side = y.long()
        flat = (torch.arange(self.n)[None, :] * 2 + side) * self.bins + b
        self.counts += torch.bincount(flat.reshape(-1), minlength=self.n * 2 * self.bins).reshape(self.n, 2, self.bins)
        for s in (0, 1):
            m = (side == s).double()
            self.sums[:, s, 0] += m.sum(0)
            self.sums[:, s, 1] += (x * m).sum(0)
            self.sums[:, s, 2] += (x * x * m).sum(0)
        return self

    def merge(self, other: "SplitHistogram") -> "SplitHistogram":
        self.counts += other.counts
        self.sums += other.sums
        return self

    def state_dict(self) -> dict:
        return {"counts": self.counts.clone(), "sums": self.sums.clone()}

    def load_state_dict(self, st: dict) -> None:
        self.counts, self.sums = st["counts"].clone(), st["sums"].clone()

    def summary(self) -> pd.DataFrame:
        """Per variable and side: n, mean, std, and the 5/25/50/75/95th percentiles from the bins."""
        centres = self.lo + (torch.arange(self.bins) + 0.5) * (self.hi - self.lo) / self.bins
        rows = []
        for i in range(self.n):
            for s in (0, 1):
                n, sm, sq = self.sums[i, s].tolist()
                c = self.counts[i, s].double()
                cum = c.cumsum(0) / max(c.sum().item(), 1)
                q = {f"q{int(p * 100)}": float(centres[min(int(torch.searchsorted(cum, p)), self.bins - 1)]) if n else float("nan")
                     for p in (0.05, 0.25, 0.5, 0.75, 0.95)}
                mean = sm / n if n else float("nan")
                rows.append({"index": i, "next_in_class": bool(s), "n": int(n), "mean": mean,
                             "std": math.sqrt(max(sq / n - mean * mean, 0.0)) if n else float("nan"), **q})
        return pd.DataFrame(rows)


def _split_accumulator(model, rows, neurons: pd.DataFrame, class_masks: np.ndarray, drop_ids: Sequence[int],
                       batch_size: int, hook: str, lo: float, hi: float, verbose: bool, desc: str = "next-token split"
                       ) -> SplitHistogram:
    layers = sorted({int(l) for l in neurons.layer})
    names = [f"blocks.{l}.{hook}" for l in layers]
    masks = torch.from_numpy(np.asarray(class_masks, dtype=bool))
    sign = _row_signs(neurons)  # the effective activation s * a: larger = more of the effective direction
    stream = ActivationStream({MODEL: model}, rows, names, batch_size, drop_ids, lambda: {"split": SplitHistogram(len(neurons), lo, hi)},
                              desc=desc, verbose=verbose, device=model.cfg.device)
    for batch in stream:
        acts = torch.stack([batch.acts[MODEL][f"blocks.{int(l)}.{hook}"][:, int(n)] for l, n in zip(neurons.layer, neurons.neuron)], 1)
        nxt = torch.cat([batch.ids[:, 1:], torch.full_like(batch.ids[:, :1], -1)], dim=1)  # the next token; none at the end
        nv = batch.valid(nxt)
        keep = nv >= 0
        y = masks[:, nv[keep]].T  # [tokens, neurons]: is the next token in this neuron's class
        stream.accs["split"].update(acts[keep.to(acts.device)].float() * sign.to(acts.device), y)
    return stream.merged()["split"]


def _check_split_args(neurons: pd.DataFrame, class_masks: np.ndarray) -> pd.DataFrame:
    neurons = neurons.reset_index(drop=True)
    if class_masks.ndim != 2 or class_masks.shape[0] != len(neurons):
        raise ValueError(f"class_masks must be [neurons, d_vocab]; got {class_masks.shape} for {len(neurons)} neurons")
    return neurons


def stream_next_token_split(model, rows, neurons: pd.DataFrame, class_masks: np.ndarray, drop_ids: Sequence[int],
                            batch_size: int = 8, hook: str = "mlp.hook_post", lo: float = -10.0, hi: float = 15.0,
                            verbose: bool = False) -> pd.DataFrame:
    """Fig 24: the activation (`hook`, default `mlp.hook_post`: the neuron's output coefficient, for
    a gated MLP silu(gate) * up, not the gate's input) of each neuron of `neurons` (layer, neuron;
    times its `act_sign` where the table has one, so a larger value always means more of its
    effective direction), split by whether the
    NEXT token is in that neuron's class (`class_masks` `[len(neurons), d_vocab]` bool over model
    ids), over the valid tokens of `rows` that have a next token (the last position has none).
    One `ActivationStream` pass; returns `SplitHistogram.summary()` joined with `neurons`."""
    neurons = _check_split_args(neurons, class_masks)
    acc = _split_accumulator(model, rows, neurons, class_masks, drop_ids, batch_size, hook, lo, hi, verbose)
    return _join(neurons, acc.summary())


def _join(neurons: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    return neurons.assign(index=np.arange(len(neurons))).merge(summary, on="index").drop(columns="index")


def next_token_conditioning(family, member: str, rows, neurons: pd.DataFrame, class_masks: np.ndarray,
                            artifacts_dir: str | Path, batch_size: int = 8, n_parts: int = 2, verbose: bool = False) -> Result:
    """`stream_next_token_split` (activation `mlp.hook_post` times the neurons' `act_sign`, if
    given) over `n_parts` consecutive parts of `rows`, cached under
    `<artifacts>/next_token_split/` (keyed by the member's weights, the rows' sha256, the neurons and
    their class masks). Returns the Result, whose table `split` holds one summary per part (`part`
    = "1 of 2", ...) and for all rows (`part` = "all", the exact merge of the parts' histograms):
    the parts show how far the result has converged at the token count used."""
    neurons = _check_split_args(neurons, class_masks)
    ident = {"code_version": CODE_VERSION, "weights": family.identity[member], "rows_sha256": rows.sha256,
             "rows_shape": list(rows.ids.shape), "neurons": neurons[["layer", "neuron"]].astype(int).values.tolist(),
             "signs": _row_signs(neurons).tolist(), "hook": "mlp.hook_post",
             "classes": config_hash(np.flatnonzero(np.asarray(class_masks).ravel()).tolist(), 16), "n_parts": int(n_parts),
             "drop_ids": sorted(int(i) for i in family.codec.drop_ids)}

    def compute(folder: Path) -> dict:
        from helpers.data.tokens import TokenRows

        model = family.load(member)
        bounds = np.linspace(0, len(rows), n_parts + 1).astype(int)
        accs, out = [], []
        for k in range(n_parts):
            part = TokenRows(rows.ids[bounds[k] : bounds[k + 1]])
            acc = _split_accumulator(model, part, neurons, class_masks, family.codec.drop_ids, batch_size, "mlp.hook_post",
                                     -10.0, 15.0, verbose, desc=f"next-token split {k + 1}/{n_parts}")
            accs.append(acc)
            out.append(_join(neurons, acc.summary()).assign(part=f"{k + 1} of {n_parts}"))
        total = SplitHistogram(len(neurons))
        for a in accs:
            total.merge(a)
        out.append(_join(neurons, total.summary()).assign(part="all"))
        atomic_write_parquet(pd.concat(out, ignore_index=True), folder / "split.parquet")
        return {"n_neurons": len(neurons), "n_parts": int(n_parts)}

    return cached_result("next_token_split", ident, compute, root=artifacts_dir, prefix=f"{family.name}-{member}")


def conditioning_effect(split: pd.DataFrame) -> pd.DataFrame:
    """Per neuron (and part): mean (effective) activation with the next token in its class minus without,
    in units of the out-of-class standard deviation (columns `diff`, `effect_size`)."""
    keys = [c for c in split.columns if c not in ("next_in_class", "n", "mean", "std", "q5", "q25", "q50", "q75", "q95")]
    on = split[split.next_in_class].set_index(keys)
    off = split[~split.next_in_class].set_index(keys)
    out = pd.DataFrame({"n_in": on.n, "n_out": off.n, "mean_in": on["mean"], "mean_out": off["mean"],
                        "diff": on["mean"] - off["mean"]})
    out["effect_size"] = out["diff"] / off["std"].where(off["std"] > 0)
    return out.reset_index()


def sign_test(diffs: Sequence[float]) -> dict:
    """Two-sided exact binomial sign test over neurons (the unit of inference) that the differences
    are as often positive as negative: {n, positive, p_value}."""
    from scipy.stats import binomtest

    d = np.asarray([x for x in diffs if np.isfinite(x) and x != 0])
    if len(d) == 0:
        return {"n": 0, "positive": 0, "p_value": float("nan")}
    pos = int((d > 0).sum())
    return {"n": len(d), "positive": pos, "p_value": float(binomtest(pos, len(d), 0.5).pvalue)}


def direction_test(effects: pd.DataFrame, direction: str = "suppresses", n_tests: int = 1, part: str = "all") -> dict:
    """Fig 24's finding as a test: among the neurons of `effects` (`conditioning_effect` rows with a
    `direction` column) that `direction` their class, the sign test over neurons of "the mean
    effective activation is higher when the next token is in the class", Bonferroni-corrected for
    `n_tests` tests: {n, positive, p_value, p_bonferroni, median_effect_size}."""
    d = effects[(effects.part == part) & (effects.direction == direction)]
    st = sign_test(d["diff"].to_numpy())
    return {**st, "p_bonferroni": min(1.0, st["p_value"] * n_tests) if st["n"] else float("nan"),
            "median_effect_size": float(d.effect_size.median()) if len(d) else float("nan")}


# --------------------------------------------------------------------------------------------
# Cached per-model tables
# --------------------------------------------------------------------------------------------


def member_vocab_moments(family, member: str, artifacts_dir: str | Path, neurons_per_layer: int | None = None,
                         verbose: bool = False) -> Result:
    """`vocab_moments` of one member over its real next tokens, cached under
    `<artifacts>/vocab_moments/`, keyed by the member's weights, the excluded columns and the slice.
    Returns the Result: its table `moments`, and `meta` with `null_var` (the median vocabulary
    variance, `vocab_moments`' null) and `n_kept` (the real tokens kept)."""
    model = family.load(member)
    real = real_token_mask(family, model)
    ident = {"code_version": CODE_VERSION, "weights": family.identity[member], "real_tokens": real.key(),
             "neurons_per_layer": neurons_per_layer}

    def compute(folder: Path) -> dict:
        t = vocab_moments(model, real, neurons_per_layer=neurons_per_layer, verbose=verbose)
        atomic_write_parquet(t, folder / "moments.parquet")
        return {"null_var": t.attrs["null_var"], "n_kept": real.n_kept}

    return cached_result("vocab_moments", ident, compute, root=artifacts_dir, prefix=f"{family.name}-{member}")


def family_vocab_moments(family, artifacts_dir: str | Path, members: Sequence[str] | None = None,
                         verbose: bool = False) -> pd.DataFrame:
    """`member_vocab_moments` of every member (or `members`), stacked with a `member` column."""
    from tqdm.auto import tqdm

    ms = list(members or family.members)
    return pd.concat([member_vocab_moments(family, m, artifacts_dir).table("moments").assign(member=m)
                      for m in tqdm(ms, desc=f"{family.name} W_U moments", disable=not verbose)], ignore_index=True)
