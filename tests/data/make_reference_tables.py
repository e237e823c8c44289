"""Regenerate the reference tables of `tests/test_reference_tables.py`.

    PYTHONPATH=src python tests/data/make_reference_tables.py

Two references, each a correlation table (with its convergence table) and a neuron-statistics table:

- `planted_*`: the planted family of `tests/test_correlate.py` on seeded random rows; built from
  seeds alone, so the test runs everywhere;
- `smoke_*`: the smoke preset's embedded family over 6,000 held-out tokens (batches of 8), with
  the family's weight sha256s and the rows' sha256 in `smoke_identity.json`; the test runs where the
  smoke family trained on this machine has those weights.
"""
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))

from helpers.correlations import correlate  # noqa: E402
from helpers.properties import neuron_stats  # noqa: E402
from helpers.models.families import load_family  # noqa: E402
from helpers.core.presets import load_preset  # noqa: E402

SMOKE_TOKENS, SMOKE_BATCH = 6000, 8


def rows_sha256(rows: torch.Tensor) -> str:
    return hashlib.sha256(np.ascontiguousarray(rows.numpy().astype(np.int64)).tobytes()).hexdigest()


def planted():
    from test_correlate import planted_family

    torch.manual_seed(0)
    fam, _ = planted_family(3)
    return fam


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        fam = planted()
        table = correlate.correlate_family(fam, 0, Path(tmp) / "planted", batch_size=20,
                                           verbose=False).table("universality")
        table.to_parquet(HERE / "planted_universality.parquet")
        pd.read_parquet(Path(tmp) / "planted" / "convergence.parquet").to_parquet(HERE / "planted_convergence.parquet")
        stats = neuron_stats.member_neuron_stats(fam, 0, tmp, member="a", batch_size=20, out_dir=Path(tmp) / "pstats",
                                                 verbose=False).table("neuron_stats")
        stats.to_parquet(HERE / "planted_neuron_stats.parquet")

        params = load_preset("smoke")
        fam = load_family("embedded", params)
        rows = fam.token_rows(SMOKE_TOKENS)
        table = correlate.correlate_family(fam, SMOKE_TOKENS, Path(tmp) / "smoke", batch_size=SMOKE_BATCH,
                                           verbose=False).table("universality")
        table.to_parquet(HERE / "smoke_universality.parquet")
        pd.read_parquet(Path(tmp) / "smoke" / "convergence.parquet").to_parquet(HERE / "smoke_convergence.parquet")
        stats = neuron_stats.member_neuron_stats(fam, SMOKE_TOKENS, tmp, batch_size=SMOKE_BATCH,
                                                 out_dir=Path(tmp) / "sstats", verbose=False).table("neuron_stats")
        stats.to_parquet(HERE / "smoke_neuron_stats.parquet")
        (HERE / "smoke_identity.json").write_text(json.dumps(
            {"family": fam.identity, "rows_sha256": rows_sha256(rows), "rows_shape": list(rows.shape),
             "n_tokens": SMOKE_TOKENS, "batch_size": SMOKE_BATCH, "baseline": "rotation", "baseline_seed": 0},
            indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
