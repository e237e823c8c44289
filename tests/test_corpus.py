import gzip

import numpy as np
import pytest

from helpers.data import corpus as C
from helpers.data.tokens import GPT2_EOS, gpt2_tokenizer


def _write_texts(folder, n=12):
    folder.mkdir()
    for i in range(n):
        body = f"Document {i}. " + " ".join(f"word{j} and more text about topic {i}" for j in range(30))
        (folder / f"doc{i:02d}.txt").write_text(body)
    (folder / "ignored.bin").write_bytes(b"\x00\x01")


def test_text_dir_build_is_deterministic(tmp_path):
    texts = tmp_path / "mytexts"
    _write_texts(texts)
    cfg = {"sources": [], "text_dirs": [str(texts)], "val_fraction": 0.25}
    a = C.build_corpus(cfg, tmp_path / "out1", verbose=False)
    b = C.build_corpus(cfg, tmp_path / "out2", verbose=False)
    assert a.provenance["outputs_sha256"] == b.provenance["outputs_sha256"]
    assert a.provenance["content_sha256"] == b.provenance["content_sha256"]
    assert a.labels == ["text:mytexts"]
    p = a.provenance
    assert p["n_train_tokens"] > 0 and p["n_val_tokens"] > 0
    assert p["inputs"]["text:mytexts"]["n_files"] == 12


def test_built_tokens_are_gpt2_ids_of_the_documents(tmp_path):
    texts = tmp_path / "t"
    _write_texts(texts, n=3)
    c = C.build_corpus({"sources": [], "text_dirs": [str(texts)], "val_fraction": 0.0}, tmp_path / "o", verbose=False)
    toks = np.asarray(c.tokens("train"))
    starts = np.flatnonzero(toks == GPT2_EOS)
    assert len(starts) == 3 and starts[0] == 0
    decoded = sorted(gpt2_tokenizer().decode(toks[s + 1:e].tolist()) for s, e in zip(starts, list(starts[1:]) + [len(toks)]))
    assert decoded == sorted((texts / f"doc{i:02d}.txt").read_text() for i in range(3))
    assert (np.asarray(c.token_labels("train")) == 0).all()
    assert c.counts().sum() == len(toks)


def test_changed_input_changes_hash_and_cache_is_reused(tmp_path):
    texts = tmp_path / "t"
    _write_texts(texts)
    cfg = {"sources": [], "text_dirs": [str(texts)], "val_fraction": 0.25}
    a = C.build_corpus(cfg, tmp_path / "o", verbose=False)
    mtime = (a.path / "provenance.json").stat().st_mtime_ns
    assert (C.build_corpus(cfg, tmp_path / "o", verbose=False).path / "provenance.json").stat().st_mtime_ns == mtime
    (texts / "doc00.txt").write_text("A changed document with different words in it, long enough to count.")
    b = C.build_corpus(cfg, tmp_path / "o2", verbose=False)
    assert b.provenance["content_sha256"] != a.provenance["content_sha256"]


def test_missing_text_dir_says_what_to_pass(tmp_path):
    with pytest.raises(C.SourceMissing, match="--text-dir"):
        C.build_corpus({"sources": [], "text_dirs": [str(tmp_path / "nope")]}, tmp_path / "o", verbose=False)


def test_unknown_source_lists_known_ones():
    with pytest.raises(ValueError, match="python-docs"):
        C.corpus_config({"sources": ["wikipedia"]})


def test_missing_debian_package_without_apt_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(C.shutil, "which", lambda name: None)
    with pytest.raises(C.SourceMissing, match="apt-get download dict-gcide"):
        C.fetch_deb("dict-gcide", tmp_path)


def test_dictd_parser_splits_entries_by_index():
    entries = [b"apple\n  a fruit", b"bee\n  an insect", b"cat\n  an animal"]
    body, index, off = b"", [], 0
    for e in entries:
        index.append((e.split(b"\n")[0].decode(), off, len(e)))
        body += e
        off += len(e)

    def b64(n):
        s = ""
        while True:
            s = C._B64[n % 64] + s
            n //= 64
            if n == 0:
                return s
    idx = "\n".join(f"{h}\t{b64(o)}\t{b64(n)}" for h, o, n in index) + "\n00-database-url\tA\tB\n"
    docs = C.parse_dictd(idx.encode(), gzip.compress(body), "utf-8", "dict", per_doc=2)
    assert [d.text for d in docs] == ["apple\n  a fruit\nbee\n  an insect", "cat\n  an animal"]
    assert all(d.label == "dict" for d in docs)


def test_wordnet_parser_reads_words_and_gloss():
    line = b"00001740 03 n 02 entity 0 thing 0 000 | that which exists\n  1 license header line\n"
    docs = C.parse_wordnet([("usr/share/wordnet/data.noun", line)])
    assert docs[0].text == "entity, thing (noun): that which exists"
