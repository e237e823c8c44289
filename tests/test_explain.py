"""Variance reduction (eq. 4) and neuron families on synthetic activations with known answers."""
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from helpers.data.tokens import GPT2_EOS, TokenRows, gpt2_tokenizer
from helpers.streaming.accumulators import GroupedMoments
from helpers.taxonomy.explain import (FAMILIES, alphabet_letters, assign_families, cutoff_sensitivity, explanation_tables,
                             family_of, stream_explanations, variance_reduction_direct)
from helpers.taxonomy.features import build_feature_set, vocab_strings_gpt2


def _random_data(seed=0, t=3000, n=5, g=7, offset=0.0):
    rng = np.random.default_rng(seed)
    x = rng.gamma(0.5, 1.0, size=(t, n)) + offset
    y = rng.random((t, g)) < np.linspace(0.02, 0.6, g)
    x[:, 0] += 3.0 * y[:, 2]  # one variable explained in part by label 2
    return x, y


@pytest.mark.parametrize("dtype,tol,offset", [(torch.float64, 1e-6, 0.0), (torch.float64, 1e-6, 1000.0),
                                              (torch.float32, 1e-4, 50.0)])
def test_streamed_variance_reduction_matches_pandas(dtype, tol, offset):
    x, y = _random_data(offset=offset)
    acc = GroupedMoments(x.shape[1], y.shape[1], dtype=dtype)
    for s in range(0, len(x), 700):  # uneven chunks
        acc.update(torch.from_numpy(x[s : s + 700]), torch.from_numpy(y[s : s + 700]))
    vr = acc.variance_reduction().numpy()
    direct = np.array([[variance_reduction_direct(x[:, i], y[:, j]) for j in range(y.shape[1])] for i in range(x.shape[1])])
    np.testing.assert_allclose(vr, direct, atol=tol)
    assert direct[0, 2] > 0.3 and np.abs(np.delete(direct[0], 2)).max() < 0.05  # the data have the planted effect
    # group means and stds against pandas
    m1, m0 = acc.means()
    s1, _ = acc.stds()
    lab = y[:, 2]
    np.testing.assert_allclose(m1[0, 2].item(), x[lab, 0].mean(), rtol=1e-6)
    np.testing.assert_allclose(m0[0, 2].item(), x[~lab, 0].mean(), rtol=1e-6)
    np.testing.assert_allclose(s1[0, 2].item(), x[lab, 0].std(), rtol=1e-5)


def test_merge_and_state_dict_give_the_unsplit_result():
    x, y = _random_data(seed=1, offset=10.0)
    whole = GroupedMoments(x.shape[1], y.shape[1], dtype=torch.float64, firing=True)
    whole.update(torch.from_numpy(x), torch.from_numpy(y))
    a = GroupedMoments(x.shape[1], y.shape[1], dtype=torch.float64, firing=True)
    b = GroupedMoments(x.shape[1], y.shape[1], dtype=torch.float64, firing=True)
    a.update(torch.from_numpy(x[:1000]), torch.from_numpy(y[:1000]))
    b.update(torch.from_numpy(x[1000:] * 1.0), torch.from_numpy(y[1000:]))
    c = GroupedMoments(x.shape[1], y.shape[1], dtype=torch.float64, firing=True)
    c.load_state_dict(b.state_dict())
    a.merge(c)
    np.testing.assert_allclose(a.variance_reduction().numpy(), whole.variance_reduction().numpy(), atol=1e-9)
    np.testing.assert_allclose(a.f1.numpy(), whole.f1.numpy())


# ---- planted neurons in a hand-built "model" streamed by the real driver -----------------------


def _ids(*strings):
    tok = gpt2_tokenizer()
    out = []
    for s in strings:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, s
        out += ids
    return out


class PlantedModel:
    """A stand-in for a HookedTransformer with one MLP layer of 6 planted neurons, each a
    pre-activation (`hook_pre`) and its GELU (`hook_post`): 0 fires on the token " on" (unigram),
    1 on tokens after a comma (previous token), 2 rises with position (its pre-activation uniform
    over positions, so sub-Gaussian, kurtosis 1.8, while its GELU's kurtosis is about 2.6; it fires
    in the second half of a row), 3 is noise, 4 fires on the newline token (a token class:
    whitespace), 5 is dead (the same activation on every token)."""

    def __init__(self, on_id, comma_id, newline_id, n_ctx):
        self.cfg = SimpleNamespace(n_layers=1, d_mlp=6, device="cpu")
        self.on_id, self.comma_id, self.newline_id, self.n_ctx = on_id, comma_id, newline_id, n_ctx

    def run_with_cache(self, tokens, names_filter=None, stop_at_layer=None, return_type=None):
        b, p = tokens.shape
        g = torch.Generator().manual_seed(int(tokens.sum()))
        noise = 0.05 * torch.randn(b, p, 6, generator=g)
        prev = torch.cat([torch.full_like(tokens[:, :1], -1), tokens[:, :-1]], 1)
        pos = torch.arange(p).float()[None].expand(b, -1)
        pre = noise
        pre[..., 0] += 4.0 * (tokens == self.on_id)
        pre[..., 1] += 3.0 * (prev == self.comma_id)
        pre[..., 2] += 4.0 * (pos / self.n_ctx - 0.5)
        pre[..., 3] += torch.randn(b, p, generator=g)
        pre[..., 4] += 3.0 * (tokens == self.newline_id)
        pre[..., 5] = -30.0
        post = torch.nn.functional.gelu(pre, approximate="tanh")
        return None, {"blocks.0.mlp.hook_pre": pre, "blocks.0.mlp.hook_post": post}


@pytest.fixture(scope="module")
def planted():
    vocab = _ids(" on", ",", " the", " cat", " dog", ".", " is", " a", " and", " 1999", " In", "\n")
    rng = np.random.default_rng(0)
    n_ctx, n_rows = 32, 200
    gpt2 = rng.choice(vocab, size=(n_rows, n_ctx))
    gpt2[:, 0] = GPT2_EOS
    ids = torch.from_numpy(gpt2)
    labels = torch.from_numpy(rng.integers(0, 2, size=(n_rows, 1)).repeat(n_ctx, 1))
    rows = TokenRows(ids, ids.clone(), labels, ["src-a", "src-b"])
    fs = build_feature_set(rows, vocab_strings_gpt2(), True, None, "gpt2", min_positive=20, syntax=False)
    model = PlantedModel(vocab[0], vocab[1], vocab[-1], n_ctx)
    res = stream_explanations(model, rows, fs, [GPT2_EOS], batch_size=16, dtype=torch.float64)
    return fs, {**res, "model": model, "rows": rows}, explanation_tables(res, fs, min_positive=20)


def test_planted_unigram_neuron_has_vr_near_one_for_its_feature_only(planted):
    fs, res, tabs = planted
    vr = pd.Series(res["accs"]["labels"].variance_reduction()[0].numpy(), index=fs.names)
    assert vr["unigram_on"] > 0.97
    # labels that do not single out " on" explain almost nothing
    for other in ("unigram_the", "contains_comma", "prev_contains_comma", "position_16_32", "source_src-b"):
        assert abs(vr[other]) < 0.05, (other, vr[other])
    t = tabs["table"].set_index("neuron")
    assert t.loc[0, "family"] == "unigram" and t.loc[0, "best_vr"] > 0.97


def test_planted_previous_token_and_position_neurons_get_their_families(planted):
    _, _, tabs = planted
    t = tabs["table"].set_index("neuron")
    assert t.loc[1, "family"] == "previous-token" and t.loc[1, "best_feature"].startswith("prev_")
    assert t.loc[1, "best_vr"] > 0.9
    assert t.loc[2, "family"] == "position"
    assert t.loc[2, "position_score"] > 0.5
    # the candidate is found by its pre-activation's kurtosis; its post-activation's is above the cut-off
    assert t.loc[2, "pre_kurt"] < 1.9 and t.loc[2, "act_kurt"] > 2.3
    assert t.loc[3, "family"] == "unexplained" and t.loc[3, "position_score"] < 0.05
    prof = tabs["positions"].query("neuron == 2").sort_values("position")
    assert np.corrcoef(prof.position, prof["mean"])[0, 1] > 0.85  # mean activation rises with position
    assert prof["mean"].iloc[-1] > 1.5 and prof["fire_rate"].iloc[-1] == 1.0


def test_token_class_neuron_is_not_a_unigram_neuron(planted):
    """A neuron on the newline token is explained by a class of tokens (whitespace), not by one
    token's forms: its family is "token class"; the " on" neuron stays a unigram neuron."""
    _, _, tabs = planted
    t = tabs["table"].set_index("neuron")
    assert t.loc[4, "best_feature"] == "is_whitespace" and t.loc[4, "best_vr"] > 0.95
    assert t.loc[4, "family"] == "token class"
    assert t.loc[0, "family"] == "unigram" and t.loc[0, "best_feature"] == "unigram_on"
    fam = family_of(pd.Series(["group_preposition", "unigram_to", "contains_comma", "start_w_t", "prev_contains_comma"]),
                    pd.Series(["token", "unigram", "token", "token", "prev_token"]))
    assert list(fam) == ["token class", "unigram", "token class", "token class", "previous-token"]


def test_dead_neuron_gets_no_label(planted):
    _, _, tabs = planted
    dead = tabs["table"].set_index("neuron").loc[5]
    assert pd.isna(dead.best_feature) and pd.isna(dead.best_group) and pd.isna(dead.runner_up)  # was the first label's name
    assert np.isnan(dead.best_vr) and np.isnan(dead.mean_pos)
    assert dead.family == "unexplained" and dead.position_score == 0


class Killed(Exception):
    pass


def test_killed_explanation_pass_resumes_to_the_same_sums(planted, tmp_path):
    fs, full, _ = planted
    model = full["model"]
    rows, ident = full["rows"], {"test": "planted"}
    real, calls = model.run_with_cache, []

    def dying(*args, **kw):  # the 5th forward pass is killed
        if len(calls) == 4:
            raise Killed()
        calls.append(1)
        return real(*args, **kw)

    model.run_with_cache = dying
    ckpt = tmp_path / "stream.pt"
    try:
        with pytest.raises(Killed):
            stream_explanations(model, rows, fs, [GPT2_EOS], batch_size=16, dtype=torch.float64,
                                checkpoint=ckpt, identity=ident, checkpoint_every=1000)
        assert ckpt.is_file()  # 4 batches of 16 rows x 31 valid tokens: saved after the 3rd (1,488 >= 1,000)
        calls.clear()
        model.run_with_cache = lambda *a, **kw: (calls.append(1), real(*a, **kw))[1]
        resumed = stream_explanations(model, rows, fs, [GPT2_EOS], batch_size=16, dtype=torch.float64,
                                      checkpoint=ckpt, identity=ident, checkpoint_every=1000)
    finally:
        model.run_with_cache = real
    assert len(calls) == 13 - 3  # 200 rows in 13 batches: the 3 checkpointed ones were not redone
    assert not ckpt.exists() and resumed["n_tokens"] == full["n_tokens"]
    for k in ("labels", "position"):
        a, b = resumed["accs"][k], full["accs"][k]
        torch.testing.assert_close(a.variance_reduction(), b.variance_reduction(), rtol=1e-12, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(resumed["accs"]["moments"].kurtosis(), full["accs"]["moments"].kurtosis(), rtol=1e-10, atol=1e-10, equal_nan=True)


def test_cutoffs_change_the_counts_as_they_should(planted):
    _, _, tabs = planted
    t = tabs["table"]
    sens = cutoff_sensitivity(t)
    assert sens.loc[("min_vr", 1.0), list(FAMILIES)].sum() == len(t)
    assert sens.loc[("min_vr", 2.0), "unexplained"] >= sens.loc[("min_vr", 0.5), "unexplained"]
    # without kurtosis candidates the position neuron falls back to its best label: a position bin
    no_candidates = assign_families(t, {"max_kurtosis": 0.0})
    assert (no_candidates == "position").sum() == (t.best_group == "position").sum()
    assert t.set_index("neuron").loc[2, "best_group"] == "position"
    # a VR cut-off above 1 leaves only the position neuron (found by its firing) explained
    assert list(assign_families(t, {"min_vr": 1.01})) == ["unexplained", "unexplained", "position", "unexplained", "unexplained",
                                                          "unexplained"]


# ---- the position score: bias-corrected mutual information -----------------------------------


def test_position_score_is_bias_corrected():
    """Neurons that fire independently of position score about 0 (the plug-in MI of 3,000 tokens
    in 100 position groups would give them about 99 / (2 * 3000 * ln 2) = 0.024 bits of each bit
    of firing entropy); a neuron that fires exactly in the first half of the positions scores 1."""
    g = torch.Generator().manual_seed(0)
    t, groups, n = 3000, 100, 41
    pos = torch.randint(0, groups, (t,), generator=g)
    x = torch.randn(t, n, generator=g, dtype=torch.float64)
    x[:, 0] = torch.where(pos < groups // 2, 1.0, -1.0) + 0.01 * torch.randn(t, generator=g, dtype=torch.float64)
    acc = GroupedMoments(n, groups, dtype=torch.float64, firing=True).update(x, torch.nn.functional.one_hot(pos, groups))
    mi, score = acc.firing_information()
    # the plug-in estimate, directly: sum over positions and firing of p log2(p / (p_pos p_fire))
    fire, oh = (x[:, 1:] > 0).double(), torch.nn.functional.one_hot(pos, groups).double()
    plug = []
    for j in range(fire.shape[1]):
        joint = torch.stack([oh.T @ fire[:, j], oh.T @ (1 - fire[:, j])], 1) / t
        outer = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)
        plug.append(float(torch.where(joint > 0, joint * torch.log2(joint / outer), torch.zeros_like(joint)).sum()))
    assert np.mean(plug) > 0.02  # what the uncorrected score gave these neurons
    assert score[1:].mean() < 0.004 and score[1:].max() < 0.02
    assert score[0] > 0.99 and mi[0] > 0.99


# ---- alphabet neurons: a letter is credited only by its own feature ---------------------------


def test_alphabet_letters_credit_only_universal_neurons_whose_best_label_is_the_letter():
    letters = pd.DataFrame({"layer": [0, 0, 0, 0, 1, 1], "neuron": [0, 1, 2, 3, 0, 1],
                            "letter": ["a", "a", "b", "c", "c", "d"], "vr": [0.9, 0.5, 0.6, 0.5, 0.45, 0.95]})
    table = pd.DataFrame({"layer": [0, 0, 0, 0, 1, 1], "neuron": [0, 1, 2, 3, 0, 1],
                          # L0.0: an article neuron (its VR on "a" is high, on the article class higher);
                          # L0.2: "starts with b" is its best label; L1.1: not universal
                          "best_feature": ["group_article", "unigram_a", "start_w_b", "unigram_c", "unigram_c", "unigram_d"],
                          "universal": [True, True, True, True, True, False]})
    out = alphabet_letters(letters, table, 0.37, universal="universal").set_index("letter")
    assert list(out.index) == ["a", "b", "c", "d"]
    assert (out.loc["a", "layer"], out.loc["a", "neuron"], out.loc["a", "vr"]) == (0, 1, 0.5)  # not the article neuron
    assert out.loc["c", "vr"] == 0.5 and out.loc["c", "has_neuron"]
    assert np.isnan(out.loc["b", "vr"]) and not out.loc["b", "has_neuron"]
    assert np.isnan(out.loc["d", "vr"]) and not out.loc["d", "has_neuron"]
    assert int(out.has_neuron.sum()) == 2
    assert alphabet_letters(letters, table, 0.37).set_index("letter").loc["d", "has_neuron"]  # without the universal filter
    # the family follows the same rule: the letter's own unigram label only
    fam = family_of(table.best_feature, pd.Series(["token", "unigram", "token", "unigram", "unigram", "unigram"]))
    assert list(fam) == ["token class", "alphabet", "token class", "alphabet", "alphabet", "alphabet"]
