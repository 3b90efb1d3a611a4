"""Sampled tokenizers (hypernetwork training): lossless on any text, deterministic per seed,
sized as asked, and counting substrings exactly as a direct count does."""

import collections

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import pre_tokenizers

from jaxtok.transfer.decompose import byte_to_char
from jaxtok.transfer.sampler import SamplerConfig, count_substrings, sample_tokenizer, vocab_json

TEXTS = ["Der schnelle braune Fuchs springt über den faulen Hund. Grüße aus Köln!",
         "def add(a, b):\n    return a + b  # ¿qué tal? 世界 🙂",
         "La volpe marrone salta sopra il cane pigro; el zorro también."] * 3
CONFIG = SamplerConfig(vocab_range=(60, 120), max_len=6, max_word=12)


@pytest.fixture(scope="module")
def tokenizer():
    return sample_tokenizer(TEXTS, np.random.default_rng(0), CONFIG, ["<|endoftext|>"])


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=200))
def test_any_text_round_trips(tokenizer, text):
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_special_tokens_and_all_bytes_are_in_the_vocabulary(tokenizer):
    assert tokenizer.token_to_id("<|endoftext|>") is not None
    vocab = tokenizer.get_vocab()
    assert set(byte_to_char().values()) <= set(vocab)  # every byte: nothing is ever unknown
    assert CONFIG.vocab_range[0] <= len(vocab) - 256 - 1 <= CONFIG.vocab_range[1]


def test_same_seed_same_tokenizer_other_seed_another():
    a = sample_tokenizer(TEXTS, np.random.default_rng(5), CONFIG)
    b = sample_tokenizer(TEXTS, np.random.default_rng(5), CONFIG)
    c = sample_tokenizer(TEXTS, np.random.default_rng(6), CONFIG)
    assert vocab_json(a) == vocab_json(b) != vocab_json(c)


def test_counts_equal_a_direct_count():
    texts = ["aa ab aab", "ab ab"]
    strings, counts = count_substrings(texts, max_len=3, max_word=8)
    got = dict(zip(strings, counts.tolist()))
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    want = collections.Counter()
    for text in texts:
        for word, _ in pre.pre_tokenize_str(text):
            for n in range(1, 4):
                for i in range(len(word) - n + 1):
                    want[word[i:i + n]] += 1
    assert got == dict(want)


def test_bad_ranges_are_rejected():
    with pytest.raises(ValueError, match="vocab_range"):
        SamplerConfig(vocab_range=(10, 5))
    with pytest.raises(ValueError, match="max_len"):
        SamplerConfig(max_len=20, max_word=10)
