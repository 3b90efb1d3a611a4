"""Bits per byte: window arithmetic, a known value, and window independence."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers

from jaxtok.evaluate import evaluate_bpb, sliding_windows
from jaxtok.objectives import token_nll
from jaxtok.tokenization import TextTokenizer

# Counted by hand, characters / UTF-8 bytes:  h é l l o -> 5 / 6,  " " -> 1 / 1,  w ö r l d , -> 6 / 7,
# " " -> 1 / 1,  日 本 語 -> 3 / 9,  " " -> 1 / 1,  😀 -> 1 / 4,  ". " -> 2 / 2: 20 characters, 31 bytes.
PHRASE = "héllo wörld, 日本語 😀. "
TEXT = PHRASE * 12  # 240 characters, 372 bytes


@settings(deadline=None, max_examples=200)
@given(st.integers(2, 300), st.integers(1, 64), st.data())
def test_every_target_scored_exactly_once(num_ids, window, data):
    stride = data.draw(st.integers(1, window))
    counts = np.zeros(num_ids, int)
    for start, end, score_from in sliding_windows(num_ids, window, stride):
        assert end - 1 - start <= window  # inputs fit the window
        assert start < score_from <= end
        counts[score_from:end] += 1
    assert counts[0] == 0 and (counts[1:] == 1).all()


def byte_tokenizer(doc_start: bool) -> TextTokenizer:
    vocab = {chr(i): i for i in range(256)}
    hf = Tokenizer(models.WordLevel(vocab=vocab, unk_token="\x00"))
    hf.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return TextTokenizer(hf=hf, doc_start_id=0 if doc_start else None)


def uniform_apply(params, tokens, positions):
    return jnp.zeros((*tokens.shape, 256))


def test_uniform_model_has_known_bpb():
    tok = byte_tokenizer(doc_start=True)
    result = evaluate_bpb(uniform_apply, None, tok, "abcdefgh" * 5, window=16, progress=False)
    # each scored character costs ln(256) nats = 8 bits; every character is one byte
    assert result.tokens == 40 and result.bytes == 40
    assert result.bpb == pytest.approx(8.0)
    assert result.nats == pytest.approx(40 * math.log(256), rel=1e-6)


def test_bpb_divides_by_utf8_bytes_not_characters():
    # the byte tokenizer gives one token per character (those above U+00FF are its unknown id 0)
    tok = byte_tokenizer(doc_start=True)
    for window, stride in [(1024, 512), (64, 24)]:  # one window, and overlapping ones
        result = evaluate_bpb(uniform_apply, None, tok, TEXT, window=window, stride=stride, progress=False)
        assert result.tokens == 240 and result.bytes == 372
        assert result.bpb == pytest.approx(8.0 * 240 / 372)  # 8 bits per scored character
        assert result.nats == pytest.approx(240 * math.log(256), rel=1e-6)


def test_without_doc_start_the_first_characters_bytes_are_not_counted():
    # "日本 😀": 4 characters, 3 + 3 + 1 + 4 = 11 bytes; the first (日, 3 bytes) is only context
    tok = byte_tokenizer(doc_start=False)
    result = evaluate_bpb(uniform_apply, None, tok, "日本 😀", window=4, progress=False)
    assert result.tokens == 3 and result.bytes == 8
    assert result.bpb == pytest.approx(8.0 * 3 / 8)


def test_without_doc_start_first_token_is_not_counted():
    tok = byte_tokenizer(doc_start=False)
    result = evaluate_bpb(uniform_apply, None, tok, "abcdefgh", window=4, progress=False)
    assert result.tokens == 7 and result.bytes == 7


def bigram_apply(table):
    def apply(params, tokens, positions):
        return params[tokens]  # logits depend on the previous token only
    return apply


def test_result_is_window_independent_for_a_bigram_model():
    tok = byte_tokenizer(doc_start=True)
    table = jax.random.normal(jax.random.key(0), (256, 256))
    text = "the quick brown fox jumps over the lazy dog"
    results = [evaluate_bpb(bigram_apply(table), table, tok, text, window=w, stride=s, batch_size=3,
                            progress=False) for w, s in [(64, 32), (8, 8), (8, 1), (5, 3)]]
    ids = np.array([0] + [ord(c) for c in text])
    expected = float(token_nll(table[ids[:-1]][None], jnp.asarray(ids[1:])[None]).sum())
    for r in results:
        assert r.nats == pytest.approx(expected, rel=1e-5)
        assert r.bytes == len(text)


def test_bad_inputs():
    tok = byte_tokenizer(doc_start=True)
    with pytest.raises(ValueError, match="empty"):
        evaluate_bpb(uniform_apply, None, tok, "", progress=False)
    with pytest.raises(ValueError, match="stride"):
        evaluate_bpb(uniform_apply, None, tok, "abc", window=4, stride=5, progress=False)
