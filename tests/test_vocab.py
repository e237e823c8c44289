"""Prediction, suppression and partition neurons on a tiny hand-built model with known answers."""
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from helpers.prediction import vocab
from helpers.data.tokens import GPT2_EOS, TokenRows, VocabMap
from helpers.models.loading import VocabCodec, init_model

D_MODEL = 256
YEARS = [" 1990", "1991", " 1992", "1993", " 1994", "1995"]
NUMBERS = ["12", " 7", "300", " 5000", "9999", " 123", "45", " 8"]
PRED, SUPP, PART, TRIGGER = 3, 4, 5, 6  # the planted neurons of layer 1, and the layer-0 neuron of the conditioning test


def _strings(seed=0, n_words=280):
    rng = np.random.default_rng(seed)
    letters = np.array(list("bcdfghjklmnpqrstvwxz"))  # no vowels: no accidental pronouns or word groups
    words = []
    while len(words) < n_words:
        w = "".join(rng.choice(letters, size=rng.integers(3, 7)))
        s = (" " + w) if len(words) % 2 == 0 else w
        if s not in words:
            words.append(s)
    return ["<|endoftext|>"] + YEARS + NUMBERS + words


def planted_model():
    """A 2-layer model whose unembedding has a planted "starts with a space" direction u (every
    space-prefixed token +8u, every other -8u), and three planted neurons in layer 1: w_out along
    the mean unembedding of the years (prediction), its negation (suppression), and along u
    (partition). Years are half space-prefixed, so their mean carries no u."""
    strings = _strings()
    arch = {"n_layers": 2, "d_model": D_MODEL, "n_heads": 2, "d_mlp": 16, "n_ctx": 16, "d_vocab": len(strings)}
    model = init_model(arch, seed=3)
    g = torch.Generator().manual_seed(1)
    u = torch.randn(D_MODEL, generator=g)
    u /= u.norm()
    space = torch.tensor([s.startswith(" ") for s in strings], dtype=torch.float32) * 2 - 1
    wu = torch.randn(D_MODEL, len(strings), generator=g) + 8.0 * u[:, None] * space[None, :]
    years = [strings.index(y) for y in YEARS]
    with torch.no_grad():
        model.unembed.W_U.copy_(wu)
        w_out = model.blocks[1].mlp.W_out
        w_out[PRED] = wu[:, years].mean(1)
        w_out[SUPP] = -wu[:, years].mean(1)
        w_out[PART] = u * 3.0
    model.eval()
    codec = SimpleNamespace(token_strings=lambda: strings, bos_id=0, d_vocab=len(strings), drop_ids=[0])
    return model, codec, strings


@pytest.fixture(scope="module")
def planted():
    model, codec, strings = planted_model()
    real = vocab.real_token_mask(codec, model)
    moments = vocab.vocab_moments(model, real)
    moments["vocab_class"] = vocab.classify(moments)
    return model, codec, strings, real, moments


def test_real_token_mask_excludes_bos_and_keeps_the_rest(planted):
    model, codec, strings, real, _ = planted
    assert real.excluded.id.tolist() == [0] and "BOS" in real.excluded.reason.iloc[0]
    assert real.n_kept == len(strings) - 1 and real.kept_strings[0] == YEARS[0]


def test_reduced_vocabulary_excludes_unk_and_bos_and_uses_gpt2_strings():
    vm = VocabMap(np.array([GPT2_EOS, 198, 464, 383, -1]), 4)  # <|endoftext|>, "\n", "The", " The", <unk>
    real = vocab.real_token_mask(VocabCodec(vm))
    assert real.excluded.id.tolist() == [0, 4]
    assert set(real.excluded.reason.str.split(":").str[0]) >= {"<unk>"}
    assert real.kept_strings == ["\n", "The", " The"]


def test_planted_prediction_neuron_is_found_classified_and_explained(planted):
    model, codec, strings, real, moments = planted
    row = moments.set_index(["layer", "neuron"]).loc[(1, PRED)]
    assert row.vocab_kurt > 10 and row.vocab_skew > 0 and row.vocab_class == "prediction"
    top = moments[moments.layer == 1].sort_values("vocab_kurt", ascending=False).iloc[0]
    assert top.neuron in (PRED, SUPP)  # the planted pair is the most heavy-tailed of the layer
    classes = vocab.token_classes(real)
    effect = vocab.vocab_effect(model, 1, real, neurons=[PRED])
    ex = vocab.explain_effects(effect, classes)
    assert ex.best_class.iloc[0] == "is_year" and ex.direction.iloc[0] == "predicts"
    assert ex.best_vr.iloc[0] > 0.3 and ex.best_vr.iloc[0] > ex.runner_up_vr.iloc[0]
    assert vocab.describe_class("is_year").startswith("years")
    # the raw effect is the product itself, through W_U centred over d_model: the final LayerNorm
    # (unfolded here) removes the residual stream's mean
    # (fp32 sums in another order differ by ~1e-6 absolute, so near-zero entries get an absolute
    # tolerance scaled to the largest entry)
    wu = model.W_U - model.W_U.mean(0)
    want = (model.blocks[1].mlp.W_out[PRED] @ wu)[1:].detach().numpy()
    np.testing.assert_allclose(effect[0].numpy(), want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_negated_neuron_is_a_suppression_neuron(planted):
    model, codec, strings, real, moments = planted
    m = moments.set_index(["layer", "neuron"])
    p, s = m.loc[(1, PRED)], m.loc[(1, SUPP)]
    assert s.vocab_class == "suppression"
    assert s.vocab_skew == pytest.approx(-p.vocab_skew, rel=1e-6) and s.vocab_kurt == pytest.approx(p.vocab_kurt, rel=1e-6)
    ex = vocab.explain_effects(vocab.vocab_effect(model, 1, real, neurons=[SUPP]), vocab.token_classes(real))
    assert ex.best_class.iloc[0] == "is_year" and ex.direction.iloc[0] == "suppresses"
    # an ensemble of one predictor and one suppressor of years, antipodal (cos = -1)
    t = m.reset_index().loc[lambda d: (d.layer == 1) & d.neuron.isin([PRED, SUPP])].reset_index(drop=True)
    t = pd.concat([t, vocab.explain_effects(vocab.vocab_effect(model, 1, real, neurons=t.neuron.tolist()),
                                            vocab.token_classes(real))], axis=1)
    ens = vocab.ensembles(t, vocab.w_out_cosine_fn(model, t)).set_index("class")
    assert ens.loc["is_year", ["predict", "suppress", "antipodal_pairs"]].tolist() == [1, 1, 1]


def test_planted_partition_neuron_is_classified_as_partition(planted):
    model, codec, strings, real, moments = planted
    row = moments.set_index(["layer", "neuron"]).loc[(1, PART)]
    assert row.vocab_class == "partition" and row.vocab_kurt < 3 and row.var_ratio > 4
    ex = vocab.explain_effects(vocab.vocab_effect(model, 1, real, neurons=[PART]), vocab.token_classes(real))
    assert ex.best_class.iloc[0] in ("starts_w_space", "starts_w_letter_no_space") and ex.best_vr.iloc[0] > 0.8
    # random neurons of the init are none of the three
    rest = moments[(moments.layer == 0)]
    assert (rest.vocab_class == "none").mean() > 0.9
    counts = vocab.class_counts(moments)
    assert counts.loc[(10, 4), "partition"] >= 1 and counts.loc[(10, 4), "prediction"] >= 1
    assert (counts.xs(4, level=1).prediction.diff().dropna() <= 0).all()  # fewer at a stricter threshold


def test_next_token_conditioning_recovers_a_planted_dependence(tmp_path):
    """The layer-0 neuron TRIGGER reads the embedding of one trigger token; in the rows, the
    trigger is always followed by a year. Its activation split by "next token is a year" must
    be higher on the year side, and the streamed numbers must equal a direct computation."""
    model, codec, strings = planted_model()
    trig = strings.index(" " + "".join(s for s in strings[15].strip()))  # a word token
    years = np.array([strings.index(y) for y in YEARS])
    with torch.no_grad():
        model.blocks[0].mlp.W_in[:, TRIGGER] = model.embed.W_E[trig] * 2.0
    rng = np.random.default_rng(0)
    ids = rng.integers(15, len(strings), size=(60, 16))
    for r in range(60):
        for p in rng.choice(np.arange(1, 14), size=3, replace=False):
            ids[r, p], ids[r, p + 1] = trig, rng.choice(years)
    ids[:, 0] = 0
    rows = TokenRows(torch.from_numpy(ids))
    masks = np.zeros((1, len(strings)), dtype=bool)
    masks[0, years] = True
    neurons = pd.DataFrame({"layer": [0], "neuron": [TRIGGER]})
    out = vocab.stream_next_token_split(model, rows, neurons, masks, drop_ids=[0], batch_size=7)
    fam = SimpleNamespace(identity={"m": "planted"}, codec=codec, load=lambda m: model, name="planted")
    run = vocab.next_token_conditioning(fam, "m", rows, neurons, masks, tmp_path, batch_size=5)
    parts = run.table("split")
    assert run.meta == {"n_neurons": 1, "n_parts": 2}
    merged = parts[parts.part == "all"].drop(columns="part").reset_index(drop=True)
    pd.testing.assert_frame_equal(merged, out, check_dtype=False)
    assert set(parts.part) == {"1 of 2", "2 of 2", "all"}
    eff = vocab.conditioning_effect(parts).set_index("part")
    assert (eff["diff"] > 0).all() and eff.loc["all", "n_in"] == eff.loc[["1 of 2", "2 of 2"], "n_in"].sum()
    # direct
    _, cache = model.run_with_cache(rows.ids, names_filter="blocks.0.mlp.hook_post")
    pre = cache["blocks.0.mlp.hook_post"][:, :-1, TRIGGER][:, 1:]  # the activation at positions 1..14 (a next token, not BOS)
    nxt = torch.from_numpy(np.isin(ids[:, 2:], years))
    on, off = pre[nxt], pre[~nxt]
    got = out.set_index("next_in_class")
    assert got.loc[True, "n"] == len(on) and got.loc[False, "n"] == len(off)
    assert got.loc[True, "mean"] == pytest.approx(on.mean().item(), abs=1e-4)
    assert got.loc[False, "mean"] == pytest.approx(off.mean().item(), abs=1e-4)
    assert got.loc[True, "std"] == pytest.approx(on.std(unbiased=False).item(), abs=1e-3)
    assert got.loc[True, "mean"] - got.loc[False, "mean"] > 2 * got.loc[False, "std"]


def test_split_histogram_merges_and_rejects_bad_shapes():
    x = torch.randn(500, 3)
    y = torch.rand(500, 3) < 0.3
    a = vocab.SplitHistogram(3).update(x[:200], y[:200])
    b = vocab.SplitHistogram(3).update(x[200:], y[200:])
    whole = vocab.SplitHistogram(3).update(x, y)
    a.merge(b)
    assert torch.equal(a.counts, whole.counts) and torch.allclose(a.sums, whole.sums)
    s = whole.summary().set_index(["index", "next_in_class"])
    assert s.loc[(1, True), "mean"] == pytest.approx(x[y[:, 1], 1].double().mean().item(), abs=1e-9)
    assert abs(s.loc[(0, False), "q50"] - x[~y[:, 0], 0].median().item()) < 0.2  # a bin is 0.1 wide
    with pytest.raises(ValueError):
        whole.update(x, y[:, :2])
    with pytest.raises(ValueError):
        vocab.classify(pd.DataFrame({"vocab_kurt": [1.0], "vocab_skew": [0.0], "var_ratio": [1.0]}), kurtosis_threshold=0)


def test_class_helpers_and_the_sign_test(planted):
    model, codec, strings, real, moments = planted
    classes = vocab.token_classes(real)
    t = pd.DataFrame({"layer": [1, 1], "neuron": [PRED, SUPP], "best_class": ["is_year", "is_year"]})
    m = vocab.class_masks(t, classes, len(strings))
    assert m.shape == (2, len(strings)) and sorted(np.flatnonzero(m[0])) == sorted(strings.index(y) for y in YEARS)
    e = vocab.effect_by_class(model, t, real, classes).set_index(["row", "side"])
    assert e.loc[(0, "in class"), "mean"] > e.loc[(0, "other"), "q95"]  # the predictor raises years above almost all else
    assert e.loc[(1, "in class"), "mean"] < e.loc[(1, "other"), "q5"]
    eff = pd.DataFrame({"part": "all", "direction": ["suppresses"] * 8 + ["predicts"] * 3, "diff": [1.0] * 8 + [-1.0] * 3,
                        "effect_size": 0.5})
    r = vocab.direction_test(eff, "suppresses", n_tests=2)
    assert (r["n"], r["positive"]) == (8, 8) and r["p_value"] == pytest.approx(2 / 2 ** 8) and r["p_bonferroni"] == pytest.approx(4 / 2 ** 8)
    assert vocab.rise_depth(pd.Series({0: 0, 1: 1, 2: 5, 3: 10}), 4) == pytest.approx(1 / 3)
    assert np.isnan(vocab.rise_depth(pd.Series({0: 0, 1: 0}), 2))


def test_hf_tokenizer_special_tokens_and_padding_columns_are_excluded():
    class Added:
        def __init__(self, content, special):
            self.content, self.special = content, special

        def __str__(self):
            return self.content

    tok = SimpleNamespace(added_tokens_decoder={0: Added("<|endoftext|>", True), 1: Added("<|im_start|>", True),
                                                4: Added("extra", False)}, pad_token_id=None)
    codec = SimpleNamespace(tokenizer=tok, token_strings=lambda: ["<|endoftext|>", "<|im_start|>", " a", "b", "extra"],
                            bos_id=0, d_vocab=5)
    model = SimpleNamespace(cfg=SimpleNamespace(d_vocab=7))
    real = vocab.real_token_mask(codec, model)
    assert real.excluded.id.tolist() == [0, 1, 5, 6] and real.kept_strings == [" a", "b", "extra"]
    assert real.excluded.set_index("id").reason[5].startswith("padding column")


def test_sign_restricts_the_best_class_to_the_raised_or_lowered_ones(planted):
    model, codec, strings, real, moments = planted
    classes = vocab.token_classes(real)
    eff = vocab.vocab_effect(model, 1, real, neurons=[PRED, SUPP])
    free = vocab.explain_effects(eff, classes)
    assert (free.best_class == "is_year").all()
    # told that both raise their class, the suppressor can no longer take "years" (which it lowers)
    forced = vocab.explain_effects(eff, classes, sign=np.array([1, 1]))
    assert forced.best_class[0] == "is_year" and forced.best_class[1] != "is_year" and forced.direction[1] == "predicts"
    assert list(vocab.class_sign(["prediction", "suppression", "partition"])) == [1, -1, 0]


def _moments(members, kurt_last, skew_last=-1.0, n_layers=2, d=10):
    """W_U moments of a `members` family: every neuron Gaussian-like (kurtosis 3) except the first
    neuron of the last layer, whose kurtosis is `kurt_last[member]`."""
    rows = []
    for m in members:
        for l in range(n_layers):
            for n in range(d):
                k = kurt_last[m] if (l == n_layers - 1 and n == 0) else 3.0 + 0.01 * n
                rows.append({"member": m, "layer": l, "neuron": n, "vocab_kurt": k, "vocab_skew": skew_last, "var_ratio": 1.0})
    return pd.DataFrame(rows)


def test_seed_consistency_says_when_there_is_nothing_to_compare():
    flat = vocab.seed_consistency(_moments("abc", {"a": 3.0, "b": 3.0, "c": 3.0}), 2)
    # every seed "agrees" on a tie because none has a heavy-tailed neuron: consistent, but not measured
    assert flat["consistent"] and not flat["measured"] and flat["n_heavy"] == {"a": 0, "b": 0, "c": 0}
    same = vocab.seed_consistency(_moments("abc", {"a": 40.0, "b": 40.0, "c": 40.0}), 2)
    assert same["measured"] and same["n_heavy"] == {"a": 1, "b": 1, "c": 1}
    assert set(same["last_layer_majority"].values()) == {"suppression"}
    one = vocab.seed_consistency(_moments("abc", {"a": 40.0, "b": 3.0, "c": 3.0}), 2)
    assert one["measured"] and not one["consistent"]  # one seed's suppression neuron against two ties


def gated_negative_model(d_model=256, d_vocab=300, targets=(10, 11), neuron=3, seed=0):
    """A 2-layer gated (SiLU) model without normalisation whose layer-1 neuron `neuron` writes w_out =
    W_U[:, t1] + W_U[:, t2] (so W_U w_out alone looks like a prediction neuron of the targets), but
    whose activation silu(gate) * up is always negative: every token embedding carries 10 e, the
    gate reads 5 e (large and positive) and the linear branch is the constant -1."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=d_model, n_heads=2, d_head=d_model // 2, d_mlp=16, n_ctx=16, d_vocab=d_vocab,
                                  act_fn="silu", gated_mlp=True, normalization_type=None, seed=seed)
    model = HookedTransformer(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(d_model, generator=g)
    e /= e.norm()
    with torch.no_grad():
        model.W_U.copy_(torch.randn(d_model, d_vocab, generator=g))
        model.W_E.add_(10.0 * e)
        mlp = model.blocks[1].mlp
        mlp.W_gate[:, neuron] = 5.0 * e
        mlp.W_in[:, neuron] = 0.0
        mlp.b_in[neuron] = -1.0
        mlp.W_out[neuron] = model.W_U[:, list(targets)].sum(1)
    return model


def test_gated_neuron_firing_negatively_is_classified_by_what_it_does_to_the_logits():
    from helpers.properties.neuron_stats import activation_statistics

    targets, n = (10, 11), 3
    model = gated_negative_model(targets=targets, neuron=n)
    strings = [f"t{i}" for i in range(model.cfg.d_vocab)]
    codec = SimpleNamespace(token_strings=lambda: strings, bos_id=0, d_vocab=len(strings), drop_ids=[0])
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, model.cfg.d_vocab, (6, 16), generator=g)
    ids[:, 0] = 0
    # ground truth: what the neuron does to the target logits (clean minus with the neuron zeroed)
    hook = f"blocks.1.mlp.hook_post"
    with torch.no_grad():
        clean, cache = model.run_with_cache(ids, names_filter=lambda k: k == hook)
        zeroed = model.run_with_hooks(ids, fwd_hooks=[(hook, lambda a, hook: a.index_fill_(-1, torch.tensor([n]), 0.0))])
    assert (cache[hook][..., n] < -0.5).all()
    d = (clean - zeroed)[..., list(targets)]
    assert (d < 0).all()  # it lowers the target tokens' logits: a suppression neuron
    real = vocab.real_token_mask(codec, model)
    moments = vocab.vocab_moments(model, real)
    row = (moments.layer == 1) & (moments.neuron == n)
    assert vocab.classify(moments)[row].item() == "prediction"  # W_U w_out alone gets it backwards
    stats = activation_statistics(model, ids, drop_ids=[0], batch_size=3)
    sign = stats.set_index(["layer", "neuron"]).act_sign
    assert sign.loc[(1, n)] == -1 and (sign.drop((1, n)) != 0).all()
    eff = vocab.apply_signs(moments, stats)
    assert vocab.classify(eff)[row].item() == "suppression"
    assert eff.loc[row, "vocab_kurt"].item() == moments.loc[row, "vocab_kurt"].item()
    plus = eff.act_sign > 0  # neurons with s = +1 keep every number
    pd.testing.assert_frame_equal(eff.loc[plus, moments.columns], moments.loc[plus])
    effect = vocab.vocab_effect(model, 1, real, neurons=[n], signs=[-1.0])[0]
    assert effect[torch.tensor([list(real.ids).index(t) for t in targets])].max() < effect.median()
    table = eff[row].reset_index(drop=True)
    assert (vocab.vocab_effect_rows(model, table, real)[0] == effect).all()
