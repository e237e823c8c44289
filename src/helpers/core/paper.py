"""The paper's numbers, in one registry (Gurnee et al., 2024, arXiv v1, and its released tables).

Every number a chapter compares with is a `PaperNumber`: a key, the model it was measured on, the
value, where it comes from (section, figure, or the released CSVs), and the **absolute**
tolerance within which this book calls its own measurement "matched" (`None` for values that are
shown but not scored, such as per-layer profiles). Chapters never type a paper number: they look
it up here, and `result_table` builds their "Result vs paper" table from computed values and
these entries, with a verdict computed from the tolerance (see `verdict` for the rule, which
judges the untrained control by the same test as the trained model).

Tolerances are this book's choice, not the paper's; each entry's note says what it rests on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import pandas as pd

SMALL, MEDIUM, PYTHIA = "stanford-gpt2-small", "stanford-gpt2-medium", "pythia-160m"
PAPER_MODELS = (SMALL, MEDIUM, PYTHIA)
# The model a small family is compared with when it is not one of the paper's own.
DEFAULT_MODEL = SMALL


@dataclass(frozen=True)
class PaperNumber:
    """One number of the paper: `value` on `model`, from `source`; `tolerance` is the absolute
    difference within which a measurement counts as matched (None: not scored)."""

    key: str
    model: str
    value: Any
    source: str
    tolerance: float | None = None
    note: str = ""

    def matches(self, ours: Any) -> bool | None:
        """True/False when the measurement is within/outside the tolerance (numbers) or equal/unequal
        (strings, tuples with tolerance 0); None when the entry is not scored or `ours` is missing."""
        if self.tolerance is None or ours is None:
            return None
        if isinstance(self.value, (int, float)) and not isinstance(self.value, bool):
            try:
                x = float(ours)
            except (TypeError, ValueError):
                return None
            if math.isnan(x):
                return None
            return abs(x - float(self.value)) <= self.tolerance + 1e-12
        if isinstance(self.value, (tuple, list, set, frozenset)):
            return set(self.value) == set(ours)
        return self.value == ours


def _per_model(key: str, values: dict, source: str, tolerance: float | None = None, note: str = "") -> list[PaperNumber]:
    return [PaperNumber(key, m, v, source, tolerance, note) for m, v in values.items()]


_TABLE1 = "Table 1"
# Follow-ups whose claims the book tests in its sections beyond the paper.
NANDAN = "Nandan et al. 2025, arXiv 2508.00903"
STOLFO = "Stolfo et al. 2024, arXiv 2406.16254"
REGISTRY: tuple[PaperNumber, ...] = tuple([
    # --- §1, Table 1: the models -------------------------------------------------------------
    *_per_model("n_seeds", {SMALL: 5, MEDIUM: 5, PYTHIA: 4}, "§1 (Pythia: a and 3 seeds, per the reference code)", 0,
                "models that differ only in their random seed, the reference model included"),
    *_per_model("n_layers", {SMALL: 12, MEDIUM: 24, PYTHIA: 12}, _TABLE1, 0),
    *_per_model("n_heads", {SMALL: 12, MEDIUM: 16, PYTHIA: 12}, _TABLE1, 0),
    *_per_model("d_model", {SMALL: 768, MEDIUM: 1024, PYTHIA: 768}, _TABLE1, 0),
    *_per_model("d_mlp", {SMALL: 3072, MEDIUM: 4096, PYTHIA: 3072}, _TABLE1, 0),
    *_per_model("d_vocab", {SMALL: 50257, MEDIUM: 50257, PYTHIA: 50304}, _TABLE1, 0),
    *_per_model("n_ctx", {SMALL: 1024, MEDIUM: 1024, PYTHIA: 2048}, _TABLE1, 0),
    *_per_model("act_fn", {SMALL: "gelu_new", MEDIUM: "gelu_new", PYTHIA: "gelu"}, _TABLE1, 0),
    *_per_model("positional", {SMALL: "absolute", MEDIUM: "absolute", PYTHIA: "rotary"}, _TABLE1, 0),
    *_per_model("n_neurons", {SMALL: 36864, MEDIUM: 98304, PYTHIA: 36864}, "Table 1 (n_layers x d_mlp)", 0),
    *_per_model("params_printed", {SMALL: "160M", MEDIUM: "410M", PYTHIA: "160M"}, _TABLE1, None,
                "as printed in the paper; the usual GPT-2 counts are 124M and 355M"),
    *_per_model("train_steps", {SMALL: 400_000, MEDIUM: 400_000}, "§1 (Stanford CRFM Mistral runs)", 0),
    *_per_model("train_data", {SMALL: "OpenWebText", MEDIUM: "OpenWebText", PYTHIA: "Pile"}, _TABLE1, 0),
    *_per_model("weight_processing", {m: ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")
                                      for m in PAPER_MODELS},
                "App. A.1 (TransformerLens from_pretrained defaults)", 0,
                "the weight statistics of chapter 02 depend on it; from_pretrained also folds the value biases into "
                "b_O by default (fold_value_biases=True)"),
    *_per_model("seed_only_difference", {m: "members differ only in their random seed" for m in (SMALL, MEDIUM)}, "§1", None,
                "a claim, scored by the caller from the family's recorded configuration"),
    # --- §2 and §4.1: universality -----------------------------------------------------------
    *_per_model("excess_threshold", {m: 0.5 for m in PAPER_MODELS}, "§2 (eq. 3)", None,
                "the paper states the threshold has no principled basis"),
    *_per_model("universal_share", {SMALL: 0.0416, MEDIUM: 0.0123, PYTHIA: 0.0126}, "§4.1, §6.3; released CSVs", 0.01,
                "share of neurons with excess correlation > 0.5; tolerance: one percentage point"),
    *_per_model("universal_count", {SMALL: 1533, MEDIUM: 1211, PYTHIA: 465}, "§4.1, §6.3; released CSVs", None,
                "§4.1 also says 1253 for GPT2-medium-a, which does not equal its 1.23%; the CSV has 1211"),
    *_per_model("universal_pct_by_layer", {
        SMALL: (7.2, 7.9, 3.3, 3.6, 2.3, 2.3, 1.8, 3.7, 3.3, 4.6, 4.1, 5.8),
        MEDIUM: (3.2, 3.4, 1.1, 1.0, 1.0, 0.7, 0.6, 0.5, 0.6, 0.6, 0.6, 0.4, 0.9, 0.9, 1.4, 1.3, 1.3, 1.4, 1.2, 1.3, 1.1, 1.3,
                 1.5, 2.3),
        PYTHIA: (2.1, 0.5, 0.6, 0.2, 0.9, 1.1, 1.4, 1.3, 2.2, 1.6, 1.6, 1.7),
    }, "Fig 12; computed from the released CSVs", None, "% of each layer's neurons with excess > 0.5"),
    PaperNumber("seed_spread_all", MEDIUM, 0.049, "§4.1 (Fig 2b) and the reference notebook", 0.02,
                "mean over all neurons of (max - min over seeds) of the max correlation"),
    PaperNumber("seed_spread_universal", MEDIUM, 0.105, "§4.1 (Fig 2b) and the reference notebook", 0.03,
                "the same mean over universal neurons"),
    *_per_model("median_mean_corr_universal", {m: 0.75 for m in PAPER_MODELS}, "released CSVs (PAPER.md §2)", 0.05,
                "median over universal neurons of the mean (over seeds) max correlation"),
    *_per_model("median_baseline_universal", {m: 0.155 for m in PAPER_MODELS}, "released CSVs (PAPER.md §2)", 0.05,
                "median over universal neurons of the mean rotation baseline (0.15-0.16 in all three models)"),
    *_per_model("depth_specialisation", {m: "best matches lie at a similar depth" for m in (SMALL, MEDIUM)}, "§4.1, Fig 2c", None,
                "a claim, scored by the caller: diagonal mass above chance and the largest entry of every row"),
    # --- §4.2: properties of universal neurons (medians over universal neurons, released CSVs) --
    *_per_model("median_pre_kurt_universal", {SMALL: 5.6, MEDIUM: 6.0, PYTHIA: 5.8}, "§4.2; released CSVs", 1.0,
                "pre-activation kurtosis (Gaussian: 3)"),
    *_per_model("median_pre_skew_universal", {SMALL: 0.80, MEDIUM: 0.93, PYTHIA: 0.70}, "§4.2; released CSVs", 0.2,
                "pre-activation skew"),
    *_per_model("median_act_freq_universal", {SMALL: 0.025, MEDIUM: 0.036, PYTHIA: 0.045}, "§4.2; released CSVs", 0.02,
                "share of tokens with pre-activation above 0 (the paper bins at about -0.1)"),
    *_per_model("median_input_bias_universal", {SMALL: -0.79, MEDIUM: -0.40, PYTHIA: -0.05}, "§4.2; released CSVs", 0.2,
                "b_in after LayerNorm folding"),
    *_per_model("median_l2_penalty_universal", {SMALL: 0.77, MEDIUM: 0.61, PYTHIA: 2.09}, "§4.2; released CSVs", 0.2,
                "|w_in|^2 + |w_out|^2"),
    *_per_model("freq_inout_relation", {m: "activation frequency and cos(w_in, w_out) are strongly related: "
                "neurons that fire very often have w_in and w_out pointing almost opposite ways" for m in PAPER_MODELS},
                "§6, Fig 9 (GPT2-small-a, GPT2-medium-a, Pythia-160m)", None,
                "a claim over every neuron of one model, scored by `properties.verdicts.frequency_alignment`: this "
                "book's rule (the paper gives no number) is a Pearson r of at most -0.3 between the two and a median "
                "cos(w_in, w_out) below -0.3 over the 1% of neurons that fire most often"),
    # --- §4.3: neuron families by variance reduction (eq. 4) ---------------------------------------
    PaperNumber("alphabet_letters", MEDIUM, 18, "§4.3, Fig 1a and Fig 17", 4,
                "letters (of 26) whose best universal alphabet neuron has VR > 0.37; tolerance: four letters"),
    PaperNumber("alphabet_vr_cutoff", MEDIUM, 0.37, "reference notebook (PAPER.md §4)", None,
                "the VR a letter's best neuron must reach to count"),
    PaperNumber("max_vr_unigram", MEDIUM, 0.99, "§4.3, Fig 4a (L0.3270 \"to\")", 0.1,
                "the highest VR of a universal unigram neuron (one token's forms)"),
    PaperNumber("position_candidates", MEDIUM, 9, "§4.3 (universal neurons with kurtosis < 2; layers 1, 2, 5)", None),
    PaperNumber("position_candidates", SMALL, 34, "§4.3 (released CSV)", None),
    PaperNumber("unigram_depth", MEDIUM, "unigram neurons sit early (layers 0-1 of 24)", "§4.3, Figs 4a, 15, 16", None,
                "a claim, scored by `explain.depth_claim_holds`: the depth slice of the unigram neurons' median "
                "layer overlaps [0, 1/3]"),
    PaperNumber("previous_token_depth", MEDIUM, "previous-token neurons sit early-mid (mostly layers 4-6 of 24)",
                "§4.3, Figs 1b, 18", None, "a claim, scored by `explain.depth_claim_holds`: the depth slice of the "
                "median layer overlaps [0.1, 0.5]"),
    PaperNumber("position_depth", MEDIUM, "position neurons sit in the first layers (0-2)", "§4.3, Figs 1c, 19", None,
                "a claim, scored by `explain.depth_claim_holds`: the depth slice of the median layer overlaps [0, 1/4]"),
    PaperNumber("syntax_depth", MEDIUM, "syntax neurons are not concentrated in any part of the network",
                "§4.3, Figs 4b, 20", None, "a claim, scored by `explain.depth_claim_holds`: the first- and third-quartile "
                "layers lie more than 0.25 of the depth apart"),
    PaperNumber("late_prediction", MEDIUM, "almost all late-layer universal neurons are prediction, suppression or partition",
                "§4.3, §5.1", None, "W_U statistics, not a variance-reduction family: measured in chapter 02's table"),
    # --- chapter 06, §5.3: attention (de)activation neurons (Figs 8, 26) --------------------------
    PaperNumber("bos_value_ratio_median", MEDIUM, 19.4, "§5.3", 10.0,
                "median over heads of mean ‖W_O v‖ over other tokens / ‖W_O v_BOS‖; tolerance: this book's, "
                "an order-of-magnitude check (9.4-29.4)"),
    PaperNumber("attn_score_min", MEDIUM, -11.7, "Fig 8a", None,
                "the most negative h_n over all (neuron, later head) pairs; its scale depends on the model's size"),
    PaperNumber("attn_score_heavy_tails", MEDIUM, "the scores of neurons have far heavier tails than random directions",
                "Fig 8a", None, "a claim, scored by the caller: at least 10 pairs beyond the largest |score| of as many "
                "random unit vectors (about 1 is expected by chance)"),
    PaperNumber("attn_example_deactivation", MEDIUM,
                "ablating a high-h_n neuron's positive activation lowers the head's BOS attention and raises its output norm",
                "§5.3, Fig 8b,c (L4.3594 -> L5.H0)", None,
                "a claim, scored by the caller: for the measured pair of largest h_n, the fitted slope of Δp(BOS) on "
                "the activation is negative and that of the norm change positive"),
    PaperNumber("attn_example_points", MEDIUM, 12288, "Fig 8b,c (A5H0L4N0_12288dp.csv)", None,
                "tokens in the example's scatter"),
    PaperNumber("attn_heuristic_predicts", MEDIUM, "pairs chosen by the heuristic show the predicted effect",
                "§5.3, Figs 8, 26 (examples only)", None,
                "this book's test across many pairs, scored by the caller: the 95% bootstrap interval of the Spearman "
                "correlation between h_n x mean activation and the measured mean effect lies above 0"),
    # --- §5.1 (chapter 04): prediction, suppression and partition neurons --------------------------
    PaperNumber("wu_kurtosis_threshold", MEDIUM, 10, "reference code (`vocab_kurt > 10`; PAPER.md §5a)", None,
                "W_U kurtosis above which a neuron is a prediction (skew > 0) or suppression (skew < 0) neuron"),
    PaperNumber("prediction_rise_depth", MEDIUM, 0.5, "§5.1, Fig 6a (prediction neurons become common 'after about "
                "the midpoint')", 0.25, "relative depth layer / (layers - 1); ours by `vocab.rise_depth` (the first layer "
                "whose count of prediction neurons reaches 10% of the largest per-layer count; the notebook applies the same "
                "rule to universal_wu_kurt_gt10_by_layer); tolerance: 'about the midpoint' read as 0.25-0.75"),
    PaperNumber("suppression_last_layer", MEDIUM, "suppression neurons dominate the very last layer", "§5.1, Fig 6b,c", None,
                "a claim, scored by the caller: in the last layer, suppression neurons outnumber prediction neurons"),
    PaperNumber("wu_seed_consistency", MEDIUM, "the per-layer W_U pattern is very consistent across the five seeds",
                "§5.1, Fig 6 (min-max bands over seeds a-e)", None,
                "a claim, scored by the caller: `vocab.seed_consistency` (every layer's 95th-percentile W_U kurtosis within "
                "25% of its seed mean, and the same majority class among heavy-tailed last-layer neurons in every seed)"),
    PaperNumber("wu_pattern_tied", MEDIUM, "heavy-tailed (prediction/suppression) neurons concentrate in late layers "
                "with tied embeddings (GPT2)", "§5.1, Fig 6", None,
                "a claim, scored by the caller: the share of heavy-tailed neurons in the last quarter of the layers exceeds "
                "that in the first half"),
    PaperNumber("wu_pattern_untied", MEDIUM, "the same late-layer pattern with untied embeddings (Pythia 410M-6.9B; "
                "GPT2-medium is the tied model it is compared with)",
                "§5.1, App. Fig 22", None, "a claim, scored by the caller with the rule of wu_pattern_tied"),
    PaperNumber("universal_wu_kurt_gt10_by_layer", MEDIUM, ((14, 4), (15, 8), (16, 11), (17, 16), (18, 24), (19, 28),
                                                            (20, 31), (21, 37), (22, 50), (23, 77)),
                "reference notebook (PAPER.md §4, 'also mentioned')", None,
                "(layer, universal neurons with W_U kurtosis > 10) in GPT2-medium-a; almost none before layer 14 of 24"),
    PaperNumber("suppression_fires_on_class", MEDIUM, "suppression neurons fire more when the next token is in "
                "their class", "§5.1, Fig 24", None,
                "a claim, scored by the caller: most tested suppression neurons have a higher mean pre-activation when "
                "the next token is in their class (sign test over neurons)"),
    PaperNumber("antipodal_cos", MEDIUM, -0.8, "§5.1 (ensembles; PAPER.md §5a)", None,
                "cos(w_out_i, w_out_j) below which two neurons of a class ensemble count as an antipodal pair"),
    # --- §5.2: entropy neurons (chapter 05) ----------------------------------------------------
    PaperNumber("entropy_grid", MEDIUM, (-0.17, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0), "§5.2 (entropy_intervention.py)", None,
                "the fixed post-GELU activations; -0.17 is GELU's minimum"),
    PaperNumber("entropy_n_random", MEDIUM, 20, "§5.2, Fig 7 (sample_baseline_neurons)", None,
                "random neurons of the last two layers, without the top decile of l2_penalty or bottom decile of vocab_var"),
    PaperNumber("entropy_neuron_l2_rank", MEDIUM, 15, "§5.2 (L23.945 is the 15th-largest-norm neuron)", None,
                "rank of the entropy neuron's ||w_in||^2 + ||w_out||^2 among all neurons"),
    PaperNumber("entropy_neuron_vocab_var_rank", MEDIUM, 1, "§5.2 (L23.945 has the lowest var of W_U w_out)", None,
                "rank of the entropy neuron's vocabulary-effect variance, lowest first"),
    PaperNumber("entropy_anti_cos", MEDIUM, -0.886, "§5.2 (cos of w_out, L23.945 vs L22.2882)", 0.15,
                "an antipodal pair; tolerance: this book's"),
    PaperNumber("entropy_delta_entropy", MEDIUM, 0.83, "§5.2 reference notebook (2.61 -> 3.44 nats, L23.945 at 5 vs 0)", None,
                "24 sequences; not scored: model and activation scale differ"),
    PaperNumber("entropy_monotone", MEDIUM, "fixing the entropy neuron higher raises the final-LN scale and the entropy "
                "steeply while the reciprocal rank stays nearly flat; random neurons are flat", "§5.2, Fig 7c-e", None,
                "a claim, scored by the caller from the computed curves"),
    PaperNumber("entropy_anti_partner", MEDIUM, "an anti-entropy neuron lowers the scale and the entropy",
                "§5.2, Fig 7c,e (L22.2882)", None, "a claim, scored by the caller"),
    PaperNumber("entropy_null_space", MEDIUM, "the entropy neuron's output lies mostly in W_U's null space",
                "§5.2 (mechanism); quantified in Stolfo et al. 2024", None,
                "a claim, scored by the caller: null-space fraction far above random neurons'"),
    # --- follow-ups (sections beyond the paper): their claims, under their own source -----------
    PaperNumber("nandan_ablation_matters", SMALL,
                "mean-ablating universal neurons raises the loss and the KL divergence more than ablating as "
                "many random neurons", f"{NANDAN} (abstract; ablation experiments)", None,
                "five GPT-2 small seeds, 5M tokens; a claim, scored by the caller: for the whole set, the "
                "bootstrap interval (over token rows) of the ratio to random neurons of the same layers lies "
                "above 1 for the KL and for the loss, and the set's effect exceeds every random draw's"),
    PaperNumber("nandan_first_layer", SMALL,
                "ablating the first layer's universal neurons raises the KL and the loss disproportionately",
                f"{NANDAN} (layer-wise ablation)", None,
                "a claim, scored by the caller: layer 0's set moves the KL more than random neurons of layer 0 "
                "(as for the whole set) and its ratio is the largest of all layers in at least 95% of the "
                "bootstrap resamples"),
    PaperNumber("nandan_persistence", SMALL,
                "the universal neurons of one checkpoint largely stay universal at the next",
                f"{NANDAN} (persistence across checkpoints)", None,
                "a claim, scored by the caller: for every consecutive pair of trained checkpoints, more than "
                "half of the earlier set is in the later one, and the overlap is beyond what random sets of "
                "the same per-layer sizes reach (p < 0.01)"),
    PaperNumber("stolfo_frequency_direction", SMALL,
                "token frequency neurons write along the log-frequency direction of the unigram distribution "
                "in logit space", f"{STOLFO} (abstract; token frequency neurons)", None,
                "GPT-2 small (OpenAI's release) and Pythia 410M in that paper; a claim, scored by the caller: "
                "the top late-layer neuron's |cos| with the direction is beyond what as many random "
                "directions reach (Bonferroni p < 0.01)"),
    PaperNumber("stolfo_frequency_effect", SMALL,
                "fixing a token frequency neuron's activation shifts the output towards or away from the "
                "unigram distribution", f"{STOLFO} (abstract; token frequency neurons)", None,
                "a claim, scored by the caller: the change of KL(output || unigram) from activation 0 to the "
                "neuron's typical large activation (total effect) exceeds every random late neuron's"),
])

_INDEX = {(e.key, e.model): e for e in REGISTRY}
if len(_INDEX) != len(REGISTRY):  # pragma: no cover - a duplicated entry is a bug in this file
    raise RuntimeError("duplicate (key, model) in the paper registry")


def model_for(name: str, default: str = DEFAULT_MODEL) -> str:
    """The paper model a family is compared with: itself if it is one of the paper's, else `default`."""
    return name if name in PAPER_MODELS else default


def entry(key: str, model: str = DEFAULT_MODEL) -> PaperNumber:
    """The registry entry `key` for `model` (KeyError naming the models that have it)."""
    try:
        return _INDEX[(key, model)]
    except KeyError:
        have = sorted(m for k, m in _INDEX if k == key)
        raise KeyError(f"the paper registry has no {key!r} for {model!r}" + (f"; it has it for {have}" if have else "")) from None


def value(key: str, model: str = DEFAULT_MODEL) -> Any:
    return entry(key, model).value


def by_model(key: str) -> dict[str, Any]:
    """{model: value} of one key."""
    return {e.model: e.value for e in REGISTRY if e.key == key}


def registry_table() -> pd.DataFrame:
    return pd.DataFrame([e.__dict__ for e in REGISTRY]).set_index(["key", "model"])


# Views kept for callers that read a whole key at once (all derived from REGISTRY).
UNIVERSAL_SHARE = by_model("universal_share")
UNIVERSAL_COUNT = by_model("universal_count")
N_NEURONS = by_model("n_neurons")
UNIVERSAL_PCT_BY_LAYER = {m: list(v) for m, v in by_model("universal_pct_by_layer").items()}
PROPERTY_MEDIAN_KEYS = {"pre_kurt": "median_pre_kurt_universal", "pre_skew": "median_pre_skew_universal",
                        "act_freq": "median_act_freq_universal", "input_bias": "median_input_bias_universal",
                        "l2_penalty": "median_l2_penalty_universal"}


def property_medians(model: str) -> dict[str, float]:
    """{statistics column: the paper's median over universal neurons} for `model` (§4.2)."""
    return {col: value(key, model) for col, key in PROPERTY_MEDIAN_KEYS.items()}


# ------------------------------------------------------------------------ "Result vs paper"
def _show(v: Any, fmt: str) -> str:
    if v is None:
        return ""
    if isinstance(v, float) and math.isnan(v):
        return "n/a"
    if isinstance(v, (tuple, list, set, frozenset)):
        return ", ".join(str(x) for x in v)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        try:
            return format(v, fmt)
        except (TypeError, ValueError):
            return str(v)
    return str(v)


# The verdicts a "Result vs paper" row can have, in the order the front page counts them.
VERDICTS = ("matched", "differs", "not informative", "not measured", "not scored")


@dataclass
class Comparison:
    """One row of a "Result vs paper" table.

    `ours` is the computed value; `control` the same measurement on the untrained control (None
    where there is none); `key`/`model` name the registry entry. `holds` scores a claim entry
    (tolerance None) with a computed boolean, and `control_holds` is the same rule applied to the
    control (required when a claim row shows a control). `measured` is False when there is nothing
    to measure (e.g. no neuron of the kind the claim is about), whatever `holds` says. `reason` is
    computed text the caller passes for a row that differs or is not measured (shown only then).
    `fmt` formats numbers (e.g. ".3f", ".2%")."""

    quantity: str
    key: str
    ours: Any
    control: Any = None
    model: str = DEFAULT_MODEL
    reason: str = ""
    holds: bool | None = None
    control_holds: bool | None = None
    measured: bool = True
    fmt: str = ".3f"
    extra: dict = field(default_factory=dict)


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def control_passes(e: PaperNumber, control: Any, holds: bool | None = None, control_holds: bool | None = None) -> bool | None:
    """Whether the untrained control passes the test the trained model is scored by: `control_holds`
    for a claim (a row scored with `holds`), else the entry's tolerance applied to `control`. None
    when there is no control value. A control that is shown but cannot be judged by that rule is an
    error (a claim row needs `control_holds`), so no row is matched on an unjudged control."""
    if control_holds is not None:
        return bool(control_holds)
    if _missing(control):
        return None
    if holds is not None:
        raise ValueError(f"{e.key}: a claim row with an untrained control needs `control_holds` (the same rule on the control)")
    ok = e.matches(control)
    if ok is None and e.tolerance is not None:
        raise ValueError(f"{e.key}: the control {control!r} cannot be judged by the tolerance; pass `control_holds`")
    return ok


def verdict(e: PaperNumber, ours: Any, holds: bool | None = None, control: Any = None,
            control_holds: bool | None = None, measured: bool = True) -> str:
    """The row's verdict:

    - "not measured": `ours` is missing, or the caller found nothing to measure (`measured` False);
    - "not scored": neither a tolerance nor `holds` applies;
    - "differs": ours fails the entry's tolerance (or `holds` is False);
    - "not informative": ours passes, but so does the untrained control by the same rule
      (`control_passes`), so passing says nothing about training;
    - "matched": ours passes and the control, where there is one, does not."""
    if not measured or _missing(ours):
        return "not measured"
    ok = e.matches(ours) if holds is None else bool(holds)
    if ok is None:
        return "not scored"
    if not ok:
        return "differs"
    return "not informative" if control_passes(e, control, holds, control_holds) else "matched"


def result_table(rows: Iterable[Comparison]) -> pd.DataFrame:
    """The chapter's "Result vs paper" table: quantity, this book, untrained control, paper (value,
    model, source, tolerance), verdict, and a reason: the caller's where the verdict is "differs" or
    "not measured", the control's passing value where it is "not informative"."""
    out = []
    for r in rows:
        e = entry(r.key, r.model)
        v = verdict(e, r.ours, r.holds, r.control, r.control_holds, r.measured)
        numeric = isinstance(e.value, (int, float)) and not isinstance(e.value, bool)
        tol = "" if e.tolerance is None or not numeric else f" (± {_show(e.tolerance, r.fmt)})"  # none for a text value
        ctl = _show(r.control, r.fmt) if r.control is not None else ""
        reason = (r.reason if v in ("differs", "not measured") else
                  f"the untrained control passes the same test ({ctl})" if v == "not informative" else "")
        out.append({"quantity": r.quantity, "this book": _show(r.ours, r.fmt), "untrained control": ctl,
                    "paper": f"{_show(e.value, r.fmt)}{tol}; {e.model}, {e.source}", "verdict": v, "reason": reason})
    return pd.DataFrame(out).set_index("quantity")


def control_note(table: pd.DataFrame, reasons: dict[str, str]) -> str:
    """Markdown for under a `result_table`: for each model `label` of `reasons` {label: why} whose rows
    (the quantity names it) have no untrained control, a sentence that says so, why, and how many
    of those rows are "matched" (agree with the paper with no control to check that training made
    them so). Empty when every row of those models has a control."""
    parts = []
    for label, why in reasons.items():
        mine = table[table.index.str.contains(label, regex=False) & (table["untrained control"] == "")]
        if len(mine) == 0:
            continue
        n, k = int((mine.verdict == "matched").sum()), len(mine)
        rows = f"its {k} rows above are" if k != 1 else "its row above is"
        who = ("its \"matched\" verdict says" if k == 1 else "the one \"matched\" verdict among them says" if n == 1
               else f"the {n} \"matched\" verdicts among them say")
        matched = ("none of them is \"matched\"" if n == 0 else
                   f"{who} that {label} agrees with the paper, not that its training made it so")
        parts.append(f"**{label}: no untrained control.** {why} So {rows} not checked against one: {matched}.")
    return "\n\n".join(parts)

TABLE1_KEYS = ("n_layers", "n_heads", "d_model", "d_mlp", "d_vocab", "n_ctx", "act_fn", "positional", "n_neurons",
               "params_printed")


def table1(ours: dict | None = None, name: str = "this book", models: Iterable[str] = (SMALL, MEDIUM)) -> pd.DataFrame:
    """The paper's Table 1 from the registry (one column per paper model), with `ours` (a
    `models.describe_model` dict; `n_params` is shown in the `params_printed` row) beside it."""
    cols = {f"{m} (paper)": {k: value(k, m) for k in TABLE1_KEYS} for m in models}
    if ours is not None:
        cols[name] = {k: (f"{ours['n_params'] / 1e6:.2f}M" if k == "params_printed" else ours.get(k)) for k in TABLE1_KEYS}
    out = pd.DataFrame(cols)
    out.index.name = "Table 1"
    return out
