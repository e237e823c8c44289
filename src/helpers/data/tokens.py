"""Tokens: the GPT-2 tokenizer (vendored), reduced vocabularies, token batches and token filtering.

The embedded seed family keeps GPT-2's token strings but predicts only the corpus's most frequent
GPT-2 tokens plus one unknown-token id (`VocabMap`): the full 50,257-token unembedding makes CPU
training several times slower. Online families (GPT-2, Pythia) use their own tokenizer and the
identity map.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from helpers.core.cache import array_sha256, atomic_write_bytes, cached_result, sha256_file

TOKENIZER_DIR = Path(__file__).parent / "tokenizer_gpt2"
TOKENIZER_SHA256 = {
    "vocab.json": "03087853bc70c618b66e7c7a43e787d2db4c469416beac9a483e53dad1f72f27",
    "merges.txt": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
GPT2_VOCAB_SIZE = 50257
GPT2_EOS = 50256  # <|endoftext|>: GPT-2's BOS, EOS and pad token
GPT2_NEWLINE = 198  # "\n"


def verify_tokenizer_files() -> None:
    """Check the vendored GPT-2 BPE files against their known sha256 sums."""
    for name, expected in TOKENIZER_SHA256.items():
        got = sha256_file(TOKENIZER_DIR / name)
        if got != expected:
            raise RuntimeError(
                f"{TOKENIZER_DIR / name} has sha256 {got}, expected {expected}: the vendored GPT-2 "
                "tokenizer file is corrupted; restore it from the repository"
            )


@functools.lru_cache(maxsize=1)
def gpt2_tokenizer():
    """The real GPT-2 tokenizer (`GPT2TokenizerFast`) loaded offline from the vendored files.

    Loaded with `from_pretrained(<dir>)`: in transformers 5.x the `vocab_file=`/`merges_file=`
    constructor builds an empty tokenizer, and TransformerLens needs a directory-loaded one.
    """
    from transformers import GPT2TokenizerFast

    verify_tokenizer_files()
    tok = GPT2TokenizerFast.from_pretrained(str(TOKENIZER_DIR))
    if len(tok) != GPT2_VOCAB_SIZE:
        raise RuntimeError(f"GPT-2 tokenizer has {len(tok)} tokens, expected {GPT2_VOCAB_SIZE}")
    return tok


def encode_gpt2(texts: Sequence[str], batch_size: int = 256) -> list[list[int]]:
    """GPT-2 ids of each text (no special tokens added)."""
    tok = gpt2_tokenizer()
    out: list[list[int]] = []
    for i in range(0, len(texts), batch_size):
        out.extend(tok(list(texts[i : i + batch_size]), add_special_tokens=False)["input_ids"])
    return out


@dataclass
class VocabMap:
    """A model vocabulary given as GPT-2 ids: model id `i` is GPT-2 token `gpt2_ids[i]`.

    `unk_id` (or None for full vocabularies) is the model id every other GPT-2 token maps to.
    """

    gpt2_ids: np.ndarray  # [d_vocab] int64, -1 at unk_id
    unk_id: int | None

    @classmethod
    def identity(cls, d_vocab: int = GPT2_VOCAB_SIZE) -> "VocabMap":
        return cls(np.arange(d_vocab, dtype=np.int64), None)

    @classmethod
    def top_k(cls, counts: np.ndarray, d_vocab: int, always: Sequence[int] = (GPT2_EOS, GPT2_NEWLINE)) -> "VocabMap":
        """The `d_vocab - 1` most frequent GPT-2 tokens of `counts` ([50257] token counts), ties
        broken by id, always including `always`, then one unknown-token id at the end."""
        if d_vocab < len(always) + 2:
            raise ValueError(f"d_vocab={d_vocab} is too small (need at least {len(always) + 2})")
        order = np.lexsort((np.arange(len(counts)), -counts.astype(np.int64)))
        chosen = [int(t) for t in always]
        seen = set(chosen)
        for t in order:
            if len(chosen) == d_vocab - 1:
                break
            if int(t) not in seen and counts[t] > 0:
                chosen.append(int(t))
                seen.add(int(t))
        ids = np.array(chosen + [-1], dtype=np.int64)
        return cls(ids, len(chosen))

    @property
    def d_vocab(self) -> int:
        return len(self.gpt2_ids)

    @functools.cached_property
    def to_model(self) -> np.ndarray:
        """[50257] lookup table: GPT-2 id -> model id."""
        if self.unk_id is None:
            return np.arange(GPT2_VOCAB_SIZE, dtype=np.int64)
        table = np.full(GPT2_VOCAB_SIZE, self.unk_id, dtype=np.int64)
        valid = self.gpt2_ids >= 0
        table[self.gpt2_ids[valid]] = np.nonzero(valid)[0]
        return table

    def map(self, gpt2_ids: np.ndarray | torch.Tensor) -> torch.Tensor:
        """GPT-2 ids (any shape) -> model ids (int64 tensor, same shape)."""
        arr = gpt2_ids.numpy() if isinstance(gpt2_ids, torch.Tensor) else np.asarray(gpt2_ids)
        return torch.from_numpy(self.to_model[arr.astype(np.int64)])

    @property
    def bos_id(self) -> int:
        return int(self.to_model[GPT2_EOS])

    @property
    def newline_id(self) -> int:
        return int(self.to_model[GPT2_NEWLINE])

    def token_strings(self) -> list[str]:
        """Readable string of every model id (`<unk>` for the unknown id)."""
        tok = gpt2_tokenizer()
        return [tok.decode([int(t)]) if t >= 0 else "<unk>" for t in self.gpt2_ids]

    def encode(self, text: str, prepend_bos: bool = True) -> torch.Tensor:
        """Text -> model ids [1, tokens] (GPT-2 BPE, then mapped)."""
        ids = encode_gpt2([text])[0]
        if prepend_bos:
            ids = [GPT2_EOS] + ids
        return self.map(np.array(ids, dtype=np.int64))[None]

    def decode(self, model_ids: Sequence[int] | torch.Tensor) -> str:
        ids = [int(i) for i in (model_ids.tolist() if isinstance(model_ids, torch.Tensor) else model_ids)]
        parts = []
        tok = gpt2_tokenizer()
        for i in ids:
            g = int(self.gpt2_ids[i])
            parts.append(tok.decode([g]) if g >= 0 else "<unk>")
        return "".join(parts)

    def coverage(self, counts: np.ndarray) -> float:
        """Fraction of the tokens counted in `counts` ([50257]) that are not mapped to unk."""
        keep = self.gpt2_ids[self.gpt2_ids >= 0]
        return float(counts[keep].sum() / max(counts.sum(), 1))


def rows_from_stream(stream: np.ndarray, n_ctx: int, bos: int = GPT2_EOS) -> np.ndarray:
    """Cut a 1-D token stream into rows of BOS + (n_ctx - 1) tokens ([rows, n_ctx]); the tail that
    does not fill a row is dropped (as TransformerLens `tokenize_and_concatenate` does)."""
    body = n_ctx - 1
    n_rows = len(stream) // body
    rows = np.empty((n_rows, n_ctx), dtype=np.int64)
    rows[:, 0] = bos
    rows[:, 1:] = np.asarray(stream[: n_rows * body], dtype=np.int64).reshape(n_rows, body)
    return rows


def iter_row_batches(n_rows: int, batch_size: int, seed: int, start_batch: int = 0, n_batches: int | None = None) -> Iterator[np.ndarray]:
    """Indices of rows for each training batch: a fresh seeded permutation per epoch, so the data
    order is a function of (seed, batch index) alone and a resumed run sees the same batches."""
    if n_rows < batch_size:
        raise ValueError(f"only {n_rows} rows of data for batch size {batch_size}: build a larger corpus")
    per_epoch = n_rows // batch_size
    b = start_batch
    while n_batches is None or b < n_batches:
        epoch, within = divmod(b, per_epoch)
        perm = np.random.default_rng([seed, epoch]).permutation(n_rows)
        yield perm[within * batch_size : (within + 1) * batch_size]
        b += 1


def valid_token_mask(tokens: torch.Tensor, drop_ids: Sequence[int]) -> torch.Tensor:
    """[batch, pos] bool mask of the tokens kept for neuron statistics: the paper drops the
    BOS/pad token and the newline token (`drop_ids` holds their ids in the model's vocabulary)."""
    mask = torch.ones_like(tokens, dtype=torch.bool)
    for t in drop_ids:
        mask &= tokens != t
    return mask


def pile_token_rows(n_tokens: int, n_ctx: int = 512, seed: int = 0, tokenizer=None) -> np.ndarray:
    """Rows of the Pile test split (online only): BOS + n_ctx-1 tokens each, documents joined by
    EOS, documents of 50 characters or fewer dropped, shuffled with a fixed seed.

    Needs the `datasets` package and access to the Hugging Face hub.
    """
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the Pile loader needs `pip install datasets`") from e
    from helpers.data.hub import require_hub

    require_hub("the Pile test split")
    tok = tokenizer or gpt2_tokenizer()
    eos = tok.eos_token_id
    ds = datasets.load_dataset("monology/pile-uncopyrighted", split="test", streaming=True)
    ds = ds.shuffle(seed=seed, buffer_size=10_000)
    stream: list[int] = []
    target = n_tokens // (n_ctx - 1) * (n_ctx - 1) + (n_ctx - 1)
    for doc in ds:
        if len(doc["text"]) <= 50:
            continue
        stream.extend(tok(doc["text"], add_special_tokens=False)["input_ids"] + [eos])
        if len(stream) >= target:
            break
    return rows_from_stream(np.array(stream), n_ctx, bos=tok.bos_token_id or eos)


# --------------------------------------------------------------------------------------------
# Token rows with their per-token metadata, cached by content
# --------------------------------------------------------------------------------------------

ROWS_FILE = "rows.npz"


@dataclass
class TokenRows:
    """Token rows for the analyses and what each token is.

    `ids` [rows, n_ctx] int64 model ids (what the models read); `gpt2_ids` [rows, n_ctx] int64 the
    GPT-2 ids of the same tokens (for the embedded family the model ids are a reduced vocabulary in
    which rare tokens are `<unk>`; None where the tokenizer is not GPT-2's); `labels` [rows, n_ctx]
    int64 index into `label_names` of the source each token comes from (-1 for an inserted BOS;
    None when the source is unknown). `sha256` identifies the rows' content (`array_sha256` of
    `ids`), for cache keys.
    """

    ids: torch.Tensor
    gpt2_ids: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    label_names: list[str] = field(default_factory=list)
    sha256: str | None = None

    def __post_init__(self):
        for name in ("gpt2_ids", "labels"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != tuple(self.ids.shape):
                raise ValueError(f"TokenRows.{name} has shape {tuple(t.shape)}, ids have {tuple(self.ids.shape)}")
        if self.sha256 is None:
            self.sha256 = array_sha256(self.ids)

    @classmethod
    def of(cls, rows: "TokenRows | torch.Tensor | np.ndarray") -> "TokenRows":
        """`rows` as TokenRows (a bare [rows, n_ctx] id tensor gets no GPT-2 ids or labels)."""
        if isinstance(rows, TokenRows):
            return rows
        return cls(torch.as_tensor(np.asarray(rows) if not isinstance(rows, torch.Tensor) else rows).long())

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def n_ctx(self) -> int:
        return int(self.ids.shape[1])


def save_token_rows(rows: TokenRows, path: str | Path) -> None:
    """Write `rows` as one .npz (ids int32, GPT-2 ids int32, labels int16), atomically."""
    arrays = {"ids": rows.ids.numpy().astype(np.int32)}
    if rows.gpt2_ids is not None:
        arrays["gpt2_ids"] = rows.gpt2_ids.numpy().astype(np.int32)
    if rows.labels is not None:
        arrays["labels"] = rows.labels.numpy().astype(np.int16)
    buf = io.BytesIO()
    np.savez(buf, label_names=np.array(rows.label_names, dtype=str), **arrays)
    atomic_write_bytes(path, buf.getvalue())


def load_token_rows(path: str | Path, sha256: str | None = None) -> TokenRows:
    with np.load(path) as z:
        get = lambda k: torch.from_numpy(z[k].astype(np.int64)) if k in z else None  # noqa: E731
        return TokenRows(get("ids"), get("gpt2_ids"), get("labels"), [str(x) for x in z["label_names"]], sha256)


def cached_token_rows(artifacts_dir: str | Path, identity: dict, build: Callable[[], TokenRows]) -> TokenRows:
    """Token rows built once by `build()` and cached under `artifacts_dir/token_rows/`, keyed by
    `identity` (where the rows come from: corpus content hash, vocabulary, split, sizes, a
    version); the rows' own sha256 is recorded, so results can be keyed on it without re-hashing."""

    def compute(folder: Path) -> dict:
        rows = build()
        save_token_rows(rows, folder / ROWS_FILE)
        return {"sha256": rows.sha256, "shape": list(rows.ids.shape)}

    res = cached_result("token_rows", identity, compute, root=artifacts_dir, prefix=str(identity.get("source", "rows")))
    return load_token_rows(res.file(ROWS_FILE), res.meta.get("sha256"))
