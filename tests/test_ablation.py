"""Mean ablation of a neuron set against random neurons of the same layers (Nandan et al. 2025), on a
hand-built model in which one neuron carries the whole prediction, and on planted effect tables."""
import numpy as np
import pandas as pd
import pytest
import torch

from helpers.core import paper
from helpers.correlations import ablation as ab
from helpers.models.loading import init_model, processed_model

ARCH = {"n_layers": 2, "d_model": 32, "n_heads": 2, "d_mlp": 64, "n_ctx": 16, "d_vocab": 97}
PLANTED = (0, 5)  # the neuron that carries the prediction
HALF = 48  # group A: token ids 1..48, group B: 49..96; 0 is BOS


def planted_group_model(seed: int = 0):
    """A processed 2-layer model that predicts the group of the next token (A or B) from the group
    of the current one, through neuron PLANTED alone: the embedding writes +u for A tokens and -u for
    B tokens; PLANTED reads u (so it fires on A and is near 0 on B) and writes GAIN v; W_U reads v
    with +G for A tokens and -G for B tokens, and b_U favours B when nothing writes v. Attention
    writes nothing; every other neuron writes a small random vector."""
    torch.manual_seed(seed)
    model = processed_model(ARCH, init_model(ARCH, seed).state_dict())
    d = ARCH["d_model"]
    g = torch.Generator().manual_seed(seed)

    def unit(x):
        x = x - x.mean()
        return x / x.norm()

    u, v = unit(torch.randn(d, generator=g)), unit(torch.randn(d, generator=g))
    v = unit(v - (v @ u) * u)
    group = torch.zeros(ARCH["d_vocab"])
    group[1:HALF + 1], group[HALF + 1:] = 1.0, -1.0
    with torch.no_grad():
        model.embed.W_E.mul_(0.05).add_(torch.outer(group, u) * 1.0)
        model.pos_embed.W_pos.mul_(0.05)
        for blk in model.blocks:
            blk.attn.W_O.zero_()
            blk.attn.b_O.zero_()
            blk.mlp.W_out.mul_(0.05)
            blk.mlp.b_out.zero_()
        l, n = PLANTED
        model.blocks[l].mlp.W_in[:, n] = 6.0 * u
        model.blocks[l].mlp.b_in[n] = 0.0
        model.blocks[l].mlp.W_out[n] = 4.0 * v
        model.W_U.mul_(0.05).add_(torch.outer(v, (group > 0).float() * 12.0))
        model.b_U.copy_((group < 0).float() * 7.0)
    return model


def group_rows(n: int = 8, seed: int = 0) -> torch.Tensor:
    """Rows of one group each (alternating A and B rows), BOS first, a newline-like token (id 96 is
    kept; the dropped id is 0) here and there."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.empty(n, ARCH["n_ctx"], dtype=torch.long)
    for i in range(n):
        lo = 1 if i % 2 == 0 else HALF + 1
        rows[i] = torch.randint(lo, lo + HALF, (ARCH["n_ctx"],), generator=g)
    rows[:, 0] = 0
    rows[1, 5] = 0  # an extra dropped token: rows differ in their count of valid tokens
    return rows


def test_plan_draws_matched_random_sets_outside_the_set():
    sel = pd.DataFrame({"layer": [0, 0, 0, 2], "neuron": [1, 7, 9, 3]})
    plan = ab.ablation_plan(sel, n_layers=3, d_mlp=16, n_draws=20, seed=4)
    t = ab.plan_table(plan)
    assert list(t.scope.unique()) == ["L0", "L2", ab.WHOLE]  # layer 1 holds no neuron of the set: no ablation
    assert (t.groupby("scope").kind.apply(lambda k: (k == "random").sum()) == 20).all()
    for a in plan:
        if a.scope == "L0":
            assert len(a.neurons) == 3 and all(l == 0 for l, _ in a.neurons)
            if a.kind == "random":
                assert not {n for _, n in a.neurons} & {1, 7, 9}
        if a.scope == ab.WHOLE and a.kind == "random":
            layers = pd.Series([l for l, _ in a.neurons]).value_counts().to_dict()
            assert layers == {0: 3, 2: 1}
            same = [b for b in plan if b.kind == "random" and b.draw == a.draw and b.scope != ab.WHOLE]
            assert set(a.neurons) == {x for b in same for x in b.neurons}  # the union of the per-layer draws
    assert plan == ab.ablation_plan(sel, 3, 16, 20, seed=4)
    assert plan != ab.ablation_plan(sel, 3, 16, 20, seed=5)
    draws = {a.neurons for a in plan if a.scope == "L0" and a.kind == "random"}
    assert len(draws) > 15  # draws differ from each other
    with pytest.raises(ValueError, match="outside it"):
        ab.ablation_plan(pd.DataFrame({"layer": [0] * 10, "neuron": range(10)}), 1, 16)


def test_ablating_nothing_changes_nothing():
    model = planted_group_model()
    rows = group_rows(4)
    means = ab.neuron_means(model, rows, drop_ids=[0], batch_size=2)
    nothing = ab.Ablation("none", "set", -1, ())
    same = ab.Ablation("L1", "set", -1, ((1, 3),))
    eff = ab.batch_effects(model, rows, [nothing, same], means, [0])
    assert (eff["dloss"][0] == 0).all() and (eff["kl"][0] == 0).all()  # exactly: the same logits
    assert np.abs(eff["kl"][1]).max() > 0  # the check can fail: a real ablation moves the output
    assert (eff["n"] == eff["n"][0]).all() and eff["n"][0].sum() == (rows[:, :-1] != 0).sum()


def test_means_are_the_mean_over_valid_tokens():
    model = planted_group_model()
    rows = group_rows(4)
    means = ab.neuron_means(model, rows, [0], batch_size=3)
    _, cache = model.run_with_cache(rows, names_filter=lambda n: n.endswith("hook_post"))
    keep = rows != 0
    for l in range(ARCH["n_layers"]):
        want = cache[f"blocks.{l}.mlp.hook_post"][keep].double().mean(0)
        assert torch.allclose(means[l], want, atol=1e-5)


def test_the_planted_neuron_matters_more_than_random_neurons():
    model = planted_group_model()
    rows = group_rows(8)
    # without ablation the model knows the group: nearly all probability on the right half
    lp = model(rows)[:, :-1].log_softmax(-1).exp()
    right = torch.where(rows[:, 1:2] <= HALF, lp[..., 1:HALF + 1].sum(-1), lp[..., HALF + 1:].sum(-1))
    assert right[:, 1:].mean() > 0.9
    plan = ab.ablation_plan(pd.DataFrame({"layer": [PLANTED[0]], "neuron": [PLANTED[1]]}), ARCH["n_layers"],
                            ARCH["d_mlp"], n_draws=20, seed=0)
    table = ab.run_ablations(model, rows, plan, [0], batch_size=3, verbose=False)
    summ = ab.ablation_summary(table, ab.plan_table(plan), n_boot=500)
    s = summ.set_index(["scope", "metric"])
    assert s.loc[("L0", "dloss"), "set"] > 0.3  # about log 2 per token: the group is lost
    assert s.loc[("L0", "kl"), "ratio"] > 10 and s.loc[("L0", "kl"), "ratio_lo"] > 1
    assert s.loc[("L0", "kl"), "matters_more"] and s.loc[("L0", "dloss"), "matters_more"]
    assert s.loc[(ab.WHOLE, "kl"), "matters_more"]
    v = ab.verdicts(summ)
    assert v["layers_more"] == [0] and v["whole_more"] and v["first_stands_out"]
    # a random neuron of the same layer in the set's place does not matter more than the others
    other = ab.ablation_plan(pd.DataFrame({"layer": [0], "neuron": [11]}), ARCH["n_layers"], ARCH["d_mlp"],
                             20, seed=0)
    other = [a for a in other if PLANTED not in a.neurons]  # the draws that miss the planted neuron
    other_t = ab.run_ablations(model, rows, other, [0], batch_size=3, verbose=False)
    o = ab.ablation_summary(other_t, ab.plan_table(other), n_boot=500).set_index(["scope", "metric"])
    assert not o.loc[("L0", "kl"), "matters_more"]


def test_every_ablation_sees_the_same_tokens():
    model = planted_group_model()
    rows = group_rows(5)
    plan = ab.ablation_plan(pd.DataFrame({"layer": [0, 1], "neuron": [PLANTED[1], 2]}), 2, ARCH["d_mlp"],
                            n_draws=3)
    table = ab.run_ablations(model, rows, plan, [0], batch_size=2, max_logit_elems=2 * ARCH["n_ctx"] * 97 * 2,
                             verbose=False)
    by = table.pivot(index="row", columns="ablation", values="n")
    assert by.shape == (5, len(plan)) and (by.nunique(axis=1) == 1).all()  # same rows, same valid tokens
    assert by.iloc[1, 0] == by.iloc[0, 0] - 1  # the extra dropped token is counted out
    # chunking and batching do not change what each ablation sees: each alone, in one batch, agrees
    for i in (0, len(plan) - 1):
        alone = ab.run_ablations(model, rows, [plan[i]], [0], batch_size=5, verbose=False)
        mine = table[table.ablation == i].reset_index(drop=True)
        assert np.allclose(alone.kl, mine.kl, rtol=1e-4, atol=1e-7) and np.array_equal(alone.n, mine.n)


def test_killed_run_resumes_to_the_same_table(tmp_path, monkeypatch):
    model = planted_group_model()
    rows = group_rows(6)
    plan = ab.ablation_plan(pd.DataFrame({"layer": [0], "neuron": [PLANTED[1]]}), 2, ARCH["d_mlp"], n_draws=2)
    first = ab.cached_ablations(model, "planted", rows, plan, [0], tmp_path / "a", batch_size=2,
                                verbose=False)
    full = first.table("ablation")
    pd.testing.assert_frame_equal(first.table("plan"), ab.plan_table(plan))
    calls = {"n": 0}
    real = ab.batch_effects

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(ab, "batch_effects", dying)
    with pytest.raises(KeyboardInterrupt):
        ab.cached_ablations(model, "planted", rows, plan, [0], tmp_path / "b", batch_size=2, verbose=False)
    monkeypatch.setattr(ab, "batch_effects", real)
    calls["n"] = 0
    monkeypatch.setattr(ab, "batch_effects", lambda *a, **k: (calls.__setitem__("n", calls["n"] + 1),
                                                              real(*a, **k))[1])
    resumed = ab.cached_ablations(model, "planted", rows, plan, [0], tmp_path / "b", batch_size=2,
                                  verbose=False).table("ablation")
    assert calls["n"] == 2  # the first batch was not computed again
    pd.testing.assert_frame_equal(resumed, full)
    again = ab.cached_ablations(model, "planted", rows, plan, [0], tmp_path / "b", batch_size=2,
                                verbose=False).table("ablation")
    assert calls["n"] == 2  # cached: nothing recomputed


def _planted_table(set_row, draws_row, scopes=("L0", "L1", ab.WHOLE)) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A long table with known per-row effects: every scope's set has `set_row(scope)` [rows] per row
    and its draws `draws_row(scope)` [draws, rows]; the loss change equals the KL."""
    recs, plan = [], []
    for scope in scopes:
        plan.append({"scope": scope, "kind": "set", "draw": -1, "n_neurons": 2})
        plan += [{"scope": scope, "kind": "random", "draw": d,
                  "n_neurons": 2} for d in range(len(draws_row(scope)))]
    plan = pd.DataFrame(plan).reset_index(names="ablation")
    for p in plan.itertuples():
        vals = set_row(p.scope) if p.kind == "set" else draws_row(p.scope)[p.draw]
        for r, x in enumerate(vals):
            recs.append({"ablation": p.ablation, "row": r, "n": 10, "dloss": x, "kl": x})
    return pd.DataFrame(recs), plan


def test_summary_on_planted_effects():
    rng = np.random.default_rng(0)
    base = rng.uniform(1, 2, 30)
    factor = {"L0": 3.0, "L1": 1.0, ab.WHOLE: 2.0}
    noise = {s: 1 + 0.02 * np.arange(-10, 10)[:, None] for s in factor}  # 20 draws: +-20% around the base
    table, plan = _planted_table(lambda s: factor[s] * base, lambda s: noise[s] * base)
    s = ab.ablation_summary(table, plan, n_boot=400).set_index(["scope", "metric"])
    rmean = float(np.mean(noise["L0"]))
    assert s.loc[("L0", "kl"), "ratio"] == pytest.approx(3.0 / rmean)
    assert s.loc[("L0", "kl"),
                 "ratio_lo"] == pytest.approx(3.0 / rmean)  # proportional rows: no spread over text
    assert s.loc[("L0", "kl"), "set"] == pytest.approx(3.0 * base.sum() / 300)
    assert s.loc[("L0", "kl"), "matters_more"] and s.loc[(ab.WHOLE, "kl"), "matters_more"]
    assert not s.loc[("L1", "kl"), "matters_more"]  # ratio 1 and inside the draws
    assert s.loc[("L0", "kl"), "first_largest_share"] == 1.0 and s.loc[("L1", "kl"),
                                                                       "first_largest_share"] == 0.0
    assert np.isnan(s.loc[(ab.WHOLE, "kl"), "first_largest_share"])
    v = ab.verdicts(s.reset_index())
    assert v["layers_more"] == [0] and v["first_stands_out"] and v["whole_more"]
    text = ab.conclusion(s.reset_index())
    assert "L0 (3.03x) of 2" in text and "the whole set matters more" in text and "it stands out" in text


def test_the_interval_covers_text_variation_and_a_noisy_layer_is_not_called():
    rng = np.random.default_rng(1)
    base = rng.uniform(0.5, 2, 40)
    # L0: the set's effect is 1.1x on half the rows and 0.6x on the rest (mean below random's) - noisy
    set0 = np.where(np.arange(40) % 2 == 0, 1.6, 0.6) * base
    draws = lambda s: (1 + 0.01 * np.arange(-10, 10)[:, None]) * base  # noqa: E731
    table, plan = _planted_table(lambda s: set0 if s == "L0" else 2 * base, draws)
    s = ab.ablation_summary(table, plan, n_boot=400).set_index(["scope", "metric"])
    assert s.loc[("L0", "kl"), "ratio_lo"] < s.loc[("L0", "kl"), "ratio"] < s.loc[("L0", "kl"), "ratio_hi"]
    assert not ab.verdicts(s.reset_index())["first_stands_out"]
    assert ab.verdicts(s.reset_index())["largest_layer"] == 1


def test_no_effect_gives_no_ratio():
    zeros = np.zeros(10)
    table, plan = _planted_table(lambda s: zeros + 1.0, lambda s: np.zeros((20, 10)), scopes=("L0", ab.WHOLE))
    s = ab.ablation_summary(table, plan, n_boot=100).set_index(["scope", "metric"])
    assert np.isnan(s.loc[("L0", "kl"), "ratio"]) and not s.loc[("L0", "kl"), "matters_more"]
    # random effects that rise on some rows and fall on others, barely positive on average: no ratio either
    signs = np.where(np.arange(10) % 2 == 0, 1.0, -0.98)
    table, plan = _planted_table(lambda s: zeros + 1.0, lambda s: np.tile(signs, (20, 1)),
                                 scopes=("L0", ab.WHOLE))
    s = ab.ablation_summary(table, plan, n_boot=300).set_index(["scope", "metric"])
    assert s.loc[("L0", "kl"), "random_mean"] > 0 and np.isnan(s.loc[("L0", "kl"), "ratio"])


def test_convergence_puts_token_counts_side_by_side():
    base = np.linspace(1, 2, 30)
    draws = lambda s: (1 + 0.01 * np.arange(-10, 10)[:, None]) * base  # noqa: E731
    small = ab.ablation_summary(*_planted_table(lambda s: 3 * base, draws), n_boot=50)
    large = ab.ablation_summary(*_planted_table(lambda s: 2 * base, draws), n_boot=50)
    c = ab.convergence({2048: large, 1024: small})
    assert list(c.columns) == ["ratio @ 1,024", "interval @ 1,024", "ratio @ 2,048", "interval @ 2,048"]
    assert c.loc["L0", "ratio @ 1,024"] == pytest.approx(3 / 0.995)
    assert c.loc["L0", "ratio @ 2,048"] == pytest.approx(2 / 0.995)


def test_comparisons_follow_the_verdict_rule():
    base = np.linspace(1, 2, 30)
    draws = lambda s: (1 + 0.01 * np.arange(-10, 10)[:, None]) * base  # noqa: E731
    trained = ab.ablation_summary(*_planted_table(lambda s: 3 * base, draws), n_boot=200)
    flat = ab.ablation_summary(*_planted_table(lambda s: base, draws), n_boot=200)
    rows = paper.result_table(ab.comparisons(trained, flat))
    assert list(rows.verdict) == ["matched", "matched"]
    rows = paper.result_table(ab.comparisons(trained, trained))
    assert list(rows.verdict) == ["not informative", "not informative"]
    rows = paper.result_table(ab.comparisons(flat, flat))
    assert list(rows.verdict) == ["differs", "differs"]
    no_l0 = ab.ablation_summary(*_planted_table(lambda s: 3 * base, draws, scopes=("L1", ab.WHOLE)),
                                n_boot=200)
    assert paper.result_table(ab.comparisons(no_l0)).verdict.tolist() == ["matched", "not measured"]


def test_layer_matched_top_takes_the_controls_top_per_layer():
    t = pd.DataFrame({"layer": [0, 0, 0, 1, 1, 1], "neuron": [0, 1, 2, 0, 1, 2], "excess_corr": [.1, .5, .3,
                                                                                                 .9, .2, .4]})
    got = ab.layer_matched_top(t, {0: 2, 1: 1})
    assert sorted(zip(got.layer, got.neuron)) == [(0, 1), (0, 2), (1, 0)]


def test_effects_match_a_direct_computation_in_fp64():
    model = planted_group_model()
    rows = group_rows(4)
    means = ab.neuron_means(model, rows, [0], batch_size=4)
    a = ab.Ablation("L0", "set", -1, ((0, PLANTED[1]), (0, 9), (1, 4)))
    eff = ab.batch_effects(model, rows, [a], means, [0])

    def hook(act, hook):
        l = int(hook.name.split(".")[1])
        for ll, n in a.neurons:
            if ll == l:
                act[..., n] = means[l, n].float()
        return act

    store = {}

    def grab(x, hook):
        store[len(store)] = x
        return x

    last = "blocks.1.hook_resid_post"
    with torch.no_grad():
        logits = model.run_with_hooks(rows, fwd_hooks=[(last, grab)])
        model.run_with_hooks(rows, fwd_hooks=[(lambda n: n.endswith("mlp.hook_post"), hook), (last, grab)])
        W, b = model.W_U.double(), model.b_U.double()
        clean, abl = ((model.ln_final(store[i]).double() @ W + b)[:, :-1].log_softmax(-1) for i in (0, 1))
    assert torch.allclose(model.ln_final(store[0]) @ model.W_U + model.b_U, logits,
                          atol=1e-4)  # the logits' recipe
    keep = (rows[:, :-1] != 0).double()
    kl = ((clean.exp() * (clean - abl)).sum(-1) * keep).sum(1)
    tgt = rows[:, 1:, None]
    dloss = ((clean.gather(-1, tgt) - abl.gather(-1, tgt))[..., 0] * keep).sum(1)
    assert kl.max() > 1 and dloss.min() < 1e-2  # large and small effects, so the comparison means something
    assert np.allclose(eff["kl"][0], kl.numpy(), rtol=1e-5, atol=1e-7)
    assert np.allclose(eff["dloss"][0], dloss.numpy(), rtol=1e-4, atol=1e-7)


def test_log_mean_exp_small_large_and_zero_changes():
    g = torch.Generator().manual_seed(0)
    lp = torch.randn(3, 50, generator=g).log_softmax(-1)
    delta = torch.stack([torch.zeros(3, 50), 1e-3 * torch.randn(3, 50, generator=g),
                         90 + torch.randn(3, 50, generator=g)])
    want = torch.logsumexp(lp.double() + delta.double(), -1)
    got = ab._log_mean_exp(lp.exp(), delta.clone(), lp)
    assert (got[0] == 0).all()
    assert torch.allclose(got[1].double(), want[1], atol=1e-7) and torch.allclose(got[2].double(), want[2],
                                                                                  rtol=1e-6)


def test_row_subsets_summarise_the_first_rows():
    base = np.linspace(1, 2, 30)
    draws = lambda s: (1 + 0.01 * np.arange(-10, 10)[:, None]) * base  # noqa: E731
    # the set's effect is 3x random on the first 15 rows and 1x on the rest
    set_row = np.where(np.arange(30) < 15, 3.0, 1.0) * base
    table, plan = _planted_table(lambda s: set_row, draws)
    subs = ab.row_subsets(table, plan, (0.5, 1.0), n_boot=50)
    assert sorted(subs) == [150, 300]
    assert subs[150].set_index(["scope", "metric"]).loc[("L0", "kl"), "ratio"] == pytest.approx(3 / 0.995)
    whole = set_row.sum() / base.sum()
    assert subs[300].set_index(["scope", "metric"]).loc[("L0", "kl"), "ratio"] == pytest.approx(whole / 0.995)


def test_draw_effects_are_per_token_means():
    base = np.linspace(1, 2, 10)
    table, plan = _planted_table(lambda s: 3 * base, lambda s: np.array([base, 2 * base]),
                                 scopes=("L0", ab.WHOLE))
    d = ab.draw_effects(table, plan).set_index(["scope", "kind", "draw"])
    assert d.loc[("L0", "set", -1), "kl"] == pytest.approx(3 * base.sum() / 100)
    assert d.loc[("L0", "random", 1), "dloss"] == pytest.approx(2 * base.sum() / 100)
    assert len(d) == len(plan)
