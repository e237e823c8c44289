"""Chapters 01-03's "Result vs paper" rows and their set-size sensitivity tables, on planted tables
whose verdicts are known: matched, not informative (the untrained control passes too), differs and
not measured (nothing to measure)."""
import numpy as np
import pandas as pd
import pytest

from helpers.core import paper
from helpers.correlations import universality
from helpers.correlations import verdicts as v01
from helpers.properties import compare
from helpers.properties import verdicts as v02
from helpers.taxonomy import explain
from helpers.taxonomy import verdicts as v03


# ---- chapter 01 ---------------------------------------------------------------------------------

N_LAYERS, PER_LAYER, N_SET = 3, 200, 25


def _universality(set_corr=0.755, set_base=0.155, rest_corr=0.30, rest_base=0.25, set_spread=0.105,
                  rest_spread=0.045, diagonal=True, n_set=N_SET) -> pd.DataFrame:
    """3 layers x 200 neurons, comparison seeds b and c; the first `n_set` rows are the planted
    universal set (mean max correlation `set_corr`, baseline `set_base`, range over seeds `set_spread`),
    the rest are ordinary; every best match lies in the neuron's own layer when `diagonal`."""
    n = N_LAYERS * PER_LAYER
    layer = np.repeat(np.arange(N_LAYERS), PER_LAYER)
    is_set = np.arange(n) < n_set
    corr = np.where(is_set, set_corr, rest_corr)
    half = np.where(is_set, set_spread, rest_spread) / 2
    base = np.where(is_set, set_base, rest_base)
    match = layer if diagonal else (layer + 1) % N_LAYERS
    t = pd.DataFrame({"layer": layer, "neuron": np.tile(np.arange(PER_LAYER), N_LAYERS),
                      "max_corr_b": corr + half, "max_corr_c": corr - half,
                      "match_layer_b": match, "match_layer_c": match,
                      "baseline_b": base, "baseline_c": base, "mean_corr": corr, "mean_baseline": base,
                      "max_corr": corr + half, "min_corr": corr - half, "excess_corr": corr - base, "is_dead": False})
    return t.assign(is_universal=t.excess_corr > 0.5)


def _nset(table, control, chosen=None):
    sets = universality.add_calibrated_sets(table, control)
    return universality.NeuronSet(sets, chosen or universality.choose_set(sets), control)


def _verdicts(rows):
    return dict(zip([r.key for r in rows], paper.result_table(rows).verdict))


def test_chapter01_planted_paper_values_are_matched_against_a_failing_control():
    trained = _universality()
    # the control: nothing above 0.5, a high baseline, wide spreads and no depth structure
    control = _universality(set_corr=0.40, set_base=0.30, rest_corr=0.30, rest_base=0.28, set_spread=0.2,
                            rest_spread=0.1, diagonal=False)
    nset = _nset(trained, control)
    assert nset.chosen == "is_universal" and nset.size == N_SET
    rows = v01.comparisons(nset, paper.SMALL)
    assert [r.key for r in rows] == ["universal_share", "median_mean_corr_universal", "median_baseline_universal",
                                     "seed_spread_all", "seed_spread_universal", "depth_specialisation"]
    assert rows[0].ours == pytest.approx(N_SET / len(trained)) and rows[0].control == 0.0
    assert rows[1].ours == pytest.approx(0.755) and rows[1].control == pytest.approx(0.40)  # the control's top 25
    assert set(_verdicts(rows).values()) == {"matched"}


def test_chapter01_a_control_that_passes_too_makes_every_row_not_informative():
    trained = _universality()
    nset = _nset(trained, trained.copy())  # a control exactly like the trained family: nothing beats it
    assert nset.table.paper_sized.sum() == 0 and nset.chosen == "is_universal"
    verdicts = _verdicts(v01.comparisons(nset, paper.SMALL))
    assert set(verdicts.values()) == {"not informative"}


def test_chapter01_an_empty_set_is_not_measured_and_a_wrong_value_differs():
    trained = _universality(rest_spread=0.2, diagonal=False)
    control = _universality(set_corr=0.40, set_base=0.30, diagonal=False)
    empty = universality.NeuronSet(universality.add_calibrated_sets(trained, control).assign(paper_sized=False),
                                   "paper_sized", control)
    verdicts = _verdicts(v01.comparisons(empty, paper.SMALL))
    assert verdicts["median_mean_corr_universal"] == verdicts["median_baseline_universal"] == "not measured"
    assert verdicts["seed_spread_universal"] == "not measured"
    assert verdicts["seed_spread_all"] == "differs" and verdicts["depth_specialisation"] == "differs"
    t = paper.result_table(v01.comparisons(empty, paper.SMALL))
    assert t.loc["median mean_corr over the set (paper_sized)", "reason"] == "the set is empty"
    # without a control, a passing row is matched on its own test
    alone = universality.NeuronSet(universality.add_calibrated_sets(_universality(), None), "is_universal", None)
    assert set(_verdicts(v01.comparisons(alone, paper.SMALL)).values()) == {"matched"}


def test_spectrum_summary_reads_the_family_rows():
    dims = pd.DataFrame({"label": ["x", "x", "y"], "pr_corr": [2.0, 4.0, 9.0], "predicted_median": [0.8, 0.6, 0.1],
                         "measured_median": [0.7, 0.5, 0.1], "d": [64, 64, 64]})
    assert v01.spectrum_summary(dims, "x") == {"pr_corr": 3.0, "predicted": 0.7, "measured": 0.6, "d": 64}
    assert np.isnan(v01.spectrum_summary(None, "x")["pr_corr"]) and v01.spectrum_summary(dims, "z")["d"] is None


def _graded(n=1000, n_diag=50):
    """Excess correlation falling with the neuron's index; the first `n_diag` neurons match their
    own layer in every seed, the others the next layer; the control's maximum is 0.2."""
    layer = np.arange(n) % 4
    excess = np.linspace(0.9, 0.0, n)
    match = np.where(np.arange(n) < n_diag, layer, (layer + 1) % 4)
    t = pd.DataFrame({"layer": layer, "neuron": np.arange(n) // 4, "excess_corr": excess, "mean_corr": excess + 0.3,
                      "mean_baseline": 0.3, "max_corr": excess + 0.35, "min_corr": excess + 0.25,
                      "max_corr_b": excess + 0.35, "max_corr_c": excess + 0.25,
                      "match_layer_b": match, "match_layer_c": match, "is_universal": excess > 0.5})
    control = pd.DataFrame({"excess_corr": np.linspace(0.2, 0.0, n)})
    sets = universality.add_calibrated_sets(t, control)
    return universality.NeuronSet(sets, universality.choose_set(sets, min_count=10_000), control)


def test_set_sensitivity_moves_with_the_share():
    nset = _graded()
    assert nset.chosen == "top_excess"  # min_count forces the fallback: its row is labelled as chosen
    sized = nset.sized_sets()
    assert list(sized.columns) == ["layer", "neuron", "1%", "4%", "10%", "top_excess"]
    assert sized["4%"].sum() == 40 and sized["10%"].sum() == 100
    s = universality.set_sensitivity(nset)
    assert list(s.index) == ["1%", "4%", "10%", "top_excess (chosen)"]
    assert s.loc["1%", "neurons"] == 10 and s.loc["10%", "neurons"] == 100
    # the first 50 neurons match their own layer: all of the 1% and 4% sets, half of the 10% set
    assert s.loc["1%", "same-layer best matches"] == 1.0 and s.loc["4%", "same-layer best matches"] == 1.0
    assert s.loc["10%", "same-layer best matches"] == pytest.approx(0.5)
    assert s.loc["10%", "chance"] == 0.25
    assert s.loc["1%", "median excess"] > s.loc["4%", "median excess"] > s.loc["10%", "median excess"]
    assert s.loc["4%", "smallest excess"] == pytest.approx(nset.table.excess_corr.iloc[39])
    assert s.loc["4%", "median mean_baseline"] == pytest.approx(0.3)
    assert s.loc["4%", "mean seed spread"] == pytest.approx(0.1)
    # the sets never take a neuron the control reaches: at 10% of a control-limited family, fewer
    limited = universality.NeuronSet(nset.table, "top_excess", pd.DataFrame({"excess_corr": [0.85]}))
    assert universality.set_sensitivity(limited).loc["10%", "neurons"] == int((nset.table.excess_corr > 0.85).sum())


def test_same_layer_share_and_set_table():
    t = _universality(n_set=N_SET)
    assert universality.same_layer_share(t) == 1.0
    assert universality.same_layer_share(_universality(diagonal=False)) == 0.0
    assert np.isnan(universality.same_layer_share(t, pd.Series(False, index=t.index)))
    nset = _graded()
    st = universality.set_table(nset)
    assert list(st.index) == ["is_universal", "above_control", "paper_sized", "top_excess"]
    assert st.loc["paper_sized", "neurons"] == int(nset.table.paper_sized.sum())
    assert st.loc["above_control", "control neurons reaching it"] == 0  # above the control's maximum: none reach it
    low = st.loc["top_excess", "smallest excess"]
    assert st.loc["top_excess", "control neurons reaching it"] == int((nset.control.excess_corr >= low).sum())
    assert st["used later"].tolist() == [False, False, False, True]
    assert universality.share_label(0.04) == "4%" and universality.share_label(universality.SET_SHARE) == "4.16%"


# ---- chapter 02 ---------------------------------------------------------------------------------

def _properties(n=200, k=20):
    """A planted set with the paper's GPT2-small medians; the rest Gaussian-like."""
    med = paper.property_medians(paper.SMALL)
    rest = {"pre_kurt": 3.0, "pre_skew": 0.0, "act_freq": 0.5, "input_bias": 0.0, "l2_penalty": 0.3}
    df = pd.DataFrame({c: [med[c]] * k + [rest[c]] * (n - k) for c in med})
    return df.assign(layer=np.arange(n) % 4, neuron=np.arange(n) // 4, top=[True] * k + [False] * (n - k))


def test_chapter02_medians_are_scored_against_the_control():
    df = _properties()
    gaussian = df.assign(top=df.top.to_numpy()[::-1])  # the control's set looks like the rest
    rows = v02.comparisons(df, "top", paper.SMALL, control=gaussian)
    assert [r.key for r in rows] == list(paper.PROPERTY_MEDIAN_KEYS.values())
    assert set(paper.result_table(rows).verdict) == {"matched"}
    assert set(paper.result_table(v02.comparisons(df, "top", paper.SMALL)).verdict) == {"matched"}
    assert set(paper.result_table(v02.comparisons(df, "top", paper.SMALL, control=df)).verdict) == {"not informative"}
    t = paper.result_table(v02.comparisons(gaussian, "top", paper.SMALL, control=df))
    assert set(t.verdict) == {"differs"}
    assert t.loc["median pre-activation kurtosis over the set (top)", "reason"] == (
        "the set's 20 neurons against a median of 3.000 over the other 180")


def test_chapter02_an_empty_set_is_not_measured():
    df = _properties().assign(top=False)
    t = paper.result_table(v02.comparisons(df, "top", paper.SMALL, control=_properties()))
    assert set(t.verdict) == {"not measured"}
    assert t.iloc[0]["reason"] == "the set (top) is empty"


def test_chapter02_set_sensitivity_separates_the_set_from_the_rest():
    df = _properties()
    sized = df[["layer", "neuron"]].assign(**{"small": df.top, "large": np.arange(len(df)) < 100})
    s = compare.set_sensitivity(df.assign(small=False), sized)  # a column of the same name in df is replaced
    assert list(s.index) == ["small", "large"]
    assert s.loc["small", ("neurons", "")] == 20 and s.loc["large", ("neurons", "")] == 100
    kurt = compare.FIG3_METRICS["pre_kurt"][0]
    assert s.loc["small", (kurt, "set")] == paper.value("median_pre_kurt_universal")
    assert s.loc["small", (kurt, "rest")] == 3.0
    assert s.loc["large", (kurt, "set")] == 3.0  # most of the large set is the Gaussian-like rest
    assert len(s.columns) == 1 + 2 * len(paper.PROPERTY_MEDIAN_KEYS)


# ---- chapter 03 ---------------------------------------------------------------------------------

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _explained(n_letters=20, letter_vr=0.5, unigram_vr=0.95, unigram_layer=0, prev_layer=1,
               syntax_layers=(0, 0, 3, 3), position=False):
    """An explanation table of 4 layers x 40 neurons: `n_letters` universal alphabet neurons, one
    universal unigram neuron, previous-token neurons in `prev_layer`, syntax neurons in
    `syntax_layers`; the rest unexplained. Returns (table with column `universal`, letters)."""
    n_layers, per = 4, 40
    t = pd.DataFrame({"layer": np.repeat(np.arange(n_layers), per), "neuron": np.tile(np.arange(per), n_layers),
                      "family": "unexplained", "best_feature": "source_x", "best_vr": 0.05, "pre_kurt": 5.0,
                      "universal": False})
    letters = []
    for i, ch in enumerate(LETTERS[:n_letters]):  # layer 2, neurons 0-19
        idx = 2 * per + i
        t.loc[idx, ["family", "best_feature", "best_vr", "universal"]] = ["alphabet", f"unigram_{ch}", letter_vr, True]
        letters.append({"layer": 2, "neuron": i, "letter": ch, "vr": letter_vr})
    letters += [{"layer": 3, "neuron": 39, "letter": ch, "vr": 0.01} for ch in LETTERS[n_letters:]]
    cols = ["family", "best_feature", "best_vr", "universal"]
    t.loc[unigram_layer * per + 30, cols] = ["unigram", "unigram_to", unigram_vr, True]
    for j in range(3):
        t.loc[prev_layer * per + 31 + j, cols[:3]] = ["previous-token", "prev_unigram_the", 0.4]
    for j, l in enumerate(syntax_layers):
        t.loc[l * per + 34 + j, cols[:3]] = ["syntax", "dep_nsubj", 0.3]
    if position:
        t.loc[[0, 1], ["family", "pre_kurt", "universal"]] = ["position", 1.5, True]
    return t, pd.DataFrame(letters)


def _ctl(table, letters):
    return type("Explanations", (), {"table": table, "letters": letters})()


def test_chapter03_planted_families_get_their_verdicts():
    t, letters = _explained()
    # control: letters explained weakly, a weaker unigram neuron placed late, previous-token neurons where the
    # trained ones are (the claim holds there too), no syntax neurons
    ct, cl = _explained(letter_vr=0.1, unigram_vr=0.5, unigram_layer=3, syntax_layers=())
    ct["universal"] = False
    rows = v03.comparisons(t, "universal", letters, 4, "planted", 10_000, control=_ctl(ct, cl))
    v = {r.quantity: verdict for r, verdict in zip(rows, paper.result_table(rows).verdict)}
    assert v["letters with an alphabet neuron (of 26)"] == "matched"  # 20 letters (18 ± 4); control 0
    assert rows[0].ours == 20 and rows[0].control == 0
    assert v["highest VR of a universal unigram neuron (one token's forms; control: any of its neurons)"] == "matched"
    assert v["unigram neurons: where (planted)"] == "matched"  # layer 0 of 4; the control's sits in layer 3
    assert v["previous-token neurons: where (planted)"] == "not informative"  # the control's sit in layer 1 too
    assert v["position neurons: where (planted)"] == "not measured"  # no position neuron
    assert v["syntax neurons: where (planted)"] == "matched"  # spread out; the control has none
    assert v["position candidates in the universal set (pre-activation kurtosis < 2.0)"] == "not scored"
    assert v["late layers: prediction / suppression neurons"] == "not measured"
    assert [r.key for r in rows][-1] == "late_prediction" and len(rows) == 3 + len(explain.DEPTH_CLAIMS) + 1


def test_chapter03_a_control_that_passes_too_and_a_model_without_control():
    t, letters = _explained(position=True)
    rows = v03.comparisons(t, "universal", letters, 4, "planted", 10_000,
                           control=_ctl(t.assign(universal=False), letters),
                           single=t.assign(layer=t.layer * 5), single_label="deep")
    v = dict(zip([r.quantity for r in rows], paper.result_table(rows).verdict))
    assert v["letters with an alphabet neuron (of 26)"] == "not informative"
    assert v["highest VR of a universal unigram neuron (one token's forms; control: any of its neurons)"] == "not informative"
    assert v["position neurons: where (planted)"] == "not informative"
    assert rows[2].ours == 2  # the two planted position neurons, universal with kurtosis 1.5
    # the sampled deeper model (16 layers) has no control: its rows are judged on their own
    assert v["unigram neurons: where (deep)"] == "matched" and v["previous-token neurons: where (deep)"] == "matched"
    t_no, _ = _explained(unigram_vr=0.5)
    rows = v03.comparisons(t_no.assign(universal=False), "universal", letters.iloc[:0], 4, "planted", 10_000)
    v = dict(zip([r.key for r in rows], paper.result_table(rows).verdict))
    assert v["alphabet_letters"] == "not measured"  # no letter has a label
    assert v["max_vr_unigram"] == "not measured"  # no universal unigram neuron


def test_chapter03_set_sensitivity():
    t, _ = _explained()
    sized = t[["layer", "neuron"]].assign(all_layer2=t.layer.eq(2), one=(t.layer.eq(0) & t.neuron.eq(30)))
    s = explain.set_sensitivity(t.assign(one=False), sized)
    assert s.loc["all_layer2", "neurons"] == 40
    assert s.loc["all_layer2", "explained (set)"] == pytest.approx(20 / 40)
    assert s.loc["all_layer2", "largest family of the set"] == "alphabet"
    assert s.loc["all_layer2", "its share of the set"] == pytest.approx(0.5)
    assert s.loc["one", "largest family of the set"] == "unigram" and s.loc["one", "median best VR (set)"] == 0.95
    assert s.loc["one", "explained (rest)"] == pytest.approx((20 + 3 + 4) / 159)


# ---- chapter 00 ---------------------------------------------------------------------------------

def _gpt2_small():
    description = {"n_layers": 12, "d_model": 768, "d_mlp": 3072, "act_fn": "gelu_new"}
    processing = {"fold_ln": True, "center_writing_weights": True, "center_unembed": True, "fold_value_biases": True}
    training = pd.DataFrame({"seed": [0, 1, 2, 3, 4], "steps": 400_000, "train_tokens": 10_000})
    corpus = pd.DataFrame({"train_tokens": [6_000, 4_000]}, index=["web", "books"])
    return description, processing, training, corpus


def test_chapter00_a_planted_gpt2_small_family_matches_and_a_small_one_differs():
    from helpers.models import verdicts as v00

    description, processing, training, corpus = _gpt2_small()
    rows = v00.comparisons(paper.SMALL, 5, description, processing, training, corpus,
                           {"train_seconds": {"a": 10.0, "b": 30.0}, "source": "shipped"}, data_name="OpenWebText")
    t = paper.result_table(rows)
    assert set(t.verdict) == {"matched"} and len(t) == 9
    small = v00.comparisons("embedded", 3, {**description, "n_layers": 2, "d_mlp": 512},
                            {**processing, "fold_ln": False}, training.assign(seed=[0, 0, 1, 2, 3]).iloc[:3],
                            corpus, {"train_seconds": {"a": 10.0}})
    t = paper.result_table(small)
    assert t.loc["architecture: layers", "verdict"] == "differs"
    assert t.loc["architecture: d_model", "verdict"] == "matched"
    assert t.loc["architecture: layers", "reason"] == (
        "sized for 10,000 training tokens per seed, about 10 s of training per member where it was trained "
        "(trained here)")
    assert t.loc["weight processing on load", "reason"] == "not applied here: fold_ln; applied here only: none"
    assert t.loc["what differs between members", "verdict"] == "differs"  # two members share seed 0
    assert t.loc["models differing only in their seed", "verdict"] == "differs"
    assert t.loc["training data", "verdict"] == "differs"
    assert t.loc["training data", "reason"] == "2 sources, 10,000 training tokens (section 1)"
    # a hub family: no training rows; a missing description entry is not measured
    hub = paper.result_table(v00.comparisons(paper.PYTHIA, 4, {**description, "act_fn": None}, processing))
    assert len(hub) == 6 and hub.loc["activation function", "verdict"] == "not measured"


def _fig9(n=1000, coupled=True, seed=0):
    """Neurons whose activation frequency falls as cos(w_in, w_out) falls (the paper's Fig 9) or not."""
    rng = np.random.default_rng(seed)
    cos = rng.uniform(-0.8, 0.8, n)
    freq = (0.5 - 0.6 * cos + 0.05 * rng.standard_normal(n)) if coupled else rng.uniform(0, 1, n)
    return pd.DataFrame({"act_freq": np.clip(freq, 0, 1), "in_out_sim": cos})


def test_chapter02_fig9_relation_is_scored_over_every_neuron_against_the_control():
    row = v02.frequency_alignment(_fig9(), "m", paper.MEDIUM, control=_fig9(coupled=False))
    t = paper.result_table([row])
    assert t.verdict.iloc[0] == "matched" and row.ours < -0.9
    s = v02.frequency_alignment_stats(_fig9())
    assert s["n_top"] == 10 and s["cos_top"] < -0.6
    # no relation: differs, and says by how much; a control with the relation makes it uninformative
    flat = paper.result_table([v02.frequency_alignment(_fig9(coupled=False), "m", paper.MEDIUM, gated=True)])
    assert flat.verdict.iloc[0] == "differs" and "w_in is the gate" in flat.reason.iloc[0]
    both = paper.result_table([v02.frequency_alignment(_fig9(), "m", paper.MEDIUM, control=_fig9(seed=1))])
    assert both.verdict.iloc[0] == "not informative"
    # a strong correlation alone is not enough: the most frequent neurons must point w_out against w_in
    shifted = _fig9().assign(in_out_sim=lambda d: d.in_out_sim + 1.0)
    assert not v02.frequency_alignment_stats(shifted)["holds"]
    with pytest.raises(ValueError, match="at least 3 neurons"):
        v02.frequency_alignment_stats(_fig9().head(2))
