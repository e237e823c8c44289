"""Benchmark the entropy chapter's last-layer shortcut against full intervened passes.

Both sweeps fix the same last-layer neuron at the same values (total and direct effect) on the same
token rows, in one process, alternating over `--rounds`; the reported ratio is the median of the
within-round ratios (shortcut time / full time), and the largest difference of the per-row metric
sums between the two is printed. With `--model gemma3-270m` (default; needs `make gemma`) the real
model of the book, otherwise a randomly initialised model with the same vocabulary size and width.
The last line printed is one JSON object.

    python benchmarks/last_layer_shortcut.py                       # Gemma 3 270M, 2 x 256 tokens
    python benchmarks/last_layer_shortcut.py --model random --rounds 2
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch

from helpers.entropy import interventions as iv


def load(name: str):
    if name == "random":
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        cfg = HookedTransformerConfig(n_layers=2, d_model=640, n_heads=4, d_head=160, d_mlp=2048, n_ctx=512,
                                      d_vocab=262144, act_fn="gelu", normalization_type="LNPre", seed=0)
        return HookedTransformer(cfg).eval()
    from helpers.core.presets import load_preset
    from helpers.models.families import load_family

    fam = load_family(name, load_preset("default"))
    return fam.load(fam.reference)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--values", type=int, default=4, help="grid points (each in total and direct mode)")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    model = load(a.model)
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(10, model.cfg.d_vocab, (a.rows, a.ctx), generator=g)
    grid = iv.paper_grid()[:: max(1, len(iv.paper_grid()) // a.values)][: a.values]
    targets = [iv.Target(model.cfg.n_layers - 1, 5, grid * 0.5, grid, "bench")]
    ratios = []
    for _ in range(a.rounds):
        t0 = time.perf_counter()
        fast = iv.intervention_sweep(model, rows, targets, [], batch_size=a.rows, verbose=False, shortcut=True)
        t_fast = time.perf_counter() - t0
        t0 = time.perf_counter()
        full = iv.intervention_sweep(model, rows, targets, [], batch_size=a.rows, verbose=False, shortcut=False)
        t_full = time.perf_counter() - t0
        ratios.append(t_fast / t_full)
    key = ["row", "mode", "grid"]
    fast, full = (t.sort_values(key).reset_index(drop=True) for t in (fast, full))
    diff = {k: float(np.abs(fast[k] / fast.n - full[k] / full.n).max()) for k in iv.METRICS}
    result = {"model": a.model, "d_vocab": model.cfg.d_vocab, "tokens": a.rows * a.ctx, "replicas": 2 * len(grid),
              "shortcut_over_full": statistics.median(ratios), "max_abs_diff_of_means": diff,
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.processor() or platform.machine()}
    print(f"shortcut / full time: {result['shortcut_over_full']:.3f} for {result['replicas']} replicas "
          f"(the unintervened pass included in both); largest differences of the means {diff}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
