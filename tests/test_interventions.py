"""Fixed-activation interventions and entropy neurons on tiny hand-built models with known answers
(paper §5.2): a planted neuron whose output lies in W_U's null space."""
import numpy as np
import pandas as pd
import pytest
import torch

from helpers.entropy import candidates as entropy, interventions as iv
from helpers.models.loading import init_model, processed_model

ARCH = {"n_layers": 2, "d_model": 32, "n_heads": 2, "d_mlp": 64, "n_ctx": 16, "d_vocab": 97}
PLANTED = (1, 7)  # the entropy neuron: last layer
ANTI = (1, 30)  # its anti-entropy partner (weights tests only)
GAIN = 20.0


def _project_out(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`w` [..., d_model] without its component along unit `v`."""
    return w - (w @ v)[..., None] * v


def planted_entropy_model(eps: float = 0.0, anti: bool = False, seed: int = 3, offset: float = 0.0):
    """A processed 2-layer model in which unit direction v (orthogonal to the all-ones direction that
    LayerNorm removes) is read by W_U with gain `eps` of its own (0: exactly W_U's null space) and
    written by no component but neuron PLANTED, whose w_out is GAIN * v. With `anti`, neuron ANTI
    writes -0.9 GAIN v plus a little noise. `offset`: the last MLP's bias writes offset * v, so the
    residual norm grows monotonically with the neuron's activation over its range, both signs (with
    0 the norm is symmetric in the activation around 0)."""
    model = processed_model(ARCH, init_model(ARCH, seed).state_dict())
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(ARCH["d_model"], generator=g)
    v = v - v.mean()
    v = v / v.norm()
    with torch.no_grad():
        model.W_U.mul_(8.0)  # sharp predictions (an untrained model is near uniform), so temperature shows
        model.W_U.copy_(model.W_U - (1 - eps) * torch.outer(v, v @ model.W_U))
        model.b_U.zero_()
        for p in (model.embed.W_E, model.pos_embed.W_pos):
            p.copy_(_project_out(p, v))
        for blk in model.blocks:
            blk.attn.W_O.copy_(_project_out(blk.attn.W_O, v))
            blk.attn.b_O.copy_(_project_out(blk.attn.b_O, v))
            blk.mlp.W_out.copy_(_project_out(blk.mlp.W_out, v))
            blk.mlp.b_out.copy_(_project_out(blk.mlp.b_out, v))
        model.blocks[PLANTED[0]].mlp.W_out[PLANTED[1]] = GAIN * v
        model.blocks[PLANTED[0]].mlp.b_out.add_(offset * v)
        if anti:
            noise = _project_out(torch.randn(ARCH["d_model"], generator=g), v)
            model.blocks[ANTI[0]].mlp.W_out[ANTI[1]] = -0.9 * GAIN * v + 0.3 * noise / noise.norm() * GAIN
    return model, v


def _rows(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(1, ARCH["d_vocab"], (n, ARCH["n_ctx"]), generator=g)
    rows[:, 0] = 0
    return rows


def test_planted_neuron_raises_scale_and_entropy_and_keeps_top1():
    model, _ = planted_entropy_model()
    values = np.array([0.0, 0.5, 1.0, 2.0, 4.0])
    t = iv.Target(*PLANTED, values=values, grid=values, role="entropy", modes=("total",))
    table = iv.intervention_sweep(model, _rows(), [t], drop_ids=[0], batch_size=4, verbose=False)
    c = iv.curves(table)
    c = c[c["mode"] == "total"].sort_values("grid")
    assert (np.diff(c.scale) > 0).all() and (np.diff(c.entropy) > 0).all()
    assert c.entropy.iloc[-1] - c.entropy.iloc[0] > 0.5  # a large effect, not rounding
    assert (c.top1_same == 1.0).all()  # only the temperature changes: the argmax never moves
    eff = iv.effect_summary(table).iloc[0]
    assert eff.scale_monotone and eff.entropy_monotone and eff.scale_direction == 1 and eff.d_entropy > 0.5
    # an ordinary neuron of the same layer moves the entropy much less per unit of activation
    other = iv.Target(1, 3, values=values, grid=values, role="random", modes=("total",))
    oc = iv.curves(iv.intervention_sweep(model, _rows(), [other], [0], 4, verbose=False))
    assert oc.scale.max() - oc.scale.min() < 0.2 * (c.scale.max() - c.scale.min())


def test_frozen_scale_removes_the_null_space_neurons_effect():
    model, _ = planted_entropy_model()
    ids = _rows(3)
    logits, cache = model.run_with_cache(ids, names_filter=lambda n: n == iv.SCALE_HOOK)
    scale = cache[iv.SCALE_HOOK]
    specs = [(*PLANTED, 4.0)]
    direct, _ = iv.intervened_logits(model, ids, specs, frozen_scale=scale)
    total, total_scale = iv.intervened_logits(model, ids, specs)
    assert (direct - logits).abs().max() < 1e-4  # the direct effect is ~0: the output is in W_U's null space
    assert (total - logits).abs().max() > 0.1  # the total effect is not
    assert (total_scale > scale).all()
    # the sweep's bookkeeping says the same: direct-mode entropy equals the nominal one
    t = iv.Target(*PLANTED, values=np.array([0.0, 4.0]), grid=np.array([0.0, 6.0]), role="entropy")
    table = iv.intervention_sweep(model, ids, [t], [0], batch_size=2, verbose=False)
    c = iv.curves(table)
    direct_entropy = c[c["mode"] == "direct"].entropy
    assert np.allclose(direct_entropy, iv.nominal(table).entropy, atol=1e-5)
    assert c[c["mode"] == "total"].entropy.max() > iv.nominal(table).entropy + 0.2


def test_intervening_at_its_own_activation_reproduces_the_run():
    model, _ = planted_entropy_model(eps=0.1)
    ids = _rows(4)
    name = "blocks.0.mlp.hook_post"
    logits, cache = model.run_with_cache(ids, names_filter=lambda n: n == name)
    own = cache[name][..., 11]  # [batch, pos]: a layer-0 neuron, so layer 1 sees the change too
    same, _ = iv.intervened_logits(model, ids, [(0, 11, own), (None, 0, 0.0)])
    assert torch.equal(same[:4], logits) and torch.equal(same[4:], logits)
    moved, _ = iv.intervened_logits(model, ids, [(0, 11, own + 1.0)])
    assert (moved - logits).abs().max() > 1e-3  # the check can fail: a different value changes the logits
    # starting at a later layer from the cached residual stream is the same computation
    _, c1 = model.run_with_cache(ids, names_filter=lambda n: n == "blocks.1.hook_resid_pre")
    full, _ = iv.intervened_logits(model, ids, [(*PLANTED, 2.0)])
    late, _ = iv.intervened_logits(model, ids, [(*PLANTED, 2.0)], start_layer=1, start_resid=c1["blocks.1.hook_resid_pre"])
    assert (full - late).abs().max() < 1e-5


def test_sweep_batches_replicas_and_caches(tmp_path):
    model, _ = planted_entropy_model(eps=0.1)
    rows = _rows(5)
    values = iv.scaled_grid(2.0)
    assert values[-1] == pytest.approx(2.0) and values[0] == pytest.approx(-0.17 * 2 / 6)
    targets = [iv.Target(*PLANTED, values, iv.paper_grid(), "entropy"), iv.Target(0, 2, values, iv.paper_grid(), "random", ("total",))]
    one = iv.intervention_sweep(model, rows, targets, [0], batch_size=2, max_logit_elems=1, verbose=False)  # one replica per pass
    many = iv.intervention_sweep(model, rows, targets, [0], batch_size=3, verbose=False)  # all replicas in one pass
    key = ["row", "layer", "neuron", "mode", "grid"]
    a, b = one.sort_values(key).reset_index(drop=True), many.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a[key + ["n"]], b[key + ["n"]])
    assert np.allclose(a[list(iv.METRICS)], b[list(iv.METRICS)], atol=1e-4)
    assert len(one) == 5 * (1 + 8 * 2 + 8)  # nominal + entropy (total, direct) + random (total)
    assert (one[one["mode"] == "nominal"].n == 14).all()  # 15 positions with a next token, less the BOS
    run = iv.cached_sweep(model, "planted", iv.TokenRows.of(rows), targets, [0], tmp_path, batch_size=2, verbose=False)
    again = iv.cached_sweep(model, "planted", iv.TokenRows.of(rows), targets, [0], tmp_path, batch_size=2, verbose=False)
    first = run.table("sweep")
    pd.testing.assert_frame_equal(first, again.table("sweep"))
    assert again.path == run.path and run.meta["n_tokens"] == 5 * 14 and run.meta["seconds"] >= 0
    assert len(list((tmp_path / "entropy_intervention").iterdir())) == 1
    h = iv.halves(first)
    assert set(h.metric) == {"scale", "entropy", "loss", "rr"} and len(h) == 3 * 4  # (entropy: total, direct; random: total)
    # the halves check on planted halves: two identical halves differ by nothing; a second half whose
    # entropy is raised by 0.3 nats per unit of grid differs by 0.3 x the grid's top (6), and only there
    head = first[first.row.isin([0, 1])]
    twin = iv.halves(pd.concat([head, head.assign(row=head.row + 100)]))
    assert np.allclose(twin.max_half_diff, 0, atol=1e-9)
    assert (twin[(twin.role == "entropy") & (twin.metric == "entropy")].effect_range > 0).all()
    bumped = head.assign(row=head.row + 100)
    bumped["entropy"] = bumped.entropy + 0.3 * bumped.grid.fillna(0.0) * bumped.n
    hb = iv.halves(pd.concat([head, bumped]))
    assert np.allclose(hb[hb.metric == "entropy"].max_half_diff, 0.3 * 6)
    assert np.allclose(hb[hb.metric != "entropy"].max_half_diff, 0, atol=1e-9)
    with pytest.raises(ValueError):
        iv.scaled_grid(0.0)
    # streamed in batches of 2 rows, the ranges are those of one pass over all valid tokens (BOS, id 0, dropped)
    ranges = iv.activation_ranges(model, rows, [0, 1], [0], batch_size=2)
    assert len(ranges) == 2 * ARCH["d_mlp"]
    _, cache = model.run_with_cache(rows, names_filter=lambda n: n.endswith("mlp.hook_post"))
    for layer in (0, 1):
        acts = cache[f"blocks.{layer}.mlp.hook_post"][rows != 0].double()  # [valid tokens, d_mlp]
        r = ranges[ranges.layer == layer]
        np.testing.assert_allclose(r.act_min, acts.min(0).values.numpy(), atol=1e-5)
        np.testing.assert_allclose(r.act_max, acts.max(0).values.numpy(), atol=1e-5)
        np.testing.assert_allclose(r.act_mean, acts.mean(0).numpy(), atol=1e-5)
    assert (ranges.act_min <= ranges.act_q_lo).all() and (ranges.act_q_lo <= ranges.act_q_hi).all() and (ranges.act_q_hi <= ranges.act_max).all()
    assert set(ranges.act_sign) <= {-1.0, 1.0}
    # natural grids on planted ranges: 6 maps to 1.5 x the natural side's quantile; the other side's
    # reach is relative to it, never below the paper's -0.17 against 6; a neuron silent on its side gets 0
    planted = pd.DataFrame({"act_sign": [1.0, -1.0, 1.0, 1.0], "act_q_lo": [-0.5, -4.0, -0.001, -1.0],
                            "act_q_hi": [2.0, 1.0, 3.0, 0.0]})
    nat = entropy.natural_grid(planted)
    np.testing.assert_allclose(nat.grid_scale, [3.0, 6.0, 4.5, 0.0])
    np.testing.assert_allclose(nat.other_ratio, [0.25, 0.25, entropy.MIN_OTHER, entropy.MIN_OTHER])


def test_entropy_neuron_found_from_weights():
    model, v = planted_entropy_model(eps=0.02, anti=True)
    sp = entropy.unembed_spectrum(model)
    assert sp.n_zero == 1  # the all-ones direction that LayerNorm folding removes, left out
    ones = torch.ones(ARCH["d_model"], dtype=torch.float64) / ARCH["d_model"] ** 0.5
    assert abs(float(sp.zero[:, 0] @ ones)) > 0.999
    assert abs(float(sp.directions[:, sp.d - 2] @ v.double())) > 0.999  # v: the smallest non-zero direction
    table = entropy.entropy_table(model, sp)
    row = table.set_index(["layer", "neuron"]).loc[PLANTED]
    assert row.null_frac > 0.99 and row.null_ratio > 10 and row.l2_rank <= 2 and row.vocab_var_rank <= 2
    others = table.set_index(["layer", "neuron"]).drop([PLANTED, ANTI])
    assert others.null_frac.max() < 0.5
    top = entropy.candidates(table, k=1).iloc[0]
    assert (top.layer, top.neuron) == PLANTED
    partner = entropy.anti_partner(model, *PLANTED)
    assert (partner["layer"], partner["neuron"]) == ANTI and partner["cos"] < -0.9
    base = entropy.random_baseline(table, n=20, seed=0)
    assert len(base) == 20 and PLANTED not in set(zip(base.layer, base.neuron))
    assert base.equals(entropy.random_baseline(table, n=20, seed=0)) and not base.equals(entropy.random_baseline(table, n=20, seed=1))
    curve = entropy.null_fraction_curve(model, sp, [PLANTED], [1, 2, 4])
    assert (curve.null_frac > 0.99).all() and np.allclose(curve.random, np.array([1, 2, 4]) / 31)
    cos = entropy.unembed_cosines(model, [PLANTED, (0, 1)])
    assert cos[cos.neuron == PLANTED[1]].cos.abs().max() < cos[cos.neuron == 1].cos.abs().max()


def test_study_finds_and_sweeps_the_planted_entropy_neuron(tmp_path):
    model, _ = planted_entropy_model(eps=0.02, offset=8.0)  # a small but non-zero gain: an exact zero would be left out with LayerNorm's
    rows = _rows(4)
    s = entropy.study(model, "planted", "planted-weights", rows, [0], tmp_path, n_candidates=1, n_random=20, seed=0,
                      random_grid=(0.0, 3.0, 6.0), batch_size=2, verbose=False)
    top = s.role("entropy").iloc[0]
    assert (top.layer, top.neuron) == PLANTED
    assert len(s.role("random")) == 20 and len(s.role("anti-entropy")) == 1
    assert set(s.sweep[s.sweep.role == "random"].grid.unique()) == {0.0, 3.0, 6.0}
    summary = entropy.seed_summary({"planted": s}).loc["planted"]
    assert summary.monotone and summary.direction == 1 and summary.d_entropy > 2 * summary.random_max_abs_d_entropy
    assert summary.null_ratio > 10  # (top-1 agreement is tested with an exact null space above)


def test_rmsnorm_final_scale_is_the_hook_and_freezing_it_works():
    """SmolLM2-style models: RMSNorm (folded: RMSPre) and a gated MLP. `ln_final.hook_scale` is the
    root-mean-square of the final residual stream, and freezing it removes a null-space neuron's effect."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=2, d_head=16, d_mlp=48, n_ctx=16, d_vocab=97, act_fn="silu",
                                  normalization_type="RMSPre", gated_mlp=True, positional_embedding_type="rotary", seed=5)
    model = HookedTransformer(cfg).eval()
    g = torch.Generator().manual_seed(5)
    v = torch.randn(32, generator=g)
    v = v / v.norm()
    with torch.no_grad():
        model.W_U.mul_(8.0)
        model.W_U.copy_(model.W_U - torch.outer(v, v @ model.W_U))
        model.blocks[1].mlp.W_out[4] = GAIN * v
    ids = _rows(2)
    logits, cache = model.run_with_cache(ids, names_filter=lambda n: n in (iv.SCALE_HOOK, "ln_final.hook_normalized", "blocks.1.hook_resid_post"))
    resid = cache["blocks.1.hook_resid_post"]
    rms = (resid.pow(2).mean(-1, keepdim=True) + cfg.eps).sqrt()
    assert torch.allclose(cache[iv.SCALE_HOOK], rms, rtol=1e-5)
    direct, _ = iv.intervened_logits(model, ids, [(1, 4, 3.0)], frozen_scale=cache[iv.SCALE_HOOK])
    total, scale = iv.intervened_logits(model, ids, [(1, 4, 3.0)])
    assert (direct - logits).abs().max() < 1e-3 < (total - logits).abs().max()
    with pytest.raises(ValueError):
        iv.check_final_scale(HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=8, n_heads=1, d_head=8, d_mlp=8, n_ctx=4,
                                                                       d_vocab=5, act_fn="relu", normalization_type=None)))


def gated_entropy_model(seed: int = 5, neuron: int = 4, offset: float = 8.0):
    """A SmolLM2-style model (RMSNorm folded, gated SiLU MLP) with a planted entropy neuron whose
    activations are NEGATIVE: every embedding carries 10 e, the gate reads 5 e (large and positive)
    and the linear branch is the constant -1, so its activation is about -silu(large). Its w_out is
    -GAIN v, v in W_U's null space (e, v orthogonal), so when it acts it writes +|a| GAIN v; the
    last MLP's bias writes offset * v, so that grows the residual norm: raising the final scale and
    the entropy is what it naturally does, while driving it upwards (positive values) lowers them."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=2, d_head=16, d_mlp=48, n_ctx=16, d_vocab=97, act_fn="silu",
                                  normalization_type="RMSPre", gated_mlp=True, positional_embedding_type="rotary", seed=seed)
    model = HookedTransformer(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(32, generator=g)
    v /= v.norm()
    e = _project_out(torch.randn(32, generator=g), v)
    e /= e.norm()
    with torch.no_grad():
        model.W_U.mul_(8.0)
        model.W_U.copy_(model.W_U - 0.98 * torch.outer(v, v @ model.W_U))
        model.W_E.copy_(_project_out(model.W_E, v) + 10.0 * e)
        for blk in model.blocks:
            blk.attn.W_O.copy_(_project_out(blk.attn.W_O, v))
            blk.mlp.W_out.copy_(_project_out(blk.mlp.W_out, v))
        mlp = model.blocks[1].mlp
        mlp.W_gate[:, neuron] = 5.0 * e
        mlp.W_in[:, neuron] = 0.0
        mlp.b_in[neuron] = -1.0
        mlp.W_out[neuron] = -GAIN * v
        mlp.b_out.add_(offset * v)
    return model


def test_gated_entropy_neuron_is_swept_and_labelled_in_its_natural_direction(tmp_path):
    model = gated_entropy_model()
    rows = _rows(4)
    s = entropy.study(model, "gated", "gated-weights", rows, [0], tmp_path, n_candidates=1, n_random=20, seed=0,
                      random_grid=(0.0, 3.0, 6.0), batch_size=2, verbose=False)
    top = s.role("entropy").iloc[0]
    assert (top.layer, top.neuron) == (1, 4) and top.act_sign == -1 and top.act_q_hi < 0
    sw = s.sweep[(s.sweep.role == "entropy") & (s.sweep["mode"] == "total")]
    assert (sw.grid < 0).any() and (sw.value[sw.grid > 0] < 0).all() and (sw.value[sw.grid < 0] > 0).all()
    assert sw.value.min() == pytest.approx(-top.grid_scale) and top.grid_scale == pytest.approx(-entropy.EXTEND * top.act_q_lo)
    summary = entropy.seed_summary({"gated": s}).loc["gated"]
    # its natural (negative) activation raises the scale and the entropy: an entropy neuron
    assert summary.effect_role == "entropy" and summary.d_entropy > 0 and summary.d_scale > 0
    assert summary.monotone and summary.direction == 1
    # driven upwards (the old one-sided sweep) it lowers the entropy: labelled by w_out alone, it would be anti-entropy
    up = iv.intervention_sweep(model, rows, [iv.Target(1, 4, np.array([0.0, 0.2]), np.array([0.0, 6.0]), "up", ("total",))], [0],
                               batch_size=2, verbose=False)
    assert iv.effect_summary(up).d_entropy.iloc[0] < 0


def test_monotonicity_check_uses_the_negative_grid_points():
    """A curve that rises over the natural side but also rises on the opposite side (a U) is not
    monotone; leaving the negative points out, as a one-sided check did, would call it monotone."""
    grid = entropy.grid_points(0.5)
    assert grid.min() == pytest.approx(-3.0) and 0.0 in grid and (grid > 0).sum() == 6 and (grid < 0).sum() == 2
    assert entropy.grid_points(0.0).min() == pytest.approx(0.0) and entropy.natural_grid(pd.DataFrame(
        {"layer": [0], "neuron": [0], "act_sign": [1.0], "act_q_lo": [0.5], "act_q_hi": [2.0]})).other_ratio.iloc[0] == entropy.MIN_OTHER
    ent = np.where(grid < 0, 2.0 + 0.1 * np.abs(grid), 2.0 + 0.1 * grid)
    t = pd.DataFrame({"row": 0, "layer": 1, "neuron": 4, "role": "entropy", "mode": "total", "grid": grid, "value": grid, "n": 1.0,
                      "scale": 1.0 + grid, "entropy": ent, "loss": 1.0, "rr": 0.5, "top1_same": 1.0})
    e = iv.effect_summary(t).iloc[0]
    assert e.scale_monotone and not e.entropy_monotone
    assert e.d_entropy == pytest.approx(0.6)
    assert entropy.opposite_effects(0.6, -0.4, 0.1) and not entropy.opposite_effects(-0.6, -0.4, 0.1)
    assert not entropy.opposite_effects(0.6, -0.05, 0.1)


def test_flat_unembedding_has_no_null_space():
    """W_U with every live singular value equal (and LayerNorm's exact zero): no direction is read at
    less than half the median gain, so there is no null space and no share is computed in it."""
    model, _ = planted_entropy_model()
    d, V = ARCH["d_model"], ARCH["d_vocab"]
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(V, d, generator=g))
    centre = torch.eye(d) - torch.ones(d, d) / d
    with torch.no_grad():
        model.W_U.copy_(centre @ q.T * 3.0)
    sp = entropy.unembed_spectrum(model)
    assert sp.n_zero == 1 and sp.flat and sp.k == 0 and not sp.has_null_space
    assert sp.null.shape == (d, 0) and np.isnan(sp.random_fraction) and "null space" not in set(sp.table().part)
    assert np.isnan(entropy.null_space_fraction(model, sp)).all()
    table = entropy.entropy_table(model, sp)
    assert table.null_frac.isna().all() and table.null_ratio.isna().all()
    assert entropy.null_space_fraction(model, sp, k=2).max() <= 1  # an explicit cut-off is still a share


def test_token_metrics_have_known_values_across_chunk_boundaries():
    """Hand-built logits: a uniform row has entropy log V and loss log V; a row that puts logit 30 on
    one token has entropy ~0, loss ~0 on it and ~30 elsewhere; ties count in the true token's favour.
    Chunks of 1, 3 and 100 positions give the same numbers."""
    V, P = 11, 7
    logits = torch.zeros(2, P, V)
    tokens = torch.zeros(2, P, dtype=torch.long)
    tokens[0, 1:] = torch.arange(P - 1) % V  # row 0: uniform logits, every target ties with all tokens
    logits[1, :, 4] = 30.0  # row 1: token 4 dominates
    tokens[1, 1:] = torch.tensor([4, 5, 4, 6, 4, 7])
    logits[1, 2, 9] = 30.0  # position 2: tokens 4 and 9 tie, the target (4) gets rank 1, entropy log 2
    want_entropy = torch.tensor([[np.log(V)] * (P - 1), [0.0, 0.0, np.log(2.0), 0.0, 0.0, 0.0]], dtype=torch.float32)
    want_loss = torch.tensor([[np.log(V)] * (P - 1), [0.0, 30.0, np.log(2.0), 30.0, 0.0, 30.0]], dtype=torch.float32)
    want_rr = torch.tensor([[1.0] * (P - 1), [1.0, 0.5, 1.0, 0.5, 1.0, 0.5]])
    kl_uniform = {"neg_h": lambda lp: (lp.exp() * lp).sum(-1)}
    for chunk in (1, 3, 100):
        m = iv.token_metrics(logits, tokens, nominal_top1=torch.full((2, P - 1), 4), extra=kl_uniform, chunk=chunk)
        assert torch.allclose(m["entropy"], want_entropy, atol=1e-4), chunk
        assert torch.allclose(m["loss"], want_loss, atol=1e-4), chunk
        assert torch.allclose(m["rr"], want_rr), chunk
        assert torch.allclose(m["neg_h"], -want_entropy, atol=1e-4), chunk
        assert m["top1"][1].tolist() == [4] * (P - 1)
        assert m["top1_same"][1].tolist() == [1.0] * (P - 1) and m["top1_same"][0].sum() < P - 1


def _ln_model(seed: int = 4, softcap: float = 0.0):
    """An unprocessed GPT-2-style model: every LayerNorm keeps a weight and a bias far from (1, 0),
    and the unembedding a bias, so a norm, a bias or a centring left out changes the logits."""
    model = init_model(ARCH, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".w", ".b")) and ("ln" in name):
                p.copy_((torch.exp(0.7 * torch.randn(p.shape, generator=g)) if name.endswith(".w")
                         else 0.5 * torch.randn(p.shape, generator=g)))
        model.b_U.copy_(torch.randn(model.b_U.shape, generator=g))
        model.W_U.mul_(8.0)
    model.cfg.output_logits_soft_cap = softcap
    return model


@pytest.mark.parametrize("kind", ["processed LNPre", "LayerNorm with weights and biases, soft-capped", "gated RMSPre"])
def test_last_layer_shortcut_gives_the_full_passes_numbers(kind, sweep_both_ways):
    """Last-layer replicas combined from three logit rows per token give the numbers of a full
    intervened pass (total and direct, both signs, with an extra metric), on a processed GPT-2-style
    model, an unprocessed one whose final LayerNorm keeps its weight and bias (plus b_U and a logit
    soft cap), and a gated RMSNorm model; the full pass is then never run for the last layer, and
    still is for an earlier one."""
    if kind == "processed LNPre":
        model, _ = planted_entropy_model(eps=0.1, offset=3.0)
        layer, d_vocab = 1, ARCH["d_vocab"]
    elif kind.startswith("LayerNorm"):
        model, layer, d_vocab = _ln_model(softcap=4.0), 1, ARCH["d_vocab"]
    else:
        model, layer, d_vocab = gated_entropy_model(), 1, 97
    assert iv.last_layer_shortcut_applies(model)
    rows = _rows(3)
    rows[rows >= d_vocab] = 1
    values = iv.scaled_grid(3.0)  # from -0.085 to 3: both signs of the activation
    targets = [iv.Target(layer, 7, values, iv.paper_grid(), "entropy"), iv.Target(layer, 30, -values, iv.paper_grid(), "neg"),
               iv.Target(0, 2, values[::3], iv.paper_grid()[::3], "random", ("total",))]
    extra = {"top_logp": lambda lp: lp.max(-1).values}
    tables, calls = sweep_both_ways(model, rows, targets, [0], extra=extra)
    assert calls == {True: {0}, False: {0, layer}}
    moved = tables[True].query("mode == 'total' and role == 'entropy'").groupby("grid").entropy.sum()
    assert moved.max() - moved.min() > 1e-3  # the replicas differ: a shortcut that ignored the value fails above too


def test_last_layer_shortcut_is_refused_where_it_would_be_wrong():
    """A model with parallel attention and MLP, or without a final norm, runs every replica in full."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    base = dict(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=16, n_ctx=8, d_vocab=11, act_fn="gelu")
    assert iv.last_layer_shortcut_applies(HookedTransformer(HookedTransformerConfig(**base, normalization_type="LN")))
    assert not iv.last_layer_shortcut_applies(HookedTransformer(HookedTransformerConfig(**base, normalization_type="LN",
                                                                                        parallel_attn_mlp=True)))
    assert not iv.last_layer_shortcut_applies(HookedTransformer(HookedTransformerConfig(**base, normalization_type=None)))
