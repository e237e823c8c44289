"""The correlation and neuron-statistics tables equal reference tables kept in `tests/data/`
(made by `tests/data/make_reference_tables.py`) to float32 precision (relative 1e-5, absolute 1e-6):
changes to the streaming code must not change a result."""
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers.correlations import correlate
from helpers.properties import neuron_stats

DATA = Path(__file__).parent / "data"
sys.path.insert(0, str(DATA))

from make_reference_tables import SMOKE_BATCH, SMOKE_TOKENS, planted, rows_sha256  # noqa: E402


# The activations come from float32 matrix products, whose summation order (and so their last bit)
# depends on the CPU's kernels (AVX-512 vs AMX, ...); the moments accumulate them in float64 but
# keep those input differences, and the higher ones amplify them (a skew of 10.38 and a kurtosis of
# 140.6 move by ~1e-7 relative from one CPU to another). So floats are compared relative to their
# size, at 1e-5: ~100 float32 ulps, room for that amplification, still far below what a change to
# the statistics moves (a value off by 1e-3 relative fails). The small absolute tolerance is for
# values near zero.
RTOL, ATOL = 1e-5, 1e-6


def assert_same_table(got: pd.DataFrame, want: pd.DataFrame, name: str) -> None:
    assert list(got.columns) == list(want.columns), name
    assert len(got) == len(want), name
    for col in want.columns:
        g, w = got[col].to_numpy(), want[col].to_numpy()
        if np.issubdtype(w.dtype, np.floating):
            np.testing.assert_allclose(g.astype(float), w, rtol=RTOL, atol=ATOL, equal_nan=True, err_msg=f"{name}.{col}")
        else:
            np.testing.assert_array_equal(g, w, err_msg=f"{name}.{col}")


def check(fam, n_tokens, batch_size, prefix, tmp_path, member):
    table = correlate.correlate_family(fam, n_tokens, tmp_path / "corr", batch_size=batch_size,
                                       verbose=False).table("universality")
    assert_same_table(table, pd.read_parquet(DATA / f"{prefix}_universality.parquet"), f"{prefix} universality")
    conv = pd.read_parquet(tmp_path / "corr" / "convergence.parquet")
    assert_same_table(conv.reset_index(drop=True), pd.read_parquet(DATA / f"{prefix}_convergence.parquet").reset_index(drop=True),
                      f"{prefix} convergence")
    stats = neuron_stats.member_neuron_stats(fam, n_tokens, tmp_path, member=member, batch_size=batch_size,
                                             out_dir=tmp_path / "stats", verbose=False).table("neuron_stats")
    assert_same_table(stats, pd.read_parquet(DATA / f"{prefix}_neuron_stats.parquet"), f"{prefix} neuron stats")


def test_planted_family_tables_equal_the_reference(tmp_path):
    check(planted(), 0, 20, "planted", tmp_path, "a")


def test_smoke_family_tables_equal_the_reference(tmp_path):
    from helpers.models.families import FamilyNotTrained, load_family
    from helpers.core.presets import load_preset

    ref = json.loads((DATA / "smoke_identity.json").read_text())
    try:
        fam = load_family("embedded", load_preset("smoke"))
    except FamilyNotTrained:
        pytest.skip("the smoke family is not trained here: python -m helpers.models.training --preset smoke")
    if fam.identity != ref["family"] or rows_sha256(fam.token_rows(SMOKE_TOKENS)) != ref["rows_sha256"]:
        pytest.skip("the smoke family or corpus built here differs from the one the reference tables were made with")
    check(fam, SMOKE_TOKENS, SMOKE_BATCH, "smoke", tmp_path, None)
