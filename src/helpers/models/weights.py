"""Where the embedded family's weights live: family keys and folders, the training logs in them,
the shipped folders of `weights/` with their manifest, and how a family is shipped and checked.

Two places hold a family:
- the training cache `<artifacts>/family/<key>/`, `key` a hash of the architecture, the recipe,
  the base seed, the corpus content and `TRAINER_VERSION` (`family_key`, `family_dir`): one folder
  per member (`a/`, `b/`, ... with `train_log.json` and `checkpoints/step*/`), the reduced
  vocabulary and `family.json`. `helpers.models.training` fills it;
- a shipped folder of `weights/` (or of `$UNIVERSAL_NEURONS_WEIGHTS`): the same members as fp16
  safetensors with a manifest of every file's sha256 and size, matched to a preset by
  `shipped_key` (`ship_family` writes it, `check_shipped` re-verifies it).

`helpers.models.families` loads from either; this module neither trains nor loads families.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch

from helpers.core.cache import config_hash, read_json, sha256_file, write_json
from helpers.core.presets import Architecture, Preset, Recipe, repo_root
from helpers.data.corpus import Corpus, preset_corpus
from helpers.data.tokens import VocabMap, rows_from_stream
from helpers.models.loading import MEMBERS, PROCESSING, evaluate_loss, load_model

TRAINER_VERSION = 2  # 2: fused forward (SDPA, addmm), loss over all positions with the last one ignored
UNTRAINED_SEED_OFFSET = 1000
VOCAB_FILE = "vocab_gpt2_ids.npy"


# --------------------------------------------------------------------------------------------
# Members, seeds and checkpoints of a preset's family
# --------------------------------------------------------------------------------------------


def family_members(params: Preset) -> list[str]:
    """Members of the preset's embedded family: `a`.. (`n_seeds`, default 5)."""
    n = int(params.get("n_seeds", len(MEMBERS)))
    if not 2 <= n <= len(MEMBERS):
        raise ValueError(f"n_seeds must be between 2 and {len(MEMBERS)}, got {n}")
    return MEMBERS[:n]


def member_seed(base_seed: int, member: str, untrained: bool = False) -> int:
    """The seed of a member (`a`: the base seed, `b`: + 1, ...; the untrained control's are offset)."""
    return int(base_seed) + MEMBERS.index(member) + (UNTRAINED_SEED_OFFSET if untrained else 0)


def checkpoint_steps(n_steps: int, n_checkpoints: int) -> list[int]:
    """Steps at which weights are saved: the init (0) and `n_checkpoints` points spaced
    geometrically up to the end (early training changes fastest)."""
    pts = {0, n_steps}
    for i in range(1, n_checkpoints):
        pts.add(max(1, round(n_steps * 2.0 ** (-(n_checkpoints - i)))))
    return sorted(pts)


def saved_checkpoint_steps(params: Preset) -> list[int]:
    """Training steps at which every member of the preset's embedded family saved its weights."""
    return checkpoint_steps(params.recipe.n_steps(params.arch.n_ctx), params.recipe.n_checkpoints)


# --------------------------------------------------------------------------------------------
# The training cache
# --------------------------------------------------------------------------------------------


def family_key(arch: Architecture, recipe: Recipe, base_seed: int, corpus: Corpus) -> str:
    """The training cache key: architecture, recipe, base seed, corpus content, trainer version."""
    return config_hash({"arch": arch.to_dict(), "recipe": recipe.to_dict(), "seed": int(base_seed),
                        "corpus": corpus.provenance["content_sha256"], "trainer": TRAINER_VERSION})


def family_dir(params: Preset, corpus: Corpus) -> Path:
    """The training cache folder of the preset's embedded family."""
    key = family_key(params.arch, params.recipe, params.train_seed, corpus)
    return params.artifacts_path / "family" / key


def family_vocab(folder: Path, arch: Architecture) -> VocabMap:
    """The reduced vocabulary saved in a family folder (its last id is the unknown token)."""
    return VocabMap(np.load(Path(folder) / VOCAB_FILE), int(arch["d_vocab"]) - 1)


def prepare_rows(corpus: Corpus, vocab: VocabMap, n_ctx: int, split: str,
                 max_tokens: int | None = None) -> torch.Tensor:
    """[rows, n_ctx] int64 model ids of a corpus split, each row BOS + n_ctx-1 tokens."""
    stream = corpus.tokens(split)
    if max_tokens:
        stream = stream[: max_tokens + n_ctx]
    return vocab.map(rows_from_stream(stream, n_ctx))


def trained_members(folder: str | Path) -> list[str]:
    """The members of a family folder whose training finished (those with a `train_log.json`)."""
    return [m for m in MEMBERS if (Path(folder) / m / "train_log.json").is_file()]


def training_table(folder: str | Path):
    """Per-member table: seed, final validation loss, training time and speed."""
    import pandas as pd

    folder = Path(folder)
    rows = []
    for m in trained_members(folder):
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
    for m in trained_members(folder):
        log = read_json(folder / m / "train_log.json")
        rows += [{"member": m, "kind": "train", "tokens": r["tokens"], "loss": r["loss"]}
                 for r in log["train"]]
        rows += [{"member": m, "kind": "validation", "tokens": r["tokens"], "loss": r["val_loss"]}
                 for r in log["eval"]]
    return pd.DataFrame(rows)


def checkpoint_folders(folder: str | Path, member: str) -> list[Path]:
    """Saved checkpoints of a member, in training order (step 0 = initialisation)."""
    return sorted((Path(folder) / member / "checkpoints").glob("step*"))


# --------------------------------------------------------------------------------------------
# The shipped family: trained once, committed in weights/ with a manifest of sha256s
# --------------------------------------------------------------------------------------------

# Members whose intermediate checkpoints are shipped: the emergence analysis needs at least two;
# three keep weights/ under 60 MB.
SHIPPED_CHECKPOINT_MEMBERS = ("a", "b", "c")
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


class ShippedWeightsError(RuntimeError):
    """A shipped weight file is missing, truncated or altered: never loaded, never retrained over."""


# Another folder of shipped families (e.g. one restored from git history).
WEIGHTS_ENV = "UNIVERSAL_NEURONS_WEIGHTS"


def shipped_root() -> Path:
    """The folder of shipped families: `weights/` of the repository, or `$UNIVERSAL_NEURONS_WEIGHTS`."""
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        root = Path(env).expanduser().resolve()
        if not root.is_dir():
            raise FileNotFoundError(f"${WEIGHTS_ENV}={env} is not a folder: point it at a folder of shipped "
                                    "families (each with a manifest.json), or unset it to use weights/")
        return root
    return repo_root() / "weights"


def shipped_key(params: Preset, corpus_key: str) -> str:
    """What a shipped family must match to stand in for a preset's: architecture, recipe, training
    seed, members and the corpus configuration (its key; the content hash is checked separately)."""
    return config_hash({"arch": params.arch.to_dict(), "recipe": params.recipe.to_dict(),
                        "train_seed": params.train_seed, "members": family_members(params),
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
            raise ShippedWeightsError(f"{path}: unreadable manifest ({e}); "
                                      f"restore it with `git checkout -- {path}`") from None

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
        hint = (f"restore it with `git checkout -- {path}` (or retrain the family: "
                f"`python -m helpers.models.training --preset {self.manifest.get('preset', '<name>')} "
                f"--retrain --ship {self.folder}`)")
        if not path.is_file():
            raise ShippedWeightsError(f"{path}: missing; {hint}")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise ShippedWeightsError(f"{path}: {size} bytes, the manifest says {entry['bytes']} "
                                      f"(truncated?); {hint}")
        if sha256_file(path) != entry["sha256"]:
            raise ShippedWeightsError(f"{path}: sha256 differs from the manifest (altered or corrupted); "
                                      f"{hint}")

    def family_info(self) -> dict:
        """What a loaded family records about its weights, read from the manifest (the keys of a
        trained family's `family.json`)."""
        man, recs = self.manifest, self.manifest["members"]
        return {"arch": man["arch"], "recipe": man["recipe"], "base_seed": man["train_seed"],
                "members": list(recs), "source": f"shipped ({self.folder.name})",
                "val_loss": {m: v["val_loss"] for m, v in recs.items()},
                "train_seconds": {m: v["train_seconds"] for m, v in recs.items()},
                "precision": {m: v["precision"] for m, v in recs.items()},
                "corpus": man["corpus_key"], "corpus_content_sha256": man["corpus_content_sha256"],
                "vocab_coverage": man["vocab_coverage"], "seeds": {m: v["seed"] for m, v in recs.items()},
                "manifest": man}

    def verify_all(self) -> None:
        for rel in sorted(self.manifest["files"]):
            self.verify(self.folder / rel)


def shipped_family(params: Preset, corpus: Corpus) -> ShippedFamily | None:
    """The shipped folder of `weights/` whose manifest matches the preset, or None. Its vocabulary
    file is verified here; each weight file is verified when it is loaded."""
    root = shipped_root()
    if not root.is_dir() or params.arch is None:
        return None
    key = shipped_key(params, corpus.provenance["key"])
    for man in sorted(root.glob(f"*/{MANIFEST}")):
        fam = ShippedFamily(man.parent)
        if fam.manifest.get("key") == key:
            fam.verify(fam.folder / VOCAB_FILE)
            if fam.manifest["corpus_content_sha256"] != corpus.provenance["content_sha256"]:
                print(f"note: the corpus built here differs in content from the one {fam.folder.name} "
                      "was trained on (a newer Debian package?); the shipped weights are used, and held-out "
                      "numbers may differ slightly")
            return fam
    return None


def _fp16_copy(src: Path, dst: Path) -> None:
    """Copy a saved model with its weights rounded to fp16 (half the size; loaded back as fp32)."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(torch.float16).contiguous()
             for k, v in load_file(str(src / "model.safetensors")).items()}
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt", "dtype": "float16"})
    shutil.copyfile(src / "config.json", dst / "config.json")


def _member_record(log: dict, loss: float) -> dict:
    """A member's entry in the manifest: its training record and the loss of its shipped weights."""
    run = log.get("runs", [{}])[-1]
    return {"seed": log["seed"], "val_loss": loss, "val_loss_fp32_weights": log["final_val_loss"],
            "precision": log.get("precision", "unknown"), "cpu": run.get("cpu"),
            "forward": run.get("forward"), "torch": run.get("torch"),
            "train_seconds": round(log["seconds"], 1),
            "tokens_per_second": log.get("tokens_per_second")}


def ship_family(params: Preset, out: Path, command: str, device: str = "cpu") -> Path:
    """Export the preset's trained family (from the training cache) to `out` as fp16 safetensors,
    with the checkpoints of `SHIPPED_CHECKPOINT_MEMBERS` (step 0 is rebuilt from the seed and the
    last step is the final model, so neither is stored) and a manifest."""
    arch, recipe = params.arch, params.recipe
    corpus = preset_corpus(params, verbose=False)
    src = family_dir(params, corpus)
    info = read_json(src / "family.json")
    members = family_members(params)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copyfile(src / VOCAB_FILE, tmp / VOCAB_FILE)
    val_rows = prepare_rows(corpus, family_vocab(src, arch), arch.n_ctx, "val", recipe.eval_tokens)
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
        record[m] = _member_record(log, evaluate_loss(load_model(tmp / m, device), val_rows))
    files = {p.relative_to(tmp).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
             for p in sorted(tmp.rglob("*")) if p.is_file()}
    manifest = {
        "version": MANIFEST_VERSION, "preset": params.get("preset"),
        "key": shipped_key(params, corpus.provenance["key"]), "arch": arch.to_dict(),
        "recipe": recipe.to_dict(), "train_seed": params.train_seed, "trainer": TRAINER_VERSION,
        "corpus_key": corpus.provenance["key"], "corpus_config": corpus.provenance["config"],
        "corpus_content_sha256": corpus.provenance["content_sha256"],
        "vocab_coverage": info.get("vocab_coverage"), "processing_on_load": PROCESSING,
        "weights_dtype": "float16",
        "val_loss_measured_on": f"the first {recipe.eval_tokens:,} tokens of the corpus's held-out split, "
                                "fp32, after loading",
        "checkpoint_members": [m for m in SHIPPED_CHECKPOINT_MEMBERS if m in members],
        "checkpoint_steps": steps[1:-1], "command": command, "members": record, "files": files,
    }
    write_json(tmp / MANIFEST, manifest)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def check_shipped(params: Preset, device: str = "cpu", tolerance: float = 1e-3) -> list[str]:
    """Re-verify every shipped file of the preset's family and re-evaluate every member's validation
    loss; returns the problems found (empty: all good)."""
    corpus = preset_corpus(params, verbose=False)
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
    val_rows = prepare_rows(corpus, family_vocab(fam.folder, params.arch), params.arch.n_ctx, "val",
                            params.recipe.eval_tokens)
    for m, rec in fam.manifest["members"].items():
        loss = evaluate_loss(load_model(fam.folder / m, device), val_rows)
        diff = abs(loss - rec["val_loss"])
        status = "ok" if diff <= tolerance else "DIFFERS"
        print(f"member {m}: validation loss {loss:.5f}, manifest {rec['val_loss']:.5f} (|diff| {diff:.1e}) "
              f"{status}")
        if diff > tolerance:
            problems.append(f"member {m} ({fam.folder / m / 'model.safetensors'}): validation loss "
                            f"{loss:.5f} differs from the manifest's {rec['val_loss']:.5f} by {diff:.1e} > "
                            f"{tolerance:g} nats")
    return problems
