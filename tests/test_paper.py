"""The paper registry, the "Result vs paper" table and the summary formatter."""
import math

import pandas as pd
import pytest

from helpers.core import paper, report
from helpers.properties import compare as properties


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
    assert paper.verdict(wp, ["center_unembed", "fold_ln", "center_writing_weights", "fold_value_biases"]) == "matched"
    assert paper.verdict(wp, ["center_unembed", "fold_ln", "center_writing_weights"]) == "differs"
    assert paper.verdict(wp, ["fold_ln"]) == "differs"
    assert paper.verdict(paper.entry("n_seeds"), 5) == "matched" and paper.verdict(paper.entry("n_seeds"), 3) == "differs"


def test_weight_processing_entry_is_what_the_models_are_loaded_with():
    from helpers.models import loading as models

    # the paper loaded its models with from_pretrained's defaults; ours are processed the same way
    applied = [k for k, v in models.PROCESSING.items() if v]
    assert paper.verdict(paper.entry("weight_processing"), applied) == "matched"


def test_verdict_judges_the_control_by_the_same_rule():
    e = paper.entry("universal_share", "stanford-gpt2-small")  # 0.0416 +- 0.01
    # trained passes, control fails -> matched; both pass -> not informative; trained fails -> differs
    assert paper.verdict(e, 0.045, control=0.0) == "matched"
    assert paper.verdict(e, 0.045, control=0.04) == "not informative"
    assert paper.verdict(e, 0.045, control=0.0516) == "not informative"  # at the tolerance's edge: passes
    assert paper.verdict(e, 0.2, control=0.04) == "differs" and paper.verdict(e, 0.2, control=0.0) == "differs"
    assert paper.verdict(e, 0.045) == "matched"  # no control measured: our rule alone
    assert paper.verdict(e, 0.045, control=float("nan")) == "matched"
    # nothing measured -> not measured, whatever the values
    assert paper.verdict(e, float("nan"), control=0.04) == "not measured"
    assert paper.verdict(e, 0.045, control=0.0, measured=False) == "not measured"
    # a claim: the control is judged by control_holds, never by our holds
    c = paper.entry("attn_heuristic_predicts", "stanford-gpt2-medium")
    assert paper.verdict(c, "rho 0.30", holds=True, control="rho 0.86", control_holds=False) == "matched"
    assert paper.verdict(c, "rho 0.30", holds=True, control="rho 0.86", control_holds=True) == "not informative"
    assert paper.verdict(c, "rho -0.1", holds=False, control="rho 0.86", control_holds=True) == "differs"
    assert paper.verdict(c, "0 pairs", holds=True, control_holds=False, measured=False) == "not measured"
    # a control shown on a claim row without its judgement cannot be matched silently
    with pytest.raises(ValueError, match="control_holds"):
        paper.verdict(c, "rho 0.30", holds=True, control="rho 0.86")
    with pytest.raises(ValueError, match="control_holds"):
        paper.verdict(e, 0.045, control="rho 0.86")
    # a control judged on a row that fails or is not scored changes nothing
    assert paper.verdict(paper.entry("universal_count"), 10, control=10) == "not scored"


def test_result_table_reasons_follow_the_verdict():
    t = paper.result_table([
        paper.Comparison("both pass", "universal_share", 0.045, control=0.04, fmt=".2%", reason="r"),
        paper.Comparison("claim", "attn_heuristic_predicts", "rho 0.30", control="rho 0.86", model="stanford-gpt2-medium",
                         holds=True, control_holds=True, reason="r"),
        paper.Comparison("vacuous", "wu_seed_consistency", "0 neurons per seed", model="stanford-gpt2-medium", holds=True,
                         measured=False, reason="no heavy-tailed neuron in any seed"),
        paper.Comparison("fails", "universal_share", 0.2, control=0.04, reason="too many"),
    ])
    assert list(t.verdict) == ["not informative", "not informative", "not measured", "differs"]
    assert t.loc["both pass", "reason"] == "the untrained control passes the same test (4.00%)"
    assert t.loc["claim", "reason"] == "the untrained control passes the same test (rho 0.86)"
    assert t.loc["vacuous", "reason"] == "no heavy-tailed neuron in any seed" and t.loc["fails", "reason"] == "too many"
    assert set(t.verdict) <= set(paper.VERDICTS)


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


def test_control_note_names_the_rows_without_a_control_and_counts_their_matches():
    from helpers.core.presets import load_preset
    from helpers.models import families

    t = paper.result_table([
        paper.Comparison("share (embedded-a)", "universal_share", 0.045, control=0.0, fmt=".2%"),
        paper.Comparison("share (gemma3-270m)", "universal_share", 0.045, fmt=".2%"),
        paper.Comparison("baseline (gemma3-270m)", "median_baseline_universal", 0.7, reason="high"),
        paper.Comparison("share (smollm2-135m)", "universal_share", 0.045, control=0.0, fmt=".2%"),
    ])
    why = families.control_reasons(load_preset("default"))
    assert set(why) == {"gemma3-270m", "smollm2-135m"} and "Gemma 3 270M" in why["gemma3-270m"]
    note = paper.control_note(t, why)
    assert note.startswith("**gemma3-270m: no untrained control.** Gemma 3 270M is a pretrained model")
    assert "its 2 rows above are not checked against one: the one \"matched\" verdict among them says that gemma3-270m agrees" in note
    one = paper.result_table([paper.Comparison("x (gemma3-270m)", "median_baseline_universal", 0.7, reason="high")])
    assert "its row above is not checked against one: none of them is \"matched\"." in paper.control_note(one, why)
    assert "smollm2-135m" not in note  # its row has a control
    assert paper.control_note(t, {"smollm2-135m": "x"}) == ""
    assert families.control_reasons(load_preset("smoke")) == {"smollm2-135m": families.no_control_reason("smollm2-135m")}
    with pytest.raises(ValueError, match="real models"):
        families.no_control_reason("embedded")


def test_chapters_02_to_05_say_where_the_second_real_model_is():
    from helpers.core.presets import load_preset
    from helpers.models import families

    note = families.second_model_note(load_preset("default"))
    assert "SmolLM2-135M-Instruct (`smollm2-135m`), is analysed in chapter 06 only" in note
    assert note.endswith("the model kept is the preset's `single_model`, `gemma3-270m`.")
    assert families.second_model_note(load_preset("smoke")) == ""  # it names no second model
