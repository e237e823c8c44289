"""The neuron browser: joined per-neuron tables, cards checked against a direct computation, and
the page drawn in headless Chromium from its shipped data."""
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from helpers.book import browser
from helpers.core import report
from helpers.models.loading import init_model

ROOT = Path(__file__).resolve().parents[1]


def test_published_tables_join_per_model(tmp_path):
    from helpers.core.presets import load_preset

    params = load_preset("smoke", artifacts_dir=str(tmp_path))
    a = pd.DataFrame({"layer": [0, 0, 1], "neuron": [1, 2, 1], "x": [0.1, 0.2, 0.3]})
    b = pd.DataFrame({"layer": [0, 1], "neuron": [2, 1], "fam": ["unigram", "position"]})
    report.publish_neurons("01_x", params, a, "m1", {"x": "excess"})
    report.publish_neurons("03_y", params, b, "m1", {"fam": "family"})
    report.publish_neurons("03_y", params, b, "m2", {"fam": "family"})
    t = browser.published_neurons(tmp_path / "results" / "smoke" / "neurons")
    assert list(t.columns) == ["model", "layer", "neuron", "excess", "family"]
    m1 = t[t.model == "m1"].set_index(["layer", "neuron"])
    assert len(m1) == 3 and m1.loc[(0, 2), "family"] == "unigram" and pd.isna(m1.loc[(0, 1), "family"])
    assert len(t[t.model == "m2"]) == 2 and t[t.model == "m2"].excess.isna().all()
    with pytest.raises(KeyError, match="no column"):
        report.publish_neurons("01_x", params, a, "m1", {"missing": "m"})


def test_cards_match_a_direct_computation(tiny_arch):
    model = init_model(tiny_arch, seed=3)
    torch.manual_seed(0)
    rows = torch.randint(1, tiny_arch["d_vocab"], (6, 12))
    rows[:, 0] = 0  # BOS, never a top token
    strings = [f"t{i}" for i in range(tiny_arch["d_vocab"])]
    neurons = pd.DataFrame({"layer": [0, 1], "neuron": [3, 5]})
    cards = browser.neuron_cards(model, rows, neurons, strings, strings, drop_ids=[0], batch_size=4, k=2, window=3, n_vocab=4)
    _, cache = model.run_with_cache(rows)
    for l, n in [(0, 3), (1, 5)]:
        acts = cache[f"blocks.{l}.mlp.hook_post"][..., n].clone()
        acts[:, 0] = float("-inf")
        best = acts.flatten().topk(2).values
        card = cards[f"L{l}.{n}"]
        assert [c["values"][-1] for c in card["contexts"]] == pytest.approx(best.tolist(), abs=2e-2)  # fp16 storage
        r, p = divmod(int(acts.flatten().argmax()), rows.shape[1])
        assert card["contexts"][0]["tokens"] == [strings[t] for t in rows[r, max(1, p - 3):p + 1].tolist()]
        # the direct effect through the final LayerNorm: W_U with its mean over d_model removed (the
        # norm removes the mean of a write), which is W_U itself for a model processed with fold_ln
        w_u = model.W_U - model.W_U.mean(0, keepdim=True)
        effect = model.W_out[l][n] @ w_u
        assert [t for t, _ in card["promoted"]] == [strings[i] for i in effect.topk(4).indices.tolist()]
        assert [t for t, _ in card["suppressed"]] == [strings[i] for i in (-effect).topk(4).indices.tolist()]


def test_assets_hold_the_bundle_and_the_data(tmp_path):
    table = pd.DataFrame({"model": ["m"], "layer": [0], "neuron": [1], "family": ["unigram"], "x": [float("nan")]})
    sizes = browser.write_assets(tmp_path, table, {"m": {"L0.1": {"contexts": [], "promoted": [], "suppressed": []}}})
    assert sizes["circuitsvis.js"] > 100_000 and "CircuitsVis" in (tmp_path / "circuitsvis.js").read_text()[:2000]
    data = json.loads((tmp_path / "neurons" / "data.js").read_text().removeprefix("window.NEURON_BROWSER = ").rstrip(";\n"))
    assert data["columns"] == list(table.columns) and data["rows"] == [["m", 0, 1, "unigram", None]]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no Chromium (`make browser`)")
def test_the_page_draws_a_card_from_its_data_without_errors(tmp_path):
    spec = importlib.util.spec_from_file_location("check_book", ROOT / "scripts" / "check_book.py")
    check_book = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = check_book
    spec.loader.exec_module(check_book)
    table = pd.DataFrame({"model": ["m", "m"], "layer": [0, 1], "neuron": [1, 2], "family": ["unigram", "position"]})
    card = {"contexts": [{"tokens": ["a", " b"], "values": [0.1, 2.0]}], "promoted": [["x", 1.0]], "suppressed": [["y", -1.0]]}
    browser.write_assets(tmp_path / "_static", table, {"m": {"L0.1": card, "L1.2": card}})
    (tmp_path / "book").mkdir()
    (tmp_path / "book" / "neurons.html").write_text("<html><body>" + browser.page_html() + "</body></html>")
    rep = check_book.check_site(tmp_path, settle_ms=800)[0]
    assert rep.ok and (rep.views_expected, rep.views_drawn) == (1, 1), rep.line()


def test_the_page_lists_the_reference_model_and_the_single_models_analysed_neurons():
    t = pd.DataFrame({"model": ["ref", "ref", "sm", "sm", "sm", "sm"], "layer": [0, 1, 0, 1, 2, 3], "neuron": 0,
                      "family": [None, None, "unigram", None, None, None],
                      "vocabulary class": [None, None, None, "prediction", "none", None]})
    out = browser._browsable(t, "ref")
    assert list(zip(out.model, out.layer)) == [("ref", 0), ("ref", 1), ("sm", 0), ("sm", 1)]


def test_the_page_lists_the_real_models_published_attention_neurons_only():
    col = browser.ATTENTION_COLUMN
    t = pd.DataFrame({"model": ["ref", "sm", "gemma", "gemma"], "layer": [0, 0, 0, 1], "neuron": 0,
                      "family": [None, None, None, None], col: [0.5, None, 3.0, None]})
    assert list(browser._browsable(t, "ref").model) == ["ref"]  # no real model of chapter 06
    out = browser._browsable(t, "ref", ("gemma",))
    assert list(zip(out.model, out.layer)) == [("ref", 0), ("gemma", 0)]
    both = browser._browsable(t, "ref", ("gemma", "sm"))
    assert list(zip(both.model, both.layer)) == [("ref", 0), ("gemma", 0)]  # sm has no score


def test_a_real_models_cards_cover_its_analysed_and_its_attention_neurons_only():
    col = browser.ATTENTION_COLUMN
    rows = pd.DataFrame({"family": ["unigram", None, None], col: [None, 2.0, None],
                         "vocabulary class": [None, None, "prediction"]})
    assert list(browser._carded(rows)) == [True, True, False]
    assert list(browser._carded(rows.drop(columns=[col]))) == [True, False, False]
