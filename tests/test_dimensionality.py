"""Effective dimension and the baseline it predicts, on covariances with known answers; the
baselines redrawn from kept accumulators against a direct computation."""
import math

import numpy as np
import pytest
import torch

from helpers.correlations import baselines, checks, dimensionality as dim
from helpers.correlations.pearson import random_rotation
from helpers.streaming.accumulators import StreamingPearson


def test_participation_ratio_known_spectra():
    assert dim.participation_ratio(np.ones(7)) == pytest.approx(7)
    assert dim.participation_ratio([3.0, 0, 0, 0]) == pytest.approx(1)
    assert dim.participation_ratio([1.0, 1.0, 0, 0]) == pytest.approx(2)
    cov = np.diag([1.0, 4.0, 9.0])
    assert dim.participation_ratio(dim.spectrum(cov)) == pytest.approx(196 / 98)
    # standardised, three independent units are three directions whatever their scales
    assert dim.participation_ratio(dim.spectrum(dim.correlation_from_covariance(cov))) == pytest.approx(3)


def test_correlation_matrix_sees_common_modes():
    d, rho = 50, 0.8
    corr = (1 - rho) * np.eye(d) + rho * np.ones((d, d))
    scales = np.linspace(0.1, 10, d)
    cov = corr * scales[:, None] * scales[None, :]
    c = dim.correlation_from_covariance(cov)
    assert np.allclose(c, corr)
    # one common mode: eigenvalues 1 + (d-1) rho and (1 - rho) x (d-1)
    lam = np.r_[1 + (d - 1) * rho, np.full(d - 1, 1 - rho)]
    assert dim.participation_ratio(dim.spectrum(c)) == pytest.approx(dim.participation_ratio(lam))
    assert dim.participation_ratio(dim.spectrum(c)) < 2


def test_predicted_max_correlation_isotropic_two_units():
    # Σ = I, d = 2: each column of a Haar 2x2 orthogonal matrix is uniform on the circle, so the
    # expected max of its two entries is E[max(cos t, sin t)] = sqrt(2) / pi.
    pred = dim.predicted_max_correlation(np.eye(2), n_draws=3000, seed=1)
    assert pred.mean() == pytest.approx(math.sqrt(2) / math.pi, abs=0.01)


def test_predicted_max_correlation_single_direction_is_one():
    v = np.random.default_rng(0).normal(size=(20, 1))
    cov = v @ v.T + 1e-10 * np.eye(20)
    assert np.allclose(dim.predicted_max_correlation(cov, n_draws=2), 1.0, atol=1e-3)
    # and more directions lower the prediction
    low = dim.predicted_max_correlation(np.eye(20), n_draws=4)
    assert np.median(low) < 0.7


def test_rotated_unit_correlations_match_samples():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(20000, 4)) @ rng.normal(size=(4, 4))
    m = random_rotation(4, 3, dtype=torch.float64).numpy()
    z = y @ m.T
    direct = np.corrcoef(np.c_[z, y].T)[:4, 4:]
    assert np.allclose(dim.rotated_unit_correlations(np.cov(y.T, bias=True), m), direct, atol=1e-10)


def _planted_run(n=4000, d=6, seed=0):
    """A tiny 'run': reference x (2 layers x d) against one member with 2 layers of d units."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(n, 2 * d, generator=g, dtype=torch.float64) @ torch.randn(2 * d, 2 * d, generator=g, dtype=torch.float64)
    x = y[:, :2 * d] + 0.5 * torch.randn(n, 2 * d, generator=g, dtype=torch.float64)
    acc = StreamingPearson(2 * d, 2 * d)
    grams = [StreamingPearson(d, d), StreamingPearson(d, d)]
    acc.update(x, y)
    for l, gm in enumerate(grams):
        gm.update(y[:, l * d:(l + 1) * d], y[:, l * d:(l + 1) * d])
    run = baselines.RunAccumulators([(slice(0, 2 * d), acc, grams)], [("b", 0, slice(0, d)), ("b", 1, slice(d, 2 * d))], 2 * d)
    return run, x, y


def test_redrawn_baseline_equals_direct_rotation():
    from helpers.correlations.correlate import baseline_matrices

    d = 6
    run, x, y = _planted_run(d=d)
    for kind in ("rotation", "gaussian"):
        b = baselines.baseline_table(run, seed=7, kind=kind)
        mats = baseline_matrices("b", 2, d, 7, kind)
        z = torch.cat([y[:, l * d:(l + 1) * d] @ mats[l].double().T for l in range(2)], 1)
        c = np.corrcoef(torch.cat([x, z], 1).T.numpy())[:2 * d, 2 * d:]
        assert np.allclose(b.baseline_b.to_numpy(), c.max(1), atol=1e-6)
        assert np.allclose(b.mean_baseline, b.baseline_b)


def test_variability_reports_spread_sizes_and_jaccard():
    run, x, y = _planted_run()
    table = __import__("pandas").DataFrame({"layer": np.repeat([0, 1], 6), "neuron": np.tile(np.arange(6), 2),
                                            "mean_corr": np.linspace(0.5, 0.99, 12)})
    res = baselines.baseline_variability(table, run, seeds=(1, 2, 3, 4, 5), gaussian_seeds=(1,), threshold=0.1, top_fraction=0.25)
    assert len(res["draws"]) == 6 and set(res["draws"].kind) == {"rotation", "gaussian"}
    assert (res["per_neuron"].baseline_range >= 0).all() and res["per_neuron"].baseline_std.notna().all()
    assert res["per_neuron"].baseline_range.max() > 0  # different rotations give different baselines
    st = res["stability"]
    assert 0 <= st.loc["top_excess", "jaccard_rotations"] <= 1
    # every set the chapters can choose has its row (chapter 01's summary reads the chosen one's)
    from helpers.correlations.universality import SET_COLUMNS

    assert set(SET_COLUMNS) <= set(st.index)
    # without a control the paper-sized set is the top share alone: at the same share as top_excess,
    # the same neurons
    same = baselines.baseline_variability(table, run, seeds=(1, 2), gaussian_seeds=(), threshold=0.1,
                                          top_fraction=0.25, share=0.25)
    assert (same["draws"].n_paper_sized == same["draws"].n_top_excess).all()
    assert same["stability"].loc["paper_sized", "jaccard_rotations"] == \
        same["stability"].loc["top_excess", "jaccard_rotations"]
    assert baselines.jaccard(np.array([1, 1, 0], bool), np.array([0, 1, 1], bool)) == pytest.approx(1 / 3)
    assert baselines.mean_pairwise_jaccard([np.array([1, 0], bool)] * 3) == 1.0


def test_trained_exceeds_control_can_fail(tmp_path):
    assert checks.trained_exceeds_control({"p99": 0.2}, {"p99": 0.1}).passed.all()
    res = checks.trained_exceeds_control({"p99": 0.1}, {"p99": 0.1})
    assert not res.passed.any() and res.required.all()
    csv = tmp_path / "r.csv"
    import pandas as pd
    pd.DataFrame({"train_tokens": [1000, 2000], "excess_p99": [0.2, 0.3], "control_p99": [0.1, 0.1]}).to_csv(csv, index=False)
    assert not checks.trained_exceeds_control({"p99": 0.1}, {"p99": 0.2}, train_tokens=500, results_csv=csv).required.any()
    assert checks.trained_exceeds_control({"p99": 0.1}, {"p99": 0.2}, train_tokens=1000, results_csv=csv).required.all()
