"""Benchmark a forward pass the chapters share instead of repeating.

SmolLM2-135M's neuron statistics on N tokens (chapter 02: 32,768), with the half-token table of
its convergence check written from the same pass (`member_neuron_stats(..., prefixes=[N // 2])`),
against the two separate passes it replaces, in alternating order over `--rounds` rounds in one
process (shared machines drift: the ratio reported is the median of the within-round ratios).
Every run writes into a fresh temporary folder; only the token rows come from the book's cache.
The last line printed is one JSON object.

    python benchmarks/shared_passes.py                       # ~12 min on 2 cores without bf16
    python benchmarks/shared_passes.py --tokens 8192 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time

import torch

from helpers.models import families
from helpers.properties import neuron_stats
from helpers.core import presets


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_prefix(params: dict, n_tokens: int, rounds: int) -> dict:
    single = families.load_family(params["single_model"], params)
    single.load(single.reference)  # loaded once, outside the timings

    def shared() -> None:
        art = tempfile.mkdtemp()
        neuron_stats.member_neuron_stats(single, n_tokens, art, batch_size=8, prefixes=[n_tokens // 2], verbose=False)
        t = timed(lambda: neuron_stats.member_neuron_stats(single, n_tokens // 2, art, batch_size=8, verbose=False))
        assert t < 5, f"the half-token table was not read back from the shared pass ({t:.1f} s)"

    def separate() -> None:
        art = tempfile.mkdtemp()
        neuron_stats.member_neuron_stats(single, n_tokens, art, batch_size=8, verbose=False)
        neuron_stats.member_neuron_stats(single, n_tokens // 2, art, batch_size=8, verbose=False)

    ratios, times = [], {"shared": [], "separate": []}
    for r in range(rounds):
        order = [("shared", shared), ("separate", separate)]
        for name, fn in (order if r % 2 == 0 else order[::-1]):
            times[name].append(timed(fn))
        ratios.append(times["shared"][-1] / times["separate"][-1])
    return {"n_tokens": n_tokens, "rounds": rounds, "shared_s": round(min(times["shared"]), 1),
            "separate_s": round(min(times["separate"]), 1), "ratio_shared_to_separate": round(statistics.median(ratios), 3)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="default")
    ap.add_argument("--tokens", type=int, default=32_768, help="SmolLM2 tokens (chapter 02 uses 32,768)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    params = presets.load_preset(args.preset)
    out = {"cpu": platform.processor() or platform.machine(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "threads": torch.get_num_threads(), "prefix": bench_prefix(params, args.tokens, args.rounds)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
