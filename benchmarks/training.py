"""Training throughput of the embedded family's trainer against this machine's matmul peak.

Trains the default preset's architecture (random tokens: throughput does not depend on the text)
for a fixed number of steps with the trainer's own step (`helpers.models.training.train_loss`, the precision
`choose_precision` picks, torch.compile when it pays), and measures in the same process:

- `model_gflop_per_token`: forward + backward FLOPs per token, counted from the architecture
  (every matmul's 2·m·n·k, backward = 2x forward; causal attention counted at half the full square);
- `peak_gflops`: the best of fp32 and bf16 matmul throughput at the model's largest product (the
  unembedding: [tokens, d_model] @ [d_model, d_vocab], and its two backward products);
- `ratio_to_peak` = achieved / peak.

Optionally the previous trainer's step (TransformerLens forward with hooks, sliced logits) runs as
a baseline in the same process (`--baseline`), and its ratio is printed too. The last line is JSON.

    python benchmarks/training.py                 # ~2 minutes
    python benchmarks/training.py --baseline      # + the previous step, for a before/after ratio
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/training.py   # a CPU without bf16
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from helpers.core.presets import load_preset
from helpers.models.loading import init_model
from helpers.models.training import adamw_optimizer, choose_precision, compiled_loss, cpu_description


def model_flops_per_token(arch) -> float:
    """Forward + backward FLOPs per token of the GPT-2-style architecture (matmuls and attention)."""
    d, m, v, t, L = arch["d_model"], arch["d_mlp"], arch["d_vocab"], arch["n_ctx"], arch["n_layers"]
    per_layer = 2 * (3 * d * d + d * d + 2 * d * m)  # QKV, O, MLP in and out
    attention = 2 * 2 * d * (t / 2)  # QK^T and AV over the causal half of the context, on average
    forward = L * (per_layer + attention) + 2 * d * v
    return 3.0 * forward


def matmul_gflops(dtype, m: int, k: int, n: int, reps: int = 5) -> float:
    a = torch.randn(m, k).to(dtype)
    b = torch.randn(k, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best / 1e9


def peak_gflops(arch, tokens: int, dtypes) -> dict:
    d, v = arch["d_model"], arch["d_vocab"]
    shapes = [(tokens, d, v), (tokens, v, d), (d, tokens, v)]  # forward, grad of input, grad of weight
    out = {}
    for dt in dtypes:
        name = str(dt).removeprefix("torch.")
        if dt == torch.bfloat16:
            probe = matmul_gflops(dt, 256, d, 256, reps=1)
            if probe < 5:  # no bf16 hardware: a scalar fallback; measuring at full size would take minutes
                out[name] = probe
                continue
        out[name] = max(matmul_gflops(dt, *s) for s in shapes)
    return out


def legacy_loss(model, tokens):
    """The previous trainer's step: TransformerLens forward with hooks, then sliced logits."""
    logits = model(tokens, return_type="logits")
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def run(arch, recipe, loss_fn, precision: str, steps: int, warmup: int) -> float:
    model = init_model(arch, 0)
    opt = adamw_optimizer(model, recipe)
    bs, t = recipe.batch_size, arch.n_ctx
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, arch["d_vocab"], (bs, t), generator=gen) for _ in range(4)]

    def step(i):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_fn(model, batches[i % len(batches)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()

    for i in range(warmup):
        step(i)
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    return steps * bs * t / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="default")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--baseline", action="store_true", help="also time the previous trainer's step")
    ap.add_argument("--precision", default=None, help="override the preset's precision (auto, fp32, bf16)")
    args = ap.parse_args()
    params = load_preset(args.preset)
    arch, recipe = params.arch, params.recipe
    prec = choose_precision(args.precision or recipe.precision, "cpu", arch.d_model, arch.d_vocab)
    tokens = recipe.batch_size * arch.n_ctx
    peaks = peak_gflops(arch, tokens, [torch.float32, torch.bfloat16])
    flops = model_flops_per_token(arch) / 1e9
    fn, how = compiled_loss("cpu", 10_000)
    tok_s = run(arch, recipe, fn, prec["precision"], args.steps, warmup=3)
    result = {"tokens_per_s": round(tok_s, 1), "model_gflop_per_token": round(flops, 5),
              "achieved_gflops": round(tok_s * flops, 2), "peak_gflops": round(max(peaks.values()), 2),
              "ratio_to_peak": round(tok_s * flops / max(peaks.values()), 3), "dtype": prec["precision"]}
    print(f"cpu: {cpu_description()}")
    print(f"precision: {prec}; forward: {how}; matmul peaks (GFLOP/s) at the unembedding's shapes: "
          f"{ {k: round(v, 1) for k, v in peaks.items()} }")
    if args.baseline:
        base = run(arch, recipe, legacy_loss, prec["precision"], max(5, args.steps // 3), warmup=2)
        print(f"previous trainer step: {base:,.0f} tokens/s; this trainer is {tok_s / base:.2f}x faster "
              f"(ratio_to_peak {base * flops / max(peaks.values()):.3f} -> {result['ratio_to_peak']:.3f})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
