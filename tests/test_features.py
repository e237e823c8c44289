"""Token-feature definitions on hand-picked GPT-2 tokens, unigram forms, and spaCy alignment."""
import numpy as np
import pytest

from helpers.data.tokens import gpt2_tokenizer
from helpers.taxonomy.features import (align_offsets, position_bins, row_text, spacy_pipeline, token_feature_table,
                              unigram_features, unigram_min_count, vocab_strings_gpt2)


def test_token_features_on_hand_picked_gpt2_tokens():
    tok = gpt2_tokenizer()
    picks = [" The", "1999", " HTML", ",", " January", "ing", " he", "\n", " unbelievable", "7", " her", "(", " Monday",
             " three", "1200"]
    ids = [tok.convert_tokens_to_ids(tok.tokenize(s))[0] for s in picks]
    assert all(len(tok.tokenize(s)) == 1 for s in picks)
    f = token_feature_table([vocab_strings_gpt2()[i] for i in ids]).set_index(np.array(picks))
    yes = {" The": ["starts_w_space", "starts_w_capital", "is_alpha", "group_article", "start_w_t"],
           "1999": ["is_numeric", "is_year", "is_4_digit", "contains_digit"],
           " HTML": ["is_all_caps", "is_alpha", "starts_w_capital"],
           ",": ["contains_comma", "is_symbolic"],
           " January": ["group_month", "start_w_j"],
           "ing": ["starts_w_letter_no_space", "is_lower", "starts_w_vowel"],
           " he": ["pronoun_male", "is_lower"],
           "\n": ["is_whitespace"],
           " unbelievable": ["prefix_un", "suffix_able"],
           "7": ["is_1_digit", "is_numeric"],
           " her": ["pronoun_female", "pronoun_possessive"],
           "(": ["contains_open_paren", "is_symbolic"],
           " Monday": ["group_weekday"],
           " three": ["is_number_word"]}
    for s, cols in yes.items():
        for c in cols:
            assert f.loc[s, c], f"{s!r} should have {c}"
    no = {" The": ["is_lower", "starts_w_letter_no_space", "is_numeric"], "1999": ["is_alpha", "is_symbolic"],
          ",": ["is_alpha", "is_whitespace"], "\n": ["is_symbolic", "starts_w_space"], "ing": ["prefix_in", "suffix_ing"],
          "1200": ["is_year"], " he": ["pronoun_female"], "7": ["is_year"]}
    for s, cols in no.items():
        for c in cols:
            assert not f.loc[s, c], f"{s!r} should not have {c}"
    assert f.loc["1200", "is_4_digit"] and not f.loc["1200", "is_year"]


def test_unigram_forms_merge_case_and_space_and_respect_thresholds():
    strings = vocab_strings_gpt2()
    tok = gpt2_tokenizer()
    counts = np.zeros(len(strings), dtype=np.int64)
    on = [tok.convert_tokens_to_ids(t) for t in ("on", "Ġon", "On", "ĠOn")]
    counts[on] = 10
    the = tok.convert_tokens_to_ids("Ġthe")
    counts[the] = 5
    feats = unigram_features(strings, counts, min_count=20)
    assert set(on) <= set(feats["unigram_on"].tolist())
    assert "unigram_the" not in feats  # 5 < 20 occurrences
    assert unigram_min_count(10_000_000, 20) == 3000 and unigram_min_count(100_000, 20) == 30
    assert unigram_min_count(1_000, 20) == 20


def test_position_bins_cover_every_position_once():
    bins = position_bins(64)
    assert bins[0] == (1, 2) and bins[-1][1] == 64
    assert all(a[1] == b[0] for a, b in zip(bins, bins[1:]))


def test_spacy_labels_align_to_every_piece_of_a_split_word():
    tok = gpt2_tokenizer()
    text = "The incomprehensibly quick foxes weren't jumping. Then it ended."
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    pieces = tok.convert_ids_to_tokens(enc["input_ids"])
    doc = spacy_pipeline()(text)
    labels = align_offsets(enc["offset_mapping"], text, doc)
    spans = [text[a:b] for a, b in enc["offset_mapping"]]
    word = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if 3 <= a and b <= 20]  # "incomprehensibly"
    assert len(word) == 3, pieces  # GPT-2 splits it into three tokens
    for i in word:
        assert "pos_ADV" in labels[i], (spans[i], labels[i])
    assert "sent_start" in labels[0] and not any("sent_start" in labels[i] for i in word)
    then = spans.index(" Then")
    assert "sent_start" in labels[then] and "sent_end" in labels[then - 1]  # the period before it
    foxes = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a >= 25 and b <= 32]
    assert len(foxes) == 2 and all("morph_Number=Plur" in labels[i] for i in foxes)
    # "weren't": GPT-2 cuts " weren" + "'t", spaCy "were" + "n't"; each piece takes the word of its first character
    weren = spans.index(" weren")
    assert "pos_AUX" in labels[weren] and "pos_PART" in labels[weren + 1] and "morph_Polarity=Neg" in labels[weren + 1]
    # the same alignment through the spans of concatenated token strings (what the chapter's rows use)
    strings = vocab_strings_gpt2()
    ids = [50256] + enc["input_ids"]
    row, row_spans = row_text(strings, ids)
    assert row == text
    assert align_offsets(row_spans[1:], row, doc) == labels
