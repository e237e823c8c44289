import numpy as np
import pytest
import torch

from helpers.core.presets import Architecture, Recipe
from helpers.data.tokens import iter_row_batches
from helpers.models import families, loading as models, training as train, weights

RECIPE = Recipe(train_tokens=16 * 16 * 12, batch_size=16, n_checkpoints=2, precision="fp32", lr=1e-2)


def _rows(arch, n=200, seed=0):
    # a learnable stream: tokens follow a fixed cycle with noise
    g = np.random.default_rng(seed)
    base = np.arange(n * arch["n_ctx"]) % 7 + 1
    noise = g.integers(0, arch["d_vocab"], size=base.shape)
    stream = np.where(g.random(base.shape) < 0.1, noise, base)
    return torch.from_numpy(stream.reshape(n, arch["n_ctx"]).astype(np.int64))


def test_training_lowers_loss_and_saves_checkpoints(tmp_path, tiny_arch):
    rows = _rows(tiny_arch)
    log = train.train_member(Architecture(**tiny_arch), RECIPE, rows, rows[:20], seed=0, folder=tmp_path / "a")
    evals = [e["val_loss"] for e in log["eval"]]
    assert evals[-1] < evals[0] - 0.5
    steps = [p.name for p in weights.checkpoint_folders(tmp_path, "a")]
    assert steps == [f"step{s:06d}" for s in weights.checkpoint_steps(log["n_steps"], 2)]
    assert steps[0] == "step000000"
    m = models.load_model(tmp_path / "a")
    assert models.evaluate_loss(m, rows[:20]) == pytest.approx(log["final_val_loss"], abs=1e-4)


def test_killed_training_resumes_to_the_same_weights(tmp_path, tiny_arch, monkeypatch):
    rows = _rows(tiny_arch)
    tiny_arch = Architecture(**tiny_arch)
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
    assert weights.checkpoint_steps(800, 4) == [0, 100, 200, 400, 800]
    assert weights.checkpoint_steps(5, 1) == [0, 5]


def test_smoke_family_is_trained_cached_and_loads(smoke_params):
    params = smoke_params
    with pytest.raises(families.FamilyNotTrained, match="python -m helpers.models.training --preset smoke"):
        families.load_family("embedded", params)  # loading never trains unless asked to
    fam = families.load_family("embedded", params, train=True)
    ctl = families.load_family("embedded-untrained", params)
    assert fam.members == list("abcde") and fam.info["source"] == "trained on this machine"
    rows = fam.token_rows(2000)
    assert rows.shape[1] == params["embedded"]["n_ctx"] and (rows[:, 0] == fam.codec.bos_id).all()
    trained, untrained = families.evaluate_family(fam, rows), families.evaluate_family(ctl, rows)
    assert max(trained.values()) < min(untrained.values()) - 1.0
    a, b = fam.load("a"), fam.load("b")
    assert not torch.equal(a.W_in, b.W_in)  # different seeds, different weights
    # identities are content hashes, distinct per member; the control's differ from the trained ones
    assert len(set(fam.identity.values())) == 5 and not set(fam.identity.values()) & set(ctl.identity.values())
    # a second call reuses the cache (no retraining): the logs are untouched
    import os

    log = fam.info["family_folder"] + "/a/train_log.json"
    before = os.stat(log).st_mtime_ns
    families.load_family("embedded", params, train=True)
    assert os.stat(log).st_mtime_ns == before


def test_training_forward_equals_the_hooked_forward(tiny_arch):
    """`train_logits` (SDPA, fused bias-adds, no hooks) computes what the HookedTransformer computes."""
    model = models.init_model(tiny_arch, 3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # biases and LayerNorm weights away from their init
    tokens = torch.randint(0, tiny_arch["d_vocab"], (3, tiny_arch["n_ctx"]))
    with torch.no_grad():
        ref = model(tokens, return_type="logits")
        ours = train.train_logits(model, tokens).view_as(ref)
        assert (ours - ref).abs().max() < 1e-4
        sliced = torch.nn.functional.cross_entropy(ref[:, :-1].reshape(-1, ref.shape[-1]), tokens[:, 1:].reshape(-1))
        assert train.train_loss(model, tokens) == pytest.approx(float(sliced), abs=1e-5)


def test_precision_auto_is_fp32_without_bf16_hardware(monkeypatch):
    train._PRECISION_CACHE.clear()
    monkeypatch.setattr(train, "cpu_bf16_flags", lambda: [])
    out = train.choose_precision("auto", "cpu", 64, 128)
    assert out["precision"] == "fp32" and "no bf16" in out["reason"]
    assert train.choose_precision("bf16", "cpu")["precision"] == "bf16"  # an explicit request is honoured
    train._PRECISION_CACHE.clear()


@pytest.mark.parametrize("bf16_seconds, expected", [(0.1, "bf16"), (0.6, "fp32"), (50.0, "fp32")])
def test_precision_auto_needs_a_measured_2x_speedup(monkeypatch, bf16_seconds, expected):
    train._PRECISION_CACHE.clear()
    monkeypatch.setattr(train, "cpu_bf16_flags", lambda: ["avx512_bf16"])
    monkeypatch.setattr(train, "_matmul_seconds", lambda dtype, *a, **k: 1.0 if dtype == torch.float32 else bf16_seconds)
    assert train.choose_precision("auto", "cpu", 64, 128)["precision"] == expected
    train._PRECISION_CACHE.clear()


def test_row_losses_average_to_the_validation_loss(tiny_arch):
    """Per-row losses, by hand for one row, and their mean equal to `evaluate_loss`."""
    model = models.init_model(tiny_arch, seed=3).eval()
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, tiny_arch["d_vocab"], (7, tiny_arch["n_ctx"]), generator=g)
    per_row = models.row_losses(model, rows, batch_size=3)
    assert per_row.shape == (7,)
    with torch.no_grad():
        logp = torch.log_softmax(model(rows[2:3]).double()[0, :-1], -1)
    by_hand = -logp[torch.arange(tiny_arch["n_ctx"] - 1), rows[2, 1:]].mean().item()
    assert per_row[2] == pytest.approx(by_hand, rel=1e-5)
    assert per_row.mean() == pytest.approx(models.evaluate_loss(model, rows, batch_size=2), rel=1e-6)
    assert np.ptp(per_row) > 0  # rows differ: an interval over rows is not degenerate
