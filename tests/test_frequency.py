"""Token-frequency neurons (Stolfo et al. 2024) on a hand-built model with a planted neuron that writes
exactly the log-frequency direction: it is found, and fixing it moves the output towards the unigram
distribution; a neuron writing the opposite direction moves it away."""
import numpy as np
import pandas as pd
import pytest
import torch

from helpers.core import paper
from helpers.entropy import frequency as fq, interventions as iv
from helpers.models.loading import init_model, processed_model

ARCH = {"n_layers": 2, "d_model": 32, "n_heads": 2, "d_mlp": 64, "n_ctx": 16, "d_vocab": 97}
PLANTED = (1, 7)
ANTI = (1, 30)


def zipf_log_q(seed: int = 0) -> np.ndarray:
    """A Zipf-like unigram distribution over the vocabulary, in a shuffled token order."""
    rng = np.random.default_rng(seed)
    c = 1.0 / np.arange(1, ARCH["d_vocab"] + 1)
    return np.log(rng.permutation(c) / c.sum())


def planted_frequency_model(log_q: np.ndarray, gain: float = 1.0, anti: bool = False, seed: int = 1):
    """A processed 2-layer model whose unembedding is small and random except along one residual
    direction v, which it reads as the centred log-frequencies; the residual stream is kept free of v
    except for neuron PLANTED, which fires on every token (bias +2) and writes `gain` x the model's
    own least-squares log-frequency direction d* (`frequency_direction`). With `anti`, neuron ANTI
    writes -d* too and fires a little more."""
    model = processed_model(ARCH, init_model(ARCH, seed).state_dict())
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(ARCH["d_model"], generator=g)
    v = v - v.mean()
    v = v / v.norm()
    f = torch.as_tensor(log_q - log_q.mean(), dtype=torch.float32)

    def project_out(w):
        return w - (w @ v)[..., None] * v

    with torch.no_grad():
        model.W_U.mul_(0.1)
        model.W_U.copy_(project_out(model.W_U.T).T + torch.outer(v, f) * 0.5)
        model.b_U.zero_()
        for p in (model.embed.W_E, model.pos_embed.W_pos):
            p.copy_(project_out(p))
        for blk in model.blocks:
            for w in (blk.attn.W_O, blk.attn.b_O, blk.mlp.W_out, blk.mlp.b_out):
                w.copy_(project_out(w))
    d = fq.frequency_direction(model, log_q).coef.float()
    with torch.no_grad():
        for (l, n), sign, bias in ((PLANTED, 1.0, 2.0), (ANTI, -1.0, 2.5)):
            if sign < 0 and not anti:
                continue
            model.blocks[l].mlp.W_in[:, n] *= 0.01
            model.blocks[l].mlp.b_in[n] = bias
            model.blocks[l].mlp.W_out[n] = sign * gain * d * model.blocks[l].mlp.W_out[n].norm() / d.norm()
    return model


def _rows(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(1, ARCH["d_vocab"], (n, ARCH["n_ctx"]), generator=g)
    rows[:, 0] = 0
    return rows


def test_unigram_counts_and_smoothing():
    rows = torch.tensor([[0, 3, 3, 5], [0, 5, 3, 0]])
    c = fq.unigram_counts(rows, 6)
    assert c.tolist() == [1, 0, 0, 3, 0, 2]  # the leading BOS of each row is not counted, a later one is
    lq = fq.unigram_log_probs(c, alpha=1.0)
    assert np.exp(lq).sum() == pytest.approx(1.0) and lq[3] == pytest.approx(np.log(4 / 12))
    with pytest.raises(ValueError):
        fq.unigram_log_probs(c, alpha=0.0)


def test_direction_is_the_least_squares_fit_and_lies_in_the_read_subspace():
    log_q = zipf_log_q()
    model = processed_model(ARCH, init_model(ARCH, 0).state_dict())
    fd = fq.frequency_direction(model, log_q)
    W = model.W_U.detach().double()
    Wc = W - W.mean(1, keepdim=True)
    f = torch.as_tensor(log_q - log_q.mean())
    ref = torch.linalg.lstsq(Wc.T, f[:, None], rcond=1e-3, driver="gelsd").solution[:, 0]
    assert torch.allclose(Wc.T @ fd.coef, Wc.T @ ref, atol=1e-8)  # the same fitted logits as lstsq
    assert fd.k == ARCH["d_model"] - 1  # the folded, centring LayerNorm's all-ones direction is left out
    assert abs(float(fd.direction.sum())) < 1e-8
    resid = Wc.T @ fd.coef - f
    assert fd.r2 == pytest.approx(1 - float(resid.square().sum() / f.square().sum()))
    assert np.allclose(fd.logit_effect(), (Wc.T @ fd.coef).numpy())
    # the fit's residual is orthogonal to every logit pattern the live directions write: none does better
    assert torch.allclose(fd.live.T @ (Wc @ resid), torch.zeros(fd.k, dtype=torch.float64), atol=1e-8)


def test_random_directions_follow_the_beta_law():
    model = processed_model(ARCH, init_model(ARCH, 0).state_dict())
    fd = fq.frequency_direction(model, zipf_log_q())
    c = fq.random_cosines(fd, 20000, seed=1)
    for x in (0.1, 0.3, 0.5):
        assert fq.chance_p(x, fd.k) == pytest.approx((np.abs(c) >= x).mean(), abs=0.01)


def test_planted_neuron_is_found_and_moves_the_output_towards_the_unigram_distribution(tmp_path):
    log_q = zipf_log_q()
    model = planted_frequency_model(log_q, anti=True)
    rows = _rows()
    s = fq.study(model, "planted", "planted-frequency", rows, [0], tmp_path, log_q, n_candidates=2,
                 n_random=10,
                 batch_size=4, verbose=False)
    t = s.table.set_index(["layer", "neuron"])
    assert s.direction.r2 > 0.9  # W_U reads the log-frequencies along one direction
    assert t.loc[PLANTED, "freq_cos"] == pytest.approx(1.0, abs=1e-6)  # the sign as well as the direction
    assert t.loc[ANTI, "freq_cos"] == pytest.approx(-1.0, abs=1e-6)
    assert t.loc[PLANTED, "act_sign"] == 1.0 and t.freq_cos.abs().drop(index=[PLANTED, ANTI]).max() < 0.9
    assert set(zip(s.neurons[s.neurons.role != "random"].layer,
                   s.neurons[s.neurons.role != "random"].neuron)) == {
        PLANTED, ANTI}
    e = fq.effects(s).set_index(["layer", "neuron", "mode"])
    d = f"d_{fq.KL_NAME}"
    for mode in iv.MODES:
        assert e.loc[(*PLANTED, mode), d] < -0.05  # towards the unigram distribution
        assert e.loc[(*ANTI, mode), d] > 0.05  # away from it
        rnd = e.xs(mode, level="mode")
        rnd = rnd[rnd.role == "random"][d].abs().max()
        assert abs(e.loc[(*PLANTED, mode), d]) > 5 * rnd
    # KL falls along the grid: the more the planted neuron writes, the nearer the unigram distribution
    c = iv.curves(s.sweep)
    mine = (c.layer == PLANTED[0]) & (c.neuron == PLANTED[1]) & (c["mode"] == "direct") & (c.grid >= 0)
    c = c[mine].sort_values("grid")
    assert (np.diff(c[fq.KL_NAME]) < 0).all()
    summ = fq.summary({"planted": s}).iloc[0]
    assert summ.aligned and summ.effect_beyond_random and summ.sign_agrees and abs(summ.swept_cos) > 0.99
    way = "towards the unigram distribution" if summ.swept_cos > 0 else "away from the unigram distribution"
    assert summ.towards == (summ.swept_cos > 0) and fq.conclusion(summ).endswith(way + ".")


def test_a_direction_of_the_wrong_sign_or_another_direction_would_not_pass():
    log_q = zipf_log_q()
    model = planted_frequency_model(log_q)
    fd = fq.frequency_direction(model, log_q)
    # against the negated log-frequencies the planted neuron is anti-aligned; against another
    # distribution's log-frequencies it is not singled out
    neg = fq.frequency_table(model, fq.frequency_direction(model, 2 * np.mean(log_q) - log_q))
    other = fq.frequency_table(model, fq.frequency_direction(model, zipf_log_q(seed=5)))
    mine = fq.frequency_table(model, fd)
    key = (mine.layer == PLANTED[0]) & (mine.neuron == PLANTED[1])
    assert float(mine[key].freq_cos.iloc[0]) == pytest.approx(1.0, abs=1e-6)
    assert float(neg[key].freq_cos.iloc[0]) == pytest.approx(-1.0, abs=1e-6)
    assert abs(float(other[key].freq_cos.iloc[0])) < 0.5
    # and the intervention tells the two apart: writing +d* lowers KL(output || q), writing -d* raises it
    rows = _rows(4)
    kl = {fq.KL_NAME: fq.kl_metric(log_q)}
    up = iv.Target(*PLANTED, values=np.array([0.0, 3.0]), grid=np.array([0.0, 6.0]), role="frequency",
                   modes=("direct",))
    down = iv.Target(*PLANTED, values=np.array([0.0, -3.0]), grid=np.array([0.0, 6.0]), role="flipped",
                     modes=("direct",))
    eff = iv.effect_summary(iv.intervention_sweep(model, rows, [up, down], [0], 4, verbose=False,
                                                  extra_metrics=kl))
    eff = eff.set_index("role")[f"d_{fq.KL_NAME}"]
    assert eff["frequency"] < 0 < eff["flipped"]


def test_kl_metric_and_extra_metric_bookkeeping():
    log_q = zipf_log_q()
    logp = torch.as_tensor(log_q, dtype=torch.float32)[None, None].repeat(2, 3, 1)
    assert torch.allclose(fq.kl_metric(log_q)(logp), torch.zeros(2, 3), atol=1e-6)
    uniform = torch.full((1, 1, ARCH["d_vocab"]), -np.log(ARCH["d_vocab"]), dtype=torch.float32)
    want = float(np.mean(-np.log(ARCH["d_vocab"]) - log_q))
    assert float(fq.kl_metric(log_q)(uniform)) == pytest.approx(want, rel=1e-5)
    model = planted_frequency_model(log_q)
    t = iv.Target(*PLANTED, values=np.array([0.0, 2.0]), grid=np.array([0.0, 6.0]), role="frequency")
    table = iv.intervention_sweep(model, _rows(3), [t], [0], 2, verbose=False,
                                  extra_metrics={fq.KL_NAME: fq.kl_metric(log_q)})
    assert iv.metric_columns(table) == [*iv.METRICS, fq.KL_NAME]
    assert fq.KL_NAME in iv.nominal(table) and f"d_{fq.KL_NAME}" in iv.effect_summary(table)
    assert set(iv.halves(table).metric) >= {fq.KL_NAME}
    with pytest.raises(ValueError, match="clash"):
        iv.intervention_sweep(model, _rows(3), [t], [0], 2, verbose=False,
                              extra_metrics={"loss": fq.kl_metric(log_q)})
    with pytest.raises(ValueError, match="extra_identity"):
        iv.cached_sweep(model, "m", _rows(3), [t], [0], "unused",
                        extra_metrics={fq.KL_NAME: fq.kl_metric(log_q)})


def _row(**kw):
    base = {"top_aligned": "L1.7", "cos": 0.9, "p_bonferroni": 1e-6, "aligned": True, "d_kl_total": -0.2,
            "random_max_total": 0.01, "effect_beyond_random": True, "n_late": 128}
    return pd.Series({**base, **kw}, name="m")


def test_comparisons_follow_the_verdict_rule():
    ctl = _row(cos=0.3, p_bonferroni=0.5, aligned=False, d_kl_total=0.005, effect_beyond_random=False)
    assert paper.result_table(fq.comparisons(_row(), ctl)).verdict.tolist() == ["matched", "matched"]
    assert paper.result_table(fq.comparisons(_row(), _row())).verdict.tolist() == ["not informative"] * 2
    assert paper.result_table(fq.comparisons(ctl, ctl)).verdict.tolist() == ["differs"] * 2
