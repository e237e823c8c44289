"""The weight-based analyses of chapters 02, 04 and 05 read what a neuron does to the logits: its
effective direction (w_out times the weight of the norm after the MLP) through the effective
unembedding (diag(g_f) W_U while the final norm keeps its weight g_f).

Known answers on the tiny Gemma 3 of test_gemma.py, unprocessed (its post-MLP norms and its final
norm keep their weights, far from 1), and exact agreement with the plain weights on a folded
LayerNorm model without post-MLP norms, where nothing may move."""
import numpy as np
import pandas as pd
import pytest
import torch

from helpers.entropy import candidates, frequency
from helpers.models import gemma
from helpers.models.loading import init_model, processed_model
from helpers.prediction import vocab
from helpers.properties.neuron_stats import weight_statistics
from test_gemma import NO_PROCESSING, tiny_hf, token_rows

LAST = 2  # the tiny Gemma's last layer


@pytest.fixture(scope="module")
def hf():
    return tiny_hf()


def unfolded(hf):
    """A fresh copy (the tests plant weights) with every norm keeping its weight."""
    return gemma.convert_gemma(hf, processing=NO_PROCESSING)


def g_post(model, layer):
    return model.blocks[layer].ln2_post.w.detach()


def unembed_of(model):
    """diag(g_f) W_U [d_model, d_vocab] float64, from the parameters."""
    return (model.ln_final.w.detach()[:, None] * model.W_U.detach()).double()


def cosine(a, b):
    return float(a @ b / (a.norm() * b.norm()))


@torch.no_grad()
def test_vocab_effect_is_the_measured_direct_change_of_the_logits(hf):
    """A bump of eps in a last-layer neuron's activation, with the post-MLP norm's scale s and the
    final norm's scale s_f held, changes the logits by eps * vocab_effect / (s * s_f) at every
    position: exact, since both scales are held; the raw W_U w_out is not that change."""
    model = unfolded(hf)
    toks = token_rows(2).ids
    s_mlp, s_f = f"blocks.{LAST}.ln2_post.hook_scale", "ln_final.hook_scale"
    logits, c = model.run_with_cache(toks, names_filter=lambda n: n in (s_mlp, s_f))
    scale = c[s_mlp] * c[s_f]  # [batch, pos, 1]
    eps = 0.25
    moments = vocab.vocab_moments(model).set_index(["layer", "neuron"])
    stats = weight_statistics(model).set_index(["layer", "neuron"])
    for n in (0, 11, 40):
        def bump(post, hook):
            post = post.clone()
            post[..., n] += eps
            return post

        hooks = [(f"blocks.{LAST}.mlp.hook_post", bump), (s_mlp, lambda t, hook: c[s_mlp]),
                 (s_f, lambda t, hook: c[s_f])]
        with model.hooks(fwd_hooks=hooks):
            moved = model(toks)
        measured = (moved - logits) * scale / eps
        effect = vocab.vocab_effect(model, LAST, neurons=[n])[0]
        assert torch.allclose(measured, effect.expand_as(measured), atol=1e-3 * effect.abs().max()), n
        raw = model.blocks[LAST].mlp.W_out[n] @ model.W_U
        assert not torch.allclose(measured, raw.expand_as(measured), atol=0.1 * raw.abs().max())
        # the same rows through the table path (Figs 5, 23) and the cosines and moments (Fig 6)
        row = vocab.vocab_effect_rows(model, pd.DataFrame({"layer": [LAST], "neuron": [n]}))[0]
        assert torch.allclose(row, effect)
        d = model.blocks[LAST].mlp.W_out[n] * g_post(model, LAST)
        U = unembed_of(model).float()
        want = (d / d.norm()) @ (U / U.norm(dim=0).clamp_min(1e-30))  # column 0 (padding) is zero
        assert torch.allclose(vocab.vocab_cosines(model, LAST, neurons=[n])[0], want, atol=1e-5)
        m, st = moments.loc[(LAST, n)], stats.loc[(LAST, n)]
        for k, v in vocab.row_moments(want[None]).items():
            assert m[k] == pytest.approx(float(v[0]), rel=1e-4, abs=1e-7), k
            assert st[k] == pytest.approx(float(v[0]), rel=1e-4, abs=1e-7), k
        assert m.w_out_norm == pytest.approx(float(d.norm()), rel=1e-6)
        assert st.w_out_norm == pytest.approx(float(model.blocks[LAST].mlp.W_out[n].norm()), rel=1e-6)


@torch.no_grad()
def test_unembed_spectrum_is_that_of_the_effective_unembedding(hf):
    model = unfolded(hf)
    sp = candidates.unembed_spectrum(model)
    U = unembed_of(model)
    np.testing.assert_allclose(sp.values, torch.linalg.svdvals(U).numpy(), rtol=1e-9, atol=1e-12)
    assert not np.allclose(sp.values, torch.linalg.svdvals(model.W_U.double()).numpy(), rtol=0.1)
    # its null-space directions are read at their singular values
    d, z = sp.d, sp.n_zero
    np.testing.assert_allclose((U.T @ sp.null).norm(dim=0).numpy(), sp.values[d - z - sp.k: d - z], rtol=1e-8)
    assert sp.has_null_space


def axes_by_null_share(sp):
    """The share of each residual coordinate's unit vector in the null space (its part in the zero
    directions left out, as `null_space_fraction` does; NaN for a coordinate that is mostly a zero
    direction), and the coordinates of the largest and the smallest share."""
    eye = torch.eye(sp.d, dtype=torch.float64)
    zero = (eye @ sp.zero).square().sum(1)
    share = (eye @ sp.null).square().sum(1) / (1 - zero).clamp_min(1e-12)
    share[zero > 0.5] = float("nan")
    valid = ~share.isnan()
    return share, int(torch.where(valid, share, -1.0).argmax()), int(torch.where(valid, share, 2.0).argmin())


@torch.no_grad()
def test_a_neuron_writing_into_the_null_space_through_its_norm_weight(hf):
    """Neuron a writes w_out = e_j + e_i / 30, mostly along a coordinate j that the unembedding reads
    strongly; its post-MLP norm weight is 3 on coordinate i (in the null space: the final norm's
    weight is small there) and 1/100 on j, so what it writes is 0.1 e_i + 0.01 e_j: nearly all in
    the null space. Neuron b of the layer before writes exactly the opposite through its own norm."""
    model = unfolded(hf)
    sp = candidates.unembed_spectrum(model)
    share, i, j = axes_by_null_share(sp)
    assert share[i] > 0.95 and share[j] < 0.01
    a, b, d_mlp = 5, 9, model.cfg.d_mlp
    blk = model.blocks[LAST]
    blk.ln2_post.w[i], blk.ln2_post.w[j] = 3.0, 0.01
    blk.mlp.W_out[a] = 0
    blk.mlp.W_out[a, j], blk.mlp.W_out[a, i] = 1.0, 1 / 30
    eff = blk.mlp.W_out[a] * blk.ln2_post.w
    model.blocks[LAST - 1].mlp.W_out[b] = -2 * eff / g_post(model, LAST - 1)

    frac = candidates.null_space_fraction(model, sp)
    raw = blk.mlp.W_out[a].double()
    raw_frac = float((raw @ sp.null).square().sum() / (raw.square().sum() - (raw @ sp.zero).square().sum()))
    assert frac[LAST * d_mlp + a] > 0.95 and raw_frac < 0.01
    table = candidates.entropy_table(model, sp).set_index(["layer", "neuron"])
    assert table.loc[(LAST, a), "null_frac"] == pytest.approx(frac[LAST * d_mlp + a])
    # the unembedding barely reads what it writes; its raw w_out it reads strongly
    U = unembed_of(model)
    Un = U / U.norm(dim=0).clamp_min(1e-30)
    raw_var = float(((raw / raw.norm()) @ Un).var(unbiased=False))
    assert table.loc[(LAST, a), "vocab_var"] < 0.05 * raw_var
    assert table.loc[(LAST, a), "w_out_norm"] == pytest.approx(float(eff.norm()), rel=1e-6)
    w_in = blk.mlp.W_gate[:, a]  # the L2 penalty stays on the weights themselves
    assert table.loc[(LAST, a), "l2_penalty"] == pytest.approx(float(w_in @ w_in + 1 + 1 / 900), rel=1e-5)
    # the partner: effective directions exactly opposite, raw ones far from it
    partner = candidates.anti_partner(model, LAST, a)
    assert (partner["layer"], partner["neuron"]) == (LAST - 1, b) and partner["cos"] == pytest.approx(-1, abs=1e-6)
    assert cosine(model.blocks[LAST - 1].mlp.W_out[b], blk.mlp.W_out[a]) > -0.5
    # Fig 7b: the cosines of its effective direction with the effective unembedding's columns
    got = torch.tensor(candidates.unembed_cosines(model, [(LAST, a)]).cos.to_numpy())
    assert torch.allclose(got, (eff.double() / eff.norm()) @ Un, atol=1e-6)
    assert got.abs().max() < 0.5 * ((raw / raw.norm()) @ Un).abs().max()


@torch.no_grad()
def test_frequency_direction_and_alignment_through_the_effective_unembedding(hf):
    model = unfolded(hf)
    rng = np.random.default_rng(0)
    c = 1.0 / np.arange(1, model.cfg.d_vocab + 1)
    log_q = np.log(rng.permutation(c) / c.sum())
    fd = frequency.frequency_direction(model, log_q)
    # the least-squares solution through diag(g_f) W_U, centred over the vocabulary
    U = unembed_of(model)
    Uc = (U - U.mean(1, keepdim=True)).numpy()
    f = log_q - log_q.mean()
    coef = np.linalg.lstsq(Uc.T, f, rcond=1e-3)[0]
    np.testing.assert_allclose(fd.coef.numpy(), coef, rtol=1e-6, atol=1e-9 * np.abs(coef).max())
    W = model.W_U.detach().double()
    plain = np.linalg.lstsq((W - W.mean(1, keepdim=True)).numpy().T, f, rcond=1e-3)[0]
    assert abs(cosine(torch.as_tensor(plain), fd.coef)) < 0.9
    # a neuron whose effective write is the direction: |cos| 1 and the top rank; its raw w_out is not
    n = 17
    model.blocks[LAST].mlp.W_out[n] = fd.direction.float() / g_post(model, LAST)
    t = frequency.frequency_table(model, fd).set_index(["layer", "neuron"])
    assert t.loc[(LAST, n), "freq_cos"] == pytest.approx(1.0, abs=1e-6) and t.loc[(LAST, n), "freq_rank"] == 1
    raw = model.blocks[LAST].mlp.W_out[n].double() @ fd.live
    assert abs(cosine(raw, fd.live.T @ fd.direction)) < 0.99


# --------------------------------------------------------------------------------------------
# Without post-MLP norms and with the final norm folded, the numbers are those of the weights
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def test_folded_layernorm_model_keeps_the_plain_numbers(tiny_arch):
    model = processed_model(tiny_arch, init_model(tiny_arch, 2).state_dict())
    assert model.cfg.normalization_type == "LNPre" and not model.cfg.use_normalization_before_and_after
    L, D = model.cfg.n_layers, model.cfg.d_mlp
    W_U = model.W_U.detach()
    w_out = torch.cat([b.mlp.W_out.detach() for b in model.blocks])  # [L * D, d_model]
    # prediction: effect, cosines, moments, random-direction variance
    assert torch.equal(vocab.vocab_effect(model), w_out.float() @ W_U.float())
    unit = W_U / W_U.norm(dim=0, keepdim=True).clamp_min(1e-30)
    cos = (w_out / w_out.norm(dim=1, keepdim=True).clamp_min(1e-30)) @ unit
    assert torch.equal(vocab.vocab_cosines(model), cos)
    m = vocab.vocab_moments(model)
    for k, v in vocab.row_moments(cos).items():
        np.testing.assert_array_equal(m[k].to_numpy(), v)
    np.testing.assert_array_equal(m.w_out_norm.to_numpy(), w_out.norm(dim=1).numpy())
    g = torch.Generator().manual_seed(0)
    d = torch.randn(512, model.cfg.d_model, generator=g)
    d = d / d.norm(dim=1, keepdim=True)
    assert m.attrs["null_var"] == float(np.median(vocab.row_moments(d @ unit)["vocab_var"]))
    rows = pd.DataFrame({"layer": [1, 0], "neuron": [3, 8], "act_sign": [1.0, -1.0]})
    want = torch.stack([model.blocks[1].mlp.W_out[3], -model.blocks[0].mlp.W_out[8]]) @ W_U
    assert torch.equal(vocab.vocab_effect_rows(model, rows), want)
    # weight statistics: the vocabulary moments of w_out against W_U
    ws = weight_statistics(model, dtype=torch.float64)  # float64 products: exact to 1e-12
    U64 = W_U.double() / W_U.double().norm(dim=0, keepdim=True)
    c64 = (w_out.double() / w_out.double().norm(dim=1, keepdim=True)) @ U64
    mean = c64.mean(1, keepdim=True)
    dv = c64 - mean
    m2 = dv.square().mean(1)
    for k, v in {"vocab_mean": mean[:, 0], "vocab_var": m2, "vocab_skew": dv.pow(3).mean(1) / m2.pow(1.5),
                 "vocab_kurt": dv.pow(4).mean(1) / m2.square()}.items():
        np.testing.assert_allclose(ws[k].to_numpy(), v.numpy(), rtol=1e-12, err_msg=k)
    # entropy: spectrum, null-space share, cosines between neurons and with W_U, the weight table
    sp = candidates.unembed_spectrum(model, k=3)  # a random W_U's spectrum is flat: a cut-off given
    U, S, _ = torch.linalg.svd(W_U.double(), full_matrices=False)
    assert np.array_equal(sp.values, S.numpy()) and torch.equal(sp.directions, U)
    W = w_out.double()
    null = U[:, sp.d - sp.n_zero - sp.k: sp.d - sp.n_zero]
    share = (W @ null).square().sum(1) / (W.square().sum(1) - (W @ sp.zero).square().sum(1))
    np.testing.assert_array_equal(candidates.null_space_fraction(model, sp), share.numpy())
    Wn = W / W.norm(dim=1, keepdim=True)
    pc = candidates.w_out_cosines(model, 1, 5, late_only=None).set_index(["layer", "neuron"]).cos
    np.testing.assert_array_equal(pc.loc[[(0, 7), (1, 0)]].to_numpy(), (Wn @ Wn[D + 5])[[7, D]].numpy())
    fig7 = candidates.unembed_cosines(model, [(1, 5)]).cos.to_numpy()
    np.testing.assert_array_equal(fig7, ((W[D + 5] / W[D + 5].norm()) @ U64).numpy())
    table = candidates.vocab_statistics(model)
    np.testing.assert_array_equal(table.w_out_norm.to_numpy(), W.norm(dim=1).numpy())
    np.testing.assert_array_equal(table.vocab_var.to_numpy(), weight_statistics(model).vocab_var.to_numpy())
    # token frequency: the direction through W_U and the alignment of w_out
    log_q = np.log(np.full(model.cfg.d_vocab, 1.0) / np.arange(1, model.cfg.d_vocab + 1))
    fd = frequency.frequency_direction(model, log_q)
    Wc = W_U.double() - W_U.double().mean(1, keepdim=True)
    Uc, Sc, Vh = torch.linalg.svd(Wc, full_matrices=False)
    keep = Sc > 1e-3 * Sc.max()
    f = torch.as_tensor(log_q - log_q.mean())
    assert torch.equal(fd.coef, Uc[:, keep] @ ((Vh[keep] @ f) / Sc[keep])) and torch.equal(fd.unembed, Wc)
    live = W @ fd.live
    fc = (live @ (fd.live.T @ fd.direction)) / live.norm(dim=1)
    np.testing.assert_array_equal(frequency.frequency_table(model, fd).freq_cos.to_numpy(), fc.numpy())
