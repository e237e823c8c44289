"""Attention (de)activation neurons (helpers.attention.heads) on tiny hand-built models with known answers."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from helpers.attention import heads as attention
from helpers.data.tokens import TokenRows
from helpers.models.loading import init_model, processed_model

ARCH = {"n_layers": 2, "d_model": 16, "n_heads": 2, "d_mlp": 32, "n_ctx": 16, "d_vocab": 30}
BOS = 0


def tiny(seed=3):
    """A GPT-2-style 2-layer model with the book's weight processing (LayerNorm folded: LNPre)."""
    raw = init_model(ARCH, seed)
    return processed_model(ARCH, raw.state_dict())


def rows(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, ARCH["d_vocab"], (n, ARCH["n_ctx"]), generator=g)
    ids[:, 0] = BOS
    return TokenRows(ids)


def linear_model(rotary: bool, gqa: bool, seed=1):
    """No normalisation, so the attention logit is linear in the query input: the score is exact."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=16, n_ctx=16, d_vocab=20,
                                  act_fn="silu", gated_mlp=True, normalization_type=None,
                                  n_key_value_heads=2 if gqa else None,
                                  positional_embedding_type="rotary" if rotary else "standard", rotary_dim=8 if rotary else None,
                                  init_weights=True, seed=seed)
    m = HookedTransformer(cfg)
    with torch.no_grad():  # untrained biases are zero; give the key a bias so the BOS key is not trivial
        for b in m.blocks:
            for p in b.attn.parameters():
                p.add_(0.3 * torch.randn_like(p))
    return m.eval()


def hand_head(model, layer, head, resid, delta):
    """Attention of `head` on the LNPre'd residual, the query from resid - delta, by hand."""
    eps = model.cfg.eps

    def ln(x):
        x = x - x.mean(-1, keepdim=True)
        return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()

    a = model.blocks[layer].attn
    q = ln(resid - delta) @ a.W_Q[head] + a.b_Q[head]
    k = ln(resid) @ a.W_K[head] + a.b_K[head]
    v = ln(resid) @ a.W_V[head] + a.b_V[head]
    s = q @ k.transpose(-1, -2) / math.sqrt(model.cfg.d_head)
    n = s.shape[-1]
    s = s.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), float("-inf"))
    p = s.softmax(-1)
    out = (p @ v) @ a.W_O[head]
    return p[..., 0], out.norm(dim=-1)


@torch.no_grad()
def test_path_ablated_attention_equals_hand_computation():
    model, r = tiny(), rows()
    pairs = pd.DataFrame({"neuron_layer": [0, 0], "neuron": [5, 11], "head_layer": [1, 1], "head": [1, 0]})
    rec = attention.path_ablation(model, r, pairs, drop_ids=[BOS], batch_size=4)
    _, cache = model.run_with_cache(r.ids, names_filter=lambda n: n in ("blocks.0.mlp.hook_post", "blocks.1.hook_resid_pre"))
    resid, post = cache["blocks.1.hook_resid_pre"], cache["blocks.0.mlp.hook_post"]
    first = ARCH["n_ctx"] // 2
    assert set(rec.pos) == set(range(first, ARCH["n_ctx"])) and len(rec) == 2 * len(r) * first
    for pid, pr in pairs.iterrows():
        a = post[..., pr.neuron]
        w = model.blocks[0].mlp.W_out[pr.neuron]
        p_abl, n_abl = hand_head(model, 1, pr["head"], resid, a[..., None] * w)
        p_cln, n_cln = hand_head(model, 1, pr["head"], resid, torch.zeros_like(resid))
        g = rec[rec.pair == pid]
        ri, pi = torch.tensor(g.row.values), torch.tensor(g.pos.values)
        assert np.allclose(g.p_bos_ablated, p_abl[ri, pi].numpy(), atol=1e-5)
        assert np.allclose(g.norm_ablated, n_abl[ri, pi].numpy(), rtol=1e-4, atol=1e-5)
        assert np.allclose(g.p_bos, p_cln[ri, pi].numpy(), atol=1e-5)
        assert np.allclose(g.act, a[ri, pi].numpy(), atol=1e-6)
        assert np.allclose(g.d_bos, g.p_bos_ablated - g.p_bos, atol=1e-7)
        # the clean values are the model's own forward pass
        _, c2 = model.run_with_cache(r.ids, names_filter=lambda n: n == "blocks.1.attn.hook_pattern")
        assert np.allclose(g.p_bos, c2["blocks.1.attn.hook_pattern"][ri, pr["head"], pi, 0].numpy(), atol=1e-6)
        assert g.d_bos.abs().max() > 1e-4  # the ablation did something


@torch.no_grad()
def test_keys_and_values_untouched_and_other_heads_unchanged():
    model, r = tiny(), rows(3)
    _, cache = model.run_with_cache(r.ids, names_filter=lambda n: n in ("blocks.1.hook_resid_pre", "blocks.1.attn.hook_k",
                                                                        "blocks.1.attn.hook_v"))
    resid = cache["blocks.1.hook_resid_pre"]
    delta = 3 * torch.randn_like(resid)
    cap = ("q", "k", "v", "pattern")
    clean = attention.head_run(model, 1, resid, 1, None, cap)
    abl = attention.head_run(model, 1, resid, 1, delta, cap)
    assert torch.equal(clean["k"], abl["k"]) and torch.equal(clean["v"], abl["v"])
    assert torch.allclose(clean["k"], cache["blocks.1.attn.hook_k"], atol=1e-6)
    assert torch.allclose(clean["v"], cache["blocks.1.attn.hook_v"], atol=1e-6)
    assert torch.equal(clean["q"][:, :, 0], abl["q"][:, :, 0]) and not torch.allclose(clean["q"][:, :, 1], abl["q"][:, :, 1])
    assert torch.equal(clean["pattern"][:, 0], abl["pattern"][:, 0])
    assert not model.cfg.use_split_qkv_input  # switched back off


def test_zero_activation_changes_nothing():
    model, r = tiny(), rows()
    mlp = model.blocks[0].mlp
    with torch.no_grad():  # (the ablation itself runs with gradients enabled around it)
        mlp.W_in[:, 7] = 0.0
        mlp.b_in[7] = -30.0  # gelu_new(-30) is exactly 0 in fp32
    pairs = pd.DataFrame({"neuron_layer": [0, 0], "neuron": [7, 7], "head_layer": [1, 1], "head": [0, 1]})
    rec = attention.path_ablation(model, r, pairs, drop_ids=[BOS], batch_size=3)
    assert (rec.act == 0).all()
    assert (rec.d_bos == 0).all() and (rec.norm_ablated == rec.norm).all() and (rec.d_norm_pct == 0).all()


@pytest.mark.parametrize("sign", [1.0, -1.0])
@torch.no_grad()
def test_planted_neuron_score_sign_predicts_the_measured_change(sign):
    """A layer-0 neuron that always fires (act = gelu_new(3)) and writes ±the direction that raises
    head 1.0's logit on BOS: positive score -> its ablation lowers BOS attention (deactivation
    neuron), negative -> raises it; the other head's records are the control."""
    model, r = tiny(), rows(8)
    h, n = 0, 4
    kb = attention.bos_keys(model, BOS)
    d = attention.query_directions(model, 1, kb[1])[h]
    mlp = model.blocks[0].mlp
    mlp.W_in[:, n] = 0.0
    mlp.b_in[n] = 3.0
    mlp.W_out[n] = sign * 4.0 * d / d.norm()
    sc = attention.heuristic_scores(model, BOS)
    score = float(sc["score"][0, n, 1, h])
    assert np.sign(score) == sign  # (not exactly |d|: the neuron also writes at BOS, which moves k_BOS)
    assert torch.isnan(sc["score"][1]).all() and torch.isnan(sc["score"][:, :, 0]).all()  # only later heads
    pairs = pd.DataFrame({"neuron_layer": [0], "neuron": [n], "head_layer": [1], "head": [h], "score": [score]})
    rec = attention.path_ablation(model, r, pairs, drop_ids=[BOS], batch_size=4)
    assert (rec.act > 2.9).all()
    summ = attention.pair_summary(pairs, rec)
    # sign convention: effect_bos = clean - ablated has the sign of h_n for a positive activation
    assert np.sign(summ.effect_bos.iloc[0]) == sign
    assert (np.sign(-rec.d_bos) == sign).mean() > 0.9
    if sign > 0:  # deactivation: removing the neuron's write lowers BOS attention
        assert rec.d_bos.mean() < 0
    else:
        assert rec.d_bos.mean() > 0


@pytest.mark.parametrize("rotary", [False, True])
@pytest.mark.parametrize("gqa", [False, True])
@torch.no_grad()
def test_score_is_the_exact_change_of_the_bos_logit(rotary, gqa):
    """Without normalisation the BOS logit of head h at query position p moves by exactly
    h_n(p)·|w| when w is added to h's query input. A rotary model's score at one position is that
    position's change, and over several positions their mean; GQA heads read their own kv head."""
    model = linear_model(rotary, gqa)
    cfg = model.cfg
    toks = torch.randint(1, cfg.d_vocab, (1, cfg.n_ctx), generator=torch.Generator().manual_seed(0))
    toks[0, 0] = BOS
    _, cache = model.run_with_cache(toks, names_filter=lambda n: n == "blocks.1.hook_resid_pre")
    resid = cache["blocks.1.hook_resid_pre"]
    n = 3
    w = model.blocks[0].mlp.W_out[n]
    exact = {}
    for h in range(cfg.n_heads):
        clean = attention.head_run(model, 1, resid, h, None, ("attn_scores",))["attn_scores"]
        # path_ablation subtracts delta; adding w means delta = -w
        plus = attention.head_run(model, 1, resid, h, -w.expand_as(resid), ("attn_scores",))["attn_scores"]
        exact[h] = ((plus - clean)[0, h, :, 0] / w.norm()).numpy()  # [q positions]
    positions = [5, 9, 12]
    for p in positions:
        s = attention.heuristic_scores(model, BOS, positions=[p], neuron_layers=[0], head_layers=[1])["score"]
        got = s[0, n, 1].numpy()
        want = np.array([exact[h][p] for h in range(cfg.n_heads)])
        assert np.allclose(got, want, atol=1e-4), (p, got, want)
    s = attention.heuristic_scores(model, BOS, positions=positions, neuron_layers=[0], head_layers=[1])["score"][0, n, 1].numpy()
    assert np.allclose(s, [np.mean([exact[h][p] for p in positions]) for h in range(cfg.n_heads)], atol=1e-4)
    if rotary:  # the rotation matters: positions give different scores
        assert not np.allclose(exact[0][5], exact[0][12], atol=1e-3)
        with pytest.raises(ValueError, match="positions"):
            attention.heuristic_scores(model, BOS)
    if gqa:
        assert [attention.kv_head_of(cfg, h) for h in range(4)] == [0, 0, 1, 1]
        attn = model.blocks[1].attn
        for h in range(4):
            assert torch.equal(attn.W_K[h], attn._W_K[attention.kv_head_of(cfg, h)])
        # a wrong mapping (h mod n_kv) gives other scores for heads 1 and 2
        kb = attention.bos_keys(model, BOS)
        _, c = model.run_with_cache(torch.tensor([[BOS]]), names_filter=lambda nm: nm == "blocks.1.attn.hook_k")
        assert torch.allclose(kb[1, 1], c["blocks.1.attn.hook_k"][0, 0, 0]) and torch.allclose(kb[1, 2], c["blocks.1.attn.hook_k"][0, 0, 1])
    else:
        assert [attention.kv_head_of(cfg, h) for h in range(4)] == [0, 1, 2, 3]


@torch.no_grad()
def test_bos_value_norms_match_a_direct_computation():
    model, r = tiny(), rows(4)
    bos = attention.bos_value_norms(model, r, BOS, drop_ids=[BOS], batch_size=3)
    _, cache = model.run_with_cache(r.ids, names_filter=lambda n: n.endswith("hook_v"))
    for l in range(ARCH["n_layers"]):
        v = cache[f"blocks.{l}.attn.hook_v"]  # [b, pos, heads, d_head]
        norms = torch.einsum("bphd,hdm->bphm", v, model.blocks[l].attn.W_O).norm(dim=-1)
        for h in range(ARCH["n_heads"]):
            row = bos.query("layer == @l and head == @h").iloc[0]
            assert row.bos_norm == pytest.approx(float(norms[0, 0, h]), rel=1e-5)
            assert row.mean_norm == pytest.approx(float(norms[:, 1:, h].mean()), rel=1e-5)
            assert row.ratio == pytest.approx(row.mean_norm / row.bos_norm, rel=1e-6)
    assert (bos.n_tokens == 4 * (ARCH["n_ctx"] - 1)).all()


def test_bos_value_norms_read_their_own_rows_and_say_how_many(tmp_path):
    from types import SimpleNamespace

    model = tiny()
    codec = SimpleNamespace(drop_ids=[BOS], bos_id=BOS)
    fam = SimpleNamespace(name="tiny", identity={"a": "tiny-a"}, codec=codec, load=lambda member: model)
    ablated, more = rows(4), rows(9, seed=5)
    run = attention.attention_deactivation(fam, "a", ablated, tmp_path, n_top=1, n_random=1, bos_rows=7,
                                           bos_source=more, model=model)
    bos = run.table("bos")
    direct = attention.bos_value_norms(model, TokenRows(more.ids[:7]), BOS, [BOS])
    assert (bos.n_rows == 7).all() and np.allclose(bos.mean_norm, direct.mean_norm)
    assert run.meta["n_rows"] == 4  # the ablation keeps its own rows
    default = attention.attention_deactivation(fam, "a", ablated, tmp_path, n_top=1, n_random=1, model=model)
    own = default.table("bos")
    assert (own.n_rows == 4).all() and not np.allclose(own.mean_norm, bos.mean_norm)
    with pytest.raises(ValueError, match="hold 9"):
        attention.attention_deactivation(fam, "a", ablated, tmp_path, bos_rows=10, bos_source=more, model=model)
    short = attention.attention_deactivation(fam, "a", ablated, tmp_path, n_top=1, n_random=1, bos_rows=7, bos_ctx=5,
                                             bos_source=more, model=model).table("bos")
    direct_short = attention.bos_value_norms(model, TokenRows(more.ids[:7, :5]), BOS, [BOS])
    assert np.allclose(short.mean_norm, direct_short.mean_norm) and not np.allclose(short.mean_norm, bos.mean_norm)


def test_bad_input_is_refused():
    model = tiny()
    with pytest.raises(ValueError, match="earlier layer"):
        attention.path_ablation(model, rows(2), pd.DataFrame({"neuron_layer": [1], "neuron": [0], "head_layer": [1], "head": [0]}), [BOS])
    with pytest.raises(ValueError, match="columns"):
        attention.path_ablation(model, rows(2), pd.DataFrame({"neuron": [0]}), [BOS])
    with pytest.raises(ValueError, match="head"):
        attention.kv_head_of(model.cfg, 5)


def test_rank_correlation_and_selection():
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    rc = attention.rank_correlation(x, x + 0.1 * rng.normal(size=200), n_boot=300)
    assert rc["rho"] > 0.95 and rc["lo"] <= rc["rho"] <= rc["hi"] and rc["lo"] > 0.9
    rc0 = attention.rank_correlation(x, rng.normal(size=200), n_boot=300)
    assert rc0["lo"] < 0 < rc0["hi"]
    t = pd.DataFrame({"neuron_layer": 0, "neuron": range(50), "head_layer": 1, "head": 0, "score": np.arange(50.0) - 20})
    sel = attention.select_pairs(t, 3, 5, seed=1)
    assert list(sel[sel.why == "most positive h_n"].score) == [29, 28, 27]
    assert list(sel[sel.why == "most negative h_n"].score) == [-20, -19, -18]
    assert len(sel) == 11 and sel.neuron.is_unique


@torch.no_grad()
def test_head_patterns_window_is_a_block_of_the_full_pattern():
    model, r = tiny(), rows(1)
    full = attention.head_patterns(model, r.ids[0], 0, 5, 1, 1)
    win = attention.head_patterns(model, r.ids[0], 0, 5, 1, 1, end=12, window=4)
    assert list(win["positions"]) == [0, 9, 10, 11, 12]
    keep = win["positions"]
    assert torch.allclose(win["clean"], full["clean"][:13, :13][keep][:, keep], atol=1e-6)
    assert torch.allclose(win["ablated"], full["ablated"][:13, :13][keep][:, keep], atol=1e-6)
    assert torch.allclose(full["clean"].sum(-1), torch.ones(ARCH["n_ctx"]), atol=1e-5)


def test_matched_recurrence_reads_the_match_and_its_rank():
    ref = pd.DataFrame({"neuron_layer": 0, "neuron": [0, 1, 2], "head_layer": 1, "head": 0, "best": [5.0, -0.1, 0.2],
                        "abs_best": [5.0, 0.1, 0.2]})
    other = pd.DataFrame({"neuron_layer": 0, "neuron": [0, 1, 2, 3], "head_layer": 1, "head": 0, "best": [0.1, 0.2, -0.3, 4.0],
                          "abs_best": [0.1, 0.2, 0.3, 4.0]})
    corr = pd.DataFrame({"layer": 0, "neuron": [0, 1, 2], "max_corr_b": [0.9, 0.5, 0.4], "match_layer_b": 0,
                         "match_neuron_b": [3, 0, 1]})
    rec = attention.matched_recurrence(ref, {"b": other}, corr, k=1)
    assert len(rec) == 1 and rec.match.iloc[0] == "L0.3" and rec.percentile.iloc[0] == 100 and rec.same_sign.iloc[0]
    assert attention.neuron_best(pd.DataFrame({"neuron_layer": 0, "neuron": [0, 0], "head_layer": 1, "head": [0, 1],
                                               "score": [0.5, -2.0]})).best.iloc[0] == -2.0


def test_convergence_uses_the_first_rows():
    pairs = pd.DataFrame({"neuron_layer": 0, "neuron": range(6), "head_layer": 1, "head": 0, "score": np.arange(6.0), "why": "random"})
    rng = np.random.default_rng(0)
    rec = pd.DataFrame([{"pair": p, "row": r, "pos": 5, "act": 1.0 + rng.random(), "d_bos": -p * 0.01 * (1 + r) + 1e-4 * rng.random(),
                         "d_norm_pct": 0.0, "p_bos": 0.5} for p in range(6) for r in range(4)])
    c = attention.convergence(pairs, rec, fractions=(0.5, 1.0))
    assert list(c.rows) == [2, 4] and list(c.tokens_per_pair) == [2, 4]
    assert (c.rho > 0.9).all()


@torch.no_grad()
def test_gated_neuron_firing_negatively_takes_the_sign_of_its_activation():
    """A gated layer-0 neuron whose activation is always negative (every embedding carries 10 e, the
    gate reads 0.5 e, no key reads e, the linear branch is the constant -1) and whose w_out raises head 1.0's BOS
    logit: w_out alone says "deactivation" (raw score > 0), but the neuron writes -|a| w_out and
    its write LOWERS the head's BOS logit (an activation neuron); the score of s * w_out has the
    measured sign."""
    from helpers.properties.neuron_stats import activation_statistics, sign_tensor

    model = linear_model(rotary=False, gqa=False)
    h, n = 0, 3
    g = torch.Generator().manual_seed(2)
    e = torch.randn(model.cfg.d_model, generator=g)
    e /= e.norm()
    model.W_E.add_(10.0 * e)
    for blk in model.blocks:  # the keys do not read e: otherwise every key would look like k_BOS
        blk.attn.W_K.sub_(e[None, :, None] * torch.einsum("m,hmd->hd", e, blk.attn.W_K)[:, None, :])
    mlp = model.blocks[0].mlp
    mlp.W_gate[:, n] = 0.5 * e
    mlp.W_in[:, n] = 0.0
    mlp.b_in[n] = -1.0
    d = attention.query_directions(model, 1, attention.bos_keys(model, BOS)[1])[h]
    mlp.W_out[n] = 4.0 * d / d.norm()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 20, (8, 16), generator=g)
    ids[:, 0] = BOS
    r = TokenRows(ids)
    stats = activation_statistics(model, r, drop_ids=[BOS], batch_size=4)
    signs = sign_tensor(stats, model.cfg.n_layers, model.cfg.d_mlp)
    assert signs[0, n] == -1
    sc = attention.heuristic_scores(model, BOS, signs=signs)
    raw, eff = float(sc["raw"][0, n, 1, h]), float(sc["score"][0, n, 1, h])
    assert raw > 0 and eff == pytest.approx(-raw)
    plus = signs > 0
    assert torch.equal(sc["score"][plus].nan_to_num(), sc["raw"][plus].nan_to_num())  # s = +1: unchanged
    table = attention.score_table(sc["score"], sc["raw"])
    pairs = table[(table.neuron_layer == 0) & (table.neuron == n) & (table["head"] == h)].reset_index(drop=True)
    rec = attention.path_ablation(model, r, pairs, drop_ids=[BOS], batch_size=4)
    assert (rec.act < 0).all()
    summ = attention.pair_summary(pairs, rec)
    assert np.sign(summ.predicted.iloc[0]) == -1
    # measured: the neuron's write moves the head's BOS logit (clean minus ablated) with the sign of s * raw
    _, cache = model.run_with_cache(ids, names_filter=lambda k: k in ("blocks.1.hook_resid_pre", "blocks.0.mlp.hook_post"))
    delta = cache["blocks.0.mlp.hook_post"][..., n, None] * model.blocks[0].mlp.W_out[n]
    resid = cache["blocks.1.hook_resid_pre"]
    clean = attention.head_run(model, 1, resid, h, None, ("attn_scores",))["attn_scores"][:, h, 8:, 0]
    ablated = attention.head_run(model, 1, resid, h, delta, ("attn_scores",))["attn_scores"][:, h, 8:, 0]
    assert ((clean - ablated) < 0).all() and np.sign(eff) == -1
