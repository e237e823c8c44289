"""Neuron statistics: exact streaming moments, weight statistics against direct computations,
activation statistics against a one-shot `run_with_cache`, resume, cache and CLI."""
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from helpers.properties import neuron_stats as ns
from helpers.models.families import Family
from helpers.models.loading import init_model
from helpers.properties.neuron_stats import activation_statistics, neuron_stats_table, weight_statistics
from helpers.streaming.accumulators import StreamingMoments

ARCH = {"n_layers": 2, "d_model": 16, "n_heads": 2, "d_mlp": 24, "n_ctx": 8, "d_vocab": 30}
BOS, NEWLINE = 0, 5


def reference_moments(x: np.ndarray) -> dict:
    """Column moments of `x` [tokens, n] by numpy/scipy on the full data."""
    return {"mean": x.mean(0), "var": x.var(0), "skew": stats.skew(x, axis=0, bias=True),
            "kurt": stats.kurtosis(x, axis=0, fisher=False, bias=True), "pos": (x > 0).mean(0)}


def assert_moments(acc: StreamingMoments, ref: dict, rtol=1e-10):
    np.testing.assert_allclose(acc.mean().numpy(), ref["mean"], rtol=1e-13)
    np.testing.assert_allclose(acc.variance().numpy(), ref["var"], rtol=rtol)
    # skew and kurtosis are dimensionless: also an absolute tolerance, for skews near 0
    np.testing.assert_allclose(acc.skew().numpy(), ref["skew"], rtol=rtol, atol=1e-10)
    np.testing.assert_allclose(acc.kurtosis().numpy(), ref["kurt"], rtol=rtol, atol=1e-10)
    np.testing.assert_array_equal(acc.fraction_positive().numpy(), ref["pos"])


def moment_data(n=6000, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([
        1000.0 + rng.exponential(1.0, n),          # mean 1000x its std, skew 2, kurtosis 9
        -1000.0 - 0.01 * rng.exponential(1.0, n),  # mean 1e5x its std, negative skew
        rng.normal(0.3, 2.0, n),
        np.where(rng.random(n) < 0.05, rng.exponential(3.0, n), -0.1),  # sparse, GELU-like floor
    ], axis=1)


def test_moments_match_scipy_in_uneven_chunks():
    x = moment_data()
    acc = StreamingMoments(x.shape[1])
    bounds = [0, 1, 8, 508, 1742, 1743, 4000, len(x)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        acc.update(torch.from_numpy(x[a:b]))
    assert acc.count == len(x)
    ref = reference_moments(x)
    assert_moments(acc, ref)
    # the well-conditioned columns also match their population values roughly (sanity of the data)
    assert abs(acc.skew()[0] - 2) < 0.3 and abs(acc.kurtosis()[0] - 9) < 3
    # tiny chunks (via chunk_elems) give the same result
    small = StreamingMoments(x.shape[1], chunk_elems=37).update(torch.from_numpy(x))
    assert_moments(small, ref)


def test_float32_input_is_accumulated_in_float64():
    x32 = moment_data(seed=3).astype(np.float32)
    acc = StreamingMoments(4)
    for part in np.array_split(x32, 7):
        acc.update(torch.from_numpy(part))
    assert acc.mean().dtype == torch.float64
    assert_moments(acc, reference_moments(x32.astype(np.float64)), rtol=1e-9)


def test_merge_of_halves_equals_one_pass():
    x = moment_data(seed=1)
    x[len(x) // 2 :] += 3.0  # the halves have different means: the merge must re-centre exactly
    h = len(x) // 3
    a = StreamingMoments(4)
    for part in np.array_split(x[:h], 5):
        a.update(torch.from_numpy(part))
    b = StreamingMoments(4).update(torch.from_numpy(x[h:]))
    one = StreamingMoments(4).update(torch.from_numpy(x))
    merged = StreamingMoments(4).merge(a).merge(b)
    ref = reference_moments(x)
    assert_moments(merged, ref)
    for fn in ("mean", "variance", "skew", "kurtosis", "fraction_positive"):
        np.testing.assert_allclose(getattr(merged, fn)().numpy(), getattr(one, fn)().numpy(), rtol=1e-10, atol=1e-12)
    assert merged.count == len(x)
    # merging into a non-empty accumulator, the other order, and merging an empty one
    a.merge(b).merge(StreamingMoments(4))
    assert_moments(a, ref)
    with pytest.raises(ValueError):
        a.merge(StreamingMoments(3))


def test_state_dict_round_trip_resumes_exactly(tmp_path):
    x = torch.from_numpy(moment_data(seed=2))
    full = StreamingMoments(4).update(x[:2000]).update(x[2000:])
    first = StreamingMoments(4).update(x[:2000])
    torch.save(first.state_dict(), tmp_path / "s.pt")
    first.update(torch.ones(3, 4) * 99)  # the saved state must not change afterwards
    resumed = StreamingMoments(4).load_state_dict(torch.load(tmp_path / "s.pt"))
    resumed.update(x[2000:])
    assert resumed.count == full.count
    for fn in ("mean", "variance", "skew", "kurtosis", "fraction_positive"):
        assert torch.equal(getattr(resumed, fn)(), getattr(full, fn)()), fn


def test_empty_and_constant_variables_are_nan():
    acc = StreamingMoments(2)
    assert torch.isnan(acc.kurtosis()).all() and torch.isnan(acc.mean()).all()
    acc.update(torch.tensor([[0.0, 1.0], [0.0, 2.0], [0.0, 4.0]]))
    assert torch.isnan(acc.skew()[0]) and torch.isnan(acc.kurtosis()[0]) and acc.variance()[0] == 0
    assert torch.isfinite(acc.skew()[1])


def test_planted_sparse_neurons():
    """Neuron 0: -0.17 on 98% of tokens, 3.0 on exactly 2% (a shifted Bernoulli, closed forms);
    neuron 1: Exp(1) values on ~2% of tokens, 0 elsewhere."""
    n, p = 50_000, 0.02
    rng = np.random.default_rng(5)
    bern = np.full(n, -0.17)
    bern[rng.permutation(n)[: int(p * n)]] = 3.0
    fire = rng.random(n) < p
    expo = np.where(fire, rng.exponential(1.0, n), 0.0)
    x = np.stack([bern, expo, rng.normal(size=n)], axis=1)
    acc = StreamingMoments(3)
    for part in np.array_split(x, 13):
        acc.update(torch.from_numpy(part).float())  # activations arrive as fp32
    q = 1 - p
    assert acc.fraction_positive()[0].item() == pytest.approx(p, abs=0)
    assert acc.skew()[0].item() == pytest.approx((1 - 2 * p) / np.sqrt(p * q), rel=1e-6)
    assert acc.kurtosis()[0].item() == pytest.approx((1 - 3 * p * q) / (p * q), rel=1e-6)
    assert acc.variance()[0].item() == pytest.approx(3.17**2 * p * q, rel=1e-6)
    # exponential spikes: vs scipy exactly, vs the closed form (E[X^k] = p k!) within sampling noise
    x1 = x[:, 1].astype(np.float32).astype(np.float64)
    assert acc.fraction_positive()[1].item() == fire.mean()
    assert acc.skew()[1].item() == pytest.approx(stats.skew(x1), rel=1e-9)
    assert acc.kurtosis()[1].item() == pytest.approx(stats.kurtosis(x1, fisher=False), rel=1e-9)
    r1, r2, r3, r4 = p, 2 * p, 6 * p, 24 * p
    var = r2 - r1**2
    skew = (r3 - 3 * r1 * r2 + 2 * r1**3) / var**1.5
    kurt = (r4 - 4 * r1 * r3 + 6 * r1**2 * r2 - 3 * r1**4) / var**2
    assert acc.skew()[1].item() == pytest.approx(skew, rel=0.15)
    assert acc.kurtosis()[1].item() == pytest.approx(kurt, rel=0.3)
    assert acc.kurtosis()[1] > 100 and abs(acc.kurtosis()[2] - 3) < 0.1  # sparse neuron vs Gaussian


# ------------------------------------------------------------------------------------ weights


def tiny_model(seed=0):
    model = init_model(ARCH, seed=seed)
    with torch.no_grad():  # TransformerLens initialises biases at zero
        for block in model.blocks:
            block.mlp.b_in.copy_(torch.randn(ARCH["d_mlp"]) * 0.3)
    return model.eval()


def direct_weight_stats(model, w_in_of, w_out_of):
    """Per-neuron loops in float64 numpy. The unembedding is the one the model applies: W_U times the
    final norm's weight, centred over d_model under a LayerNorm (which removes the mean; these
    models are unfolded), formed in float32 as the model does."""
    L, D = model.cfg.n_layers, model.cfg.d_mlp
    W_U = model.ln_final.w.detach()[:, None] * model.W_U.detach()
    if model.cfg.normalization_type == "LN":
        W_U = W_U - W_U.mean(0)
    W_U = W_U.double().numpy()
    W_U = W_U / np.linalg.norm(W_U, axis=0, keepdims=True)
    ins = [w_in_of(l, i) for l in range(L) for i in range(D)]
    outs = [w_out_of(l, i) for l in range(L) for i in range(D)]
    cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    rec = []
    for k, (wi, wo) in enumerate(zip(ins, outs)):
        c = (wo / np.linalg.norm(wo)) @ W_U
        rec.append({"w_in_norm": np.linalg.norm(wi), "w_out_norm": np.linalg.norm(wo), "in_out_sim": cos(wi, wo),
                    "l2_penalty": wi @ wi + wo @ wo, "vocab_mean": c.mean(), "vocab_var": c.var(),
                    "vocab_skew": stats.skew(c), "vocab_kurt": stats.kurtosis(c, fisher=False),
                    "max_cos_w_in": max(cos(wi, ins[j]) for j in range(len(ins)) if j != k),
                    "max_cos_w_out": max(cos(wo, outs[j]) for j in range(len(outs)) if j != k)})
    return pd.DataFrame(rec)


def compare_weights(got: pd.DataFrame, want: pd.DataFrame):
    for col in want.columns:
        fp32 = col.startswith(("max_cos", "vocab_"))  # cosines are fp32 products by default
        np.testing.assert_allclose(got[col].to_numpy(), want[col].to_numpy(), rtol=2e-5 if fp32 else 1e-9,
                                   atol=2e-6 if col.startswith("max_cos") else 1e-12, err_msg=col)


def test_weight_statistics_match_direct_computation():
    model = tiny_model()
    got = weight_statistics(model)
    L, D = ARCH["n_layers"], ARCH["d_mlp"]
    assert len(got) == L * D and list(got.layer[:2]) == [0, 0] and got.neuron.iloc[D] == 0
    assert "w_lin_norm" not in got
    w_in = lambda l, i: model.blocks[l].mlp.W_in[:, i].detach().double().numpy()
    w_out = lambda l, i: model.blocks[l].mlp.W_out[i].detach().double().numpy()
    compare_weights(got, direct_weight_stats(model, w_in, w_out))
    b = torch.cat([blk.mlp.b_in.detach() for blk in model.blocks]).double().numpy()
    np.testing.assert_array_equal(got.input_bias.to_numpy(), b)
    # float64 products give the max cosines exactly
    exact = weight_statistics(model, dtype=torch.float64, block_elems=50)  # also: many small blocks
    direct = direct_weight_stats(model, w_in, w_out)
    for col in ("max_cos_w_in", "max_cos_w_out", "vocab_mean", "vocab_var", "vocab_skew", "vocab_kurt"):
        np.testing.assert_allclose(exact[col], direct[col], rtol=1e-10, err_msg=col)


def test_vocab_moments_of_a_per_layer_sample():
    """`vocab_neurons=k`: the vocab columns of the first k neurons of each layer are the full
    computation's, NaN for the others; every other column is unchanged."""
    model = tiny_model()
    full = weight_statistics(model)
    part = weight_statistics(model, vocab_neurons=5, block_elems=100)  # also: blocks cut inside the sample
    vocab = ["vocab_mean", "vocab_var", "vocab_skew", "vocab_kurt"]
    sampled = part.neuron < 5
    assert sampled.sum() == 5 * ARCH["n_layers"]
    np.testing.assert_allclose(part.loc[sampled, vocab].to_numpy(), full.loc[sampled, vocab].to_numpy(), rtol=1e-12)
    assert part.loc[~sampled, vocab].isna().all().all()
    others = [c for c in full.columns if c not in vocab]
    pd.testing.assert_frame_equal(part[others], full[others])
    assert weight_statistics(model, vocab_neurons=10 * ARCH["d_mlp"])[vocab].notna().all().all()  # more than d_mlp: all


def test_planted_duplicate_input_direction_has_max_cos_one():
    model = tiny_model()
    with torch.no_grad():  # a scaled copy, in another layer: same direction
        model.blocks[1].mlp.W_in[:, 7] = 2.5 * model.blocks[0].mlp.W_in[:, 3]
    got = weight_statistics(model, block_elems=100).set_index(["layer", "neuron"])
    assert got.loc[(0, 3), "max_cos_w_in"] == pytest.approx(1.0, abs=1e-6)
    assert got.loc[(1, 7), "max_cos_w_in"] == pytest.approx(1.0, abs=1e-6)
    others = got.drop([(0, 3), (1, 7)])
    assert others.max_cos_w_in.max() < 0.99
    assert got.max_cos_w_out.max() < 0.99  # only w_in was copied


def llama_model():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=20, n_ctx=8, d_vocab=30,
                                  act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
                                  rotary_dim=8, gated_mlp=True, final_rms=True,
                                  original_architecture="LlamaForCausalLM", seed=0, device="cpu")
    torch.manual_seed(0)
    return HookedTransformer(cfg).eval()


def test_gated_mlp_weight_statistics():
    model = llama_model()
    got = weight_statistics(model)
    assert len(got) == 2 * 20 and "w_lin_norm" in got
    w_gate = lambda l, i: model.blocks[l].mlp.W_gate[:, i].detach().double().numpy()
    w_out = lambda l, i: model.blocks[l].mlp.W_out[i].detach().double().numpy()
    compare_weights(got, direct_weight_stats(model, w_gate, w_out))
    w_lin = torch.cat([blk.mlp.W_in.detach().double().norm(dim=0) for blk in model.blocks]).numpy()
    np.testing.assert_allclose(got.w_lin_norm.to_numpy(), w_lin, rtol=1e-12)
    assert not np.allclose(got.w_lin_norm, got.w_in_norm)  # the gate, not the linear branch, is w_in


# ------------------------------------------------------------------------------------ activations


def token_rows(n_rows=21, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(NEWLINE + 1, ARCH["d_vocab"], (n_rows, ARCH["n_ctx"]), generator=g)
    rows[:, 0] = BOS
    rows[::3, 4] = NEWLINE
    return rows


def direct_activation_stats(model, rows, drop_ids):
    names = [f"blocks.{l}.mlp.hook_{h}" for h in ("pre", "post") for l in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(rows, names_filter=lambda n: n in names)
    mask = torch.ones_like(rows, dtype=torch.bool)
    for t in drop_ids:
        mask &= rows != t
    out = {}
    for h in ("pre", "post"):
        x = torch.cat([cache[f"blocks.{l}.mlp.hook_{h}"][mask] for l in range(model.cfg.n_layers)], 1).double().numpy()
        ref = reference_moments(x)
        out.update({f"{h}_mean": ref["mean"], f"{h}_var": ref["var"], f"{h}_skew": ref["skew"], f"{h}_kurt": ref["kurt"]})
        if h == "pre":
            out["act_freq"] = ref["pos"]
    return pd.DataFrame(out), int(mask.sum())


@pytest.mark.parametrize("make", [tiny_model, llama_model], ids=["gpt2-style", "gated"])
def test_activation_statistics_match_run_with_cache(make):
    model, rows, drop = make(), token_rows(), [BOS, NEWLINE]
    got = activation_statistics(model, rows, drop, batch_size=4)
    want, n_valid = direct_activation_stats(model, rows, drop)
    assert got.attrs["n_valid_tokens"] == n_valid == 21 * 8 - 21 - 7  # BOS of every row, newline of every 3rd
    assert list(got.columns) == ["layer", "neuron", *ns.ACTIVATION_COLUMNS]
    for col in want.columns:  # batched vs one-shot forward passes differ at fp32 rounding level
        tol = 1.0 / n_valid if col == "act_freq" else 1e-5
        np.testing.assert_allclose(got[col].to_numpy(), want[col].to_numpy(), rtol=1e-4, atol=tol, err_msg=col)
    # dropping the newline matters: with only BOS dropped the statistics differ
    other = activation_statistics(model, rows, [BOS], batch_size=4)
    assert not np.allclose(other.pre_mean, got.pre_mean)


def test_killed_run_resumes_to_the_same_table(tmp_path, monkeypatch, capsys):
    model, rows, drop = tiny_model(), token_rows(), [BOS, NEWLINE]
    fresh = activation_statistics(model, rows, drop, tmp_path / "fresh", batch_size=4, checkpoint_every=1)
    real, calls = ns._accumulate_batch, []

    def dying(*args):
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        calls.append(1)
        real(*args)

    monkeypatch.setattr(ns, "_accumulate_batch", dying)
    # batches of 4 rows hold 26, 27, 27, ... valid tokens: a checkpoint after the 2nd batch (53 >= 40
    # tokens since the start), none after the 3rd (27 < 40 since then), killed in the 4th
    with pytest.raises(KeyboardInterrupt):
        activation_statistics(model, rows, drop, tmp_path / "run", batch_size=4, checkpoint_every=40)
    st = torch.load(tmp_path / "run" / ns.STATE_FILE, weights_only=False)["state"]
    assert (st["rows_done"], st["n_tokens"]) == (8, 53)
    calls.clear()
    monkeypatch.setattr(ns, "_accumulate_batch", lambda *a: (calls.append(1), real(*a)))
    resumed = activation_statistics(model, rows, drop, tmp_path / "run", batch_size=4, checkpoint_every=40)
    assert len(calls) == 4  # rows 8..20 in batches of 4: the checkpointed batches were not redone
    pd.testing.assert_frame_equal(resumed, fresh, check_exact=True)
    assert resumed.attrs["n_valid_tokens"] == fresh.attrs["n_valid_tokens"]
    # a finished state is reused without a forward pass; other rows are refused
    calls.clear()
    pd.testing.assert_frame_equal(activation_statistics(model, rows, drop, tmp_path / "run"), fresh, check_exact=True)
    assert not calls
    # a state of other rows is not resumed: reported, and the other rows' statistics computed afresh
    other = activation_statistics(model, token_rows(seed=1), drop, tmp_path / "run")
    assert "checkpoint made with another rows_sha256" in capsys.readouterr().err
    pd.testing.assert_frame_equal(other, activation_statistics(model, token_rows(seed=1), drop), check_exact=True)


def test_neuron_stats_table_joins_saves_and_caches(tmp_path, monkeypatch):
    model, rows = tiny_model(), token_rows()
    table = neuron_stats_table(model, rows, [BOS, NEWLINE], tmp_path, batch_size=8, verbose=False)
    assert len(table) == 2 * 24 and table[["layer", "neuron"]].duplicated().sum() == 0
    for col in ("w_in_norm", "vocab_kurt", "max_cos_w_out", "act_freq", "post_kurt"):
        assert col in table and table[col].notna().all(), col
    assert (tmp_path / "neuron_stats.parquet").is_file() and (tmp_path / "neuron_stats.csv").is_file()
    monkeypatch.setattr(ns, "activation_statistics", lambda *a, **k: pytest.fail("recomputed a cached table"))
    pd.testing.assert_frame_equal(neuron_stats_table(model, rows, [BOS, NEWLINE], tmp_path), table)


def test_cli_on_a_tiny_family(tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    from conftest import write_preset_file

    models = {"x-a": tiny_model(0), "x-b": tiny_model(1)}
    rows = token_rows()
    fam = Family("tiny", list(models), models.__getitem__, lambda: SimpleNamespace(drop_ids=[BOS, NEWLINE]), "cpu",
                 {}, lambda n, split: rows)
    monkeypatch.setattr(ns, "load_family", lambda name, params, device="cpu": fam)
    path = write_preset_file(tmp_path, family="tiny", n_tokens=100, artifacts_dir=str(tmp_path), batch_size=8)
    ns.main(["--preset", str(path), "--member", "b"])
    out = ns.member_neuron_stats(fam, 100, tmp_path, "x-b").path
    assert f"{out}: 48 neurons of tiny/x-b" in capsys.readouterr().out
    table = pd.read_parquet(out / "neuron_stats.parquet")
    direct = weight_statistics(models["x-b"])
    np.testing.assert_array_equal(table.w_in_norm.to_numpy(), direct.w_in_norm.to_numpy())
    assert out.parent == tmp_path / "neuron_stats" and out.name.startswith("tiny-x-b-")
    monkeypatch.setattr(ns, "_compute_table", lambda *a, **k: {})  # the other folders, without computing them
    assert len({out, ns.member_neuron_stats(fam, 100, tmp_path, "x-a").path,
                ns.member_neuron_stats(fam, 200, tmp_path, "x-b").path}) == 3


def test_the_vocab_sample_is_part_of_the_cache_key(tmp_path):
    """A table whose W_U moments cover a sample of each layer is cached apart from the full one, and
    the signs of chapters 04-06 (`family_signs`) read the single model's table with chapter 02's
    sample: the same folder, no second pass."""
    from types import SimpleNamespace

    from conftest import write_preset_file
    from helpers.core.presets import load_preset
    from helpers.data.tokens import TokenRows

    model, rows = tiny_model(), token_rows(n_rows=8)
    fam = Family("tiny", ["a"], lambda m: model, lambda: SimpleNamespace(drop_ids=[BOS, NEWLINE]), "cpu", {},
                 lambda n, split: TokenRows(rows[: n // ARCH["n_ctx"]]), identity_factory=lambda m: "tiny-a")
    n = 8 * ARCH["n_ctx"]
    full = ns.member_neuron_stats(fam, n, tmp_path, verbose=False)
    part = ns.member_neuron_stats(fam, n, tmp_path, verbose=False, vocab_neurons=3)
    assert full.path != part.path and part.identity["vocab_neurons_per_layer"] == 3
    assert "vocab_neurons_per_layer" not in full.identity  # the full table keeps its key
    assert part.table("neuron_stats").vocab_kurt.notna().sum() == 3 * ARCH["n_layers"]
    params = load_preset(write_preset_file(tmp_path, single_model="tiny", properties_single_tokens=n,
                                           n_tokens_single=n, properties_single_vocab_neurons=3))
    assert ns.sign_source(fam, params) == (n, 3)
    before = sorted((tmp_path / "neuron_stats").iterdir())
    signs = ns.family_signs(fam, params, tmp_path)
    assert sorted((tmp_path / "neuron_stats").iterdir()) == before  # read, not recomputed
    np.testing.assert_array_equal(signs.act_sign.to_numpy(), part.table("neuron_stats").act_sign.to_numpy())


def test_prefix_statistics_come_from_the_same_pass(tmp_path, monkeypatch):
    """A convergence check's smaller token count is written during the larger run's pass: the same
    table as a separate run over the first rows, and no row goes through the model twice."""
    from types import SimpleNamespace

    from helpers.data.tokens import TokenRows

    model, all_rows = tiny_model(), token_rows(n_rows=21)
    n_ctx = ARCH["n_ctx"]
    fam = Family("tiny", ["a"], lambda m: model, lambda: SimpleNamespace(drop_ids=[BOS, NEWLINE]), "cpu", {},
                 lambda n, split: TokenRows(all_rows[: n // n_ctx]), identity_factory=lambda m: "tiny-a")
    seen = []
    import helpers.streaming.activations as acts

    orig = acts.hook_activations
    monkeypatch.setattr(acts, "hook_activations", lambda model, ids, *a, **k: (seen.append(len(ids)), orig(model, ids, *a, **k))[1])
    # 20 rows in batches of 8; the prefix of 9 rows is not a multiple of the batch size
    full = ns.member_neuron_stats(fam, 20 * n_ctx, tmp_path, batch_size=8, verbose=False,
                                  prefixes=[9 * n_ctx]).table("neuron_stats")
    assert seen == [8, 1, 8, 3]  # a batch is cut at the prefix's last row; each of the 20 rows seen once
    seen.clear()
    half = ns.member_neuron_stats(fam, 9 * n_ctx, tmp_path, batch_size=8, verbose=False).table("neuron_stats")
    assert seen == []  # read from the cache written during the pass
    separate = ns.neuron_stats_table(model, all_rows[:9], [BOS, NEWLINE], tmp_path / "separate", batch_size=3, verbose=False)
    cols = ["layer", "neuron", *ns.ACTIVATION_COLUMNS, "w_in_norm", "vocab_kurt"]
    pd.testing.assert_frame_equal(half[cols], separate[cols], check_exact=False, rtol=1e-5, atol=1e-6)  # other batch sizes: fp32 rounding
    assert not np.allclose(half.pre_mean, full.pre_mean)  # a table of fewer rows, not the full one
    # rows that are not a prefix (another source) are not snapshotted: computed on their own when asked
    other = Family("tiny", ["a"], lambda m: model, lambda: SimpleNamespace(drop_ids=[BOS, NEWLINE]), "cpu", {},
                   lambda n, split: TokenRows(token_rows(n_rows=n // n_ctx, seed=int(n < 20 * n_ctx))),
                   identity_factory=lambda m: "tiny-a")
    seen.clear()
    ns.member_neuron_stats(other, 20 * n_ctx, tmp_path / "o", batch_size=8, verbose=False, prefixes=[9 * n_ctx])
    assert seen == [8, 8, 4]


def test_signed_log_histogram_top_fraction_sign_and_quantiles():
    """The sign of the mean over the top 1% of |x| (`SIGN_RULE`) against a sort, on columns where
    the mean and the large values disagree in sign; merge and state round trips are exact."""
    from helpers.streaming.accumulators import TOP_FRACTION, SignedLogHistogram

    rng = np.random.default_rng(0)
    n = 20_000
    x = np.stack([
        rng.exponential(1.0, n),                                             # positive
        -rng.exponential(0.03, n),                                           # negative (a gated neuron's small range)
        np.where(rng.random(n) < 0.95, 0.2, -4.0 * rng.random(n) - 1),       # mostly +0.2, the large ones negative
        np.where(rng.random(n) < 0.8, -0.05, 1.0 + rng.random(n)),           # mostly negative, large ones positive
        np.zeros(n),                                                         # silent: +1
        np.where(rng.random(n) < 0.97, -0.17, 0.2 + 0.1 * rng.random(n)),  # a sparse GELU neuron: floor on 97%, fires on 3%
    ], axis=1)
    k = int(n * TOP_FRACTION)
    exact = np.array([x[np.argsort(-np.abs(x[:, i]), kind="stable")[:k], i].mean() for i in range(x.shape[1])])
    h = SignedLogHistogram(x.shape[1], bins_per_octave=8)
    for part in np.array_split(x, 7):
        h.update(torch.from_numpy(part))
    assert h.count == n
    np.testing.assert_allclose(h.top_mean().numpy(), exact, rtol=0.05, atol=1e-9)
    assert h.large_sign().tolist() == [1, -1, -1, 1, 1, 1]
    # the top decile would mix the sparse neuron's firing with its floor and call it negative
    assert (h.top_mean(0.1)[-1] < 0) and exact[-1] > 0
    for q in (0.01, 0.5, 0.99):
        est, ref = h.quantile(q).numpy(), np.quantile(x, q, axis=0)
        assert (np.abs(est - ref) <= 0.1 * np.abs(ref) + 1e-6).all(), (q, est, ref)
    coarse = SignedLogHistogram(x.shape[1], split_sign=False)  # the cheap form chapter 02 streams
    coarse.update(torch.from_numpy(x))
    assert coarse.large_sign().tolist() == [1, -1, -1, 1, 1, 1]
    a, b = SignedLogHistogram(x.shape[1], bins_per_octave=8), SignedLogHistogram(x.shape[1], bins_per_octave=8)
    a.update(torch.from_numpy(x[:5000]))
    b.update(torch.from_numpy(x[5000:]))
    a.merge(b)
    assert torch.equal(a.counts, h.counts) and torch.allclose(a.sums, h.sums, rtol=1e-9, atol=1e-9)
    c = SignedLogHistogram(x.shape[1], bins_per_octave=8).load_state_dict(a.state_dict())
    assert torch.equal(c.counts, a.counts) and torch.equal(c.sums, a.sums)
    with pytest.raises(ValueError):
        coarse.quantile(0.5)
