"""The correlation driver on families with known answers, resume, and torchrun sharding."""
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from helpers.core.cache import read_json
from helpers.correlations import correlate
from helpers.models.families import Family
from helpers.models.loading import init_model

ARCH = {"n_layers": 2, "d_model": 32, "n_heads": 2, "d_mlp": 128, "n_ctx": 16, "d_vocab": 50}
PLANTED = [(0, 3), (0, 17), (1, 5), (1, 40)]  # neurons of the reference model copied into every seed


def planted_family(n_members=4):
    """Members share embeddings and attention, and their MLPs write nothing (so their residual streams are identical); they have
    independent random MLP input weights, except the PLANTED neurons of `a`, which are copied
    into a random position of the same layer of every other member."""
    base = init_model(ARCH, seed=100)
    g = torch.Generator().manual_seed(7)
    built = {}
    names = list("abcde")[:n_members]
    for i, m in enumerate(names):
        model = init_model(ARCH, seed=100)
        model.load_state_dict(base.state_dict())
        for l in range(ARCH["n_layers"]):
            mlp = model.blocks[l].mlp
            with torch.no_grad():
                mlp.W_in.copy_(torch.randn(mlp.W_in.shape, generator=g) * 0.5)
                mlp.b_in.copy_(torch.randn(mlp.b_in.shape, generator=g) * 0.1)
                mlp.W_out.zero_()  # MLPs write nothing: every layer's residual is the same in every member
        built[m] = model
    ref = built["a"]
    with torch.no_grad():  # planted neurons are sparse, like universal neurons (negative input bias)
        for l, n in PLANTED:
            ref.blocks[l].mlp.b_in[n] = -2.0
    where = {}
    for m in names[1:]:
        perm = torch.randperm(ARCH["d_mlp"], generator=g)
        for k, (l, n) in enumerate(PLANTED):
            j = int(perm[k])
            with torch.no_grad():
                built[m].blocks[l].mlp.W_in[:, j] = ref.blocks[l].mlp.W_in[:, n]
                built[m].blocks[l].mlp.b_in[j] = ref.blocks[l].mlp.b_in[n]
            where[(m, l, n)] = j
    for model in built.values():
        model.eval()
    rows = torch.randint(1, ARCH["d_vocab"], (300, ARCH["n_ctx"]))
    rows[:, 0] = 0
    codec = SimpleNamespace(drop_ids=[0], bos_id=0)
    fam = Family("planted", names, lambda m: built[m], lambda: codec, "cpu", {}, lambda n, split: rows)
    return fam, where


def test_planted_neurons_are_found_universal(tmp_path):
    fam, where = planted_family()
    table = correlate.correlate_family(fam, 0, tmp_path / "run", batch_size=64, verbose=False).table("universality")
    assert len(table) == ARCH["n_layers"] * ARCH["d_mlp"]
    planted = table.set_index(["layer", "neuron"]).loc[PLANTED]
    for (l, n), row in planted.iterrows():
        for m in "bcd":
            assert row[f"max_corr_{m}"] == pytest.approx(1.0, abs=1e-5)
            assert (row[f"match_layer_{m}"], row[f"match_neuron_{m}"]) == (l, where[(m, l, n)])
    # expected excess: exactly 1 - the baseline max, which is well below 1 for a rotation
    assert np.allclose(planted.excess_corr, 1 - planted.mean_baseline, atol=1e-5)
    assert planted.is_universal.all() and (planted.excess_corr > 0.5).all()
    rest = table[~table.set_index(["layer", "neuron"]).index.isin(PLANTED)]
    assert not rest.is_universal.any()
    assert planted.excess_corr.min() > rest.excess_corr.max()
    assert rest.excess_corr.abs().median() < 0.15
    assert (table.is_universal == (table.excess_corr > 0.5)).all()
    run = read_json(tmp_path / "run" / "run.json")
    assert run["others"] == ["b", "c", "d"] and run["n_valid_tokens"] == 300 * 15
    # cached: a second call reads the table without computing
    again = correlate.correlate_family(fam, 0, tmp_path / "run", verbose=False).table("universality")
    pd.testing.assert_frame_equal(again, table)


def test_baselines_are_seeded_and_orthogonal():
    a = correlate.baseline_matrices("b", 2, 16, seed=3)
    b = correlate.baseline_matrices("b", 2, 16, seed=3)
    c = correlate.baseline_matrices("c", 2, 16, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[0], a[1])
    assert torch.allclose(a[0] @ a[0].T, torch.eye(16), atol=1e-5)
    with pytest.raises(ValueError, match="rotation"):
        correlate.baseline_matrices("b", 1, 4, 0, kind="permutation")


def test_killed_run_resumes_to_the_same_table(tmp_path, monkeypatch):
    fam, _ = planted_family(3)
    full = correlate.correlate_family(fam, 0, tmp_path / "full", batch_size=20, checkpoint_every=1000,
                                      verbose=False).table("universality")
    real_update = correlate.StreamingPearson.update
    calls = {"n": 0}

    def dying_update(self, x, y):
        calls["n"] += x is not y  # the cross accumulator (per-layer covariances get x is y)
        if calls["n"] == 9:
            raise KeyboardInterrupt
        return real_update(self, x, y)

    monkeypatch.setattr(correlate.StreamingPearson, "update", dying_update)
    with pytest.raises(KeyboardInterrupt):
        correlate.correlate_family(fam, 0, tmp_path / "resumed", batch_size=20, checkpoint_every=1000, verbose=False)
    monkeypatch.setattr(correlate.StreamingPearson, "update", real_update)
    assert list((tmp_path / "resumed").glob("state_block0_rank0.pt"))
    resumed = correlate.correlate_family(fam, 0, tmp_path / "resumed", batch_size=20, checkpoint_every=1000,
                                         verbose=False).table("universality")
    num = full.select_dtypes("number").columns
    assert np.allclose(full[num].to_numpy(float), resumed[num].to_numpy(float), atol=1e-6, equal_nan=True)
    assert not list((tmp_path / "resumed").glob("state_*.pt"))


def test_one_member_family_is_rejected(tmp_path):
    fam, _ = planted_family(2)
    fam.members = ["a"]
    with pytest.raises(ValueError, match="two seeds"):
        correlate.correlate_family(fam, 0, tmp_path / "x", verbose=False)


def test_bad_budget_and_foreign_checkpoint_are_explained(tmp_path, capsys):
    fam, _ = planted_family(2)
    with pytest.raises(ValueError, match="per-layer covariances"):
        correlate.correlate_family(fam, 0, tmp_path / "x", memory_budget_gb=1e-9, verbose=False)
    clean = correlate.correlate_family(fam, 0, tmp_path / "clean", verbose=False).table("universality")
    (tmp_path / "y").mkdir()
    torch.save({"acc": {}, "next_batch": 1, "snapshots": []}, tmp_path / "y" / "state_block0_rank0.pt")
    # not resumed: started fresh
    table = correlate.correlate_family(fam, 0, tmp_path / "y", verbose=False).table("universality")
    assert "state_block0_rank0.pt: checkpoint of another version" in capsys.readouterr().err
    pd.testing.assert_frame_equal(table, clean)


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tmp_path):
    """Sharded under torchrun (gloo, 2 CPU processes) = one process, on the smoke family."""
    env = {**os.environ, "CORR_BACKEND": "gloo", "OMP_NUM_THREADS": "1"}
    common = ["-m", "helpers.correlations.correlate", "--preset", "smoke", "--n-tokens", "6000", "--batch-size", "8"]
    subprocess.run([sys.executable, *common, "--out", str(tmp_path / "one")], check=True, env=env, capture_output=True)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *common,
                           "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one = pd.read_parquet(tmp_path / "one" / "universality.parquet")
    two = pd.read_parquet(tmp_path / "two" / "universality.parquet")
    num = one.select_dtypes("number").columns
    assert np.allclose(one[num].to_numpy(float), two[num].to_numpy(float), atol=1e-6, equal_nan=True)
    assert read_json(tmp_path / "two" / "run.json")["world_size"] == 2
