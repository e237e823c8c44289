"""Chapter 06's "Result vs paper" rows and its set-size table, on planted measurements with known verdicts."""
import numpy as np
import pandas as pd
import pytest

from helpers.attention import verdicts
from helpers.attention.heads import rank_correlation
from helpers.core import paper
from helpers.correlations.universality import NeuronSet


def tails(beyond=100, n_pairs=100_000, lo=-3.0, hi=2.5):
    return {"n_pairs": n_pairs, "min": lo, "max": hi, "baseline_min": -0.5, "baseline_max": 0.5,
            "share_beyond_baseline": beyond / n_pairs if n_pairs else 0.0}


def pairs(n=40, related=True, top_slopes=(-0.02, 3.0), sign=1.0, seed=0):
    """Ablated pairs: the first is the pair of highest h_n with the given fitted slopes (per unit of
    signed activation); `predicted` and `effect_bos` related (or not) across pairs; `sign` the natural
    sign of the neurons (score = sign * score_raw)."""
    rng = np.random.default_rng(seed)
    score = np.sort(rng.normal(size=n))[::-1]
    pred = score * 0.5
    eff = pred + 0.05 * rng.normal(size=n) if related else rng.normal(size=n)
    why = ["most positive h_n"] * min(5, n) + ["random"] * max(n - 5, 0)
    p = pd.DataFrame({"neuron_layer": 1, "neuron": np.arange(n), "head_layer": 2, "head": 0, "score": score,
                      "score_raw": sign * score, "why": why, "n_tokens": 384, "slope_bos": 0.001, "slope_norm": 0.1,
                      "mean_p_bos": 0.3, "predicted": pred, "effect_bos": eff})
    p.loc[0, ["slope_bos", "slope_norm"]] = top_slopes
    return p


def measured(label, p, t=None, ratio=20.0):
    bos = pd.DataFrame({"layer": 0, "head": range(8), "ratio": [ratio] * 6 + [0.5, 0.5]})
    rank = rank_correlation(p.predicted, p.effect_bos, n_boot=300)
    return verdicts.Measured(label, bos, t or tails(), p, rank)


def verdict_of(rows, start):
    t = paper.result_table(rows)
    hit = [q for q in t.index if q.startswith(start)]
    assert len(hit) == 1, (start, list(t.index))
    return t.loc[hit[0], "verdict"]


def test_the_papers_picture_is_matched_against_a_control_without_it():
    control = measured("ctl", pairs(related=False, top_slopes=(0.02, -3.0)), tails(beyond=2), ratio=1.0)
    rows = verdicts.comparisons(measured("m", pairs()), measured("s", pairs(seed=1)), control)
    assert len(rows) == 11
    assert verdict_of(rows, "heavier tails than random (m") == "matched"
    assert verdict_of(rows, "top-h_n pair is a deactivation pair (m") == "matched"
    assert verdict_of(rows, "heuristic predicts the mean effect (m)") == "matched"
    assert verdict_of(rows, "heuristic predicts the mean effect (s)") == "matched"  # no control: our rule alone
    # 20 against 19.4 +- 10
    assert verdict_of(rows, "median head: mean ‖W_O v‖ / ‖W_O v_BOS‖ (m)") == "matched"
    assert verdict_of(rows, "tokens in the example scatter (m)") == "not scored"
    t = paper.result_table(rows)
    assert t.loc["median head: mean ‖W_O v‖ / ‖W_O v_BOS‖ (m)", "untrained control"] == "1.00"


def test_more_real_models_get_their_own_rows_in_order_without_the_example_count():
    m, s, g = measured("m", pairs()), measured("s", pairs(seed=1)), measured("g", pairs(seed=3), ratio=3.0)
    rows = verdicts.comparisons(m, s, None, [g])
    assert len(rows) == 16  # 6 rows for m, 5 each for s and g (no example token count)
    q = [r.quantity for r in rows]
    assert q.index("median head: mean ‖W_O v‖ / ‖W_O v_BOS‖ (g)") == 2  # after m's and s's BOS rows
    assert not any(x.startswith("tokens in the example scatter (g") for x in q)
    assert verdict_of(rows, "median head: mean ‖W_O v‖ / ‖W_O v_BOS‖ (g)") == "differs"  # 3 vs 19.4 ± 10


def test_a_control_that_passes_too_is_not_informative():
    m = measured("m", pairs())
    rows = verdicts.comparisons(m, None, measured("ctl", pairs(seed=2)))
    assert verdict_of(rows, "heuristic predicts the mean effect (m)") == "not informative"
    assert verdict_of(rows, "heavier tails than random (m") == "not informative"
    assert verdict_of(rows, "top-h_n pair is a deactivation pair (m") == "not informative"
    assert verdict_of(rows, "median head: mean ‖W_O v‖ / ‖W_O v_BOS‖ (m)") == "not informative"
    assert len(rows) == 6  # no single model: only the family's rows


def test_nothing_to_measure_is_not_measured():
    few = pairs(n=3).assign(why="random")  # no top pair ablated, three pairs: no rank correlation
    rows = verdicts.comparisons(measured("m", few, tails(beyond=0, n_pairs=0)), None, None)
    for q in ("heavier tails than random", "top-h_n pair is a deactivation pair",
              "heuristic predicts the mean effect", "tokens in the example scatter"):
        assert verdict_of(rows, q) == "not measured", q
    t = paper.result_table(rows)
    assert t.loc["heuristic predicts the mean effect (m)", "reason"] == (
        "3 pairs with a measured effect: too few for a rank correlation")
    nan_slopes = pairs(top_slopes=(np.nan, np.nan))
    assert verdict_of(verdicts.comparisons(measured("m", nan_slopes)), "top-h_n pair") == "not measured"


def test_the_wrong_picture_differs_and_the_natural_sign_is_read():
    rows = verdicts.comparisons(measured("m", pairs(related=False, top_slopes=(0.02, -3.0)), tails(beyond=3)))
    assert verdict_of(rows, "heavier tails than random") == "differs"
    assert verdict_of(rows, "top-h_n pair is a deactivation pair") == "differs"
    assert verdict_of(rows, "heuristic predicts the mean effect") == "differs"
    # a neuron that fires negatively (s = -1): slopes per unit of signed activation flip
    flipped = verdicts.comparisons(measured("m", pairs(top_slopes=(0.02, -3.0), sign=-1.0)))
    assert verdict_of(flipped, "top-h_n pair is a deactivation pair") == "matched"
    # and the page shows them per unit of natural activation, the signs the verdict read
    label = next(c.quantity for c in flipped if c.quantity.startswith("top-h_n pair"))
    assert "natural slopes -0.02, +3%" in label, label


def test_reasons_are_computed_from_the_model():
    rows = verdicts.comparisons(measured("m", pairs(), ratio=1.5))
    t = paper.result_table(rows)
    row = t.loc["median head: mean ‖W_O v‖ / ‖W_O v_BOS‖ (m)"]
    assert row.verdict == "differs"
    assert row.reason == ("75% of its 8 heads have a smaller BOS value than the other tokens' mean; its ablated "
                          "heads put 0.3000 of their attention on BOS")


def test_set_sensitivity_compares_the_sets_scores_with_the_rest():
    n = 50
    best = pd.DataFrame([{"neuron_layer": l, "neuron": i, "best": (3.0 if i < 2 else 0.1 * (-1) ** i),
                          "abs_best": (3.0 if i < 2 else 0.1)} for l in range(2) for i in range(n)])
    table = pd.DataFrame([{"layer": l, "neuron": i, "excess_corr": 0.9 if i < 2 else 0.001 * i}
                          for l in range(3) for i in range(n)])  # layer 2: the last, no later head
    nset = NeuronSet(table.assign(paper_sized=False), "paper_sized", pd.DataFrame({"excess_corr": [0.5]}))
    s = verdicts.set_sensitivity(best, nset, (0.04, 0.10), top=4)
    # 4% of 150: the six neurons 0-1 of every layer; the two of the last layer have no score
    assert s.loc[0.04, "set"] == 4 and s.loc[0.04, "median |h_n| (set)"] == 3.0
    assert s.loc[0.04, "median |h_n| (rest)"] == pytest.approx(0.1) and s.loc[0.04, "set in top 4"] == 4
    assert s.loc[0.04, "expected"] == pytest.approx(4 / 100 * 4)
    assert s.loc[0.10, "set"] == 4  # no other neuron beats the control
    text = verdicts.sensitivity_sentence(s)
    assert "4%: 4 neurons, median |h_n| 3.000 vs 0.100, 4 of the 4 strongest (0.2 expected by their number)" \
        in text
