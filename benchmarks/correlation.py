"""Benchmark ``StreamingPearson.update`` against the matmul peak and the paper's algorithm.

Measured in one process on the same fp16 inputs (GPT2-small-like block by default:
3,072 x 3,072 neurons, batches of 4,096 tokens):

* ``matmul_peak``: a plain fp32 ``x.T @ y`` of the same shapes (inputs pre-cast),
  the faster of a freshly allocated result and a pre-allocated ``out=``;
* ``update``: ``StreamingPearson.update`` (cast, shift, product, sums), plus the
  fp64 flush amortised over the batches between flushes;
* ``reference``: the paper's per-batch algorithm: fp32 ``x.T @ y``, ``.cpu()``,
  ``acc += prod.double()`` on the host, sums and sums of squares in fp16.

Each round times ``--steps`` calls of every case back to back, in a rotating
order, after a warm-up.  Shared machines drift by 10-20% between seconds, so the
reported ratios are the **median over rounds of the within-round ratios** (each
ratio compares cases measured seconds apart); best-of-rounds times and their
ratios are printed too.

A second measurement times one batch of a **whole family pass** (``run_family``): the
reference model against 4 other seeds and a rotation baseline of each, 4 layers of 768
neurons per model, as ``helpers.correlations.correlate`` computes it (one product against all seeds plus
one small covariance per layer, from which the baseline is derived) and as the paper's eight
runs compute it (per layer pair, per run, plus the per-batch rotation).  The update-level
ratio isolates the accumulator; the family ratio is what a correlation run costs.

``--check-precision-tokens N`` also streams N tokens
with means 100x the std and reports the max abs error against a float64
reference.  The last line printed is one JSON object.

    python benchmarks/correlation.py                     # update + family pass, ~2 min on 2 cores
    python benchmarks/correlation.py --n-a 256 --n-b 256 --check-precision-tokens 10000000
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from helpers.correlations.pearson import StreamingPearson


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_inputs(n_a: int, n_b: int, tokens: int, n_batches: int, device, seed: int = 0):
    """fp16 activation-like batches ``([tokens, n_a], [tokens, n_b])`` with nonzero means."""
    g = torch.Generator().manual_seed(seed)
    mean_a = torch.randn(n_a, generator=g) * 2
    mean_b = torch.randn(n_b, generator=g) * 2
    out = []
    for _ in range(n_batches):
        x = torch.randn(tokens, n_a, generator=g) + mean_a
        y = torch.randn(tokens, n_b, generator=g) * 0.5 + mean_b
        y[:, : min(n_a, n_b)] += 0.3 * x[:, : min(n_a, n_b)]
        out.append((x.half().to(device), y.half().to(device)))
    return out


class ReferenceAccumulator:
    """The paper's algorithm: per-batch fp32 product added on the host in fp64, sums in fp16.

    With ``layer_size``, one product per pair of layers (as the paper's code loops), each added
    into its block of the fp64 array; without it, the whole ``[n_a, n_b]`` block is one layer pair.
    """

    def __init__(self, n_a: int, n_b: int, device, layer_size: int | None = None) -> None:
        self.layer_size = layer_size
        self.acc = torch.zeros(n_a, n_b, dtype=torch.float64)  # host
        self.sum_a = torch.zeros(n_a, dtype=torch.float16, device=device)
        self.sum_b = torch.zeros(n_b, dtype=torch.float16, device=device)
        self.sq_a = torch.zeros(n_a, dtype=torch.float16, device=device)
        self.sq_b = torch.zeros(n_b, dtype=torch.float16, device=device)

    def correlation(self, n: int) -> torch.Tensor:
        """Uncentred float64 formula from the fp16 sums (as the reference did)."""
        sa, sb = self.sum_a.double().cpu() / n, self.sum_b.double().cpu() / n
        va = self.sq_a.double().cpu() / n - sa**2
        vb = self.sq_b.double().cpu() / n - sb**2
        cov = self.acc / n - torch.outer(sa, sb)
        return cov / torch.outer(va.sqrt(), vb.sqrt())

    def update(self, x16: torch.Tensor, y16: torch.Tensor) -> None:
        if self.layer_size is None:
            prod = x16.float().T @ y16.float()
            self.acc += prod.cpu().double()
        else:
            d = self.layer_size
            xf, yf = x16.float(), y16.float()
            for i in range(0, xf.shape[1], d):
                for j in range(0, yf.shape[1], d):
                    prod = xf[:, i : i + d].T @ yf[:, j : j + d]
                    self.acc[i : i + d, j : j + d] += prod.cpu().double()
        self.sum_a += x16.sum(0)
        self.sum_b += y16.sum(0)
        self.sq_a += (x16 * x16).sum(0)
        self.sq_b += (y16 * y16).sum(0)


def time_calls(fn, batches, steps: int, device) -> float:
    """Seconds per call of ``fn(x, y)`` over ``steps`` calls cycling through ``batches``."""
    _sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        x, y = batches[i % len(batches)]
        fn(x, y)
    _sync(device)
    return (time.perf_counter() - t0) / steps


def run_speed(args) -> dict:
    device = torch.device(args.device)
    batches = make_inputs(args.n_a, args.n_b, args.tokens, 2, device)
    batches32 = [(x.float(), y.float()) for x, y in batches]

    acc = StreamingPearson(args.n_a, args.n_b, device=device, precision=args.precision)
    ref = ReferenceAccumulator(args.n_a, args.n_b, device)
    out = torch.empty(args.n_a, args.n_b, device=device)

    def peak(x, y):
        return x.T @ y

    def peak_out(x, y):
        return torch.mm(x.T, y, out=out)

    # Warm-up: allocations, scratch buffers, BLAS/cuBLAS handles.
    for x, y in batches:
        acc.update(x, y)
        ref.update(x, y)
    for x, y in batches32:
        peak(x, y)
        peak_out(x, y)

    cases = {
        "matmul_peak": (peak, batches32),
        "matmul_peak_out": (peak_out, batches32),
        "update": (acc.update, batches),
        "reference": (ref.update, batches),
    }
    names = list(cases)
    times: dict[str, list[float]] = {k: [] for k in names}
    flush_times = []
    for r in range(args.repeats):
        k0 = r % len(names)
        for k in names[k0:] + names[:k0]:  # rotate the order each round
            fn, data = cases[k]
            times[k].append(time_calls(fn, data, args.steps, device))
        # One flush per round (the block is non-empty after the update steps).
        _sync(device)
        t0 = time.perf_counter()
        acc.flush()
        _sync(device)
        flush_times.append(time.perf_counter() - t0)

    batches_per_flush = max(1, min(acc.max_block_updates, -(-acc.flush_every // args.tokens)))
    flush_s = min(flush_times)
    # Per round: the update including its amortised flush, and the peak as the
    # faster of the two plain products.
    upd = [u + flush_s / batches_per_flush for u in times["update"]]
    pk = [min(a, b) for a, b in zip(times["matmul_peak"], times["matmul_peak_out"])]
    ratio_rounds = [p / u for p, u in zip(pk, upd)]
    speedup_rounds = [f / u for f, u in zip(times["reference"], upd)]
    best_peak, best_update, best_ref = min(pk), min(upd), min(times["reference"])
    flops = 2.0 * args.tokens * args.n_a * args.n_b
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "precision": args.precision,
        "n_a": args.n_a,
        "n_b": args.n_b,
        "tokens_per_batch": args.tokens,
        "steps": args.steps,
        "repeats": args.repeats,
        "matmul_peak_s": best_peak,
        "matmul_peak_gflops": flops / best_peak / 1e9,
        "update_s": best_update,
        "flush_s": flush_s,
        "batches_per_flush": batches_per_flush,
        "reference_s": best_ref,
        "update_tokens_per_s": args.tokens / best_update,
        "reference_tokens_per_s": args.tokens / best_ref,
        "ratio_to_matmul_peak_rounds": ratio_rounds,
        "speedup_vs_reference_rounds": speedup_rounds,
        "ratio_to_matmul_peak_best_of": best_peak / best_update,
        "speedup_vs_reference_best_of": best_ref / best_update,
        "ratio_to_matmul_peak": statistics.median(ratio_rounds),
        "speedup_vs_reference": statistics.median(speedup_rounds),
    }


def run_family(args) -> dict:
    """One batch of a whole family pass: the reference model against ``--family-models`` other seeds
    and a rotation baseline of each, ``--family-layers`` layers of ``--family-d`` neurons per model.

    * ``family_ours``: what ``helpers.correlations.correlate`` does per batch: one ``StreamingPearson.update``
      against all comparison models' activations, plus one ``d x d`` covariance per layer of each,
      from which the baseline is derived at the end (``mixed_correlation``);
    * ``family_reference``: the paper's runs, one per comparison model and one per rotated
      baseline, each with one fp32 product per layer pair added into an fp64 host array, sums in
      fp16, and the baseline's rotation ``R[l] @ acts[l]`` (R in fp16, applied in fp32) per batch.

    The models' forward passes are left out of both (the paper's runs also recompute the reference
    model's activations once per run).  Ratio: median over rounds, as for ``update``.
    """
    from helpers.correlations.pearson import gaussian_rotation

    device = torch.device(args.device)
    L, d, M = args.family_layers, args.family_d, args.family_models
    n_a, n_b = L * d, M * L * d
    batches = make_inputs(n_a, n_b, args.tokens, 2, device, seed=3)
    acc = StreamingPearson(n_a, n_b, device=device, precision=args.precision)
    grams = [StreamingPearson(d, d, device=device, precision=args.precision) for _ in range(M * L)]
    runs = [ReferenceAccumulator(n_a, L * d, device, layer_size=d) for _ in range(2 * M)]
    rots = [gaussian_rotation(d, 100 + i).half().to(device) for i in range(M * L)]

    def ours(x, y):
        acc.update(x, y)
        for i, g in enumerate(grams):
            yl = y[:, i * d : (i + 1) * d]
            g.update(yl, yl)

    def reference(x, y):
        for m in range(M):
            ym = y[:, m * L * d : (m + 1) * L * d]
            runs[m].update(x, ym)
            rotated = torch.cat([ym[:, l * d : (l + 1) * d].float() @ rots[m * L + l].float().T for l in range(L)], 1)
            runs[M + m].update(x, rotated)

    for x, y in batches:  # warm-up
        ours(x, y)
        reference(x, y)
    t_ours, t_ref = [], []
    for r in range(args.family_repeats):
        pair = [(ours, t_ours), (reference, t_ref)]
        for fn, out in pair if r % 2 == 0 else pair[::-1]:
            out.append(time_calls(fn, batches, 1, device))
    return {
        "family_layers": L, "family_d": d, "family_models": M, "family_tokens_per_batch": args.tokens,
        "family_ours_s": min(t_ours), "family_reference_s": min(t_ref),
        "family_speedup_vs_reference_rounds": [b / a for a, b in zip(t_ours, t_ref)],
        "family_speedup_vs_reference": statistics.median(b / a for a, b in zip(t_ours, t_ref)),
    }


def run_precision(args) -> dict:
    """Stream ``--check-precision-tokens`` tokens (means 100x std, fp16) and compare
    with a float64 accumulation centred on the true generating means."""
    device = torch.device(args.device)
    n_a, n_b, tokens = args.check_n_a, args.check_n_b, args.tokens
    g = torch.Generator().manual_seed(1)
    k = 8
    w_a = torch.randn(k, n_a, generator=g)
    w_b = torch.randn(k, n_b, generator=g)
    std_a = 10 ** (torch.rand(n_a, generator=g) * 2 - 1)
    std_b = 10 ** (torch.rand(n_b, generator=g) * 2 - 1)
    mean_a = 100 * std_a * torch.sign(torch.randn(n_a, generator=g))
    mean_b = 100 * std_b * torch.sign(torch.randn(n_b, generator=g))

    acc = StreamingPearson(n_a, n_b, device=device, precision=args.precision)
    paper = ReferenceAccumulator(n_a, n_b, device)
    f64 = torch.float64
    c_a, c_b = mean_a.double(), mean_b.double()
    sxy = torch.zeros(n_a, n_b, dtype=f64)
    s_a, s_b = torch.zeros(n_a, dtype=f64), torch.zeros(n_b, dtype=f64)
    q_a, q_b = torch.zeros(n_a, dtype=f64), torch.zeros(n_b, dtype=f64)
    seen = 0
    t0 = time.perf_counter()
    while seen < args.check_precision_tokens:
        t = min(tokens, args.check_precision_tokens - seen)
        z = torch.randn(t, k, generator=g)
        x = ((z @ w_a + torch.randn(t, n_a, generator=g)) * std_a / 3 + mean_a).half()
        y = ((z @ w_b + torch.randn(t, n_b, generator=g)) * std_b / 3 + mean_b).half()
        acc.update(x.to(device), y.to(device))
        paper.update(x.to(device), y.to(device))
        xc, yc = x.double() - c_a, y.double() - c_b
        sxy += xc.T @ yc
        s_a += xc.sum(0)
        s_b += yc.sum(0)
        q_a += (xc * xc).sum(0)
        q_b += (yc * yc).sum(0)
        seen += t
    n = float(seen)
    m_a, m_b = s_a / n, s_b / n
    cov = sxy / n - torch.outer(m_a, m_b)
    ref = cov / torch.outer((q_a / n - m_a**2).sqrt(), (q_b / n - m_b**2).sqrt())
    err = (acc.correlation().double().cpu() - ref).abs().max().item()
    paper_err = (paper.correlation(seen) - ref).abs()
    return {
        "tokens": seen,
        "n_a": n_a,
        "n_b": n_b,
        "max_abs_err": err,
        "max_abs_corr": ref.abs().max().item(),
        # The paper's algorithm on the same data (fp16 sums overflow -> non-finite).
        "reference_algorithm_max_abs_err": paper_err.nan_to_num(float("inf")).max().item(),
        "reference_algorithm_nonfinite_fraction": (~paper_err.isfinite()).float().mean().item(),
        "seconds": time.perf_counter() - t0,
    }


def _json_safe(obj):
    """Strict JSON: non-finite floats become the strings "inf" / "-inf" / "nan"."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-a", type=int, default=3072, help="x variables (rows)")
    p.add_argument("--n-b", type=int, default=3072, help="y variables (columns)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per batch")
    p.add_argument("--steps", type=int, default=2, help="batches per case and round")
    p.add_argument("--repeats", type=int, default=9, help="timed rounds (ratios: median over rounds)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--check-precision-tokens", type=int, default=0,
                   help="also stream this many tokens with means 100x std and report the error")
    p.add_argument("--check-n-a", type=int, default=48)
    p.add_argument("--check-n-b", type=int, default=32)
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--family-layers", type=int, default=4, help="family pass: layers per model")
    p.add_argument("--family-d", type=int, default=768, help="family pass: neurons per layer")
    p.add_argument("--family-models", type=int, default=4, help="family pass: comparison models")
    p.add_argument("--family-repeats", type=int, default=5, help="family pass: timed rounds")
    p.add_argument("--skip-family", action="store_true", help="do not time the family pass")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    result: dict = {}
    if not args.skip_speed:
        result.update(run_speed(args))
        for k in ("matmul_peak_s", "update_s", "reference_s", "ratio_to_matmul_peak_best_of",
                  "speedup_vs_reference_best_of", "ratio_to_matmul_peak", "speedup_vs_reference"):
            print(f"{k:>29}: {result[k]:.4g}")
        for k in ("ratio_to_matmul_peak_rounds", "speedup_vs_reference_rounds"):
            print(f"{k:>29}: " + " ".join(f"{v:.3f}" for v in result[k]))
    if not args.skip_family:
        fam = run_family(args)
        for k in ("family_ours_s", "family_reference_s", "family_speedup_vs_reference"):
            print(f"{k:>29}: {fam[k]:.4g}")
        result.update(fam)
    if args.check_precision_tokens:
        check = run_precision(args)
        print(f"{'precision check':>22}: {check}")
        result["precision_check"] = check
    print(json.dumps(_json_safe(result)))
    return result


if __name__ == "__main__":
    main()
