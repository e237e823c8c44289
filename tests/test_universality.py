"""Analyses of the universality table and of neuron properties, on hand-built tables with known answers."""
import math

import numpy as np
import pandas as pd
import pytest

from helpers.properties import compare as properties
from helpers.correlations import sweep, universality


def _table():
    # 2 layers x 3 neurons, 2 comparison seeds
    return pd.DataFrame({
        "layer": [0, 0, 0, 1, 1, 1], "neuron": [0, 1, 2, 0, 1, 2],
        "max_corr_b": [0.9, 0.5, 0.4, 0.8, 0.3, 0.6], "match_layer_b": [0, 0, 1, 1, 1, 0],
        "max_corr_c": [0.7, 0.5, 0.2, 0.8, 0.5, 0.6], "match_layer_c": [0, 1, 1, 1, 0, 0],
        "baseline_b": [0.2] * 6, "baseline_c": [0.2] * 6,
    }).assign(
        mean_corr=lambda d: (d.max_corr_b + d.max_corr_c) / 2, max_corr=lambda d: d[["max_corr_b", "max_corr_c"]].max(axis=1),
        min_corr=lambda d: d[["max_corr_b", "max_corr_c"]].min(axis=1), mean_baseline=0.2,
        excess_corr=lambda d: d.mean_corr - 0.2, is_universal=lambda d: d.mean_corr - 0.2 > 0.5, is_dead=False)


def test_best_match_layers_averages_over_seeds():
    heat = universality.best_match_layers(_table())
    # layer 0: seed b matches in layers [0, 0, 1], seed c in [0, 1, 1] -> (2/3 + 1/3) / 2 = 0.5 in layer 0
    assert heat.loc[0, 0] == pytest.approx(0.5) and heat.loc[0, 1] == pytest.approx(0.5)
    assert heat.loc[1, 1] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert np.allclose(heat.sum(axis=1), 1)


def test_seed_spread_and_shares():
    t = _table()
    s = universality.seed_spread(t)
    assert s["all"] == pytest.approx(np.mean([0.2, 0, 0.2, 0, 0.2, 0]))
    assert s["n_selected"] == 2 and s["selected"] == pytest.approx(0.1)  # neurons L0.0 and L1.0
    assert universality.share_by_layer(t).tolist() == [pytest.approx(1 / 3), pytest.approx(1 / 3)]
    assert universality.comparison_members(t) == ["b", "c"]


def test_calibrated_sets_and_choice():
    t = _table()
    control = t.assign(excess_corr=[0.1, 0.15, 0.3, 0.0, 0.05, 0.2])
    out = universality.add_calibrated_sets(t, control, top_fraction=0.2)
    assert out.above_control.tolist() == (t.excess_corr > 0.3).tolist()
    assert out.top_excess.sum() >= 1 and out.loc[out.excess_corr.idxmax(), "top_excess"]
    assert universality.choose_set(out, min_count=2) == "is_universal"
    assert universality.choose_set(out, min_count=3) == "top_excess"  # paper_sized has 1 neuron here
    assert universality.choose_set(out.assign(paper_sized=True), min_count=3) == "paper_sized"


def test_the_chosen_set_has_the_papers_size_when_half_the_neurons_beat_the_control():
    """Planted: 40% of 2,000 neurons beat the control's maximum (as the embedded family's sets do);
    the set later chapters use must still be of the paper's size, not 40%."""
    rng = np.random.default_rng(0)
    n = 2000
    t = pd.DataFrame({"layer": np.repeat([0, 1], n // 2), "neuron": np.tile(np.arange(n // 2), 2),
                      "excess_corr": rng.uniform(0, 0.3, n), "is_universal": False})
    control = pd.DataFrame({"excess_corr": rng.uniform(0, 0.18, n)})
    out = universality.add_calibrated_sets(t, control)
    assert 0.35 < out.above_control.mean() < 0.45
    chosen = universality.choose_set(out)
    assert chosen == "paper_sized"
    share = out[chosen].mean()
    assert share == pytest.approx(universality.SET_SHARE, abs=1 / n)
    assert out.loc[out[chosen], "excess_corr"].min() > control.excess_corr.max()
    nset = universality.NeuronSet(out, chosen, control)
    assert [nset.at_share(s).mean() for s in universality.SENSITIVITY_SHARES] == pytest.approx(
        list(universality.SENSITIVITY_SHARES), abs=1 / n)
    assert "above the untrained control's maximum" in nset.describe()
    # fewer neurons beat the control than the share asks: the set is the neurons that beat it
    strict = universality.add_calibrated_sets(t, control.assign(excess_corr=0.295))
    assert strict.paper_sized.sum() == (t.excess_corr > 0.295).sum() < universality.SET_SHARE * n


def test_within_layer_percentiles_rank_inside_each_layer():
    df = pd.DataFrame({"layer": [0, 0, 0, 1, 1], "neuron": [0, 1, 2, 0, 1], "x": [1.0, 2.0, 3.0, 10.0, 0.0],
                       "sel": [False, False, True, True, False]})
    pct = properties.within_layer_percentiles(df, ["x"], "sel")
    assert pct.percentile.tolist() == [100.0, 100.0]  # the largest of its own layer, in both layers


def test_compare_sets_reports_direction_and_agreement():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"a": np.r_[rng.normal(5, 1, 50), rng.normal(0, 1, 200)], "sel": [True] * 50 + [False] * 200})
    res = properties.compare_sets(df, {"a": ("metric a", +1)}, "sel")
    assert res.loc["metric a", "direction"] == "higher" and res.loc["metric a", "agrees"] == "yes"
    res = properties.compare_sets(df, {"a": ("metric a", -1)}, "sel")
    assert res.loc["metric a", "agrees"] == "no"


def test_linear_fit_recovers_a_line():
    x = pd.Series(np.linspace(-1, 1, 50))
    fit = properties.linear_fit(x, 2 * x + 1)
    assert fit["slope"] == pytest.approx(2) and fit["intercept"] == pytest.approx(1) and fit["r"] == pytest.approx(1)


def test_sweep_appendix_lists_every_configuration(tmp_path):
    cols = ["config", "val_loss_mean", "val_loss_spread", "train_cpu_minutes", "baseline_median", "excess_median", "excess_p99",
            "excess_max", "share>0.3", "share>0.5", "control_p99", "control_max", "share_above_control_max", "p99_gain_per_cpu_minute"]
    df = pd.DataFrame([["A"] + [0.1] * 12 + [0.01], ["B"] + [0.2] * 12 + [0.02]], columns=cols)
    sweep.write_appendix(df, "python -m helpers.correlations.sweep", tmp_path / "a.md")
    text = (tmp_path / "a.md").read_text()
    assert "| A |" in text and "| B |" in text and "**B**" in text and "python -m helpers.correlations.sweep" in text
    assert "not in this grid" in text  # no architecture columns: nothing matches the default preset

    # With architecture columns the default preset's row is named, and near-ties are listed.
    emb = sweep.load_preset("two-layer")["embedded"]
    arch = {k: emb[k] for k in ("n_layers", "d_model", "d_mlp", "d_vocab", "lr")}
    df = df.assign(**arch, train_tokens=750_000)
    df.loc[0, "n_layers"] = arch["n_layers"] + 1
    df.loc[:, "p99_gain_per_cpu_minute"] = [0.0199, 0.0200]
    sweep.write_appendix(df, "python -m helpers.correlations.sweep", tmp_path / "b.md", decision="Kept B because of C.")
    text = (tmp_path / "b.md").read_text()
    assert "uses the architecture and recipe of **B**" in text
    assert "Within 5% of it: B (0.0200), A (0.0199)." in text and "Kept B because of C." in text


def test_best_match_layers_counts_a_missing_layer_as_zero():
    # seed c never matches in layer 1 from reference layer 0 and never in layer 0 from layer 1: its
    # crosstabs lack a column; the average must still run over both seeds (rows sum to 1).
    t = _table()
    t["match_layer_c"] = [0, 0, 0, 1, 1, 1]
    heat = universality.best_match_layers(t)
    assert np.allclose(heat.sum(axis=1), 1)
    assert heat.loc[0, 0] == pytest.approx((2 / 3 + 1) / 2) and heat.loc[0, 1] == pytest.approx((1 / 3 + 0) / 2)
    assert heat.loc[1, 0] == pytest.approx((1 / 3 + 0) / 2)
    spec = universality.depth_specialisation(heat)
    assert spec["chance"] == 0.5 and spec["diagonal"] == pytest.approx((heat.loc[0, 0] + heat.loc[1, 1]) / 2)
    assert spec["diagonal_is_row_max"]


def test_like_for_like_medians_use_the_set_not_all_neurons():
    t = _table()
    t["mean_baseline"] = [0.1, 0.9, 0.9, 0.3, 0.9, 0.9]
    med = universality.like_for_like_medians(t, "is_universal")  # L0.0 and L1.0
    assert med["n"] == 2 and med["mean_baseline"] == pytest.approx(0.2) and med["mean_corr"] == pytest.approx(0.8)
    assert math.isnan(universality.like_for_like_medians(t.assign(none=False), "none")["mean_corr"])


def test_checkpoint_emergence_compares_like_with_like(monkeypatch):
    """The control run uses the checkpoints' token count and baseline, and the checkpoints honour `baseline`."""
    from types import SimpleNamespace

    calls = []

    class Fam:
        def __init__(self, name, members=("a", "b", "c")):
            self.name = name
            self.members = list(members)
            self.info = {"recipe": {"batch_size": 2}, "arch": {"n_ctx": 4}}

    def fake_table(family, n_tokens, artifacts_dir, device="cpu", batch_size=32, seed=0, baseline="rotation", precision="fp32",
                   threshold=0.5, verbose=True):
        calls.append((family.name, n_tokens, baseline))
        t = _table()
        if family.name == "control":
            t["excess_corr"] = t.excess_corr - 0.3
        return SimpleNamespace(table=lambda name: t)  # the cached run: its table by name

    monkeypatch.setattr(universality, "universality_table", fake_table)
    loaded = []

    def load_control(name, params, device="cpu", members=None):
        loaded.append(members)
        return Fam("control", members)

    monkeypatch.setattr(universality, "load_family", load_control)
    monkeypatch.setattr(universality, "embedded_family", lambda params, device="cpu", checkpoint=None: Fam(f"step{checkpoint}"))
    monkeypatch.setattr(universality, "saved_checkpoint_steps", lambda params: [0, 10])
    em = universality.checkpoint_emergence({}, 1234, "unused", baseline="gaussian")
    assert {c[1] for c in calls} == {1234} and {c[2] for c in calls} == {"gaussian"}
    assert ("control", 1234, "gaussian") in calls
    ctl_max = (_table().excess_corr - 0.3).max()
    assert em.control_max.iloc[0] == pytest.approx(ctl_max)
    assert em.share_above_control.iloc[0] == pytest.approx((_table().excess_corr > ctl_max).mean())
    assert em.loc[10, "tokens_trained"] == 80
    assert loaded == [["a", "b", "c"]]  # the control has the checkpoints' members


def test_sweep_effects_sentence_names_each_knob_and_the_largest_rise():
    df = pd.DataFrame({"config": ["base", "wide", "deep"], "n_layers": [2, 2, 3], "d_model": [128, 256, 128],
                       "d_mlp": 1024, "d_vocab": 4096, "lr": 0.003, "train_tokens": 750000,
                       "excess_p99": [0.20, 0.26, 0.19], "control_p99": [0.07, 0.07, 0.05], "share_above_control_max": [0.03, 0.08, 0.02],
                       "baseline_median": [0.7, 0.6, 0.7], "p99_gain_per_cpu_minute": [0.02, 0.01, 0.01]})
    fx = sweep.one_change_effects(df, "base")
    text = sweep.effects_sentence(fx)
    assert "d_model 128 → 256: p99 +0.060 (over its control +0.060)" in text
    assert "n_layers 2 → 3: p99 -0.010 (over its control +0.010)" in text
    assert text.endswith("p99 excess over the untrained control came from d_model 128 → 256")
    # a knob that lifts the control's tail as much as the trained one's does not win
    df.loc[1, "control_p99"] = 0.13
    assert sweep.effects_sentence(sweep.one_change_effects(df, "base")).endswith("came from n_layers 2 → 3")


def test_sweep_rows_of_a_partial_run_replace_their_own_and_keep_the_grid_order(tmp_path):
    old = pd.DataFrame({"config": ["a", "b", "c"], "x": [1, 2, 3]})
    old.to_csv(tmp_path / "r.csv", index=False)
    out = sweep._merge_rows(tmp_path / "r.csv", pd.DataFrame({"config": ["d", "b"], "x": [40, 20]}), "config", ["a", "b", "c", "d"])
    assert out.config.tolist() == ["a", "b", "c", "d"] and out.x.tolist() == [1, 20, 3, 40]


def test_family_record_and_the_comparison_of_two_families():
    from types import SimpleNamespace

    t = _table()
    control = t.assign(excess_corr=[0.0, 0.05, 0.1, 0.0, 0.02, 0.3])  # control max 0.3
    t = universality.add_calibrated_sets(t, control)
    nset = universality.NeuronSet(t, "above_control", control)
    fam = SimpleNamespace(name="embedded", info={"arch": {"n_layers": 2, "d_model": 8, "d_mlp": 3},
                                                 "recipe": {"train_tokens": 1000}, "val_loss": {"a": 2.0, "b": 3.0}})
    rec = universality.family_record(nset, fam, n_tokens=500, threshold=0.5)
    # excess = mean_corr - 0.2: [0.6, 0.3, 0.1, 0.6, 0.2, 0.4]
    assert rec["n_above_threshold"] == 2 and rec["excess_max"] == pytest.approx(0.6)
    assert rec["share_above_control_max"] == pytest.approx(3 / 6)  # 0.6, 0.6, 0.4 > 0.3
    assert rec["val_loss_mean"] == pytest.approx(2.5) and rec["control_max"] == pytest.approx(0.3)
    assert rec["same_layer_chance"] == pytest.approx(0.5) and rec["neurons"] == 6
    with pytest.raises(ValueError, match="no untrained control"):
        universality.family_record(universality.NeuronSet(t, "top_excess", None), fam, 500)

    after = dict(rec, excess_p99=rec["excess_p99"] + 0.01, val_loss_mean=1.5, n_above_threshold=2)
    cmp = universality.compare_families(rec, after)
    assert not cmp.loc["p99 excess correlation", "changed"]  # 0.01 is below the smallest change 0.05
    assert cmp.loc["held-out loss (nats)", "changed"] and cmp.loc["held-out loss (nats)", "change"] == pytest.approx(-1.0)
    assert not cmp.loc["neurons with excess > 0.5", "changed"]
    ratio = "share of best matches in the same layer, over chance (Fig 2c)"
    assert cmp.loc[ratio, "before"] == pytest.approx(rec["same_layer_share"] / 0.5)
    deeper = dict(after, same_layer_share=rec["same_layer_share"] / 2, same_layer_chance=0.25)  # half the share, half the chance
    assert not universality.compare_families(rec, deeper).loc[ratio, "changed"]
    text = universality.depth_conclusion(cmp, "A", "B")
    assert "held-out loss (nats) (2.5 → 1.5)" in text.split("These did not")[0]
    assert "p99 excess correlation" in text.split("These did not")[1]


def test_plateau_finds_where_the_emergence_curve_stops_moving():
    e = pd.DataFrame({"tokens_trained": [0, 30, 60, 120], "p99": [0.06, 0.244, 0.253, 0.256]}, index=[0, 916, 1831, 3662])
    p = universality.plateau(e, "p99", tolerance=0.05)
    assert p["step"] == 916 and p["tokens_trained"] == 30 and p["values_from_there"] == [0.244, 0.253, 0.256]
    assert p["rise_from_init"] == pytest.approx(0.196) and p["rise_from_there"] == pytest.approx(0.012)
    still_rising = e.assign(p99=[0.0, 0.1, 0.2, 0.3])
    assert universality.plateau(still_rising, "p99", 0.05)["step"] == 3662  # only the last point
