"""Benchmark `interventions.token_metrics`: positions in cache-sized chunks against whole-batch tensors.

The whole-batch baseline is the plain formulation (log_softmax over the batch, then entropy, loss,
rank and argmax on [N, pos, d_vocab] tensors), kept here only as the reference. Both run on the same
random logits in one process, alternating over `--rounds`; the reported ratio is the median of the
within-round ratios, and the largest difference of the metrics between the two is printed. The
last line printed is one JSON object.

    python benchmarks/token_metrics.py                        # Gemma 3's vocabulary, 2 x 512 tokens
    python benchmarks/token_metrics.py --vocab 50257 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from helpers.entropy import interventions as iv


@torch.no_grad()
def whole_batch(logits: torch.Tensor, tokens: torch.Tensor, extra=None) -> dict[str, torch.Tensor]:
    lg = logits[:, :-1].float()
    target = tokens[:, 1:]
    logp = lg.log_softmax(-1)
    true = lg.gather(-1, target[..., None])
    out = {"entropy": -(logp.exp() * logp).sum(-1), "loss": -logp.gather(-1, target[..., None])[..., 0],
           "rr": 1.0 / ((lg > true).sum(-1) + 1).float(), "top1": lg.argmax(-1)}
    for name, fn in (extra or {}).items():
        out[name] = fn(logp)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=262144)
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    torch.manual_seed(0)
    logits = 3 * torch.randn(a.rows, a.ctx, a.vocab)
    tokens = torch.randint(0, a.vocab, (a.rows, a.ctx))
    extra = {"neg_entropy": lambda lp: (lp.exp() * lp).sum(-1)}  # an extra metric, as the frequency study's KL
    ratios, ratios_extra = [], []
    for _ in range(a.rounds):
        t0 = time.perf_counter(); ref = whole_batch(logits, tokens); t_ref = time.perf_counter() - t0
        t0 = time.perf_counter(); new = iv.token_metrics(logits, tokens); t_new = time.perf_counter() - t0
        ratios.append(t_new / t_ref)
        t0 = time.perf_counter(); whole_batch(logits, tokens, extra); t_ref = time.perf_counter() - t0
        t0 = time.perf_counter(); iv.token_metrics(logits, tokens, extra=extra); t_new = time.perf_counter() - t0
        ratios_extra.append(t_new / t_ref)
    diff = {k: float((ref[k].float() - new[k].float()).abs().max()) for k in ("entropy", "loss", "rr")}
    diff["top1_mismatches"] = int((ref["top1"] != new["top1"]).sum())
    result = {"vocab": a.vocab, "tokens": a.rows * a.ctx, "chunked_over_whole_batch": statistics.median(ratios),
              "with_extra_metric": statistics.median(ratios_extra), "max_abs_diff": diff,
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.processor() or platform.machine()}
    print(f"chunked / whole-batch time: {result['chunked_over_whole_batch']:.2f} "
          f"(with an extra metric: {result['with_extra_metric']:.2f}); largest differences {diff}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
