"""The paper registry, the "Result vs paper" table and the summary formatter."""
import math

import pandas as pd
import pytest

from helpers import paper, properties, report


def test_every_entry_has_a_source_and_known_model():
    for e in paper.REGISTRY:
        assert e.source and e.model in paper.PAPER_MODELS and e.key
        assert e.tolerance is None or e.tolerance >= 0


def test_lookup_and_views_read_the_registry():
    assert paper.value("universal_share", "stanford-gpt2-medium") == 0.0123
    assert paper.UNIVERSAL_SHARE["pythia-160m"] == paper.entry("universal_share", "pythia-160m").value
    assert paper.value("median_baseline_universal") == pytest.approx(0.155)
    with pytest.raises(KeyError, match="seed_spread_all"):
        paper.entry("seed_spread_all", "pythia-160m")
    assert paper.model_for("embedded") == paper.DEFAULT_MODEL and paper.model_for("pythia-160m") == "pythia-160m"


def test_property_medians_come_from_the_registry():
    assert properties.PAPER_MEDIANS["stanford-gpt2-small"] == {"pre_kurt": 5.6, "pre_skew": 0.80, "act_freq": 0.025,
                                                              "input_bias": -0.79, "l2_penalty": 0.77}
    assert properties.PAPER_MEDIANS["pythia-160m"]["l2_penalty"] == paper.value("median_l2_penalty_universal", "pythia-160m")


def test_verdict_follows_the_tolerance():
    e = paper.entry("universal_share", "stanford-gpt2-small")  # 0.0416 +- 0.01
    assert paper.verdict(e, 0.05) == "matched" and paper.verdict(e, 0.06) == "differs"
    assert paper.verdict(e, float("nan")) == "not measured"
    assert paper.verdict(paper.entry("universal_count"), 10) == "not scored"
    assert paper.verdict(paper.entry("depth_specialisation"), "x", holds=False) == "differs"
    wp = paper.entry("weight_processing")
    assert paper.verdict(wp, ["center_unembed", "fold_ln", "center_writing_weights"]) == "matched"
    assert paper.verdict(wp, ["fold_ln"]) == "differs"
    assert paper.verdict(paper.entry("n_seeds"), 5) == "matched" and paper.verdict(paper.entry("n_seeds"), 3) == "differs"


def test_result_table_shows_control_and_reason_only_when_it_differs():
    t = paper.result_table([
        paper.Comparison("share", "universal_share", 0.045, control=0.0, fmt=".2%", reason="r1"),
        paper.Comparison("baseline", "median_baseline_universal", 0.7, control=0.8, reason="high baseline"),
    ])
    assert list(t.columns) == ["this book", "untrained control", "paper", "verdict", "reason"]
    assert t.loc["share", "verdict"] == "matched" and t.loc["share", "reason"] == ""
    assert t.loc["share", "this book"] == "4.50%" and t.loc["share", "untrained control"] == "0.00%"
    assert t.loc["baseline", "verdict"] == "differs" and t.loc["baseline", "reason"] == "high baseline"
    assert "stanford-gpt2-small" in t.loc["baseline", "paper"] and "0.155" in t.loc["baseline", "paper"]


def test_summary_formats_computed_numbers():
    text = report.summary_markdown(["{n} neurons, {share:.1%}", "p99 {p:.3f}"], n=12, share=0.0123, p=float("nan"))
    assert text == "- 12 neurons, 1.2%\n- p99 n/a"
    with pytest.raises(KeyError):
        report.sentence("{missing}")


def test_result_table_shows_a_tolerance_only_for_numbers():
    t = paper.result_table([paper.Comparison("layers", "n_layers", 2), paper.Comparison("activation", "act_fn", "gelu_new")])
    assert "(± 0.000)" in t.loc["layers", "paper"] and "±" not in t.loc["activation", "paper"]
