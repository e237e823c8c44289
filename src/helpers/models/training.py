"""Training of the embedded seed family (paper §1's five seeds, at a size a CPU can train).

Five GPT-2-style models `a`..`e` share one architecture, one corpus and one training recipe and
differ only in their random seed, which sets both the initialisation and the data order. A
control family (`embedded-untrained`) has the same configs, random initialisation from different
seeds, and no training.

Everything is cached under `<artifacts_dir>/family/<key>/` (`helpers.models.weights.family_dir`, a
hash of the architecture, the recipe, the base seed and the corpus content): a re-run with nothing
changed never retrains. A killed training resumes from its last checkpoint (the data order is a
function of the seed and the batch index alone, so a resumed run sees the same batches as an
uninterrupted one). The architecture and recipe are the preset's typed `params.arch` and
`params.recipe`.

Command line: `python -m helpers.models.training --preset default` (trains what is missing, prints
the table; `--ship` and `--check` run `helpers.models.weights.ship_family` and `check_shipped`).
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from helpers.core.cache import atomic_torch_save, read_json, run_cli, write_json
from helpers.core.cli import preset_from_args, preset_parser
from helpers.core.presets import Architecture, Preset, Recipe
from helpers.data.corpus import preset_corpus
from helpers.data.tokens import VocabMap, iter_row_batches
from helpers.models.loading import PROCESSING, evaluate_loss, init_model, save_model
from helpers.models.weights import (VOCAB_FILE, ShippedWeightsError, check_shipped, checkpoint_steps,
                                    family_dir, family_members, family_vocab, member_seed, prepare_rows,
                                    ship_family, trained_members, training_table)


def lr_at(step: int, n_steps: int, recipe: Recipe) -> float:
    """The learning rate at `step`: linear warm-up, then cosine decay to `min_lr_frac` of the peak."""
    warm = max(1, int(recipe.warmup_frac * n_steps))
    if step < warm:
        return recipe.lr * (step + 1) / warm
    progress = (step - warm) / max(1, n_steps - warm)
    floor = recipe.min_lr_frac
    return recipe.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


# --------------------------------------------------------------------------------------------
# Precision: bf16 autocast only where this machine computes it faster
# --------------------------------------------------------------------------------------------

_PRECISION_CACHE: dict = {}


def cpu_bf16_flags() -> list[str]:
    """The CPU's bf16-capable instruction sets (`amx_bf16`, `avx512_bf16`) from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return sorted(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return []


def _matmul_seconds(dtype, m: int, k: int, n: int, device: str, reps: int = 3) -> float:
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def choose_precision(requested: str, device: str, d_model: int = 128, d_vocab: int = 4096) -> dict:
    """Resolve `precision: auto` once per process and device: `bf16` (autocast) where bf16 matmuls
    are at least twice as fast as fp32 at the model's shapes, else `fp32`.

    On a CPU without bf16 hardware (AVX2 only) bf16 matmuls run on a scalar fallback, ~250x slower
    than fp32: such a CPU is recognised from its flags and never measured at full size. Returns the
    decision with its evidence, for the run record."""
    dev = torch.device(device).type
    if requested in ("fp32", "bf16"):
        return {"precision": requested, "reason": "requested"}
    key = (dev, d_model, d_vocab)
    if key in _PRECISION_CACHE:
        return _PRECISION_CACHE[key]
    if dev == "cuda":
        ok = torch.cuda.is_bf16_supported()
        out = {"precision": "bf16" if ok else "fp32", "reason": f"cuda bf16 support: {ok}"}
    elif dev == "cpu":
        flags = cpu_bf16_flags()
        if not flags:
            out = {"precision": "fp32", "reason": "no bf16 instructions (amx_bf16/avx512_bf16) on this CPU"}
        else:
            m, k, n = 2048, d_model, d_vocab
            t32 = _matmul_seconds(torch.float32, m, k, n, device)
            t16 = _matmul_seconds(torch.bfloat16, m, k, n, device)
            speedup = t32 / t16
            out = {"precision": "bf16" if speedup >= 2.0 else "fp32", "bf16_speedup": round(speedup, 2),
                   "reason": f"bf16 matmul {speedup:.3g}x fp32 at [{m}x{k}]@[{k}x{n}] ({', '.join(flags)})"}
    else:
        out = {"precision": "fp32", "reason": f"no bf16 measurement for device type {dev!r}"}
    _PRECISION_CACHE[key] = out
    return out


# --------------------------------------------------------------------------------------------
# The training forward pass: the HookedTransformer's own parameters, no hooks
# --------------------------------------------------------------------------------------------


def train_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """[batch * pos, d_vocab] logits of an embedded (GPT-2-style, unprocessed) `HookedTransformer`,
    computed from its parameters without hooks: fused bias-add matmuls (`addmm`), one QKV product,
    `scaled_dot_product_attention` (a fused causal kernel), tanh-GELU (= `gelu_new`). Equal to
    `model(tokens)` up to float rounding (tested); used for training only, where hooks are not needed
    and TransformerLens's explicit attention costs most of the step."""
    cfg = model.cfg
    B, T = tokens.shape
    H, dh, D = cfg.n_heads, cfg.d_head, cfg.d_model
    x = (model.embed.W_E[tokens] + model.pos_embed.W_pos[:T]).reshape(B * T, D)
    for blk in model.blocks:
        a = blk.attn
        h = F.layer_norm(x, (D,), blk.ln1.w, blk.ln1.b, cfg.eps)
        w_qkv = torch.cat([a.W_Q, a.W_K, a.W_V], 0).permute(1, 0, 2).reshape(D, 3 * H * dh)
        b_qkv = torch.cat([a.b_Q, a.b_K, a.b_V], 0).reshape(3 * H * dh)
        q, k, v = torch.addmm(b_qkv, h, w_qkv).view(B, T, 3, H, dh).permute(2, 0, 3, 1, 4)
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + torch.addmm(a.b_O, z.transpose(1, 2).reshape(B * T, H * dh), a.W_O.reshape(H * dh, D))
        m = blk.mlp
        h = F.layer_norm(x, (D,), blk.ln2.w, blk.ln2.b, cfg.eps)
        x = x + torch.addmm(m.b_out, F.gelu(torch.addmm(m.b_in, h, m.W_in), approximate="tanh"), m.W_out)
    x = F.layer_norm(x, (D,), model.ln_final.w, model.ln_final.b, cfg.eps)
    return torch.addmm(model.unembed.b_U, x, model.unembed.W_U)


def train_loss(model, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over every position but the last of each row (its target
    would be the next row's first token): the last position's target is ignored rather than sliced
    off, which saves a copy of the logits and of their gradient."""
    logits = train_logits(model, tokens)
    target = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], -100)], 1).reshape(-1)
    return F.cross_entropy(logits.float(), target, ignore_index=-100)


def compiled_loss(device: str, n_steps: int):
    """`train_loss`, compiled with torch.compile when it pays (a C++ compiler is present on CPU and
    the run is long enough to amortise ~20 s of compilation); else the eager function."""
    if os.environ.get("UNIVERSAL_NEURONS_NO_COMPILE"):
        return train_loss, "eager (UNIVERSAL_NEURONS_NO_COMPILE set)"
    if n_steps < 150:
        return train_loss, "eager (short run)"
    if torch.device(device).type == "cpu" and not (shutil.which("g++") or shutil.which("c++")):
        return train_loss, "eager (no C++ compiler for torch.compile)"
    return torch.compile(train_loss), "torch.compile"


def cpu_description() -> dict:
    """CPU model, core count, bf16 instruction sets and torch's kernel level, for run records."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"model": name, "cores": os.cpu_count(), "bf16_flags": cpu_bf16_flags(),
            "capability": torch.backends.cpu.get_cpu_capability()}


def adamw_optimizer(model, recipe: Recipe) -> torch.optim.AdamW:
    """The recipe's AdamW: weight decay on the matrices only (not on biases, gains or embeddings' rows)."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr, betas=recipe.betas,
    )


def train_member(arch: Architecture, recipe: Recipe, train_rows: torch.Tensor, val_rows: torch.Tensor,
                 seed: int, folder: Path, device: str = "cpu", desc: str = "train") -> dict:
    """Train one member and save it (with checkpoints) in `folder`; resumes from `folder/resume.pt`."""
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    bs, n_ctx = int(recipe.batch_size), arch.n_ctx
    n_steps = recipe.n_steps(n_ctx)
    ckpts = checkpoint_steps(n_steps, int(recipe.n_checkpoints))
    model = init_model(arch, seed, device)
    opt = adamw_optimizer(model, recipe)
    log = {"seed": seed, "n_steps": n_steps, "tokens_per_step": bs * n_ctx, "train": [], "eval": [], "seconds": 0.0}
    start = 0
    resume = folder / "resume.pt"
    if resume.is_file():
        state = torch.load(resume, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, log = state["step"], state["log"]
        print(f"{desc}: resuming from step {start}/{n_steps}")
    prec = choose_precision(recipe.precision, device, arch.d_model, arch.d_vocab)
    use_bf16 = prec["precision"] == "bf16"
    device_type = torch.device(device).type
    loss_fn, how = compiled_loss(device, n_steps - start)
    log.setdefault("runs", []).append({"start_step": start, "precision": prec, "forward": how, "cpu": cpu_description(),
                                       "torch": torch.__version__, "threads": torch.get_num_threads()})
    print(f"{desc}: {prec['precision']} ({prec['reason']}), {how}")

    def save_checkpoint(step: int) -> None:
        vloss = evaluate_loss(model, val_rows)
        log["eval"].append({"step": step, "tokens": step * bs * n_ctx, "val_loss": vloss})
        save_model(model, folder / "checkpoints" / f"step{step:06d}", arch, {"step": step, "seed": seed, "val_loss": vloss})
        model.train()

    if start == 0:
        save_checkpoint(0)
    t0 = time.time() - log["seconds"]
    t_run = time.time()
    batches = iter_row_batches(len(train_rows), bs, seed, start_batch=start, n_batches=n_steps)
    bar = tqdm(batches, total=n_steps, initial=start, desc=desc, unit="step")
    model.train()
    running = None
    for step, idx in enumerate(bar, start=start):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, n_steps, recipe)
        tokens = train_rows[torch.from_numpy(idx)].to(device)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = loss_fn(model, tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        lval = loss.item()
        running = lval if running is None else 0.95 * running + 0.05 * lval
        done = step + 1
        if done % max(1, n_steps // 200) == 0 or done == n_steps:
            log["train"].append({"step": done, "tokens": done * bs * n_ctx, "loss": lval, "lr": opt.param_groups[0]["lr"]})
            bar.set_postfix(loss=f"{running:.3f}", tok_s=f"{(done - start) * bs * n_ctx / max(time.time() - t_run, 1e-9):,.0f}")
        if done in ckpts:
            save_checkpoint(done)
            log["seconds"] = time.time() - t0
            atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": done, "log": log}, resume)
    log["seconds"] = time.time() - t0
    log["tokens_per_second"] = (n_steps - start) * bs * n_ctx / max(log["seconds"], 1e-9) if start == 0 else None
    log["final_val_loss"] = log["eval"][-1]["val_loss"]
    log["precision"] = "+".join(sorted({r["precision"]["precision"] for r in log["runs"]}))
    save_model(model, folder, arch, {"seed": seed, "step": n_steps, "val_loss": log["final_val_loss"]})
    write_json(folder / "train_log.json", log)
    resume.unlink(missing_ok=True)
    return log


def ensure_family(params: Preset, device: str = "cpu", verbose: bool = True) -> Path:
    """Build the corpus, then train whichever members of the embedded family are missing; returns
    the family folder. Members are trained one at a time (two at once on 2 cores ran >4x slower)."""
    members = family_members(params)
    arch, recipe = params.arch, params.recipe
    corpus = preset_corpus(params, verbose=verbose)
    folder = family_dir(params, corpus)
    if (folder / VOCAB_FILE).is_file():
        vocab = family_vocab(folder, arch)
    else:
        vocab = VocabMap.top_k(corpus.counts(), arch.d_vocab)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / VOCAB_FILE, vocab.gpt2_ids)
    base_seed = params.train_seed
    todo = [m for m in members if m not in trained_members(folder)]
    if todo:
        train_rows = prepare_rows(corpus, vocab, arch.n_ctx, "train")
        val_rows = prepare_rows(corpus, vocab, arch.n_ctx, "val", recipe.eval_tokens)
        if len(val_rows) == 0:
            raise ValueError("the validation split is smaller than one row: raise corpus.val_fraction or the corpus size")
        for m in todo:
            train_member(arch, recipe, train_rows, val_rows, member_seed(base_seed, m), folder / m, device, desc=f"seed {m}")
    members = trained_members(folder)  # all trained so far
    records = {m: read_json(folder / m / "train_log.json") for m in members}
    write_json(folder / "family.json", {
        "arch": arch.to_dict(), "recipe": recipe.to_dict(), "base_seed": base_seed, "members": members,
        "seeds": {m: member_seed(base_seed, m) for m in members},
        "untrained_seeds": {m: member_seed(base_seed, m, True) for m in members},
        "corpus": corpus.provenance["key"], "corpus_content_sha256": corpus.provenance["content_sha256"],
        "vocab_coverage": vocab.coverage(corpus.counts()), "processing": PROCESSING,
        "val_loss": {m: records[m]["final_val_loss"] for m in members},
        "precision": {m: records[m].get("precision", "unknown") for m in members},
        "train_seconds": {m: records[m]["seconds"] for m in members},
    })
    return folder


def main(argv: list[str] | None = None) -> None:
    ap = preset_parser("Train (or reuse) the embedded seed family of a preset; ship it; check it.",
                       ["device"])
    ap.add_argument("--retrain", action="store_true",
                    help="delete this preset's cached training first (never touches weights/)")
    ap.add_argument("--ship", metavar="FOLDER", default=None,
                    help="after training, export the family to FOLDER (e.g. weights/embedded-deep) as fp16 with a "
                         "manifest")
    ap.add_argument("--check", action="store_true",
                    help="verify the shipped family of the preset (sha256 of every file, validation loss of every "
                         "member within 1e-3 nats of the manifest); exits 1 naming what differs")
    args = ap.parse_args(argv)
    params = preset_from_args(args)
    if args.check:
        try:
            problems = check_shipped(params, params.device)
        except ShippedWeightsError as e:
            problems = [str(e)]
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        if problems:
            sys.exit(1)
        print("shipped family ok")
        return
    if args.retrain:
        shutil.rmtree(family_dir(params, preset_corpus(params)), ignore_errors=True)
    folder = ensure_family(params, device=params.device)
    print(f"family folder: {folder}")
    print(training_table(folder).to_string())
    if args.ship:
        command = "python -m helpers.models.training " + " ".join(argv if argv is not None else sys.argv[1:])
        out = ship_family(params, Path(args.ship), command, params.device)
        print(f"shipped to {out}")


if __name__ == "__main__":
    run_cli(main)
