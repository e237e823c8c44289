"""Benchmark the chunk size of the streaming accumulators (`StreamingMoments`, `SignedLogHistogram`)
on a CPU: the default (`default_chunk_elems`) against 1 << 22 elements per chunk.

Both update fresh accumulators with the same activations ([tokens, neurons] fp32, one layer of
Gemma 3 270M by default) in one process, alternating over `--rounds`; the reported ratios are the
medians of the within-round ratios (default time / 1 << 22 time), and the largest differences of
the results are printed (the chunking changes only the order of float64 sums). The last line
printed is one JSON object.

    python benchmarks/accumulators.py
    python benchmarks/accumulators.py --neurons 512 --tokens 8192
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from helpers.streaming.accumulators import SignedLogHistogram, StreamingMoments


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--neurons", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    torch.manual_seed(0)
    x = 3 * torch.randn(a.tokens, a.neurons) + 1
    old = 1 << 22
    r_mom, r_hist = [], []
    for _ in range(a.rounds):
        t_new, new = timed(lambda: StreamingMoments(a.neurons).update(x))
        t_old, ref = timed(lambda: StreamingMoments(a.neurons, chunk_elems=old).update(x))
        r_mom.append(t_new / t_old)
        t_new, h_new = timed(lambda: SignedLogHistogram(a.neurons, split_sign=False).update(x))
        t_old, h_ref = timed(lambda: SignedLogHistogram(a.neurons, split_sign=False, chunk_elems=old).update(x))
        r_hist.append(t_new / t_old)
    diff = {"kurtosis_rel": float(((new.kurtosis() - ref.kurtosis()) / ref.kurtosis()).abs().max()),
            "skew_abs": float((new.skew() - ref.skew()).abs().max()),
            "histogram_counts": int((h_new.counts - h_ref.counts).abs().max())}
    result = {"tokens": a.tokens, "neurons": a.neurons, "moments_default_over_4M": statistics.median(r_mom),
              "histogram_default_over_4M": statistics.median(r_hist), "max_diff": diff,
              "chunk_elems": {"moments": StreamingMoments(a.neurons).chunk_elems,
                              "histogram": SignedLogHistogram(a.neurons).chunk_elems},
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.processor() or platform.machine()}
    print(f"default / 1<<22 chunks: moments {result['moments_default_over_4M']:.2f}, histogram "
          f"{result['histogram_default_over_4M']:.2f}; largest differences {diff}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
