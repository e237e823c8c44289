import numpy as np
import pytest
import torch

from helpers import families, models, train
from helpers.data import iter_row_batches

RECIPE = {**train.RECIPE_DEFAULTS, "train_tokens": 16 * 16 * 12, "batch_size": 16, "n_checkpoints": 2,
          "autocast_bf16": False, "lr": 1e-2}


def _rows(arch, n=200, seed=0):
    # a learnable stream: tokens follow a fixed cycle with noise
    g = np.random.default_rng(seed)
    base = np.arange(n * arch["n_ctx"]) % 7 + 1
    noise = g.integers(0, arch["d_vocab"], size=base.shape)
    stream = np.where(g.random(base.shape) < 0.1, noise, base)
    return torch.from_numpy(stream.reshape(n, arch["n_ctx"]).astype(np.int64))


def test_training_lowers_loss_and_saves_checkpoints(tmp_path, tiny_arch):
    rows = _rows(tiny_arch)
    log = train.train_member(tiny_arch, RECIPE, rows, rows[:20], seed=0, folder=tmp_path / "a")
    evals = [e["val_loss"] for e in log["eval"]]
    assert evals[-1] < evals[0] - 0.5
    steps = [p.name for p in train.checkpoint_folders(tmp_path, "a")]
    assert steps == [f"step{s:06d}" for s in train.checkpoint_steps(log["n_steps"], 2)]
    assert steps[0] == "step000000"
    m = models.load_model(tmp_path / "a")
    assert train.evaluate_loss(m, rows[:20]) == pytest.approx(log["final_val_loss"], abs=1e-4)


def test_killed_training_resumes_to_the_same_weights(tmp_path, tiny_arch, monkeypatch):
    rows = _rows(tiny_arch)
    train.train_member(tiny_arch, RECIPE, rows, rows[:20], seed=1, folder=tmp_path / "full")

    # Interrupt the second run right after its first post-init checkpoint has been written.
    real_save = train.atomic_torch_save

    def save_then_die(obj, path):
        real_save(obj, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "atomic_torch_save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.train_member(tiny_arch, RECIPE, rows, rows[:20], seed=1, folder=tmp_path / "resumed")
    monkeypatch.setattr(train, "atomic_torch_save", real_save)
    assert (tmp_path / "resumed" / "resume.pt").is_file()
    train.train_member(tiny_arch, RECIPE, rows, rows[:20], seed=1, folder=tmp_path / "resumed")
    a = models.load_model(tmp_path / "full", processing={k: False for k in models.PROCESSING})
    b = models.load_model(tmp_path / "resumed", processing={k: False for k in models.PROCESSING})
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(va, vb, atol=1e-6), k
    assert not (tmp_path / "resumed" / "resume.pt").exists()


def test_checkpoint_steps_are_geometric_and_include_init_and_end():
    assert train.checkpoint_steps(800, 4) == [0, 100, 200, 400, 800]
    assert train.checkpoint_steps(5, 1) == [0, 5]


def test_embedded_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="n_layerz"):
        train.split_embedded_config({"n_layerz": 2})


def test_smoke_family_is_trained_cached_and_loads(tmp_path):
    from helpers.presets import load_preset

    params = load_preset("smoke")
    fam = families.load_family("embedded", params)
    ctl = families.load_family("embedded-untrained", params)
    assert fam.members == list("abcde")
    rows = fam.token_rows(2000)
    assert rows.shape[1] == params["embedded"]["n_ctx"] and (rows[:, 0] == fam.codec.bos_id).all()
    trained, untrained = families.evaluate_family(fam, rows), families.evaluate_family(ctl, rows)
    assert max(trained.values()) < min(untrained.values()) - 1.0
    a, b = fam.load("a"), fam.load("b")
    assert not torch.equal(a.W_in, b.W_in)  # different seeds, different weights
    # a second call reuses the cache (no retraining): the logs are untouched
    log = fam.info["family_folder"] + "/a/train_log.json"
    import os
    before = os.stat(log).st_mtime_ns
    families.load_family("embedded", params)
    assert os.stat(log).st_mtime_ns == before
