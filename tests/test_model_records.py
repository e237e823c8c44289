"""The weight-processing record of RMSNorm models and the gated-MLP weight penalty, on tiny
random TransformerLens models."""
import pytest
import torch

from helpers.models import loading as models
from helpers.properties import neuron_stats, significance as property_stats


def _tiny(normalization: str, gated: bool):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_ctx=8, d_head=4, n_heads=4, d_mlp=24, d_vocab=40,
                                  act_fn="silu" if gated else "gelu_new", normalization_type=normalization,
                                  gated_mlp=gated, final_rms=normalization == "RMS", seed=0, device="cpu")
    torch.manual_seed(0)
    raw = HookedTransformer(cfg)
    state = {k: v + 0.3 * torch.randn_like(v) if v.is_floating_point() else v for k, v in raw.state_dict().items()}
    return cfg, state


def _centred(normalization: str) -> bool:
    """Does TransformerLens centre W_out when asked to (center_writing_weights=True)?"""
    from transformer_lens import HookedTransformer

    cfg, state = _tiny(normalization, gated=normalization == "RMS")
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(state, fold_ln=True, center_writing_weights=True, center_unembed=True,
                                      fold_value_biases=True, refactor_factored_attn_matrices=False)
    return bool(model.blocks[0].mlp.W_out.mean(-1).abs().max() < 1e-5)


def test_transformer_lens_centres_writing_weights_only_for_layernorm_and_the_record_says_so():
    assert _centred("LN")  # the check can tell centred from not
    assert not _centred("RMS")  # asked for, not done
    assert models.SMOLLM2_PROCESSING["center_writing_weights"] is False
    assert models.PROCESSING["center_writing_weights"] is True


def test_gated_l2_penalty_leaves_out_the_linear_branch_and_full_penalty_adds_it():
    from transformer_lens import HookedTransformer

    cfg, state = _tiny("RMS", gated=True)
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(state, **models.SMOLLM2_PROCESSING, refactor_factored_attn_matrices=False)
    stats = neuron_stats.weight_statistics(model)
    mlp = model.blocks[0].mlp
    gate, lin, out = (mlp.W_gate.detach().double().norm(dim=0) ** 2, mlp.W_in.detach().double().norm(dim=0) ** 2,
                      mlp.W_out.detach().double().norm(dim=1) ** 2)
    assert stats.l2_penalty.to_numpy() == pytest.approx((gate + out).numpy())
    assert property_stats.full_l2_penalty(stats).to_numpy() == pytest.approx((gate + lin + out).numpy())
    assert (property_stats.full_l2_penalty(stats) > stats.l2_penalty).all()
