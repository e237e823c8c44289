"""Streaming MLP activations of several models at once, on the same tokens.

The paper records the post-activation of every MLP neuron (`blocks.{l}.mlp.hook_post`), over all
layers, dropping the BOS/pad and newline tokens, with the forward pass stopped before the
unembedding. Activations are kept in fp32 here (the reference code cast them to fp16 in the hook;
the correlation accumulators are designed for fp32 inputs).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from .data import valid_token_mask


def hook_names(model, hook: str = "mlp.hook_post") -> list[str]:
    return [f"blocks.{layer}.{hook}" for layer in range(model.cfg.n_layers)]


@torch.no_grad()
def mlp_activations(model, tokens: torch.Tensor, mask: torch.Tensor | None = None, hook: str = "mlp.hook_post") -> torch.Tensor:
    """All-layer MLP activations of `tokens` [batch, pos] -> [valid tokens, n_layers * d_mlp] fp32.

    Layers are concatenated in order (neuron `(l, i)` is column `l * d_mlp + i`); `mask`
    [batch, pos] selects the tokens kept (all when None).
    """
    names = hook_names(model, hook)
    wanted = set(names)
    _, cache = model.run_with_cache(tokens.to(model.cfg.device), names_filter=lambda n: n in wanted,
                                    stop_at_layer=model.cfg.n_layers, return_type=None)
    acts = torch.cat([cache[n] for n in names], dim=-1)  # [batch, pos, L*D]
    if mask is not None:
        acts = acts[mask.to(acts.device)]
    else:
        acts = acts.reshape(-1, acts.shape[-1])
    return acts.float()


def iter_family_activations(models: dict, rows: torch.Tensor, batch_size: int, drop_ids: Sequence[int],
                            start_batch: int = 0, rank: int = 0, world: int = 1,
                            hook: str = "mlp.hook_post") -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Yield `(batch index, {member: [valid tokens, n_neurons]})` for batches of `rows`, every model
    run on the same tokens. Batches `b` with `b % world == rank` belong to this process."""
    n_batches = (len(rows) + batch_size - 1) // batch_size
    for b in range(start_batch, n_batches):
        if b % world != rank:
            continue
        tokens = rows[b * batch_size : (b + 1) * batch_size]
        mask = valid_token_mask(tokens, drop_ids)
        yield b, {name: mlp_activations(m, tokens, mask, hook) for name, m in models.items()}


@torch.no_grad()
def top_activating_contexts(model, rows: torch.Tensor, layer: int, neuron: int, k: int = 5, window: int = 24,
                            batch_size: int = 32, hook: str = "mlp.hook_post") -> list[dict]:
    """The `k` tokens of `rows` where neuron `(layer, neuron)` is most active, each with the
    `window` tokens before it and their activations (for circuitsvis).

    Returns dicts with `row`, `pos`, `activation`, `tokens` [window+1 ids], `acts` [window+1].
    """
    name = f"blocks.{layer}.{hook}"
    per_batch = []
    for i in range(0, len(rows), batch_size):
        tokens = rows[i : i + batch_size].to(model.cfg.device)
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n == name, stop_at_layer=layer + 1, return_type=None)
        per_batch.append(cache[name][..., neuron].float().cpu())
    acts = torch.cat(per_batch)  # [rows, pos]
    acts[:, 0] = float("-inf")  # BOS
    flat = acts.flatten().topk(k)
    out = []
    for val, idx in zip(flat.values.tolist(), flat.indices.tolist()):
        r, p = divmod(idx, acts.shape[1])
        lo = max(1, p - window)
        out.append({"row": r, "pos": p, "activation": val, "tokens": rows[r, lo : p + 1].tolist(),
                    "acts": acts[r, lo : p + 1].tolist()})
    return out
