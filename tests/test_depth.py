"""Every chapter's computations on models of 4 layers, and the paper's depth claims on 2, 4, 6 and
24 layers: shapes cover every layer, pair counts follow the depth, and planted neurons are found at
the depth they were planted in (not at "the last layer = 1" or "the first = 0" of a 2-layer model)."""
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from helpers.attention import heads as attention
from helpers.correlations import correlate, universality
from helpers.entropy import candidates as entropy
from helpers.taxonomy import explain
from helpers.properties import neuron_stats, compare as properties, significance as property_stats
from helpers.prediction import vocab
from helpers.data.tokens import GPT2_EOS, TokenRows, gpt2_tokenizer
from helpers.models.families import Family
from helpers.taxonomy.features import build_feature_set, vocab_strings_gpt2
from helpers.models.loading import init_model, processed_model

L = 4  # the depth every chapter runs on here
ARCH = {"n_layers": L, "d_model": 64, "n_heads": 2, "d_mlp": 32, "n_ctx": 16, "d_vocab": 64}
D = ARCH["d_mlp"]
BOS = 0
CODEC = SimpleNamespace(drop_ids=[BOS], bos_id=BOS, d_vocab=ARCH["d_vocab"],
                        token_strings=lambda: ["<|endoftext|>"] + [f" w{i}" for i in range(1, ARCH["d_vocab"])])


def _rows(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, ARCH["d_vocab"], (n, ARCH["n_ctx"]), generator=g)
    ids[:, 0] = BOS
    return ids


def _family(name, models, rows):
    return Family(name, list(models), lambda m: models[m], lambda: CODEC, "cpu", {}, lambda n, split: rows)


# ---- chapters 01 and 02: universality and neuron statistics ------------------------------------

PLANTED = [(0, 3), (L - 1, 5), (L - 1, 20)]  # copied from `a` into every other seed, first and last layer


@pytest.fixture(scope="module")
def planted_family():
    """Three seeds whose MLPs write nothing (so every member's residual stream is the same) and
    whose MLP input weights are independent, except the PLANTED neurons of `a`, copied into a
    random position of the same layer of the others (as `planted_family` of test_correlate)."""
    g = torch.Generator().manual_seed(7)
    base = init_model(ARCH, seed=100)
    built, where = {}, {}
    for m in "abc":
        model = init_model(ARCH, seed=100)
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for blk in model.blocks:
                blk.mlp.W_in.copy_(torch.randn(blk.mlp.W_in.shape, generator=g) * 0.5)
                blk.mlp.b_in.copy_(torch.randn(blk.mlp.b_in.shape, generator=g) * 0.1)
                blk.mlp.W_out.zero_()
        built[m] = model.eval()
    with torch.no_grad():
        for l, n in PLANTED:
            built["a"].blocks[l].mlp.b_in[n] = -2.0
        for m in "bc":
            perm = torch.randperm(D, generator=g)
            for k, (l, n) in enumerate(PLANTED):
                j = int(perm[k])
                built[m].blocks[l].mlp.W_in[:, j] = built["a"].blocks[l].mlp.W_in[:, n]
                built[m].blocks[l].mlp.b_in[j] = built["a"].blocks[l].mlp.b_in[n]
                where[(m, l, n)] = j
    return _family("planted4", built, _rows(60)), where


def test_universality_and_statistics_cover_every_layer(planted_family, tmp_path):
    fam, where = planted_family
    table = correlate.correlate_family(fam, 0, tmp_path / "corr", batch_size=64, verbose=False).table("universality")
    assert len(table) == L * D and set(table.layer) == set(range(L))
    planted = table.set_index(["layer", "neuron"]).loc[PLANTED]
    for (l, n), row in planted.iterrows():  # the match is found in the planted layer, first and last alike
        for m in "bc":
            assert (row[f"match_layer_{m}"], row[f"match_neuron_{m}"]) == (l, where[(m, l, n)])
            assert row[f"max_corr_{m}"] == pytest.approx(1.0, abs=1e-5)
    assert table.match_layer_b.between(0, L - 1).all()
    heat = universality.best_match_layers(table)
    assert heat.shape == (L, L)
    spec = universality.depth_specialisation(heat)
    assert spec["chance"] == pytest.approx(1 / L)
    assert universality.share_by_layer(table).index.tolist() == list(range(L))

    stats = neuron_stats.member_neuron_stats(fam, 0, tmp_path, member="a", batch_size=64,
                                             verbose=False).table("neuron_stats")
    df = stats.merge(table, on=["layer", "neuron"], validate="one_to_one")
    property_stats.check_join(df, L, D)
    with pytest.raises(AssertionError):
        property_stats.check_join(df[df.layer < L - 1], L, D)  # a table without its last layer fails the check
    pct = properties.within_layer_percentiles(df, ["pre_kurt", "act_freq"], "is_universal")
    assert set(pct.layer) == {0, L - 1}  # the planted neurons' layers
    boxes = properties.per_layer_boxes(properties.per_layer_long(df, ["pre_kurt"], "is_universal"))
    assert set(boxes.layer) == set(range(L))
    checked = property_stats.check_detects_planted(df, "pre_kurt", n_perm=200)
    assert checked["whole_layers_p"] == 1.0


# ---- chapter 03: taxonomy and the depth claims -------------------------------------------------


class PlantedDeepModel:
    """A stand-in for a 4-layer HookedTransformer with 4 neurons per layer: a unigram neuron
    (fires on " on"), a previous-token neuron (fires after a comma) and a position neuron, each in
    the layer given, and noise everywhere else."""

    def __init__(self, on_id, comma_id, n_ctx, unigram_layer, prev_layer, position_layer):
        self.cfg = SimpleNamespace(n_layers=L, d_mlp=4, device="cpu")
        self.on_id, self.comma_id, self.n_ctx = on_id, comma_id, n_ctx
        self.where = {"unigram": unigram_layer, "previous-token": prev_layer, "position": position_layer}

    def run_with_cache(self, tokens, names_filter=None, stop_at_layer=None, return_type=None):
        b, p = tokens.shape
        g = torch.Generator().manual_seed(int(tokens.sum()))
        prev = torch.cat([torch.full_like(tokens[:, :1], -1), tokens[:, :-1]], 1)
        pos = torch.arange(p).float()[None].expand(b, -1)
        acts = torch.randn(L, b, p, 4, generator=g)
        acts[self.where["unigram"], ..., 0] = 4.0 * (tokens == self.on_id) + 0.05 * acts[self.where["unigram"], ..., 0]
        acts[self.where["previous-token"], ..., 1] = 3.0 * (prev == self.comma_id) + 0.05 * acts[self.where["previous-token"], ..., 1]
        acts[self.where["position"], ..., 2] = pos / self.n_ctx - 0.5 + 0.05 * acts[self.where["position"], ..., 2]
        # `acts` is the pre-activation (the position neuron's is uniform over positions: kurtosis 1.8,
        # the taxonomy's position rule); the post-activation is its GELU
        post = torch.nn.functional.gelu(acts)
        out = {f"blocks.{l}.mlp.hook_pre": acts[l] for l in range(L)}
        out.update({f"blocks.{l}.mlp.hook_post": post[l] for l in range(L)})
        return None, out


@pytest.fixture(scope="module")
def token_rows():
    tok = gpt2_tokenizer()
    # " in": a second preposition, so that the preposition class is a feature apart from " on" itself
    vocab_ids = [tok(s, add_special_tokens=False)["input_ids"][0] for s in (" on", ",", " the", " cat", " dog", ".", " is", " a", " in")]
    rng = np.random.default_rng(0)
    gpt2 = rng.choice(vocab_ids, size=(160, 32))
    gpt2[:, 0] = GPT2_EOS
    ids = torch.from_numpy(gpt2)
    labels = torch.from_numpy(rng.integers(0, 2, size=(160, 1)).repeat(32, 1))
    rows = TokenRows(ids, ids.clone(), labels, ["src-a", "src-b"])
    fs = build_feature_set(rows, vocab_strings_gpt2(), True, None, "gpt2", min_positive=20, syntax=False)
    return rows, fs, vocab_ids


@pytest.mark.parametrize("early", [True, False])
def test_taxonomy_places_planted_families_at_their_depth(token_rows, early):
    rows, fs, ids = token_rows
    where = (0, 1, 0) if early else (L - 1, L - 1, L - 1)  # unigram, previous-token, position
    model = PlantedDeepModel(ids[0], ids[1], rows.n_ctx, *where)
    res = explain.stream_explanations(model, rows, fs, [GPT2_EOS], batch_size=32, dtype=torch.float64)
    table = explain.explanation_tables(res, fs, min_positive=20)["table"]
    assert len(table) == L * 4 and set(table.layer) == set(range(L))
    t = table.set_index(["layer", "neuron"])
    assert t.loc[(where[0], 0), "family"] == "unigram" and t.loc[(where[1], 1), "family"] == "previous-token"
    assert t.loc[(where[2], 2), "family"] == "position"
    counts = explain.family_counts(table)
    assert counts.index.tolist() == list(range(L))
    depth = explain.depth_summary(table, L)
    assert depth.loc["unigram", "median layer"] == where[0]
    assert depth.loc["unigram", "median depth"] == pytest.approx(where[0] / (L - 1))
    # early: every claim holds (layer 1 of 4 spans [0.25, 0.5], inside "early-mid"); late: none does
    for fam in ("unigram", "previous-token", "position"):
        assert depth.loc[fam, "holds"] is early, (fam, depth.loc[fam].to_dict())
    assert depth.loc["alphabet", "holds"] is None  # no claim


def _claim(fam, layers, n_layers):
    return explain.depth_claim_holds(fam, np.asarray(layers), n_layers)


@pytest.mark.parametrize("n_layers,holds", [
    (2, {"unigram": [0], "previous-token": [0], "position": [0]}),
    (4, {"unigram": [0, 1], "previous-token": [0, 1], "position": [0]}),
    (6, {"unigram": [0, 1], "previous-token": [0, 1, 2], "position": [0, 1]}),
])
def test_depth_claims_on_every_layer_of_2_4_and_6_layers(n_layers, holds):
    """A family whose neurons all sit in one layer: the claim holds exactly in the layers listed, so
    for any depth the first layer counts as early and the last one never does."""
    for fam, layers in holds.items():
        got = [l for l in range(n_layers) if _claim(fam, [l] * 5, n_layers)]
        assert got == layers, (fam, n_layers, got)
        assert _claim(fam, [0] * 5, n_layers) and not _claim(fam, [n_layers - 1] * 5, n_layers)
    # spread: one layer is concentrated at any depth; all layers equally is spread out
    for n in (2, 4, 6):
        assert not _claim("syntax", [n - 1] * 8, n) and not _claim("syntax", [0] * 8, n)
        assert _claim("syntax", list(range(n)) * 4, n)
    assert _claim("syntax", [1] * 4 + [2] * 4, 4) is False  # the middle half of 4 layers is concentrated


def test_depth_claims_hold_for_the_papers_own_layers_and_need_depth():
    n = 24  # GPT2-medium: unigram layers 0-1, previous-token 4-6, position 0-2 (§4.3)
    assert _claim("unigram", [0, 0, 1, 1, 1], n) and _claim("previous-token", [4, 5, 5, 6], n) and _claim("position", [0, 1, 2], n)
    assert not _claim("unigram", [20, 22, 23], n) and not _claim("previous-token", [14, 15, 16], n)
    assert not _claim("previous-token", [0, 0, 0, 1], n)  # layers 0-1 of 24 are before the range
    assert _claim("unigram", [0], 1) is None and _claim("unigram", [], 4) is None and _claim("context", [0], 4) is None
    assert explain.layer_slice(5, 24) == pytest.approx((5 / 24, 6 / 24))


# ---- chapters 04, 05, 06: a dense 4-layer model with planted late and early neurons -----------

PRED = (L - 1, 6)  # a prediction neuron in the last layer
EARLY_PRED = (0, 6)  # the same in the first layer of a second model
ENTROPY = (L - 1, 9)  # an entropy neuron: output in W_U's null space
HEAD = (L - 1, 1)  # the head the planted attention neuron steers
ATTN = (1, 4)  # ... from two layers below


def _project_out(w, v):
    return w - (w @ v)[..., None] * v


def dense_model(seed=3, pred=PRED):
    """A processed 4-layer model with a prediction neuron at `pred` (w_out = one token's
    unembedding), an entropy neuron at ENTROPY (w_out along a direction nothing else writes and W_U
    reads with gain 0.02) and, at ATTN, a neuron that always fires and writes the direction that
    raises head HEAD's attention to BOS."""
    model = processed_model(ARCH, init_model(ARCH, seed).state_dict())
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(ARCH["d_model"], generator=g)
    v = v - v.mean()
    v = v / v.norm()
    with torch.no_grad():
        model.W_U.mul_(8.0)
        model.W_U.copy_(model.W_U - 0.98 * torch.outer(v, v @ model.W_U))
        model.b_U.zero_()
        for p in (model.embed.W_E, model.pos_embed.W_pos):
            p.copy_(_project_out(p, v))
        for blk in model.blocks:
            for p in (blk.attn.W_O, blk.attn.b_O, blk.mlp.W_out, blk.mlp.b_out):
                p.copy_(_project_out(p, v))
        model.blocks[ENTROPY[0]].mlp.W_out[ENTROPY[1]] = 20.0 * v
        # a constant along v (the last MLP's bias): the residual's v part is then 8 + 20 act, so its norm,
        # the final scale and the entropy grow monotonically over the neuron's two-sided grid (without
        # it the norm is symmetric in the activation and no two-sided sweep is monotone)
        model.blocks[ENTROPY[0]].mlp.b_out.add_(8.0 * v)
        model.blocks[pred[0]].mlp.W_out[pred[1]] = 3.0 * model.W_U[:, 7]
        kb = attention.bos_keys(model, BOS)
        d = attention.query_directions(model, HEAD[0], kb[HEAD[0]])[HEAD[1]]
        mlp = model.blocks[ATTN[0]].mlp
        mlp.W_in[:, ATTN[1]] = 0.0
        mlp.b_in[ATTN[1]] = 3.0
        mlp.W_out[ATTN[1]] = 4.0 * _project_out(d, v) / d.norm()
    return model.eval()


@pytest.fixture(scope="module")
def dense_family():
    return _family("dense4", {"a": dense_model(3), "b": dense_model(4), "early": dense_model(5, EARLY_PRED)}, _rows())


def test_vocabulary_moments_and_the_depth_pattern(dense_family, tmp_path):
    fam = dense_family
    mom = vocab.family_vocab_moments(fam, tmp_path, members=["a", "b"])
    assert len(mom) == 2 * L * D and set(mom.layer) == set(range(L))
    mom["vocab_class"] = vocab.classify(mom).to_numpy()
    ref = mom[mom.member == "a"].set_index(["layer", "neuron"])
    assert ref.loc[PRED, "vocab_class"] == "prediction"
    assert set(vocab.per_layer_percentiles(mom, by=("member", "layer")).layer) == set(range(L))
    assert vocab.class_shares_by_layer(mom).index.tolist() == list(range(L))
    late = vocab.depth_pattern(mom[mom.member == "a"], L)
    assert late["rise_depth"] == 1.0 and late["late_pattern"] is True and late["last_prediction"] >= 1
    early_mom = vocab.member_vocab_moments(fam, "early", tmp_path).table("moments")
    early = vocab.depth_pattern(early_mom, L)
    assert early["rise_depth"] == 0.0 and early["late_pattern"] is False and early["last_prediction"] == 0
    cons = vocab.seed_consistency(mom, L)
    assert set(cons["last_layer_majority"]) == {"a", "b"}
    assert cons["last_layer_majority"]["a"] == "prediction"


def test_entropy_candidates_come_from_the_last_two_of_four_layers(dense_family, tmp_path):
    model = dense_family.load("a")
    sp = entropy.unembed_spectrum(model)
    table = entropy.entropy_table(model, sp)
    assert len(table) == L * D
    assert set(table[table.late].layer) == {L - 2, L - 1}  # "the last two layers" of 4, not layers 0-1
    assert tuple(entropy.candidates(table, k=1).iloc[0][["layer", "neuron"]]) == ENTROPY
    late_only = entropy.entropy_table(model, sp, layers=range(L - 2, L))
    assert set(late_only.layer) == {L - 2, L - 1} and late_only.late.all()
    assert entropy.random_baseline(table, n=8, seed=0).layer.isin([L - 2, L - 1]).all()
    assert entropy.w_out_cosines(model, *ENTROPY).layer.min() == L - 2
    s = entropy.study(model, "dense4-a", "dense4-a", TokenRows(_rows(4)), [BOS], tmp_path, n_candidates=1, n_random=4, seed=0,
                      random_grid=(0.0, 6.0), late_only=True, partner_modes=("total",), batch_size=2, verbose=False)
    top = s.role("entropy").iloc[0]
    assert (top.layer, top.neuron) == ENTROPY and s.neurons.layer.isin([L - 2, L - 1]).all()
    summary = entropy.seed_summary({"dense4-a": s}).loc["dense4-a"]
    assert summary.monotone and summary.direction == 1 and summary.d_entropy > 0


def test_attention_pairs_cover_every_later_layer(dense_family, tmp_path):
    fam = dense_family
    rows = TokenRows(_rows(8))
    run = attention.attention_deactivation(fam, "a", rows, tmp_path, n_top=2, n_random=4, seed=0, batch_size=4)
    tails = run.meta["tails"]
    assert tails["n_pairs"] == D * ARCH["n_heads"] * L * (L - 1) // 2
    scores = attention.score_only(fam, "a", rows.n_ctx, tmp_path).table("scores")
    assert len(scores) == tails["n_pairs"] and (scores.head_layer > scores.neuron_layer).all()
    pairs_of_layers = set(zip(scores.neuron_layer, scores.head_layer))
    assert pairs_of_layers == {(l, h) for l in range(L) for h in range(l + 1, L)}
    bos = run.table("bos")
    assert len(bos) == L * ARCH["n_heads"] and set(bos.layer) == set(range(L))
    on_head = scores[(scores.head_layer == HEAD[0]) & (scores["head"] == HEAD[1])]
    best = on_head.loc[on_head.score.idxmax()]
    assert (best.neuron_layer, best.neuron) == ATTN  # two layers below its head
    pairs = pd.DataFrame({"neuron_layer": [ATTN[0]], "neuron": [ATTN[1]], "head_layer": [HEAD[0]], "head": [HEAD[1]],
                          "score": [float(best.score)]})
    rec = attention.path_ablation(fam.load("a"), rows, pairs, drop_ids=[BOS], batch_size=4)
    assert attention.pair_summary(pairs, rec).effect_bos.iloc[0] > 0 and rec.d_bos.mean() < 0
    strongest = attention.neuron_best(scores)
    assert len(strongest) == (L - 1) * D  # every neuron but the last layer's has a later head


# ---- chapter 00: the family's description, held-out losses and samples -------------------------

def test_seed_family_description_losses_and_samples_on_four_layers():
    from helpers.models import families, loading as models

    rows = _rows(8)
    fam = _family("deep4", {"a": processed_model(ARCH, init_model(ARCH, 1).state_dict()),
                            "b": processed_model(ARCH, init_model(ARCH, 2).state_dict())}, rows)
    ours = models.describe_model(fam.load("a"))
    assert ours["n_layers"] == L and ours["n_neurons"] == L * D
    per_row = models.row_losses(fam.load("a"), rows, batch_size=3)
    assert per_row.shape == (len(rows),) and np.isfinite(per_row).all()
    assert float(per_row.mean()) == pytest.approx(models.evaluate_loss(fam.load("a"), rows, batch_size=3), rel=1e-5)
    codec = SimpleNamespace(**vars(CODEC), encode=lambda s: torch.tensor([[BOS, 1, 2]]),
                            decode=lambda ids: "".join(f" w{int(i)}" for i in ids))
    fam_s = Family("deep4", ["a", "b"], fam.load, lambda: codec, "cpu", {}, lambda n, split: rows)
    samples = families.sample_family(fam_s, ["x", "y"], max_new_tokens=4, seed=0)
    assert samples.shape == (2, 2) and samples.notna().all().all()


# ---- beyond the paper: ablation (chapter 01), persistence (chapter 01), token frequency (chapter 05)

def test_ablation_persistence_and_frequency_cover_every_layer(dense_family, tmp_path):
    from helpers.correlations import ablation, persistence
    from helpers.entropy import frequency

    model = dense_family.load("a")
    rows = TokenRows(_rows(8))
    chosen = pd.DataFrame({"layer": [0, 0, L - 1], "neuron": [1, 2, 5]})
    s = ablation.study(model, "dense4-a", "dense4-a", chosen, rows, [BOS], tmp_path, n_draws=3, verbose=False)
    assert set(s.summary.scope) == {"L0", f"L{L - 1}", ablation.WHOLE}  # the set's layers, first and last
    assert s.plan[s.plan.scope == ablation.WHOLE].n_neurons.eq(3).all()
    # persistence: sets over the neurons of all four layers, one checkpoint to the next
    table = pd.DataFrame({"layer": np.repeat(np.arange(L), D), "neuron": np.tile(np.arange(D), L)})
    ex = np.linspace(0, 1, L * D)
    tabs = {"step 0": table.assign(excess_corr=ex[::-1]), "step 1": table.assign(excess_corr=ex)}
    sets = persistence.checkpoint_sets(tabs, rule="top_share", share=0.1)
    assert set(sets[sets["step 1"]].layer) == {L - 1} and set(sets[sets["step 0"]].layer) == {0}
    assert set(persistence.persistence_by_layer(sets).layer) == set(range(L))
    # token frequency: the late neurons are the last two of four layers
    log_q = frequency.unigram_log_probs(frequency.unigram_counts(rows, ARCH["d_vocab"]))
    f = frequency.study(model, "dense4-a", "dense4-a", rows, [BOS], tmp_path, log_q, n_candidates=1, n_random=4,
                        verbose=False)
    assert set(f.table.layer) == {L - 2, L - 1} and f.neurons.layer.isin([L - 2, L - 1]).all()
