"""Property statistics (chapter 02): within-layer permutation tests, Holm, bootstrap intervals,
metric groups, the control comparison, Fig 14's boxes and the build checks, on hand-built tables
with planted answers."""
import numpy as np
import pandas as pd
import pytest

from helpers.book import plots
from helpers.properties import compare as properties, significance as ps


def _layers(n_layers=3, per_layer=400, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"layer": np.repeat(np.arange(n_layers), per_layer),
                         "neuron": np.tile(np.arange(per_layer), n_layers)}), rng


def test_planted_within_layer_effect_is_detected_and_noise_is_not():
    df, rng = _layers()
    df["x"] = rng.normal(size=len(df)) + 5.0 * df.layer  # layers differ a lot; irrelevant within a layer
    df["noise"] = rng.normal(size=len(df))
    df["sel"] = df.groupby("layer").neuron.transform(lambda n: n % 10 == 0)
    df.loc[df.sel, "x"] += 1.5
    res = ps.permutation_test(df, ["x", "noise"], "sel", n_perm=2000)
    assert res.loc["x", "direction"] == "higher"
    assert res.loc["x", "p_holm"] < 0.01
    assert res.loc["x", "effect"] > 80
    assert res.loc["noise", "p_holm"] > 0.05
    assert res.loc["x", "n_set"] == 120


def test_between_layer_difference_is_not_a_within_layer_effect_but_fools_a_pooled_test():
    df, rng = _layers()
    df["x"] = rng.normal(size=len(df)) + np.where(df.layer == 0, 10.0, 0.0)
    # the set: every 8th neuron of layer 0 in order of x, i.e. spread evenly through its own layer
    order = df[df.layer == 0].x.rank(method="first").astype(int)
    df["sel"] = False
    df.loc[order.index[order % 8 == 4], "sel"] = True
    within = ps.permutation_test(df, ["x"], "sel", by="layer", n_perm=2000).iloc[0]
    pooled = ps.permutation_test(df, ["x"], "sel", by=None, n_perm=2000).iloc[0]
    assert within.p > 0.5 and abs(within.effect - 50) < 3
    assert pooled.p < 0.01 and pooled.direction == "higher" and pooled.effect > 80


def test_whole_layer_set_has_p_one():
    df, rng = _layers(n_layers=2, per_layer=50)
    df["x"] = rng.normal(size=len(df))
    df["sel"] = df.layer == 0
    assert ps.permutation_test(df, ["x"], "sel", n_perm=200).iloc[0].p == 1.0


def test_holm_on_known_p_values():
    np.testing.assert_allclose(ps.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(ps.holm([0.01, np.nan, 0.02]), [0.02, np.nan, 0.02])
    np.testing.assert_allclose(ps.holm([0.5, 0.6]), [1.0, 1.0])
    np.testing.assert_allclose(ps.holm([0.2]), [0.2])


def test_bootstrap_interval_covers_the_planted_percentile():
    n = 1000
    rng = np.random.default_rng(1)
    df = pd.DataFrame({"layer": 0, "neuron": np.arange(n), "x": rng.permutation(n) / n})
    # set: values evenly spaced over the layer's 60th-100th percentiles -> median percentile 80
    df["sel"] = ((df.x * n).round().astype(int) - 600) % 4 == 0
    df.loc[df.x < 0.6, "sel"] = False
    res = ps.permutation_test(df, ["x"], "sel", n_perm=500, n_boot=2000).iloc[0]
    assert abs(res.effect - 80) < 0.5
    assert res.ci_low <= 80 <= res.ci_high
    assert res.ci_high - res.ci_low < 15


def _property_table(seed=0, plant=("firing",), sign=1.0):
    df, rng = _layers(n_layers=2, per_layer=300, seed=seed)
    df["sel"] = df.neuron % 10 == 0
    base = rng.normal(size=len(df))
    shift = 2.0 * sign * df.sel
    firing = base - (shift if "firing" in plant else 0)
    df["act_freq"] = firing + 0.05 * rng.normal(size=len(df))
    df["pre_mean"] = firing + 0.05 * rng.normal(size=len(df))
    df["input_bias"] = firing + 0.05 * rng.normal(size=len(df))
    tail = rng.normal(size=len(df)) + (shift if "tail" in plant else 0)
    df["pre_skew"] = tail
    df["pre_kurt"] = tail + 0.05 * rng.normal(size=len(df))
    df["in_out_sim"] = rng.normal(size=len(df))
    return df


DIRECTIONS = {"act_freq": -1, "pre_mean": -1, "input_bias": -1, "pre_skew": 1, "pre_kurt": 1, "in_out_sim": 0}


def test_collinear_metrics_count_as_one_agreement():
    t = ps.property_tests(_property_table(), "sel", DIRECTIONS, n_perm=1000, n_boot=500)
    assert (t.metrics.loc[["act_freq", "pre_mean", "input_bias"], "verdict"] == "agrees").all()
    assert t.agreeing_groups() == ["firing rate"]
    assert t.groups.loc["activation tail", "verdict"] == "not significant"
    assert t.groups.loc["input-output alignment", "verdict"] == "no paper direction"
    assert t.groups.loc["firing rate", "effect"] > 80  # in paper-direction percentiles
    assert "weight norm" not in t.groups.index  # no metric of that group was given
    assert "1 of 2 groups" in ps.agreement_sentence(t, "the set")


def test_opposite_direction_is_reported_as_opposite():
    t = ps.property_tests(_property_table(sign=-1.0), "sel", DIRECTIONS, n_perm=1000, n_boot=500)
    assert t.groups.loc["firing rate", "verdict"] == "opposite"
    assert t.groups.loc["firing rate", "effect"] < 20
    assert t.agreeing_groups() == []


def test_verdict_rules():
    assert ps.verdict("higher", 0.01, +1) == "agrees"
    assert ps.verdict("lower", 0.01, +1) == "opposite"
    assert ps.verdict("lower", 0.01, -1) == "agrees"
    assert ps.verdict("higher", 0.2, +1) == "not significant"
    assert ps.verdict("higher", np.nan, +1) == "not significant"
    assert ps.verdict("higher", 0.001, 0) == "no paper direction"


def test_top_k_set_takes_the_k_largest_and_never_nan():
    t = pd.DataFrame({"excess_corr": [0.1, np.nan, 0.5, 0.3, 0.5]})
    assert ps.top_k_set(t, 2).tolist() == [False, False, True, False, True]
    assert ps.top_k_set(t, 10).sum() == 4


def test_control_comparison_separates_metric_from_learning():
    trained = ps.property_tests(_property_table(plant=("firing", "tail")), "sel", DIRECTIONS, n_perm=1000, n_boot=300)
    control = ps.property_tests(_property_table(seed=1, plant=("firing",)), "sel", DIRECTIONS, n_perm=1000, n_boot=300)
    side = ps.side_by_side(trained, control)
    also = side[("", "trained agreement also in control")]
    assert also["firing rate"] == "yes" and also["activation tail"] == "no" and also["input-output alignment"] == ""
    s = ps.control_sentence(trained, control)
    assert "Of the 2 groups" in s and "1 (firing rate) also show" in s and "property of the metric" in s
    assert "1 (activation tail) show only in the trained family" in s
    none = ps.property_tests(_property_table(plant=()), "sel", DIRECTIONS, n_perm=500, n_boot=200)
    assert "agrees with the paper on no group" in ps.control_sentence(none, control)


def test_fig14_boxes_keep_every_neuron_and_only_the_axis_is_clipped():
    df, rng = _layers(n_layers=2, per_layer=500)
    df["m"] = rng.normal(size=len(df))
    df["sel"] = df.neuron < 20
    df.loc[df.sel, "m"] = 3.0 + 0.1 * df.loc[df.sel, "neuron"]  # the set is the upper tail ...
    df.loc[df.neuron == 0, "m"] = 1000.0  # ... with one extreme neuron per layer
    long = properties.per_layer_long(df, ["m"], "sel")
    assert len(long) == len(df)
    boxes = properties.per_layer_boxes(long).set_index(["metric", "layer", "set"])
    sel0 = df[df.sel & (df.layer == 0)].m
    assert boxes.loc[("m", 0, "selected"), "n"] == 20
    assert boxes.loc[("m", 0, "selected"), "median"] == pytest.approx(sel0.median())
    assert boxes.loc[("m", 0, "rest"), "n"] == 480
    ranges = properties.axis_ranges(long)
    assert ranges["m"] == pytest.approx((df.m.quantile(0.0025), df.m.quantile(0.9975)))
    fig = plots.faceted_boxes(boxes.reset_index(), ranges, cols=1)
    sel_trace = [t for t in fig.data if t.name == "selected"][0]
    assert list(sel_trace.median) == pytest.approx(list(boxes.xs("selected", level="set")["median"]))
    top = tuple(fig.layout.yaxis.range)[1]
    assert top < boxes.loc[("m", 0, "selected"), "hi"]  # the view is clipped, the boxes are not


def test_check_join_catches_dropped_and_duplicated_neurons():
    df, _ = _layers(n_layers=2, per_layer=4)
    ps.check_join(df, 2, 4)
    with pytest.raises(AssertionError):
        ps.check_join(df.iloc[1:], 2, 4)
    with pytest.raises(AssertionError):
        ps.check_join(pd.concat([df, df.iloc[:1]]), 2, 4)


def test_check_activation_floor_catches_pre_post_mix_up():
    good = pd.DataFrame({"pre_mean": [-2.0, 0.5], "post_mean": [-0.05, 0.6]})
    ps.check_activation_floor(good, "gelu_new")
    swapped = good.rename(columns={"pre_mean": "post_mean", "post_mean": "pre_mean"})
    with pytest.raises(AssertionError):
        ps.check_activation_floor(swapped, "gelu_new")
    with pytest.raises(ValueError):
        ps.check_activation_floor(good, "unknown_fn")
    with pytest.raises(ValueError, match="gated"):
        ps.check_activation_floor(good.assign(w_lin_norm=1.0), "silu")


def test_check_detects_planted_passes_on_a_table_and_fails_on_a_broken_ranking():
    df, rng = _layers(n_layers=2, per_layer=200)
    df["x"] = rng.normal(size=len(df))
    out = ps.check_detects_planted(df, "x", n_perm=300)
    assert out["planted_p"] < 0.05 and out["whole_layers_p"] == 1.0
    with pytest.raises(AssertionError):  # a constant column has nothing to detect
        ps.check_detects_planted(df.assign(x=1.0), "x", n_perm=300)


def test_binned_positive_cutoff_is_the_lower_edge_of_the_bin_holding_zero():
    assert ps.binned_positive_cutoff() == pytest.approx(-10 + 102 * 25 / 256)  # -0.0390625
    assert ps.binned_positive_cutoff(-1.0, 1.0, 20) == pytest.approx(-0.1)  # 0 is an edge: the bin below counts


def test_full_l2_penalty_adds_the_linear_branch():
    t = pd.DataFrame({"l2_penalty": [1.0, 2.0], "w_lin_norm": [3.0, np.nan]})
    assert ps.full_l2_penalty(t).tolist() == [10.0, 2.0]
    assert ps.full_l2_penalty(t.drop(columns="w_lin_norm")).tolist() == [1.0, 2.0]


def test_medians_line_reads_the_tables():
    a = pd.DataFrame({"k": [1.0, 2.0, 9.0]})
    b = pd.DataFrame({"k": [4.0, 5.0]})
    assert ps.medians_line({"A": a, "B": b}, {"k": "median k"}) == "median k: A 2, B 4.5."
