import numpy as np
import pytest
import torch

from helpers.data import tokens as data


def test_tokenizer_files_match_their_sha256():
    data.verify_tokenizer_files()


@pytest.mark.parametrize("text, ids", [
    ("Hello world", [15496, 995]),
    (" the", [262]),
    ("\n", [198]),
    ("<|endoftext|>", [50256]),
    ("!", [0]),
    (" Hello", [18435]),
])
def test_gpt2_ids_of_known_strings(text, ids):
    assert data.encode_gpt2([text])[0] == ids


def test_gpt2_round_trip_is_lossless_on_unicode_and_code():
    text = "def f(x):\n    return x ** 2  # é, ü, 日本語 \t\u00a0"
    ids = data.encode_gpt2([text])[0]
    assert data.gpt2_tokenizer().decode(ids) == text


def test_vocab_top_k_keeps_most_frequent_and_specials():
    counts = np.zeros(data.GPT2_VOCAB_SIZE, dtype=np.int64)
    counts[[10, 20, 30, 40]] = [5, 50, 500, 1]
    v = data.VocabMap.top_k(counts, d_vocab=6)
    assert v.d_vocab == 6 and v.unk_id == 5
    assert list(v.gpt2_ids) == [data.GPT2_EOS, data.GPT2_NEWLINE, 30, 20, 10, -1]
    mapped = v.map(np.array([30, 40, data.GPT2_EOS, 12345]))
    assert mapped.tolist() == [2, 5, 0, 5]  # 40 was cut: unknown
    assert v.bos_id == 0 and v.newline_id == 1
    assert v.coverage(counts) == pytest.approx((5 + 50 + 500) / 556)


def test_vocab_encode_decode_round_trip_for_known_tokens():
    ids = data.encode_gpt2(["hello world"])[0]
    counts = np.zeros(data.GPT2_VOCAB_SIZE, dtype=np.int64)
    counts[ids] = 10
    v = data.VocabMap.top_k(counts, d_vocab=10)
    toks = v.encode("hello world")
    assert toks[0, 0].item() == v.bos_id
    assert v.decode(toks[0, 1:]) == "hello world"
    assert "<unk>" in v.decode(v.encode("zebra", prepend_bos=False)[0])


def test_rows_from_stream_prefixes_bos_and_drops_tail():
    rows = data.rows_from_stream(np.arange(1, 12), n_ctx=4, bos=0)
    assert rows.tolist() == [[0, 1, 2, 3], [0, 4, 5, 6], [0, 7, 8, 9]]


def test_row_batches_depend_on_seed_and_resume_identically():
    full = list(data.iter_row_batches(50, 8, seed=3, n_batches=14))
    resumed = list(data.iter_row_batches(50, 8, seed=3, start_batch=9, n_batches=14))
    assert all((a == b).all() for a, b in zip(full[9:], resumed))
    other = list(data.iter_row_batches(50, 8, seed=4, n_batches=2))
    assert not (full[0] == other[0]).all()
    epoch0 = np.concatenate(full[:6])  # 50 // 8 = 6 batches per epoch, no row twice
    assert len(set(epoch0.tolist())) == 48


def test_row_batches_reject_too_little_data():
    with pytest.raises(ValueError, match="larger corpus"):
        next(data.iter_row_batches(3, 8, seed=0))


def test_valid_token_mask_drops_bos_and_newline():
    toks = torch.tensor([[0, 5, 1, 7], [0, 1, 1, 9]])
    assert data.valid_token_mask(toks, [0, 1]).tolist() == [[False, True, False, True], [False, False, False, True]]
