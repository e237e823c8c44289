"""Chapter 00's "Result vs paper" rows (paper §1, Table 1, App. A.1): the object the paper studies.

This chapter reproduces no figure; each row reads the paper's value from the registry and scores
the family's against its tolerance (`helpers.core.paper.verdict`). There is no untrained control
here: an untrained model has the same architecture by construction, so no row could separate it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from helpers.core import paper, report


def comparisons(family_name: str, n_members: int, description: dict, processing: dict,
                training: pd.DataFrame | None = None, corpus: pd.DataFrame | None = None,
                info: dict | None = None, data_name: str = "embedded corpus") -> list[paper.Comparison]:
    """Chapter 00's rows for the family `family_name` of `n_members` models.

    `description`: the reference model's `loading.describe_model` dict; `processing`: its weight
    processing record ({step: applied}). For a family trained by this book, `training` is its
    `training.training_table` (one row per member: seed, steps, train_tokens), `corpus` the corpus
    summary (one row per source, with `train_tokens`), `info` the family's record (`train_seconds`,
    `source`); they add the rows on seeds, steps and data, and a family without them (a hub family)
    has none of those rows. The reasons are computed from the same inputs."""
    model = paper.model_for(family_name)
    info = info or {}
    budget = ""
    if training is not None:
        seconds = list((info.get("train_seconds") or {}).values())
        budget = report.sentence(
            "sized for {tokens:,} training tokens per seed, about {s:.0f} s of training per member where it was "
            "trained ({where})", tokens=int(training.train_tokens.iloc[0]),
            s=float(np.median(seconds)) if seconds else None, where=info.get("source", "trained here"))
    applied = [k for k, v in processing.items() if v]
    paper_proc = paper.value("weight_processing", model)
    missing = ", ".join(sorted(set(paper_proc) - set(applied))) or "none"
    extra = ", ".join(sorted(set(applied) - set(paper_proc))) or "none"
    rows = [
        paper.Comparison("models differing only in their seed", "n_seeds", n_members, model=model, fmt="d",
                         reason=report.sentence("this preset's family has {n} members", n=n_members)),
        *[paper.Comparison(f"architecture: {label}", key, description[key], model=model, fmt="d", reason=budget)
          for key, label in (("n_layers", "layers"), ("d_model", "d_model"), ("d_mlp", "d_mlp"))],
        paper.Comparison("activation function", "act_fn", description["act_fn"], model=model),
        paper.Comparison("weight processing on load", "weight_processing", applied, model=model,
                         reason=report.sentence("not applied here: {missing}; applied here only: {extra}",
                                                missing=missing, extra=extra)),
    ]
    if training is not None:
        seeds = training.seed
        rows += [
            paper.Comparison("what differs between members", "seed_only_difference",
                             f"seeds {', '.join(str(x) for x in seeds)}; one architecture and recipe",
                             holds=bool(seeds.nunique() == len(training)), model=model,
                             reason=report.sentence("{n} members, {k} distinct seeds", n=len(training),
                                                    k=seeds.nunique())),
            paper.Comparison("training steps", "train_steps", int(training.steps.iloc[0]), model=model, fmt=",d",
                             reason=budget),
            paper.Comparison("training data", "train_data", data_name, model=model, reason=report.sentence(
                "{n} sources, {tokens:,} training tokens (section 1)",
                n=len(corpus) if corpus is not None else None,
                tokens=int(corpus.train_tokens.sum()) if corpus is not None else None)),
        ]
    return rows
