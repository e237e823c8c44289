"""The typical scales of a model's norms over tokens: the numbers at which
`helpers.models.effective` linearises a write through a norm.

An RMSNorm divides its input by s = sqrt(mean(x^2) + eps) (TransformerLens hook `hook_scale`). For
the norms after attention and after the MLP (Gemma's `ln1_post`, `ln2_post`) and the final norm,
`norm_scales` streams s over valid tokens and returns, per norm, its mean and its harmonic mean
1 / mean(1/s): the scale at which a write of fixed size, linearised per token, has the right mean
effect (the mean of w / s over tokens is w / harmonic mean).

Precision: sums of s and 1/s in float64.
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd
import torch

from helpers.data.tokens import TokenRows
from helpers.streaming.activations import ActivationStream


class ScaleSums:
    """Streaming count, sum of s and sum of 1/s of `n` scales: update / merge / state_dict."""

    def __init__(self, n: int):
        self.n = 0
        self.sum = torch.zeros(n, dtype=torch.float64)
        self.inv = torch.zeros(n, dtype=torch.float64)

    def update(self, s: torch.Tensor) -> None:  # s [tokens, n]
        s = s.double().cpu()
        self.n += int(s.shape[0])
        self.sum += s.sum(0)
        self.inv += (1.0 / s).sum(0)

    def merge(self, other: "ScaleSums") -> None:
        self.n += other.n
        self.sum += other.sum
        self.inv += other.inv

    def state_dict(self) -> dict:
        return {"n": self.n, "sum": self.sum, "inv": self.inv}

    def load_state_dict(self, st: dict) -> None:
        self.n, self.sum, self.inv = int(st["n"]), st["sum"].double(), st["inv"].double()


def scale_hooks(model) -> list[tuple[str, int, str]]:
    """(hook name, layer, norm) of every norm after attention or MLP, and of the final norm (layer
    -1): the norms whose scale sets the size of a write (pre-norms rescale what a layer reads)."""
    out = []
    if model.cfg.use_normalization_before_and_after:
        for l in range(model.cfg.n_layers):
            out += [(f"blocks.{l}.{k}.hook_scale", l, k) for k in ("ln1_post", "ln2_post")]
    out.append(("ln_final.hook_scale", -1, "ln_final"))
    return out


@torch.no_grad()
def norm_scales(model, rows: TokenRows | torch.Tensor, drop_ids: Sequence[int], batch_size: int = 8,
                verbose: bool = False) -> pd.DataFrame:
    """Per norm of `scale_hooks`: columns layer, norm, mean_scale, harmonic_scale, n_tokens, over
    the valid tokens of `rows` (not in `drop_ids`). One pass, without the unembedding."""
    hooks = scale_hooks(model)
    names = [h for h, _, _ in hooks]
    stream = ActivationStream({"m": model}, rows, names, batch_size, drop_ids,
                              lambda: {"s": ScaleSums(len(names))}, desc="norm scales", verbose=verbose,
                              device=model.cfg.device)
    for batch in stream:
        stream.accs["s"].update(torch.cat([batch.acts["m"][n].reshape(-1, 1) for n in names], dim=1))
    acc = stream.merged()["s"]
    n = max(acc.n, 1)
    return pd.DataFrame({"layer": [l for _, l, _ in hooks], "norm": [k for _, _, k in hooks],
                         "mean_scale": (acc.sum / n).numpy(), "harmonic_scale": (n / acc.inv).numpy(),
                         "n_tokens": acc.n})
