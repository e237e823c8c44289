"""Training of the embedded seed family (paper §1's five seeds, at a size a CPU can train).

Five GPT-2-style models `a`..`e` share one architecture, one corpus and one training recipe and
differ only in their random seed, which sets both the initialisation and the data order. A
control family (`embedded-untrained`) has the same configs, random initialisation from different
seeds, and no training.

Everything is cached under `<artifacts_dir>/family/<key>/`, `key` a hash of the architecture, the
recipe, the base seed and the corpus content: a re-run with nothing changed never retrains. A
killed training resumes from its last checkpoint (the data order is a function of the seed and the
batch index alone, so a resumed run sees the same batches as an uninterrupted one).

Command line: `python -m helpers.models.training --preset default` (trains what is missing, prints the table).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from helpers.core.cache import atomic_torch_save, config_hash, read_json, sha256_file, write_json
from helpers.data.corpus import Corpus, build_corpus
from helpers.data.tokens import VocabMap, iter_row_batches, rows_from_stream
from helpers.models.loading import ARCH_KEYS, MEMBERS, PROCESSING, init_model, load_model, save_model

RECIPE_DEFAULTS = {
    "train_tokens": 3_000_000,
    "batch_size": 32,
    "lr": 3e-3,
    "min_lr_frac": 0.1,
    "warmup_frac": 0.05,
    "weight_decay": 0.1,
    "betas": [0.9, 0.95],
    "grad_clip": 1.0,
    "n_checkpoints": 4,
    "precision": "auto",
    "eval_tokens": 200_000,
}
UNTRAINED_SEED_OFFSET = 1000
TRAINER_VERSION = 2  # 2: fused forward (SDPA, addmm), loss over all positions with the last one ignored
PRECISIONS = ("auto", "fp32", "bf16")


def split_embedded_config(embedded: dict) -> tuple[dict, dict]:
    """A preset's `embedded` block -> (architecture, training recipe), defaults filled in."""
    if "autocast_bf16" in embedded:
        raise ValueError("`autocast_bf16` was replaced by `precision: auto | fp32 | bf16` in the `embedded` block "
                         "(auto: bf16 autocast only where this machine computes it faster than fp32)")
    unknown = set(embedded) - set(ARCH_KEYS) - set(RECIPE_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)} in the `embedded` block; "
                         f"architecture keys: {list(ARCH_KEYS)}, recipe keys: {sorted(RECIPE_DEFAULTS)}")
    arch = {k: int(embedded[k]) for k in ARCH_KEYS if k in embedded}
    missing = [k for k in ARCH_KEYS if k not in arch]
    if missing:
        raise ValueError(f"the `embedded` block lacks {missing}")
    recipe = {**RECIPE_DEFAULTS, **{k: v for k, v in embedded.items() if k in RECIPE_DEFAULTS}}
    if recipe["precision"] not in PRECISIONS:
        raise ValueError(f"embedded.precision must be one of {PRECISIONS}, got {recipe['precision']!r}")
    return arch, recipe


def train_seed(params: dict) -> int:
    """The base seed of the embedded family's training (member `a` uses it, `b` it + 1, ...): the
    preset's `train_seed`, which the correlation's `baseline_seed` and the `sample_seed` leave alone."""
    return int(params["train_seed"])


def member_seed(base_seed: int, member: str, untrained: bool = False) -> int:
    return int(base_seed) + MEMBERS.index(member) + (UNTRAINED_SEED_OFFSET if untrained else 0)


def checkpoint_steps(n_steps: int, n_checkpoints: int) -> list[int]:
    """Steps at which weights are saved: the init (0) and `n_checkpoints` points spaced
    geometrically up to the end (early training changes fastest)."""
    pts = {0, n_steps}
    for i in range(1, n_checkpoints):
        pts.add(max(1, round(n_steps * 2.0 ** (-(n_checkpoints - i)))))
    return sorted(pts)


def lr_at(step: int, n_steps: int, recipe: dict) -> float:
    warm = max(1, int(recipe["warmup_frac"] * n_steps))
    if step < warm:
        return recipe["lr"] * (step + 1) / warm
    progress = (step - warm) / max(1, n_steps - warm)
    floor = recipe["min_lr_frac"]
    return recipe["lr"] * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


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
    import time

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
    import shutil

    if os.environ.get("UNIVERSAL_NEURONS_NO_COMPILE"):
        return train_loss, "eager (UNIVERSAL_NEURONS_NO_COMPILE set)"
    if n_steps < 150:
        return train_loss, "eager (short run)"
    if torch.device(device).type == "cpu" and not (shutil.which("g++") or shutil.which("c++")):
        return train_loss, "eager (no C++ compiler for torch.compile)"
    return torch.compile(train_loss), "torch.compile"


@torch.no_grad()
def evaluate_loss(model, rows: torch.Tensor, batch_size: int = 32) -> float:
    """Mean next-token cross-entropy (nats) of `model` over `rows` [n, n_ctx] of model ids, in fp32."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = rows[i : i + batch_size].to(model.cfg.device)
        logits = model(batch, return_type="logits").float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total += float(loss)
        count += batch[:, 1:].numel()
    return total / max(count, 1)


@torch.no_grad()
def row_losses(model, rows: torch.Tensor, batch_size: int = 32) -> np.ndarray:
    """Mean next-token cross-entropy (nats) of `model` on each row of `rows` [n, n_ctx], in fp32:
    [n]. Every row scores n_ctx - 1 tokens, so their mean is `evaluate_loss`."""
    model.eval()
    out = []
    for i in range(0, len(rows), batch_size):
        batch = rows[i : i + batch_size].to(model.cfg.device)
        logits = model(batch, return_type="logits").float()
        loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch[:, 1:], reduction="none")  # [batch, n_ctx - 1]
        out.append(loss.mean(1).double().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


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


def _optimizer(model, recipe: dict):
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe["lr"], betas=tuple(recipe["betas"]),
    )


def train_member(arch: dict, recipe: dict, train_rows: torch.Tensor, val_rows: torch.Tensor, seed: int,
                 folder: Path, device: str = "cpu", desc: str = "train") -> dict:
    """Train one member and save it (with checkpoints) in `folder`; resumes from `folder/resume.pt`."""
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    bs, n_ctx = int(recipe["batch_size"]), arch["n_ctx"]
    n_steps = max(1, int(recipe["train_tokens"]) // (bs * n_ctx))
    ckpts = checkpoint_steps(n_steps, int(recipe["n_checkpoints"]))
    model = init_model(arch, seed, device)
    opt = _optimizer(model, recipe)
    log = {"seed": seed, "n_steps": n_steps, "tokens_per_step": bs * n_ctx, "train": [], "eval": [], "seconds": 0.0}
    start = 0
    resume = folder / "resume.pt"
    if resume.is_file():
        state = torch.load(resume, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, log = state["step"], state["log"]
        print(f"{desc}: resuming from step {start}/{n_steps}")
    prec = choose_precision(recipe["precision"], device, arch["d_model"], arch["d_vocab"])
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
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe["grad_clip"])
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


def family_key(arch: dict, recipe: dict, base_seed: int, corpus: Corpus) -> str:
    return config_hash({"arch": arch, "recipe": recipe, "seed": int(base_seed),
                        "corpus": corpus.provenance["content_sha256"], "trainer": TRAINER_VERSION})


def family_dir(params: dict, corpus: Corpus) -> Path:
    from helpers.core.presets import resolve_dir

    arch, recipe = split_embedded_config(params["embedded"])
    return resolve_dir(params.get("artifacts_dir", "artifacts")) / "family" / family_key(arch, recipe, train_seed(params), corpus)


def prepare_rows(corpus: Corpus, vocab: VocabMap, n_ctx: int, split: str, max_tokens: int | None = None) -> torch.Tensor:
    """[rows, n_ctx] int64 model ids of a corpus split, each row BOS + n_ctx-1 tokens."""
    stream = corpus.tokens(split)
    if max_tokens:
        stream = stream[: max_tokens + n_ctx]
    return vocab.map(rows_from_stream(stream, n_ctx))


def family_members(params: dict) -> list[str]:
    """Members of the preset's embedded family: `a`.. (`n_seeds`, default 5)."""
    n = int(params.get("n_seeds", len(MEMBERS)))
    if not 2 <= n <= len(MEMBERS):
        raise ValueError(f"n_seeds must be between 2 and {len(MEMBERS)}, got {n}")
    return MEMBERS[:n]


def ensure_family(params: dict, device: str = "cpu", verbose: bool = True) -> Path:
    """Build the corpus, then train whichever members of the embedded family are missing; returns
    the family folder. Members are trained one at a time (two at once on 2 cores ran >4x slower)."""
    members = family_members(params)
    from helpers.core.presets import resolve_dir

    arch, recipe = split_embedded_config(params["embedded"])
    out = resolve_dir(params.get("artifacts_dir", "artifacts"))
    corpus = build_corpus(params.get("corpus", {}), out, verbose=verbose)
    folder = family_dir(params, corpus)
    vocab_file = folder / "vocab_gpt2_ids.npy"
    if vocab_file.is_file():
        vocab = VocabMap(np.load(vocab_file), int(arch["d_vocab"]) - 1)
    else:
        vocab = VocabMap.top_k(corpus.counts(), arch["d_vocab"])
        folder.mkdir(parents=True, exist_ok=True)
        np.save(vocab_file, vocab.gpt2_ids)
    base_seed = train_seed(params)
    todo = [m for m in members if not (folder / m / "train_log.json").is_file()]
    if todo:
        train_rows = prepare_rows(corpus, vocab, arch["n_ctx"], "train")
        val_rows = prepare_rows(corpus, vocab, arch["n_ctx"], "val", recipe["eval_tokens"])
        if len(val_rows) == 0:
            raise ValueError("the validation split is smaller than one row: raise corpus.val_fraction or the corpus size")
        for m in todo:
            train_member(arch, recipe, train_rows, val_rows, member_seed(base_seed, m), folder / m, device, desc=f"seed {m}")
    members = [m for m in MEMBERS if (folder / m / "train_log.json").is_file()]  # all trained so far
    records = {m: read_json(folder / m / "train_log.json") for m in members}
    write_json(folder / "family.json", {
        "arch": arch, "recipe": recipe, "base_seed": base_seed, "members": members,
        "seeds": {m: member_seed(base_seed, m) for m in members},
        "untrained_seeds": {m: member_seed(base_seed, m, True) for m in members},
        "corpus": corpus.provenance["key"], "corpus_content_sha256": corpus.provenance["content_sha256"],
        "vocab_coverage": vocab.coverage(corpus.counts()), "processing": PROCESSING,
        "val_loss": {m: records[m]["final_val_loss"] for m in members},
        "precision": {m: records[m].get("precision", "unknown") for m in members},
        "train_seconds": {m: records[m]["seconds"] for m in members},
    })
    return folder


def saved_checkpoint_steps(params: dict) -> list[int]:
    """Training steps at which every member of the preset's embedded family saved its weights."""
    arch, recipe = split_embedded_config(params["embedded"])
    n_steps = max(1, int(recipe["train_tokens"]) // (int(recipe["batch_size"]) * arch["n_ctx"]))
    return checkpoint_steps(n_steps, int(recipe["n_checkpoints"]))


def _trained_members(folder: Path) -> list[str]:
    return [m for m in MEMBERS if (folder / m / "train_log.json").is_file()]


def training_table(folder: str | Path):
    """Per-member table: seed, final validation loss, training time and speed."""
    import pandas as pd

    folder = Path(folder)
    rows = []
    for m in _trained_members(folder):
        log = read_json(folder / m / "train_log.json")
        rows.append({"member": m, "seed": log["seed"], "steps": log["n_steps"],
                     "train_tokens": log["n_steps"] * log["tokens_per_step"],
                     "val_loss": log["final_val_loss"], "train_seconds": round(log["seconds"], 1),
                     "tokens_per_second": log.get("tokens_per_second")})
    return pd.DataFrame(rows).set_index("member")


def training_curves(folder: str | Path):
    """Long table of the logged training losses and validation losses of every member."""
    import pandas as pd

    folder = Path(folder)
    rows = []
    for m in _trained_members(folder):
        log = read_json(folder / m / "train_log.json")
        rows += [{"member": m, "kind": "train", "tokens": r["tokens"], "loss": r["loss"]} for r in log["train"]]
        rows += [{"member": m, "kind": "validation", "tokens": r["tokens"], "loss": r["val_loss"]} for r in log["eval"]]
    return pd.DataFrame(rows)


def checkpoint_folders(folder: str | Path, member: str) -> list[Path]:
    """Saved checkpoints of a member, in training order (step 0 = initialisation)."""
    return sorted((Path(folder) / member / "checkpoints").glob("step*"))


# --------------------------------------------------------------------------------------------
# The shipped family: trained once, committed in weights/ with a manifest of sha256s
# --------------------------------------------------------------------------------------------

SHIPPED_CHECKPOINT_MEMBERS = ("a", "b", "c")  # the emergence analysis needs at least two; three keep weights/ < 60 MB
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


class ShippedWeightsError(RuntimeError):
    """A shipped weight file is missing, truncated or altered: never loaded, never retrained over."""


WEIGHTS_ENV = "UNIVERSAL_NEURONS_WEIGHTS"  # another folder of shipped families (e.g. one restored from git history)


def shipped_root() -> Path:
    """The folder of shipped families: `weights/` of the repository, or `$UNIVERSAL_NEURONS_WEIGHTS`."""
    from helpers.core.presets import repo_root

    env = os.environ.get(WEIGHTS_ENV)
    if env:
        root = Path(env).expanduser().resolve()
        if not root.is_dir():
            raise FileNotFoundError(f"${WEIGHTS_ENV}={env} is not a folder: point it at a folder of shipped families "
                                    "(each with a manifest.json), or unset it to use weights/")
        return root
    return repo_root() / "weights"


def shipped_key(params: dict, corpus_key: str) -> str:
    """What a shipped family must match to stand in for a preset's: architecture, recipe, training
    seed, members and the corpus configuration (its key; the content hash is checked separately)."""
    arch, recipe = split_embedded_config(params["embedded"])
    return config_hash({"arch": arch, "recipe": recipe, "train_seed": train_seed(params), "members": family_members(params),
                        "corpus": corpus_key, "trainer": TRAINER_VERSION})


class ShippedFamily:
    """A folder of `weights/` and its manifest: every file's sha256 and size, and per member the
    training record and the validation loss of the shipped (fp16) weights."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        try:
            self.manifest = read_json(path)
        except (OSError, ValueError) as e:
            raise ShippedWeightsError(f"{path}: unreadable manifest ({e}); restore it with `git checkout -- {path}`") from None

    def _entry(self, path: Path) -> dict:
        rel = Path(path).resolve().relative_to(self.folder.resolve()).as_posix()
        try:
            return self.manifest["files"][rel]
        except KeyError:
            raise ShippedWeightsError(f"{path}: not listed in {self.folder / MANIFEST}") from None

    def expected_sha(self, path: Path) -> str:
        return self._entry(path)["sha256"]

    def verify(self, path: Path) -> None:
        """Raise `ShippedWeightsError` naming `path` if it is missing, truncated or altered."""
        entry = self._entry(path)
        path = Path(path)
        hint = (f"restore it with `git checkout -- {path}` (or retrain the family: `python -m helpers.models.training "
                f"--preset {self.manifest.get('preset', '<name>')} --retrain --ship {self.folder}`)")
        if not path.is_file():
            raise ShippedWeightsError(f"{path}: missing; {hint}")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise ShippedWeightsError(f"{path}: {size} bytes, the manifest says {entry['bytes']} (truncated?); {hint}")
        if sha256_file(path) != entry["sha256"]:
            raise ShippedWeightsError(f"{path}: sha256 differs from the manifest (altered or corrupted); {hint}")

    def verify_all(self) -> None:
        for rel in sorted(self.manifest["files"]):
            self.verify(self.folder / rel)


def shipped_family(params: dict, corpus: Corpus) -> ShippedFamily | None:
    """The shipped folder of `weights/` whose manifest matches the preset, or None. Its vocabulary
    file is verified here; each weight file is verified when it is loaded."""
    root = shipped_root()
    if not root.is_dir() or "embedded" not in params:
        return None
    key = shipped_key(params, corpus.provenance["key"])
    for man in sorted(root.glob(f"*/{MANIFEST}")):
        fam = ShippedFamily(man.parent)
        if fam.manifest.get("key") == key:
            fam.verify(fam.folder / "vocab_gpt2_ids.npy")
            if fam.manifest["corpus_content_sha256"] != corpus.provenance["content_sha256"]:
                print(f"note: the corpus built here differs in content from the one {fam.folder.name} was trained on "
                      "(a newer Debian package?); the shipped weights are used, and held-out numbers may differ slightly")
            return fam
    return None


def _fp16_copy(src: Path, dst: Path) -> None:
    """Copy a saved model with its weights rounded to fp16 (half the size; loaded back as fp32)."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(torch.float16).contiguous() for k, v in load_file(str(src / "model.safetensors")).items()}
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt", "dtype": "float16"})
    shutil.copyfile(src / "config.json", dst / "config.json")


def ship_family(params: dict, out: Path, command: str, device: str = "cpu") -> Path:
    """Export the preset's trained family (from the training cache) to `out` as fp16 safetensors,
    with the checkpoints of `SHIPPED_CHECKPOINT_MEMBERS` (step 0 is rebuilt from the seed and the
    last step is the final model, so neither is stored) and a manifest."""
    from helpers.core.presets import resolve_dir

    arch, recipe = split_embedded_config(params["embedded"])
    corpus = build_corpus(params.get("corpus", {}), resolve_dir(params.get("artifacts_dir", "artifacts")), verbose=False)
    src = family_dir(params, corpus)
    info = read_json(src / "family.json")
    members = family_members(params)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copyfile(src / "vocab_gpt2_ids.npy", tmp / "vocab_gpt2_ids.npy")
    vocab = VocabMap(np.load(src / "vocab_gpt2_ids.npy"), int(arch["d_vocab"]) - 1)
    val_rows = prepare_rows(corpus, vocab, arch["n_ctx"], "val", recipe["eval_tokens"])
    steps = saved_checkpoint_steps(params)
    record = {}
    for m in members:
        log = read_json(src / m / "train_log.json")
        _fp16_copy(src / m, tmp / m)
        shutil.copyfile(src / m / "train_log.json", tmp / m / "train_log.json")
        if m in SHIPPED_CHECKPOINT_MEMBERS:
            for step in steps[1:-1]:
                name = f"step{step:06d}"
                _fp16_copy(src / m / "checkpoints" / name, tmp / m / "checkpoints" / name)
        run = log.get("runs", [{}])[-1]
        record[m] = {"seed": log["seed"], "val_loss": evaluate_loss(load_model(tmp / m, device), val_rows),
                     "val_loss_fp32_weights": log["final_val_loss"], "precision": log.get("precision", "unknown"),
                     "cpu": run.get("cpu"), "forward": run.get("forward"), "torch": run.get("torch"),
                     "train_seconds": round(log["seconds"], 1), "tokens_per_second": log.get("tokens_per_second")}
    files = {p.relative_to(tmp).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
             for p in sorted(tmp.rglob("*")) if p.is_file()}
    manifest = {
        "version": MANIFEST_VERSION, "preset": params.get("preset"), "key": shipped_key(params, corpus.provenance["key"]),
        "arch": arch, "recipe": recipe, "train_seed": train_seed(params), "trainer": TRAINER_VERSION,
        "corpus_key": corpus.provenance["key"], "corpus_config": corpus.provenance["config"],
        "corpus_content_sha256": corpus.provenance["content_sha256"], "vocab_coverage": info.get("vocab_coverage"),
        "processing_on_load": PROCESSING, "weights_dtype": "float16",
        "val_loss_measured_on": f"the first {recipe['eval_tokens']:,} tokens of the corpus's held-out split, fp32, after loading",
        "checkpoint_members": [m for m in SHIPPED_CHECKPOINT_MEMBERS if m in members],
        "checkpoint_steps": steps[1:-1], "command": command, "members": record, "files": files,
    }
    write_json(tmp / MANIFEST, manifest)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def check_shipped(params: dict, device: str = "cpu", tolerance: float = 1e-3) -> list[str]:
    """Re-verify every shipped file of the preset's family and re-evaluate every member's validation
    loss; returns the problems found (empty: all good)."""
    from helpers.core.presets import resolve_dir

    corpus = build_corpus(params.get("corpus", {}), resolve_dir(params.get("artifacts_dir", "artifacts")), verbose=False)
    fam = shipped_family(params, corpus)
    if fam is None:
        return [f"no folder of {shipped_root()} ships the family of preset {params.get('preset')!r}"]
    problems = []
    for rel in sorted(fam.manifest["files"]):
        try:
            fam.verify(fam.folder / rel)
        except ShippedWeightsError as e:
            problems.append(str(e))
    if problems:
        return problems
    arch, recipe = split_embedded_config(params["embedded"])
    vocab = VocabMap(np.load(fam.folder / "vocab_gpt2_ids.npy"), int(arch["d_vocab"]) - 1)
    val_rows = prepare_rows(corpus, vocab, arch["n_ctx"], "val", recipe["eval_tokens"])
    for m, rec in fam.manifest["members"].items():
        loss = evaluate_loss(load_model(fam.folder / m, device), val_rows)
        diff = abs(loss - rec["val_loss"])
        status = "ok" if diff <= tolerance else "DIFFERS"
        print(f"member {m}: validation loss {loss:.5f}, manifest {rec['val_loss']:.5f} (|diff| {diff:.1e}) {status}")
        if diff > tolerance:
            problems.append(f"member {m} ({fam.folder / m / 'model.safetensors'}): validation loss {loss:.5f} differs from "
                            f"the manifest's {rec['val_loss']:.5f} by {diff:.1e} > {tolerance:g} nats")
    return problems


def main(argv: list[str] | None = None) -> None:
    import sys

    from helpers.core.presets import load_preset

    ap = argparse.ArgumentParser(description="Train (or reuse) the embedded seed family of a preset; ship it; check it.")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--device", default=None, help="overrides the preset's device (cpu, cuda, mps)")
    ap.add_argument("--retrain", action="store_true", help="delete this preset's cached training first (never touches weights/)")
    ap.add_argument("--ship", metavar="FOLDER", default=None,
                    help="after training, export the family to FOLDER (e.g. weights/embedded-deep) as fp16 with a manifest")
    ap.add_argument("--check", action="store_true",
                    help="verify the shipped family of the preset (sha256 of every file, validation loss of every member "
                         "within 1e-3 nats of the manifest); exits 1 naming what differs")
    args = ap.parse_args(argv)
    params = load_preset(args.preset)
    device = args.device or params.get("device", "cpu")
    if args.check:
        try:
            problems = check_shipped(params, device)
        except ShippedWeightsError as e:
            problems = [str(e)]
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        if problems:
            sys.exit(1)
        print("shipped family ok")
        return
    if args.retrain:
        from helpers.core.presets import resolve_dir

        corpus = build_corpus(params.get("corpus", {}), resolve_dir(params.get("artifacts_dir", "artifacts")))
        shutil.rmtree(family_dir(params, corpus), ignore_errors=True)
    folder = ensure_family(params, device=device)
    print(f"family folder: {folder}")
    print(training_table(folder).to_string())
    if args.ship:
        command = "python -m helpers.models.training " + " ".join(argv if argv is not None else sys.argv[1:])
        out = ship_family(params, Path(args.ship), command, device)
        print(f"shipped to {out}")


if __name__ == "__main__":
    from helpers.core.cache import run_cli

    run_cli(main)
