"""What a neuron or a head actually writes, once the norms around it are accounted for.

In GPT-2 a neuron adds `act * w_out` to the residual stream and a direction d of the residual
stream moves the logits by `d @ W_U` (up to the final LayerNorm's scale). Gemma 2 and 3 add norms
that change these numbers (TransformerLens: `use_normalization_before_and_after`, `use_qk_norm`):

- **After the MLP** (`ln2_post`, an RMSNorm with weight g): the MLP's output m is rescaled to
  g * m / s(m), s(m) = sqrt(mean(m^2) + eps), before it reaches the residual stream. Linearised at a
  fixed scale s, one unit of neuron n's activation writes `w_out[n] * g / s` (`output_directions`).
  The exact change when the neuron is removed from its layer is `neuron_write`. The direction is
  `w_out * g`; s is a positive number per token (its typical value over tokens comes from
  `helpers.streaming.norms`), so it sets the size of a write and leaves its direction alone.
- **After attention** (`ln1_post`): likewise, a head's output W_O z reaches the residual stream as
  g * W_O z / s; `effective_W_O` is W_O * g (the per-position scale s is shared by every head and
  every key of a position).
- **Per-head query and key norms** (`q_norm`, `k_norm`): q = g_q * (x W_Q) / s_q, so the query
  direction a residual direction x moves is x W_Q * g_q (`effective_W_Q`); keys are normalised the
  same way (`apply_norm`).
- **The final norm's weight** (from 0.19 to 301 on Gemma 3 270M): logits are
  (g_f * x / s_f) W_U, so a residual direction d moves them by `(d / s_f) @ effective_unembed`,
  with `effective_unembed = diag(g_f) W_U` (centred over d_model under a LayerNorm). After
  `fold_ln`, g_f is already folded into `W_U` and this is `W_U` itself.

Without these norms every function returns the plain weights, so the same code serves GPT-2-style,
Llama-style and Gemma-style models. The embedding scale of Gemma (sqrt(d_model)) is multiplied into
`W_E` at conversion and needs nothing here.

Precision: float32 (the weights' dtype).
"""

from __future__ import annotations

import torch

from helpers.models.loading import neuron_weights


def _norm_weight(norm) -> torch.Tensor | None:
    """The weight of an RMSNorm / LayerNorm module, None for the weightless (folded) ones. (A
    LayerNorm's bias adds a constant: it cancels in every change these functions describe.)"""
    if norm is None:
        return None
    w = getattr(norm, "w", None)
    return None if w is None else w.detach()


def post_mlp_norm(model, layer: int):
    """The norm applied to the MLP output of `layer` before the residual stream (`ln2_post`), or None."""
    return model.blocks[layer].ln2_post if model.cfg.use_normalization_before_and_after else None


def post_attn_norm(model, layer: int):
    """The norm applied to the attention output of `layer` before the residual stream (`ln1_post`),
    or None."""
    return model.blocks[layer].ln1_post if model.cfg.use_normalization_before_and_after else None


def apply_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """The RMSNorm `norm` applied to `x` [..., length] without running its hooks (None: identity)."""
    if norm is None:
        return x
    if "LayerNorm" in type(norm).__name__:
        raise NotImplementedError(f"{type(norm).__name__}: only RMSNorm is applied here")
    y = x / (x.float().pow(2).mean(-1, keepdim=True) + norm.eps).sqrt().to(x)
    w = _norm_weight(norm)
    return y if w is None else y * w.to(y)


def output_directions(model, layer: int, scale: torch.Tensor | float | None = None) -> torch.Tensor:
    """[d_mlp, d_model] float32: what one unit of each neuron's activation adds to the residual stream.

    Without a norm after the MLP: `w_out` (exact). With one (weight g): `w_out * g / scale`, the
    write linearised at the norm's scale held fixed at `scale` (the RMS of the MLP's output; a
    number, or a tensor broadcasting against [d_mlp, d_model]); `scale=None` leaves it out, giving
    the direction and the relative sizes (the units are then "per unit of the MLP output's RMS").
    Holding the scale fixed leaves out the part of the change along the MLP output itself (the
    norm's own reaction to the write), which is small when one neuron's write is a small part of m."""
    w_out = neuron_weights(model, layer).w_out.float()
    g = _norm_weight(post_mlp_norm(model, layer))
    if g is None:
        return w_out
    out = w_out * g.float()
    return out if scale is None else out / torch.as_tensor(scale, dtype=out.dtype, device=out.device)


@torch.no_grad()
def neuron_write(model, layer: int, post: torch.Tensor, neuron: int) -> torch.Tensor:
    """[..., d_model]: how much of the residual stream at each token is neuron `neuron`'s, measured
    as the change when its activation is set to zero in its own layer (nothing downstream re-run).

    `post` [..., d_mlp] are the layer's activations (`mlp.hook_post`) at those tokens. Without a norm
    after the MLP this is `post[..., neuron] * w_out[neuron]`; with one, norm(m) - norm(m - a w_out),
    m = post @ W_out + b_out (exact, not linearised)."""
    mlp = model.blocks[layer].mlp
    w = neuron_weights(model, layer).w_out[neuron].float()
    a = post[..., neuron].float()
    norm = post_mlp_norm(model, layer)
    if norm is None:
        return a[..., None] * w
    m = post.float() @ mlp.W_out.float() + mlp.b_out.float()
    return apply_norm(norm, m) - apply_norm(norm, m - a[..., None] * w)


def effective_unembed(model) -> torch.Tensor:
    """[d_model, d_vocab] float32: the map from a residual-stream direction d, divided by the final
    norm's scale s_f at a token, to the change of the logits: Δlogits = (d / s_f) @ effective_unembed
    (exact with s_f held fixed: the direct effect).

    diag(g_f) W_U when the final norm still has its weight g_f; W_U when `fold_ln` has folded it in.
    Under a LayerNorm (LN, LNPre) the mean over d_model is removed first, as the norm does; a W_U
    that `fold_ln` has already centred (to float32 rounding) is returned as it is, so that a folded
    model's numbers are exactly those of its W_U."""
    wu = model.W_U.detach().float()
    g = _norm_weight(model.ln_final) if hasattr(model, "ln_final") else None
    if g is not None:
        wu = g.float()[:, None] * wu
    if model.cfg.normalization_type in ("LN", "LNPre"):
        mean = wu.mean(0, keepdim=True)
        if mean.abs().max() > 1e-5 * wu.abs().max():
            wu = wu - mean
    return wu


def effective_W_O(model, layer: int) -> torch.Tensor:
    """[n_heads, d_head, d_model] float32: W_O times the weight of the norm after attention (W_O
    without one): what a head's output reaches the residual stream as, up to the norm's positive
    scale at the query position."""
    wo = model.blocks[layer].attn.W_O.detach().float()
    g = _norm_weight(post_attn_norm(model, layer))
    return wo if g is None else wo * g.float()


def effective_W_Q(model, layer: int) -> torch.Tensor:
    """[n_heads, d_model, d_head] float32: W_Q times the weight of the per-head query norm (W_Q
    without one): the query a residual direction moves, up to the norm's positive scale."""
    attn = model.blocks[layer].attn
    wq = attn.W_Q.detach().float()
    g = _norm_weight(getattr(attn, "q_norm", None)) if model.cfg.use_qk_norm else None
    return wq if g is None else wq * g.float()


def key_norm(model, layer: int):
    """The per-head key norm of `layer` (`k_norm`), or None."""
    return getattr(model.blocks[layer].attn, "k_norm", None) if model.cfg.use_qk_norm else None
