"""Chapter 05's "Result vs paper" rows and its set table, on planted studies with known verdicts."""
import numpy as np
import pandas as pd
import torch

from helpers.core import paper
from helpers.correlations.universality import NeuronSet
from helpers.entropy import candidates, verdicts

GRID = (-1.0, -0.5, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0)
TOP, PARTNER = (1, 7), (1, 3)
RANDOM = [(0, n) for n in range(10, 15)]


def spectrum(null: bool) -> candidates.Spectrum:
    d = 8
    values = np.array([4, 3, 3, 3, 2.5, 2.5, 1.0, 0.5]) if null else np.linspace(3.0, 2.0, d)
    k = 2 if null else 0
    directions = torch.eye(d, dtype=torch.float64)
    return candidates.Spectrum(values, directions, 0, k, 0.5, 0.5 * float(np.median(values)), not null)


def sweep(slopes: dict, n_rows=2, n=10) -> pd.DataFrame:
    """A sweep table (`interventions.intervention_sweep`'s columns) whose token means move linearly
    with the grid: `slopes` {(layer, neuron, role): (Δ entropy, Δ scale, Δ reciprocal rank) per grid unit}."""
    out = []
    for r in range(n_rows):
        out.append({"row": r, "layer": -1, "neuron": -1, "role": "nominal", "mode": "nominal", "grid": np.nan,
                    "value": np.nan, "n": n, "scale": n * 1.0, "entropy": n * 2.0, "loss": n * 3.0, "rr": n * 0.3,
                    "top1_same": float(n)})
        for (l, nn, role), (se, ss, sr) in slopes.items():
            for g in GRID:
                out.append({"row": r, "layer": l, "neuron": nn, "role": role, "mode": "total", "grid": g,
                            "value": g / 10, "n": n, "scale": n * (1.0 + ss * g), "entropy": n * (2.0 + se * g),
                            "loss": n * 3.0, "rr": n * (0.3 + sr * g), "top1_same": float(n)})
    return pd.DataFrame(out)


def study(name, top=(0.1, 0.1, 0.001), partner=(-0.1, -0.1, 0.0), random=0.01, null=True, null_ratio=5.0,
          partner_cos=-0.9, n_random=len(RANDOM)) -> candidates.Study:
    """A planted study: the top candidate's, the partner's (None: not swept) and the random neurons'
    per-grid-unit effects; the top candidate's null-space share `null_ratio` x a random direction's."""
    neurons = pd.DataFrame([{"layer": TOP[0], "neuron": TOP[1], "role": "entropy"},
                            {"layer": PARTNER[0], "neuron": PARTNER[1], "role": "anti-entropy"}]
                           + [{"layer": l, "neuron": n, "role": "random"} for l, n in RANDOM[:n_random]])
    neurons = neurons.assign(act_sign=1.0)
    table = pd.DataFrame([{"layer": l, "neuron": n, "l2_rank": 1 + i, "vocab_var_rank": 1 + i, "null_frac": 0.1,
                           "null_ratio": (null_ratio if (l, n) == TOP else 1.0 + 0.05 * i) if null else np.nan}
                          for i, (l, n) in enumerate(zip(neurons.layer, neurons.neuron))])
    slopes = {(*TOP, "entropy"): top, **({(*PARTNER, "anti-entropy"): partner} if partner else {}),
              **{(l, n, "random"): (random * (-1) ** i, 0.0, 0.0) for i, (l, n) in enumerate(RANDOM[:n_random])}}
    return candidates.Study(name, table, spectrum(null), neurons, partner_cos, sweep(slopes))


def rows_of(trained, control=None):
    studies = {"t": trained, **({"c": control} if control else {})}
    s = candidates.seed_summary(studies)
    s = verdicts.flag_candidates(s, s.random_max_abs_d_entropy)
    return verdicts.comparisons("t", trained, s.loc["t"], control, s.loc["c"] if control else None)


def verdict_of(rows, start):
    t = paper.result_table(rows)
    hit = [q for q in t.index if q.startswith(start)]
    assert len(hit) == 1, (start, list(t.index))
    return t.loc[hit[0], "verdict"]


def test_flags_follow_the_rule():
    s = candidates.seed_summary({"up": study("up"), "down": study("down", top=(-0.1, -0.1, 0.0)),
                                 "weak": study("weak", top=(0.001, 0.001, 0.0))})
    f = verdicts.flag_candidates(s, 0.06)
    assert f["has entropy neuron"].tolist() == [True, False, False]
    assert f["top candidate is anti-entropy"].tolist() == [False, True, False]
    # the top-1 rule: a candidate that changes the top token too often is neither
    s.loc["up", "top1_same_min"] = 0.5
    assert not verdicts.flag_candidates(s, 0.06).loc["up", "has entropy neuron"]


def test_a_planted_entropy_neuron_is_matched_against_a_flat_control():
    rows = rows_of(study("t"), study("c", top=(0.001, 0.001, 0.0), partner=(0.001, 0.0, 0.0), null_ratio=1.0))
    assert verdict_of(rows, "entropy neuron raises scale and entropy") == "matched"
    assert verdict_of(rows, "the partner has the opposite effect") == "matched"
    assert verdict_of(rows, "null-space fraction") == "matched"
    # both planted at -0.9: the control passes the tolerance too
    assert verdict_of(rows, "cos(w_out) of the anti-entropy partner") == "not informative"
    t = paper.result_table(rows)
    assert t.loc["Δ entropy, grid 5 vs 0 (nats; t)", "this book"] == "0.500"  # 0.1 nats per grid unit, 5 units
    assert t.loc["Δ entropy, grid 5 vs 0 (nats; t)", "verdict"] == "not scored"


def test_a_control_that_passes_too_is_not_informative():
    rows = rows_of(study("t"), study("c"))
    assert verdict_of(rows, "entropy neuron raises scale and entropy") == "not informative"
    assert verdict_of(rows, "the partner has the opposite effect") == "not informative"
    assert verdict_of(rows, "null-space fraction") == "not informative"


def test_an_unswept_partner_is_not_measured_and_no_null_space_differs():
    rows = rows_of(study("t", partner=None, null=False))
    assert verdict_of(rows, "the partner has the opposite effect") == "not measured"
    t = paper.result_table(rows)
    row = t.loc["null-space fraction, multiple of a random direction's (t)"]
    assert row.verdict == "differs" and row["this book"].startswith("no null space")
    assert row.reason == "W_U has no null space for the output to lie in"


def test_without_random_neurons_the_claims_judged_against_them_are_not_measured():
    rows = rows_of(study("t", n_random=0), study("c", n_random=0))
    t = paper.result_table(rows)
    row = t.loc["null-space fraction, multiple of a random direction's (t)"]
    assert row.verdict == "not measured" and row.reason == "no random neurons to compare the null-space share with"
    assert verdict_of(rows, "the partner has the opposite effect") == "not measured"
    assert verdict_of(rows, "entropy neuron raises scale and entropy") == "not measured"  # no chance level


def test_the_wrong_picture_differs():
    # the rank moves as much as the entropy; the partner moves the entropy the same way
    rows = rows_of(study("t", top=(0.1, 0.1, 0.1), partner=(0.1, 0.1, 0.0), null_ratio=1.5))
    assert verdict_of(rows, "entropy neuron raises scale and entropy") == "differs"
    assert verdict_of(rows, "the partner has the opposite effect") == "differs"
    t = paper.result_table(rows)
    assert t.loc["the partner has the opposite effect on the entropy (t)", "reason"] == (
        "both move the entropy the same way when they act naturally")
    assert verdict_of(rows, "null-space fraction") == "differs"  # 1.5x: not above 2x


def test_set_membership_reads_the_sets_at_each_share():
    rows = [{"layer": l, "neuron": n, "excess_corr": 0.01 * n + (0.5 if (l, n) == TOP else 0.0)}
            for l in range(2) for n in range(50)]
    control = pd.DataFrame({"excess_corr": [0.3]})
    nset = NeuronSet(pd.DataFrame(rows).assign(paper_sized=False), "paper_sized", control)
    m = verdicts.set_membership(study("t").neurons[lambda d: d.role != "random"], nset, (0.01, 0.1))
    top, partner = m.set_index("role").loc["entropy"], m.set_index("role").loc["anti-entropy"]
    assert top["name"] == "L1.7" and top.percentile == 100 and top["in set at 1%"] and top["in set at 10%"]
    # L1.3 has excess 0.03, under the control's maximum: in no set
    assert not partner["in set at 1%"] and not partner["in set at 10%"] and partner.percentile < 20
    text = verdicts.membership_sentence(m)
    assert "the entropy neuron L1.7 has excess correlation 0.570 (percentile 100) and is in the set at 1%, 10%" \
        in text
    assert "L1.3" in text and "none of these sizes" in text
