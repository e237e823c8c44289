import time

import numpy as np
import pytest
import torch

from helpers.models import families, loading as models
from helpers.data.hub import HubUnreachable


def test_saved_then_loaded_model_gives_same_log_probs(tmp_path, tiny_arch):
    raw = models.init_model(tiny_arch, seed=5)
    models.save_model(raw, tmp_path / "m", tiny_arch)
    loaded = models.load_model(tmp_path / "m")
    unprocessed = models.load_model(tmp_path / "m", processing={"fold_ln": False, "center_writing_weights": False,
                                                                "center_unembed": False, "fold_value_biases": False})
    toks = torch.randint(0, tiny_arch["d_vocab"], (3, tiny_arch["n_ctx"]))
    ref = raw(toks).log_softmax(-1)
    assert torch.allclose(unprocessed(toks).log_softmax(-1), ref, atol=1e-6)
    # Processing changes the weights but not the function (up to a constant shift of the logits).
    assert torch.allclose(loaded(toks).log_softmax(-1), ref, atol=1e-4)
    assert loaded.processing == models.PROCESSING
    assert not torch.allclose(loaded.blocks[0].mlp.W_in, raw.blocks[0].mlp.W_in)


def test_center_unembed_centres_each_residual_direction_over_the_vocabulary(tmp_path, tiny_arch):
    """`center_unembed` subtracts, from every row of W_U (one residual direction) and from b_U, its
    mean over the vocabulary: logits move by a constant per position, so log-probabilities do not.
    Chapters 04-05 read vocabulary effects (W_out @ W_U) from these centred weights."""
    raw = models.init_model(tiny_arch, seed=6)
    with torch.no_grad():
        # an offset per residual direction, shared by every token (zero mean over d_model, so the
        # centring over d_model that fold_ln does leaves it): only center_unembed removes it
        raw.unembed.W_U.add_(torch.linspace(-0.5, 0.5, tiny_arch["d_model"])[:, None])
        raw.unembed.b_U.add_(1.0)
    models.save_model(raw, tmp_path / "m", tiny_arch)
    proc = dict(models.PROCESSING)
    centred = models.load_model(tmp_path / "m", processing=proc)
    plain = models.load_model(tmp_path / "m", processing={**proc, "center_unembed": False})
    assert centred.W_U.mean(-1).abs().max() < 1e-6 and abs(float(centred.b_U.mean())) < 1e-6
    assert plain.W_U.mean(-1).abs().max() > 0.4  # without it the offset stays
    assert torch.allclose(centred.W_U, plain.W_U - plain.W_U.mean(-1, keepdim=True), atol=1e-6)
    toks = torch.randint(0, tiny_arch["d_vocab"], (2, tiny_arch["n_ctx"]))
    assert torch.allclose(centred(toks).log_softmax(-1), plain(toks).log_softmax(-1), atol=1e-5)


def test_init_depends_only_on_seed(tiny_arch):
    a, b, c = (models.init_model(tiny_arch, s) for s in (1, 1, 2))
    assert torch.equal(a.W_E, b.W_E) and not torch.equal(a.W_E, c.W_E)


def test_unknown_family_lists_known_ones():
    with pytest.raises(families.UnknownFamily) as e:
        families.load_family("gpt-5")
    for name in ("embedded", "stanford-gpt2-small", "pythia-160m", "smollm2-135m"):
        assert name in str(e.value)


@pytest.mark.parametrize("name", ["stanford-gpt2-small", "stanford-gpt2-medium", "pythia-160m"])
def test_online_family_fails_fast_offline_with_advice(name, offline):
    t0 = time.time()
    with pytest.raises(HubUnreachable, match="params/default.yaml"):
        families.load_family(name)
    assert time.time() - t0 < 5


def test_hub_member_names_are_transformer_lens_names():
    from transformer_lens.loading_from_pretrained import get_official_model_name

    official = {m: get_official_model_name(m) for ms in families.HUB_FAMILIES.values() for m in ms}
    assert official["stanford-gpt2-small-a"] == "stanford-crfm/alias-gpt2-small-x21"
    assert official["stanford-gpt2-medium-e"] == "stanford-crfm/eowyn-gpt2-medium-x777"
    assert official["pythia-160m-seed3"] == "EleutherAI/pythia-160m-seed3"
    assert len(set(official.values())) == 14


@pytest.mark.slow
def test_neuron_weights_on_full_size_gpt2_small_config():
    """The online path's weight code, on GPT2-small's real shapes with random weights."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, n_ctx=1024, d_vocab=50257,
                                  act_fn="gelu_new", normalization_type="LN", original_architecture="GPT2LMHeadModel")
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(model.state_dict(), **models.PROCESSING)
    nw = models.neuron_weights(model, 11)
    assert nw.w_in.shape == (768, 3072) and nw.w_out.shape == (3072, 768) and nw.b_in.shape == (3072,)
    assert not nw.gated
    assert models.describe_model(model)["n_neurons"] == 36864
    # centre_writing_weights: every neuron's output weight has zero mean over d_model
    assert nw.w_out.mean(1).abs().max() < 1e-6


def test_neuron_weights_on_gated_mlp():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=24, n_ctx=8, d_vocab=11,
                                  act_fn="silu", normalization_type="RMS", gated_mlp=True, positional_embedding_type="rotary",
                                  rotary_dim=8, original_architecture="LlamaForCausalLM")
    model = HookedTransformer(cfg)
    nw = models.neuron_weights(model, 0)
    assert nw.gated and nw.w_in.shape == (16, 24) and nw.w_lin.shape == (16, 24)
    assert torch.equal(nw.w_in, model.blocks[0].mlp.W_gate)
    assert torch.equal(nw.b_in, torch.zeros(24))


@pytest.mark.slow
def test_smollm2_loads_offline_and_matches_hugging_face():
    from helpers.core.presets import load_preset

    fam = families.load_family("smollm2-135m", load_preset("smoke"))
    model = fam.load("smollm2-135m")
    hf = models.smollm2_hf_model()
    toks = fam.codec.encode("The capital of France is Paris. def f(x): return x + 1")
    with torch.no_grad():
        diff = (model(toks).log_softmax(-1) - hf(toks).logits.log_softmax(-1)).abs().max()
    assert diff < 1e-3
    info = models.describe_model(model)
    assert info["gated_mlp"] and info["n_layers"] == 30 and info["d_mlp"] == 1536
    assert fam.codec.bos_id in fam.codec.drop_ids and fam.codec.newline_id in fam.codec.drop_ids
    # the family loads the processed weights cached under the artifacts: checked when made, and
    # the same logits as processing the GGUF again
    conv = models.smollm2_converted(load_preset("smoke").artifacts_path)
    assert conv.meta["max_abs_logit_diff_cached_vs_processed"] == 0.0 and model.cfg.normalization_type == "RMSPre"
    with torch.no_grad():
        assert torch.equal(model(toks), models.load_smollm2("cpu")(toks))
    assert model.tokenizer is fam.codec.tokenizer  # read once, not again by TransformerLens


@pytest.mark.parametrize("preset", ["gpt2-small", "gpt2-medium", "pythia-160m"])
def test_paper_scale_presets_name_a_member_of_their_family(preset, tmp_path):
    """The reference of every online preset resolves to a member, without the hub."""
    from helpers.core.presets import load_preset

    params = load_preset(preset)
    fam = families._hub_family(params.family, "cpu", tmp_path)
    assert fam.member(params.reference) in families.HUB_FAMILIES[params.family]


@pytest.mark.slow
def test_full_size_pythia_160m_config_with_random_weights():
    """The online Pythia path's weight and activation code, on Pythia-160m's real shapes (rotary,
    parallel attention, untied embeddings; from the paper registry's Table 1) with random weights."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from helpers.core import paper
    from helpers.streaming.activations import mlp_activations

    v = {k: paper.value(k, paper.PYTHIA) for k in ("n_layers", "d_model", "n_heads", "d_mlp", "d_vocab", "act_fn")}
    cfg = HookedTransformerConfig(n_layers=v["n_layers"], d_model=v["d_model"], n_heads=v["n_heads"],
                                  d_head=v["d_model"] // v["n_heads"], d_mlp=v["d_mlp"], n_ctx=256, d_vocab=v["d_vocab"],
                                  act_fn=v["act_fn"], normalization_type="LN", positional_embedding_type="rotary",
                                  rotary_dim=16, parallel_attn_mlp=True, original_architecture="GPTNeoXForCausalLM", seed=0)
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(model.state_dict(), **models.PROCESSING)
    nw = models.neuron_weights(model, v["n_layers"] - 1)
    assert nw.w_out.shape == (3072, 768) and not nw.gated
    assert models.describe_model(model)["n_neurons"] == 36864
    acts = mlp_activations(model, torch.randint(0, v["d_vocab"], (1, 16)))
    assert acts.shape[-1] == v["n_layers"] * v["d_mlp"] and torch.isfinite(acts).all()


def test_a_damaged_or_mismatched_converted_weights_file_says_to_convert_again(tmp_path):
    """The cached conversions (Gemma, SmolLM2) load through one checked reader: a file that cannot be
    read, or whose tensors do not fit the model, is a DamagedFile naming the folder to delete."""
    from safetensors.torch import save_file
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from helpers.core.cache import DamagedFile

    model = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=8, n_heads=1, d_head=8, d_mlp=8, n_ctx=4,
                                                      d_vocab=5, act_fn="gelu", normalization_type="LN"))
    good = tmp_path / "good.safetensors"
    save_file({k: v.detach().clone() + 1 for k, v in model.named_parameters()}, str(good))
    models.load_converted_weights(model, good, tmp_path)
    assert float(model.b_U[0]) == 1.0  # b_U was zeros: every parameter came from the file
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(DamagedFile, match=r"unreadable .*delete .* to convert again"):
        models.load_converted_weights(model, bad, tmp_path)
    odd = tmp_path / "odd.safetensors"
    save_file({"unembed.W_U": model.W_U.detach().clone(), "stray": torch.zeros(1)}, str(odd))
    with pytest.raises(DamagedFile, match=r"do not fit the config .*unexpected \['stray'\]"):
        models.load_converted_weights(model, odd, tmp_path)
