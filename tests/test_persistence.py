"""Persistence of the universal set over training checkpoints (Nandan et al. 2025), on planted tables
with known sets and overlaps, and the exact random-overlap baseline against a simulation."""
import numpy as np
import pandas as pd
import pytest

from helpers.core import paper
from helpers.correlations import persistence as ps


def _table(excess: np.ndarray, n_layers: int = 2) -> pd.DataFrame:
    d = len(excess) // n_layers
    return pd.DataFrame({"layer": np.repeat(np.arange(n_layers), d), "neuron": np.tile(np.arange(d),
                                                                                       n_layers),
                         "excess_corr": excess})


def _planted(top: dict[str, list[int]], n: int = 200, seed: int = 0) -> dict[str, pd.DataFrame]:
    """Checkpoint tables in which the neurons `top[label]` have excess 0.5 + and every other neuron
    lies below 0.1: by the top-share rule at share len/n, the set is exactly `top[label]`."""
    rng = np.random.default_rng(seed)
    out = {}
    for label, ids in top.items():
        e = rng.uniform(0, 0.1, n)
        e[ids] = 0.5 + rng.uniform(0, 0.1, len(ids))
        out[label] = _table(e)
    return out


def test_sets_follow_the_rule_and_overlaps_are_counted():
    top = {"step 0": list(range(0, 10)), "step 10": list(range(5, 15)), "step 20": list(range(5, 15))}
    tables = _planted(top)
    sets = ps.checkpoint_sets(tables, share=10 / 200, rule="top_share")
    for label, ids in top.items():
        assert sorted(np.flatnonzero(sets[label])) == ids
    t = ps.persistence_table(sets, {"step 0": 0, "step 10": 10, "step 20": 20})
    assert list(t.overlap) == [5, 10] and list(t.jaccard) == pytest.approx([5 / 15, 1.0])
    assert list(t.retained) == pytest.approx([0.5, 1.0])
    f = ps.share_of_final(sets)
    assert list(f.share) == pytest.approx([0.5, 1.0, 1.0])
    # the control's maximum cuts the paper-sized set: a control reaching 0.55 keeps only the neurons above it
    control = _table(np.r_[0.55, np.zeros(199)])
    cut = ps.checkpoint_sets(tables, control, share=10 / 200, rule="paper_sized")
    for label in top:
        assert cut[label].sum() == (tables[label].excess_corr > 0.55).sum() < 10
    with pytest.raises(ValueError, match="unknown rule"):
        ps.checkpoint_sets(tables, rule="x")


def test_exact_random_overlap_matches_a_simulation():
    a, b, sizes = [8, 3, 0], [5, 6, 2], [40, 20, 30]
    pmf = ps.overlap_distribution(a, b, sizes)
    assert pmf.sum() == pytest.approx(1.0) and len(pmf) == 5 + 3 + 1
    rng = np.random.default_rng(0)
    sims = []
    for _ in range(20000):
        k = j = 0
        for na, nb, n in zip(a, b, sizes):
            x = np.zeros(n, bool)
            y = np.zeros(n, bool)
            x[rng.choice(n, na, replace=False)] = True
            y[rng.choice(n, nb, replace=False)] = True
            k += (x & y).sum()
        sims.append(k)
    sims = np.array(sims)
    c = ps.chance(a, b, sizes, observed=3)
    assert c.overlap == pytest.approx(sum(x * y / n for x, y, n in zip(a, b, sizes)))
    assert c.overlap == pytest.approx(sims.mean(), abs=0.03)
    assert c.p_value == pytest.approx((sims >= 3).mean(), abs=0.01)
    union = sum(a) + sum(b) - sims
    assert c.jaccard == pytest.approx((sims / union).mean(), abs=0.005)


def test_layer_matched_chance_is_stricter_than_chance_over_all_neurons():
    # two sets crowded into layer 0 of four: random sets of the same per-layer sizes overlap far more
    matched = ps.chance([20, 0, 0, 0], [20, 0, 0, 0], [100] * 4, observed=10)
    pooled = ps.chance([20], [20], [400], observed=10)
    assert matched.overlap == pytest.approx(4.0) and pooled.overlap == pytest.approx(1.0)
    assert matched.p_value > pooled.p_value


def test_persisting_and_reshuffled_sets_get_opposite_verdicts():
    n = 400
    keep = {"step 0": list(range(300, 320)), "step 10": list(range(0, 20)), "step 20": list(range(2, 22)),
            "step 40": list(range(3, 23))}
    tokens = {"step 0": 0, "step 10": 10, "step 20": 20, "step 40": 40}
    sets = ps.checkpoint_sets(_planted(keep, n), share=20 / n, rule="top_share")
    t = ps.persistence_table(sets, tokens)
    assert t.p_value.iloc[0] > 0.5  # the init's set has nothing to do with the trained one
    assert (t.p_value.iloc[1:] < 1e-10).all() and (t.jaccard.iloc[1:] > 5 * t.random_jaccard.iloc[1:]).all()
    v = ps.verdicts(t)
    assert v["persists"] and v["n_pairs"] == 2  # the init's pair is not scored
    assert paper.result_table(ps.comparisons(t)).verdict.tolist() == ["matched"]
    rng = np.random.default_rng(3)
    shuffle = {k: (v if k == "step 0" else sorted(rng.choice(n, 20, replace=False))) for k, v in keep.items()}
    t2 = ps.persistence_table(ps.checkpoint_sets(_planted(shuffle, n), share=20 / n, rule="top_share"),
                              tokens)
    assert not ps.verdicts(t2)["persists"]
    assert paper.result_table(ps.comparisons(t2)).verdict.tolist() == ["differs"]
    # kept beyond chance but less than half: does not persist by the rule either
    later = {"step 20": list(range(12, 32)), "step 40": list(range(24, 44))}
    half = {k: later.get(k, v)
            for k, v in keep.items()}
    t3 = ps.persistence_table(ps.checkpoint_sets(_planted(half, n), share=20 / n, rule="top_share"), tokens)
    assert (t3.p_value.iloc[1:] < 0.01).all() and (t3.retained.iloc[1:] < 0.5).all()
    assert not ps.verdicts(t3)["persists"]
    why = paper.result_table(ps.comparisons(t3)).reason.iloc[0]
    assert why == "the least kept share is 40% (needed: over 50%)"
    text = ps.conclusion(t, ps.share_of_final(sets, tokens))
    assert "step 10 → step 20: Jaccard 0.82" in text and "persists beyond chance" in text


def test_by_layer_and_empty_sets():
    keep = {"a": [0, 1, 2, 100, 101], "b": [0, 1, 2, 150, 151]}
    sets = ps.checkpoint_sets(_planted(keep), share=5 / 200, rule="top_share")
    by = ps.persistence_by_layer(sets).set_index("layer")
    assert by.loc[0, "jaccard"] == 1.0 and by.loc[1, "jaccard"] == 0.0
    assert by.loc[0, "p_value"] < by.loc[1, "p_value"]
    empty = sets.assign(a=False, b=False, c=False)
    t = ps.persistence_table(empty, {"a": 0, "b": 1, "c": 2})
    assert np.isnan(t.jaccard.iloc[0]) and np.isnan(t.random_jaccard.iloc[0]) and np.isnan(t.retained.iloc[0])
    assert paper.result_table(ps.comparisons(t)).verdict.tolist() == ["not measured"]
    assert "nothing to persist" in ps.conclusion(t, ps.share_of_final(empty))


def test_main_rule_falls_back_to_the_top_share_when_nothing_beats_the_control():
    tables = _planted({"a": [0, 1], "b": [0, 1]})
    assert ps.main_rule(tables, _table(np.zeros(200))) == "paper_sized"
    assert ps.main_rule(tables, _table(np.full(200, 0.9))) == "top_share"
    assert ps.main_rule(tables, None) == "top_share"
