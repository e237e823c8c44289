"""Training of the embedded seed family (paper §1's five seeds, at a size a CPU can train).

Five GPT-2-style models `a`..`e` share one architecture, one corpus and one training recipe and
differ only in their random seed, which sets both the initialisation and the data order. A
control family (`embedded-untrained`) has the same configs, random initialisation from different
seeds, and no training.

Everything is cached under `<artifacts_dir>/family/<key>/`, `key` a hash of the architecture, the
recipe, the base seed and the corpus content: a re-run with nothing changed never retrains. A
killed training resumes from its last checkpoint (the data order is a function of the seed and the
batch index alone, so a resumed run sees the same batches as an uninterrupted one).

Command line: `python -m helpers.train --preset default` (trains what is missing, prints the table).
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .artifacts import atomic_torch_save, config_hash, read_json, write_json
from .corpus import Corpus, build_corpus
from .data import VocabMap, iter_row_batches, rows_from_stream
from .models import ARCH_KEYS, MEMBERS, PROCESSING, Family, VocabCodec, init_model, load_model, save_model

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
    "autocast_bf16": True,
    "eval_tokens": 200_000,
}
UNTRAINED_SEED_OFFSET = 1000
TRAINER_VERSION = 1


def split_embedded_config(embedded: dict) -> tuple[dict, dict]:
    """A preset's `embedded` block -> (architecture, training recipe), defaults filled in."""
    unknown = set(embedded) - set(ARCH_KEYS) - set(RECIPE_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)} in the `embedded` block; "
                         f"architecture keys: {list(ARCH_KEYS)}, recipe keys: {sorted(RECIPE_DEFAULTS)}")
    arch = {k: int(embedded[k]) for k in ARCH_KEYS if k in embedded}
    missing = [k for k in ARCH_KEYS if k not in arch]
    if missing:
        raise ValueError(f"the `embedded` block lacks {missing}")
    recipe = {**RECIPE_DEFAULTS, **{k: v for k, v in embedded.items() if k in RECIPE_DEFAULTS}}
    return arch, recipe


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
    use_bf16 = bool(recipe["autocast_bf16"])
    device_type = torch.device(device).type

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
            logits = model(tokens, return_type="logits")
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
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
    save_model(model, folder, arch, {"seed": seed, "step": n_steps, "val_loss": log["final_val_loss"]})
    write_json(folder / "train_log.json", log)
    resume.unlink(missing_ok=True)
    return log


def family_key(arch: dict, recipe: dict, base_seed: int, corpus: Corpus) -> str:
    return config_hash({"arch": arch, "recipe": recipe, "seed": int(base_seed),
                        "corpus": corpus.provenance["content_sha256"], "trainer": TRAINER_VERSION})


def family_dir(params: dict, corpus: Corpus) -> Path:
    from .presets import resolve_dir

    arch, recipe = split_embedded_config(params["embedded"])
    return resolve_dir(params.get("artifacts_dir", "artifacts")) / "family" / family_key(arch, recipe, params.get("seed", 0), corpus)


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
    from .presets import resolve_dir

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
    base_seed = int(params.get("seed", 0))
    todo = [m for m in members if not (folder / m / "train_log.json").is_file()]
    if todo:
        train_rows = prepare_rows(corpus, vocab, arch["n_ctx"], "train")
        val_rows = prepare_rows(corpus, vocab, arch["n_ctx"], "val", recipe["eval_tokens"])
        if len(val_rows) == 0:
            raise ValueError("the validation split is smaller than one row: raise corpus.val_fraction or the corpus size")
        for m in todo:
            train_member(arch, recipe, train_rows, val_rows, member_seed(base_seed, m), folder / m, device, desc=f"seed {m}")
    for m in members:
        target = folder / "untrained" / m
        if not (target / "model.safetensors").is_file():
            save_model(init_model(arch, member_seed(base_seed, m, untrained=True), "cpu"), target, arch,
                       {"seed": member_seed(base_seed, m, untrained=True), "step": 0})
    members = [m for m in MEMBERS if (folder / m / "train_log.json").is_file()]  # all trained so far
    records = {m: read_json(folder / m / "train_log.json") for m in members}
    write_json(folder / "family.json", {
        "arch": arch, "recipe": recipe, "base_seed": base_seed, "members": members,
        "seeds": {m: member_seed(base_seed, m) for m in members},
        "untrained_seeds": {m: member_seed(base_seed, m, True) for m in members},
        "corpus": corpus.provenance["key"], "corpus_content_sha256": corpus.provenance["content_sha256"],
        "vocab_coverage": vocab.coverage(corpus.counts()), "processing": PROCESSING,
        "val_loss": {m: records[m]["final_val_loss"] for m in members},
        "train_seconds": {m: records[m]["seconds"] for m in members},
    })
    return folder


def saved_checkpoint_steps(params: dict) -> list[int]:
    """Training steps at which every member of the preset's embedded family saved its weights."""
    arch, recipe = split_embedded_config(params["embedded"])
    n_steps = max(1, int(recipe["train_tokens"]) // (int(recipe["batch_size"]) * arch["n_ctx"]))
    return checkpoint_steps(n_steps, int(recipe["n_checkpoints"]))


def embedded_family(params: dict, untrained: bool = False, device: str = "cpu", train: bool = True,
                    checkpoint: int | None = None) -> Family:
    """The embedded family (or its untrained control) of a preset; trains it first if needed.
    `checkpoint`: load every member's weights saved at that training step instead of the final ones."""
    if train:
        folder = ensure_family(params, verbose=True)
    else:
        from .presets import resolve_dir

        corpus = build_corpus(params.get("corpus", {}), resolve_dir(params.get("artifacts_dir", "artifacts")), verbose=False)
        folder = family_dir(params, corpus)
        if not (folder / "family.json").is_file():
            raise FileNotFoundError(f"the embedded family of this preset is not trained yet ({folder}); "
                                    "run `python -m helpers.train --preset <name>`")
    info = read_json(folder / "family.json")
    vocab = VocabMap(np.load(folder / "vocab_gpt2_ids.npy"), int(info["arch"]["d_vocab"]) - 1)
    base = folder / "untrained" if untrained else folder

    def loader(member: str):
        if checkpoint is not None:
            return load_model(base / member / "checkpoints" / f"step{checkpoint:06d}", device)
        return load_model(base / member, device)

    from .presets import resolve_dir

    corpus = build_corpus(params.get("corpus", {}), resolve_dir(params.get("artifacts_dir", "artifacts")), verbose=False)
    n_ctx = int(info["arch"]["n_ctx"])

    def rows(n_tokens: int, split: str) -> torch.Tensor:
        return prepare_rows(corpus, vocab, n_ctx, split, n_tokens)

    name = "embedded-untrained" if untrained else "embedded"
    ident = str(base)
    if checkpoint is not None:
        if checkpoint not in saved_checkpoint_steps(params):
            raise ValueError(f"no checkpoint at step {checkpoint}; saved steps: {saved_checkpoint_steps(params)}")
        name, ident = f"{name}@step{checkpoint}", f"{base}@step{checkpoint}"
    return Family(name, family_members(params), loader, lambda: VocabCodec(vocab), device,
                  {**info, "folder": ident, "family_folder": str(folder)}, rows, corpus)


def evaluate_family(family: Family, rows: torch.Tensor, batch_size: int = 32) -> dict[str, float]:
    """Validation loss (nats per token) of every member of `family` on the same `rows`."""
    from tqdm.auto import tqdm

    return {m: evaluate_loss(family.load(m), rows, batch_size) for m in tqdm(family.members, desc=f"{family.name} loss")}


def sample_family(family: Family, prompts: list[str], max_new_tokens: int = 30, temperature: float = 0.7, seed: int = 0):
    """Table of sampled continuations: one row per member, one column per prompt."""
    import pandas as pd

    from .models import sample_text

    rows = {}
    for m in family.members:
        model = family.load(m)
        rows[m] = [sample_text(model, family.codec, p, max_new_tokens, temperature, seed) for p in prompts]
    return pd.DataFrame.from_dict(rows, orient="index", columns=prompts)


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


def main(argv: list[str] | None = None) -> None:
    from .presets import load_preset

    ap = argparse.ArgumentParser(description="Train (or reuse) the embedded seed family of a preset.")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--device", default=None, help="overrides the preset's device (cpu, cuda, mps)")
    ap.add_argument("--retrain", action="store_true", help="delete this preset's cached family first")
    args = ap.parse_args(argv)
    params = load_preset(args.preset)
    device = args.device or params.get("device", "cpu")
    if args.retrain:
        from .presets import resolve_dir

        corpus = build_corpus(params.get("corpus", {}), resolve_dir(params.get("artifacts_dir", "artifacts")))
        shutil.rmtree(family_dir(params, corpus), ignore_errors=True)
    folder = ensure_family(params, device=device)
    print(f"family folder: {folder}")
    print(training_table(folder).to_string())


if __name__ == "__main__":
    main()
