"""Chapter 04's "Result vs paper" rows and its set-size table, on planted W_U moments with known verdicts."""
import numpy as np
import pandas as pd
import pytest

from helpers.core import paper
from helpers.correlations.universality import NeuronSet
from helpers.prediction import verdicts

D = 20  # neurons per layer


def moments(members="abc", n_layers=4, heavy=None):
    """W_U moments of a family: every neuron Gaussian-like (kurtosis about 3, variance ratio 1) except
    `heavy` {(layer, neuron): skew}, which get kurtosis 40 (prediction for skew > 0, suppression < 0)."""
    heavy = heavy or {}
    rows = []
    for m in members:
        for l in range(n_layers):
            for n in range(D):
                skew = heavy.get((l, n))
                rows.append({"member": m, "layer": l, "neuron": n,
                             "vocab_kurt": 3.0 + 0.01 * n if skew is None else 40.0,
                             "vocab_skew": 0.05 if skew is None else skew, "var_ratio": 1.0})
    return pd.DataFrame(rows)


# the paper's picture: prediction neurons from the middle on, suppression neurons dominating the last layer
LATE = {(2, 0): 1.0, (2, 1): 1.0, (3, 0): -1.0, (3, 1): -1.0, (3, 2): -1.0, (3, 3): 1.0}
SINGLE_LATE = {(l, n): 1.0 for l in range(4, 8) for n in range(2)} | {(7, n): -1.0 for n in range(2, 6)}


def single(heavy=SINGLE_LATE):
    return moments("s", 8, heavy).drop(columns="member")


def table(rows):
    return paper.result_table(rows)


def verdict_of(rows, start):
    t = table(rows)
    hit = [q for q in t.index if q.startswith(start)]
    assert len(hit) == 1, (start, list(t.index))
    return t.loc[hit[0], "verdict"]


def rows_for(fam, ctl, sm=None, test=None):
    return verdicts.comparisons(fam, single() if sm is None else sm, ctl, test, reference="a", n_layers=4,
                                n_layers_single=8, family="planted", single_name="one-model")


def test_the_papers_picture_is_matched_against_a_gaussian_control():
    test = {"n": 10, "positive": 9, "p_bonferroni": 0.02}
    rows = rows_for(moments(heavy=LATE), moments(), test=test)
    assert verdict_of(rows, "late-layer pattern, untied") == "matched"
    assert verdict_of(rows, "suppression dominates the last layer (planted") == "matched"
    assert verdict_of(rows, "suppression dominates the last layer (one-model") == "matched"
    assert verdict_of(rows, "late-layer pattern, tied") == "matched"
    assert verdict_of(rows, "consistency across the 3 seeds") == "matched"
    assert verdict_of(rows, "suppression neurons fire more") == "matched"
    # prediction neurons rise at layer 2 of 4 (relative depth 0.67, within 0.5 +- 0.25); SmolLM2-like at 4 of 8
    assert verdict_of(rows, "relative depth where prediction neurons rise (planted-a)") == "matched"
    assert verdict_of(rows, "relative depth where prediction neurons rise (one-model)") == "matched"
    assert table(rows).loc["relative depth where prediction neurons rise (planted-a)", "this book"] == "0.67"


def test_a_control_that_shows_the_same_pattern_makes_the_rows_not_informative():
    rows = rows_for(moments(heavy=LATE), moments(heavy=LATE))
    for q in ("late-layer pattern, untied", "suppression dominates the last layer (planted",
              "consistency across", "relative depth where prediction neurons rise (planted-a)"):
        assert verdict_of(rows, q) == "not informative", q
    # a control with heavy tails only where the paper's pattern is absent does not pass
    rows = rows_for(moments(heavy=LATE), moments(heavy={(0, 0): 1.0, (0, 1): -1.0}))
    assert verdict_of(rows, "late-layer pattern, untied") == "matched"


def test_no_heavy_tailed_neuron_is_not_measured():
    none_tested = {"n": 0, "positive": 0, "p_bonferroni": float("nan")}
    rows = rows_for(moments(), moments(), sm=single({}), test=none_tested)
    t = table(rows)
    for q in ("consistency across", "late-layer pattern, untied", "late-layer pattern, tied",
              "suppression dominates the last layer (planted", "suppression dominates the last layer (one-model",
              "relative depth where prediction neurons rise", "suppression neurons fire more"):
        hits = [x for x in t.index if x.startswith(q)]
        assert hits and all(t.loc[x, "verdict"] == "not measured" for x in hits), q
    reason = t.loc[[x for x in t.index if x.startswith("consistency")][0], "reason"]
    assert "no heavy-tailed (W_U kurtosis > 10) neuron in any layer of any of the 3 seeds" == reason
    assert verdict_of(rows_for(moments(), None, test=None), "suppression neurons fire more") == "not measured"


def test_the_wrong_picture_differs():
    early = {(0, 0): 1.0, (0, 1): 1.0, (0, 2): 1.0, (3, 0): 1.0, (3, 1): 1.0}  # early, and prediction at the end
    test = {"n": 10, "positive": 2, "p_bonferroni": 0.1}
    rows = rows_for(moments(heavy=early), moments(), test=test)
    assert verdict_of(rows, "suppression dominates the last layer (planted") == "differs"
    # prediction neurons rise at relative depth 0
    assert verdict_of(rows, "relative depth where prediction neurons rise (planted-a)") == "differs"
    assert verdict_of(rows, "suppression neurons fire more") == "differs"
    # seeds that disagree on the last layer's majority are not consistent
    fam = pd.concat([moments("a", heavy=LATE), moments("b", heavy={(3, 0): 1.0, (3, 1): 1.0})])
    assert verdict_of(rows_for(fam, None), "consistency across the 2 seeds") == "differs"


def planted_set(n_layers=4, control_max=0.2):
    """A universality table whose late-layer neurons 0-3 have the highest excess correlation (0.9),
    the first layer's next (0.6); the control's maximum is `control_max`."""
    rows = [{"layer": l, "neuron": n, "excess_corr": (0.9 if (l == n_layers - 1 and n < 4) else
                                                      0.6 if (l == 0 and n < 4) else 0.01 * n)}
            for l in range(n_layers) for n in range(D)]
    t = pd.DataFrame(rows)
    control = pd.DataFrame({"excess_corr": [0.0, control_max]})
    return NeuronSet(t.assign(paper_sized=False), "paper_sized", control)


def test_set_sensitivity_counts_the_late_classes_in_the_set_and_the_rest():
    ref = moments("a", heavy=LATE).drop(columns="member")
    s = verdicts.set_sensitivity(ref, planted_set(), (0.05, 0.10), n_layers=4)
    # 5% of 80 neurons: the 4 late neurons of highest excess; 10%: 8, the first layer's 4 as well
    assert s.loc[0.05, "set"] == 4 and s.loc[0.05, "late set"] == 4 and s.loc[0.10, "set"] == 8
    assert s.loc[0.05, "late set: suppression"] == pytest.approx(3 / 4)
    assert s.loc[0.05, "late set: prediction"] == pytest.approx(1 / 4)
    assert s.loc[0.05, "late rest: suppression"] == 0.0 and s.loc[0.05, "late rest: partition"] == 0.0
    assert s.loc[0.05, "median W_U kurtosis (set)"] == 40.0 and s.loc[0.05, "median W_U kurtosis (rest)"] < 3.2
    # at 10% the set's median falls back among the Gaussian-like first-layer neurons
    assert s.loc[0.10, "median W_U kurtosis (set)"] < 40.0
    text = verdicts.sensitivity_sentence(s)
    assert "5%: 4 neurons, median W_U kurtosis 40.00" in text and "late set 100% classified" in text


def test_set_sensitivity_of_an_empty_set_is_nan_not_zero():
    ref = moments("a").drop(columns="member")
    # no neuron beats the control: the set is empty
    s = verdicts.set_sensitivity(ref, planted_set(control_max=0.95), (0.01,), n_layers=4)
    assert s.loc[0.01, "set"] == 0 and np.isnan(s.loc[0.01, "late set: prediction"])
    assert np.isnan(s.loc[0.01, "median W_U kurtosis (set)"])
    assert "n/a" in verdicts.sensitivity_sentence(s)
