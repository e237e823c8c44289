"""The embedded corpus: text reachable without a dataset hub, tokenised with the real GPT-2 tokenizer.

The paper computes everything on the Pile test split, which cannot be downloaded here. The
embedded corpus mixes prose and code from sources that install offline:

| label         | source                                                        |
|---------------|---------------------------------------------------------------|
| python-docs   | Debian `python3.11-doc`: reStructuredText sources of the docs |
| python-code   | the CPython standard library of the running interpreter       |
| gcide         | Debian `dict-gcide`: Collaborative Intl. Dictionary of English |
| wordnet       | Debian `wordnet-base`: synonym sets and their glosses         |
| perl-docs     | Debian `perl-doc`: Perl's POD manual pages                    |
| foldoc        | Debian `dict-foldoc`: Free On-line Dictionary of Computing    |
| text:<name>   | any folder of `.txt`/`.md`/`.rst` files passed by the user    |

Each document keeps its source label (the analogue of the Pile's subsets, used for context
neurons). The build is deterministic: documents are ordered and split by the sha256 of their id,
so the same inputs give the same token files, whose sha256 sums are recorded in
`provenance.json` next to the package versions and input hashes.

Command line: `python -m helpers.data.corpus --preset default` (or `--text-dir DIR`, `--deb-dir DIR`).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import lzma
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from helpers.core.cache import array_sha256, config_hash, read_json, sha256_file, write_json
from helpers.core.cli import add_preset_options, preset_from_args
from helpers.core.presets import Preset
from helpers.data.tokens import GPT2_EOS, GPT2_VOCAB_SIZE, TokenRows, VocabMap, encode_gpt2, gpt2_tokenizer, rows_from_stream

BUILDER_VERSION = 1
DEFAULT_SOURCES = ["python-docs", "python-code", "gcide", "wordnet", "perl-docs", "foldoc"]


@dataclass(frozen=True)
class Document:
    doc_id: str
    label: str
    text: str


class SourceMissing(RuntimeError):
    """A corpus source is not available on this machine; the message says how to provide it."""


# --------------------------------------------------------------------------------------------
# Debian packages, read with the standard library (no dpkg needed)
# --------------------------------------------------------------------------------------------


def _ar_members(path: Path) -> Iterator[tuple[str, bytes]]:
    data = path.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise ValueError(f"{path} is not a Debian package (ar archive)")
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        pos += 60
        yield name, data[pos : pos + size]
        pos += size + (size % 2)


def _open_member_tar(name: str, blob: bytes) -> tarfile.TarFile:
    if name.endswith(".xz"):
        return tarfile.open(fileobj=io.BytesIO(lzma.decompress(blob)))
    if name.endswith(".gz"):
        return tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob)))
    if name.endswith(".tar"):
        return tarfile.open(fileobj=io.BytesIO(blob))
    if name.endswith(".zst"):
        try:
            import zstandard
        except ImportError as e:
            raise SourceMissing(f"{name} is zstd-compressed: pip install zstandard") from e
        return tarfile.open(fileobj=io.BytesIO(zstandard.ZstdDecompressor().decompressobj().decompress(blob)))
    raise ValueError(f"unsupported Debian archive member {name}")


def deb_version(path: Path) -> str:
    for name, blob in _ar_members(path):
        if name.startswith("control.tar"):
            with _open_member_tar(name, blob) as tar:
                for m in tar.getmembers():
                    if m.name.lstrip("./") == "control":
                        text = tar.extractfile(m).read().decode()
                        match = re.search(r"^Version:\s*(\S+)", text, re.M)
                        return match.group(1) if match else "unknown"
    return "unknown"


def deb_files(path: Path, pattern: str) -> Iterator[tuple[str, bytes]]:
    """(path inside the package, content) of the regular files whose path matches `pattern`."""
    rx = re.compile(pattern)
    for name, blob in _ar_members(path):
        if name.startswith("data.tar"):
            with _open_member_tar(name, blob) as tar:
                for m in sorted(tar.getmembers(), key=lambda m: m.name):
                    inner = m.name.lstrip("./")
                    if m.isfile() and rx.search(inner):
                        yield inner, tar.extractfile(m).read()


def fetch_deb(package: str, deb_dir: Path) -> Path:
    """Find `<package>_*.deb` in `deb_dir`, or download it there with `apt-get download`."""
    deb_dir.mkdir(parents=True, exist_ok=True)
    found = sorted(deb_dir.glob(f"{package}_*.deb"))
    if found:
        return found[-1]
    apt = shutil.which("apt-get")
    hint = (
        f"the corpus source needs the Debian package {package!r}. Download it with "
        f"`apt-get download {package}` into {deb_dir} (or pass --deb-dir to a folder holding it), "
        "or leave the source out of `corpus.sources` and pass your own text with --text-dir"
    )
    if apt is None:
        raise SourceMissing(f"apt-get is not available: {hint}")
    for attempt in range(2):
        proc = subprocess.run([apt, "download", package], cwd=deb_dir, capture_output=True, text=True)
        found = sorted(deb_dir.glob(f"{package}_*.deb"))
        if proc.returncode == 0 and found:
            return found[-1]
        if attempt == 0:  # package lists may be missing on a fresh machine
            subprocess.run([apt, "update", "-qq"], capture_output=True, text=True)
    raise SourceMissing(f"`apt-get download {package}` failed ({proc.stderr.strip()[-300:]}): {hint}")


# --------------------------------------------------------------------------------------------
# Parsers: a source's raw files -> documents
# --------------------------------------------------------------------------------------------


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _dictd_number(s: str) -> int:
    n = 0
    for ch in s:
        n = n * 64 + _B64.index(ch)
    return n


def parse_dictd(index: bytes, dict_gz: bytes, encoding: str, label: str, per_doc: int = 40) -> list[Document]:
    """A dictd database (`.index` + gzip'd `.dict`) -> documents of `per_doc` consecutive entries."""
    text = gzip.decompress(dict_gz)
    spans: dict[int, tuple[int, str]] = {}
    for line in index.decode(encoding, errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00-database") or parts[0].startswith("00database"):
            continue
        off, length = _dictd_number(parts[1]), _dictd_number(parts[2])
        spans.setdefault(off, (length, parts[0]))
    entries = [(off, ln, head) for off, (ln, head) in sorted(spans.items())]
    docs = []
    for k, group in enumerate(_chunks(entries, per_doc)):
        body = "\n".join(text[o : o + ln].decode(encoding, errors="replace").strip() for o, ln, _ in group)
        docs.append(Document(f"{label}:{k:06d}:{group[0][2]}", label, body))
    return docs


_WN_POS = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}


def parse_wordnet(files: Iterable[tuple[str, bytes]], per_doc: int = 50) -> list[Document]:
    docs = []
    for path, blob in files:
        lines = []
        for line in blob.decode("utf-8", errors="replace").splitlines():
            if not line or line.startswith(" ") or "|" not in line:
                continue
            head, gloss = line.split("|", 1)
            f = head.split()
            n_words = int(f[3], 16)
            words = [f[4 + 2 * i].replace("_", " ") for i in range(n_words)]
            lines.append(f"{', '.join(words)} ({_WN_POS.get(f[2], f[2])}): {gloss.strip()}")
        stem = Path(path).name
        for k, group in enumerate(_chunks(lines, per_doc)):
            docs.append(Document(f"wordnet:{stem}:{k:05d}", "wordnet", "\n".join(group)))
    return docs


def _file_docs(files: Iterable[tuple[str, bytes]], label: str, encoding: str = "utf-8") -> list[Document]:
    return [Document(f"{label}:{p}", label, b.decode(encoding, errors="replace")) for p, b in files]


@dataclass
class Source:
    """A named corpus source: how to get its raw inputs and turn them into documents."""

    label: str
    load: Callable[["BuildContext"], tuple[list[Document], dict]]


@dataclass
class BuildContext:
    deb_dir: Path


def _deb_source(package: str, pattern: str, to_docs: Callable[[list[tuple[str, bytes]]], list[Document]]):
    def load(ctx: BuildContext) -> tuple[list[Document], dict]:
        deb = fetch_deb(package, ctx.deb_dir)
        files = list(deb_files(deb, pattern))
        if not files:
            raise SourceMissing(f"{deb.name} holds no file matching {pattern!r}")
        info = {"kind": "debian", "package": package, "version": deb_version(deb), "file": deb.name,
                "sha256": sha256_file(deb), "n_files": len(files)}
        return to_docs(files), info

    return load


def _dictd_docs(stem: str, encoding: str, label: str):
    def to_docs(files: list[tuple[str, bytes]]) -> list[Document]:
        by = {Path(p).name: b for p, b in files}
        return parse_dictd(by[f"{stem}.index"], by[f"{stem}.dict.dz"], encoding, label)

    return to_docs


def _read_tree(root: Path, paths: list[Path]) -> tuple[list[tuple[str, bytes]], str]:
    """(relative path, content) of each file, and one sha256 over all paths and contents."""
    h = hashlib.sha256()
    files = []
    for p in paths:
        rel = p.relative_to(root).as_posix()
        blob = p.read_bytes()
        h.update(rel.encode() + b"\0" + hashlib.sha256(blob).digest())
        files.append((rel, blob))
    return files, h.hexdigest()


def _stdlib_source(ctx: BuildContext) -> tuple[list[Document], dict]:
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)
    if not paths:
        raise SourceMissing(f"no standard-library sources under {root}")
    files, digest = _read_tree(root, paths)
    info = {"kind": "python-stdlib", "python": sys.version.split()[0], "root": str(root),
            "n_files": len(files), "sha256": digest}
    return _file_docs(files, "python-code"), info


SOURCES: dict[str, Source] = {
    "python-docs": Source("python-docs", _deb_source(
        "python3.11-doc", r"usr/share/doc/python3\.11/html/_sources/.*\.rst\.txt$",
        lambda files: _file_docs(files, "python-docs"))),
    "python-code": Source("python-code", _stdlib_source),
    "gcide": Source("gcide", _deb_source(
        "dict-gcide", r"usr/share/dictd/gcide\.(index|dict\.dz)$", _dictd_docs("gcide", "latin-1", "gcide"))),
    "foldoc": Source("foldoc", _deb_source(
        "dict-foldoc", r"usr/share/dictd/foldoc\.(index|dict\.dz)$", _dictd_docs("foldoc", "utf-8", "foldoc"))),
    "wordnet": Source("wordnet", _deb_source(
        "wordnet-base", r"usr/share/wordnet/data\.(noun|verb|adj|adv)$", parse_wordnet)),
    "perl-docs": Source("perl-docs", _deb_source(
        "perl-doc", r"usr/share/perl/[^/]+/pod/.*\.pod$", lambda files: _file_docs(files, "perl-docs"))),
}

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}


def text_dir_source(path: str | Path) -> tuple[str, Source]:
    """Any folder of text files (`.txt`, `.md`, `.rst`) as a source labelled `text:<folder name>`."""
    root = Path(path).expanduser().resolve()
    label = f"text:{root.name}"

    def load(ctx: BuildContext) -> tuple[list[Document], dict]:
        if not root.is_dir():
            raise SourceMissing(f"text folder {root} does not exist: pass an existing folder to --text-dir")
        paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not paths:
            raise SourceMissing(f"text folder {root} holds no {sorted(TEXT_SUFFIXES)} files")
        files, digest = _read_tree(root, paths)
        return _file_docs(files, label), {"kind": "text-dir", "path": str(root), "n_files": len(files), "sha256": digest}

    return label, Source(label, load)


# --------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------


def _doc_hash(doc_id: str) -> int:
    return int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big")


def select_documents(docs: list[Document], max_chars: int | None) -> list[Document]:
    """Deterministic sample: documents ordered by the hash of their id, taken until `max_chars`."""
    docs = sorted((d for d in docs if len(d.text.strip()) > 50), key=lambda d: (_doc_hash(d.doc_id), d.doc_id))
    if not max_chars:
        return docs
    out, total = [], 0
    for d in docs:
        if total >= max_chars:
            break
        out.append(d)
        total += len(d.text)
    return out


def is_validation(doc_id: str, val_fraction: float) -> bool:
    return (_doc_hash("split:" + doc_id) % 1_000_000) < val_fraction * 1_000_000


def corpus_config(cfg: dict) -> dict:
    """The corpus block of a preset, with defaults filled in (this dict is the cache key)."""
    out = {
        "sources": list(cfg.get("sources", DEFAULT_SOURCES)),
        "text_dirs": [str(Path(p).expanduser().resolve()) for p in cfg.get("text_dirs", [])],
        "max_chars_per_source": cfg.get("max_chars_per_source"),
        "val_fraction": float(cfg.get("val_fraction", 0.02)),
        "builder_version": BUILDER_VERSION,
    }
    unknown = [s for s in out["sources"] if s not in SOURCES]
    if unknown:
        raise ValueError(f"unknown corpus source(s) {unknown}; known: {sorted(SOURCES)} (use text_dirs for your own folders)")
    if not out["sources"] and not out["text_dirs"]:
        raise ValueError("the corpus needs at least one source or text folder")
    return out


@dataclass
class Corpus:
    """A built corpus on disk: GPT-2 token streams with a source label per token."""

    path: Path

    @property
    def provenance(self) -> dict:
        return read_json(self.path / "provenance.json")

    @property
    def labels(self) -> list[str]:
        return self.provenance["labels"]

    def tokens(self, split: str = "train") -> np.ndarray:
        """[tokens] uint16 GPT-2 ids; each document starts with <|endoftext|> (memory-mapped)."""
        return np.load(self.path / f"{split}.tokens.npy", mmap_mode="r")

    def token_labels(self, split: str = "train") -> np.ndarray:
        """[tokens] uint8 index into `labels` of the document each token belongs to."""
        return np.load(self.path / f"{split}.labels.npy", mmap_mode="r")

    def counts(self) -> np.ndarray:
        """[50257] int64 GPT-2 token counts over the training split."""
        return np.load(self.path / "counts.npy")

    def summary(self):
        """Per-source table: documents, tokens and share of tokens in each split."""
        import pandas as pd

        return pd.DataFrame(self.provenance["per_source"]).set_index("label")


def preset_corpus(params: Preset, verbose: bool = True) -> Corpus:
    """The corpus of a preset's `corpus` block, built (or reused) under its artifacts folder."""
    return build_corpus(params.get("corpus", {}), params.artifacts_path, verbose=verbose)


def build_corpus(cfg: dict, out_root: str | Path, deb_dir: str | Path | None = None, force: bool = False, verbose: bool = True) -> Corpus:
    """Build (or reuse) the corpus described by `cfg` (a preset's `corpus` block) under `out_root`.

    The result is cached in `out_root/corpus/<hash of cfg>/`; an existing complete build is reused.
    """
    from tqdm.auto import tqdm

    config = corpus_config(cfg)
    key = config_hash(config)
    out_root = Path(out_root)
    path = out_root / "corpus" / key
    if (path / "provenance.json").is_file() and not force:
        return Corpus(path)
    ctx = BuildContext(Path(deb_dir) if deb_dir else out_root / "debs")
    t0 = time.time()
    sources = [(name, SOURCES[name]) for name in config["sources"]]
    sources += [text_dir_source(p) for p in config["text_dirs"]]
    labels = [name for name, _ in sources]
    all_docs: list[Document] = []
    inputs = {}
    for name, src in tqdm(sources, desc="corpus sources", disable=not verbose):
        docs, info = src.load(ctx)
        chosen = select_documents(docs, config["max_chars_per_source"])
        info.update(n_documents_available=len(docs), n_documents=len(chosen), n_chars=sum(len(d.text) for d in chosen))
        inputs[name] = info
        all_docs.extend(chosen)
    all_docs.sort(key=lambda d: (_doc_hash(d.doc_id), d.doc_id))
    label_index = {name: i for i, name in enumerate(labels)}
    path.mkdir(parents=True, exist_ok=True)
    per_source = {name: {"label": name, "train_docs": 0, "val_docs": 0, "train_tokens": 0, "val_tokens": 0} for name in labels}
    outputs = {}
    counts = np.zeros(GPT2_VOCAB_SIZE, dtype=np.int64)
    for split in ("train", "val"):
        docs = [d for d in all_docs if is_validation(d.doc_id, config["val_fraction"]) == (split == "val")]
        tok_parts, lab_parts = [], []
        step = 512
        for i in tqdm(range(0, len(docs), step), desc=f"tokenising {split}", disable=not verbose):
            batch = docs[i : i + step]
            for d, ids in zip(batch, encode_gpt2([d.text for d in batch])):
                arr = np.empty(len(ids) + 1, dtype=np.uint16)
                arr[0] = GPT2_EOS
                arr[1:] = ids
                tok_parts.append(arr)
                lab_parts.append(np.full(len(arr), label_index[d.label], dtype=np.uint8))
                per_source[d.label][f"{split}_docs"] += 1
                per_source[d.label][f"{split}_tokens"] += len(arr)
        tokens = np.concatenate(tok_parts) if tok_parts else np.zeros(0, np.uint16)
        token_labels = np.concatenate(lab_parts) if lab_parts else np.zeros(0, np.uint8)
        if split == "train":
            counts = np.bincount(tokens, minlength=GPT2_VOCAB_SIZE).astype(np.int64)
        for kind, arr in (("tokens", tokens), ("labels", token_labels)):
            f = path / f"{split}.{kind}.npy"
            np.save(f, arr)
            outputs[f.name] = sha256_file(f)
    np.save(path / "counts.npy", counts)
    outputs["counts.npy"] = sha256_file(path / "counts.npy")
    total = sum(v["train_tokens"] + v["val_tokens"] for v in per_source.values())
    for v in per_source.values():
        v["share"] = (v["train_tokens"] + v["val_tokens"]) / max(total, 1)
    import tokenizers
    import transformers

    provenance = {
        "key": key,
        "config": config,
        "labels": labels,
        "inputs": inputs,
        "outputs_sha256": outputs,
        "content_sha256": config_hash(outputs, length=64),
        "per_source": list(per_source.values()),
        "n_train_tokens": int(sum(v["train_tokens"] for v in per_source.values())),
        "n_val_tokens": int(sum(v["val_tokens"] for v in per_source.values())),
        "tokenizer": {"name": "gpt2", "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
        "build_seconds": round(time.time() - t0, 1),
    }
    write_json(path / "provenance.json", provenance)  # written last: marks the build complete
    if verbose:
        print(f"corpus {key}: {provenance['n_train_tokens']:,} train + {provenance['n_val_tokens']:,} val tokens "
              f"in {provenance['build_seconds']} s -> {path}")
    return Corpus(path)


def retokenized_rows(corpus, codec, n_tokens: int, split: str = "val", n_ctx: int = 512):
    """[rows, n_ctx] ids of the embedded corpus for a model with another tokenizer (see
    `retokenized_token_rows`)."""
    return retokenized_token_rows(corpus, codec, n_tokens, split, n_ctx).ids


def retokenized_token_rows(corpus, codec, n_tokens: int, split: str = "val", n_ctx: int = 512) -> TokenRows:
    """Rows of the embedded corpus for a model with another tokenizer: each document is decoded
    from GPT-2 ids (lossless byte-level BPE) and re-encoded; documents joined by BOS. Each token
    keeps its document's source label; there are no GPT-2 ids (the tokens are not GPT-2's)."""
    import torch

    gpt2 = gpt2_tokenizer()
    stream = np.asarray(corpus.tokens(split))
    doc_labels = np.asarray(corpus.token_labels(split))
    starts = np.flatnonzero(stream == GPT2_EOS).tolist() + [len(stream)]
    out: list[int] = []
    labels: list[int] = []
    for s, e in zip(starts[:-1], starts[1:]):
        text = gpt2.decode(stream[s + 1 : e].tolist())
        ids = [codec.bos_id] + codec.tokenizer(text, add_special_tokens=False)["input_ids"]
        out += ids
        labels += [int(doc_labels[s])] * len(ids)
        if len(out) >= n_tokens + n_ctx:
            break
    ids = rows_from_stream(np.array(out[: n_tokens + n_ctx]), n_ctx, bos=codec.bos_id)
    lab = rows_from_stream(np.array(labels[: n_tokens + n_ctx]), n_ctx, bos=-1)
    return TokenRows(torch.from_numpy(ids), None, torch.from_numpy(lab), list(corpus.labels))


def embedded_token_rows(corpus, vocab: VocabMap, n_ctx: int, split: str, max_tokens: int | None = None) -> TokenRows:
    """Rows of a corpus split for the embedded family: each row is BOS + n_ctx-1 tokens of the
    split's GPT-2 stream (`rows_from_stream`), with the GPT-2 ids, the model ids (`vocab.map`) and
    the source label of each token (-1 for the inserted BOS)."""
    import torch

    stream, labels = corpus.tokens(split), corpus.token_labels(split)
    if max_tokens:
        stream, labels = stream[: max_tokens + n_ctx], labels[: max_tokens + n_ctx]
    gpt2 = rows_from_stream(stream, n_ctx)
    lab = rows_from_stream(labels, n_ctx, bos=-1)
    return TokenRows(vocab.map(gpt2), torch.from_numpy(gpt2), torch.from_numpy(lab), list(corpus.labels))


def embedded_rows_identity(corpus, vocab: VocabMap, n_ctx: int, split: str, max_tokens: int | None) -> dict:
    """What the embedded family's token rows are made from (content, never a path)."""
    return {"source": "embedded", "corpus": corpus.provenance["content_sha256"], "vocab": array_sha256(vocab.gpt2_ids),
            "n_ctx": int(n_ctx), "split": split, "max_tokens": int(max_tokens or 0), "version": 1}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Build the embedded corpus (cached by its configuration).")
    add_preset_options(ap, ["artifacts_dir"])
    ap.add_argument("--text-dir", action="append", default=[], help="add a folder of text files as a source")
    ap.add_argument("--only-text", action="store_true", help="use only the --text-dir folders")
    ap.add_argument("--deb-dir", default=None, help="folder holding the Debian .deb files (downloaded there if missing)")
    ap.add_argument("--force", action="store_true", help="rebuild even if a cached build exists")
    args = ap.parse_args(argv)
    preset = preset_from_args(args)
    cfg = dict(preset.get("corpus", {}))
    if args.text_dir:
        cfg["text_dirs"] = list(cfg.get("text_dirs", [])) + args.text_dir
    if args.only_text:
        cfg["sources"] = []
    try:
        corpus = build_corpus(cfg, preset.artifacts_path, deb_dir=args.deb_dir, force=args.force)
    except SourceMissing as e:
        sys.exit(f"error: {e}")
    print(corpus.summary().to_string())


if __name__ == "__main__":
    from helpers.core.cache import run_cli

    run_cli(main)
