"""Next-word accuracy: the definition, frequency buckets, and the token-LM continuer against a
plain greedy loop (the byte LM's continuer is checked in test_byte_lm_train.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxtok.data.words import byte_tokenizer
from jaxtok.models.llama import Llama, LlamaConfig
from jaxtok.next_word import (
    TokenLMContinuer,
    bucket_of,
    contexts_and_targets,
    next_word_accuracy,
    word_is_right,
)
from jaxtok.tokenization import TextTokenizer

TEXT = "the cat sat on the mat. the cat ran!"


@pytest.mark.parametrize("target, continuation, right", [
    ("cat ", b"cat sat", True),
    ("cat ", b"cat  sat", False),  # more whitespace: the word would be "cat  "
    ("cat", b"cats", False),  # the word goes on
    ("cat", b"cat.", True),
    ("cat", b"cat", True),  # the model ended the document right after it
    ("cat", b"ca", False),
    ("e\u0301", "e\u0301.".encode(), True),
    ("e\u0301", "e\u0301x".encode(), False),  # the letter run goes on: the word is "éx"
    ("e", "e\u0301".encode(), False),  # a combining mark continues the cluster
    ("東", "東京".encode(), True),  # one word per Han character
])
def test_word_is_right(target, continuation, right):
    assert word_is_right(target, continuation) is right


def test_contexts_are_whole_words_within_the_budget():
    pairs = contexts_and_targets(TEXT, context_bytes=8)
    assert pairs[0] == ("", "the ")
    assert pairs[3] == ("cat sat ", "on ")  # "the cat sat " is 12 bytes: the oldest word goes
    assert "".join(t for _, t in pairs) == TEXT
    assert all(len(c.encode()) <= 8 for c, _ in pairs)


def oracle(text):
    """The continuer that knows the text: every word right."""
    def continuer(contexts, min_bytes):
        out = []
        for c in contexts:
            start = text.index(c) + len(c) if c else 0  # contexts here are unique prefixes' tails
            out.append(text[start:].encode()[:min_bytes])
        return out
    return continuer


def test_accuracy_and_buckets():
    text = "alpha beta gamma delta"
    counts = {"alpha ": 5, "beta ": 50, "gamma ": 5000}
    result = next_word_accuracy(oracle(text), text, context_bytes=64, counts=counts, batch_size=2)
    assert (result.right, result.total, result.accuracy) == (4, 4, 1.0)
    assert result.buckets == {"unseen": (1, 1), "1-9": (1, 1), "10-99": (1, 1), "1000+": (1, 1)}
    assert result.rare_accuracy == 1.0
    # a continuer one word behind is never right
    lagging = next_word_accuracy(lambda cs, n: [b"x " * n for _ in cs], text, context_bytes=64)
    assert lagging.right == 0 and lagging.total == 4
    assert [bucket_of(n) for n in (0, 9, 10, 999, 1000)] == ["unseen", "1-9", "10-99", "100-999", "1000+"]
    with pytest.raises(ValueError, match="empty"):
        next_word_accuracy(oracle(""), "", context_bytes=8)


def test_token_continuer_is_greedy_decoding_after_the_document_start():
    hf = byte_tokenizer()
    tok = TextTokenizer(hf=hf, bos_id=256, eos_id=256, pad_id=256, doc_start_id=256)
    cfg = LlamaConfig(vocab_size=257, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64,
                      max_seq_len=64)
    model = Llama(cfg)
    params = nn.unbox(model.init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))["params"])
    got = TokenLMContinuer(model, params, tok)(["ab", ""], 4)
    # the full forward over a right-padded row (causal: padding after a position changes nothing there)
    forward = jax.jit(lambda p, ids: model.apply({"params": p}, ids).logits[0])
    for context, row in zip(["ab", ""], got):
        ids = [256] + list(context.encode())
        new = []
        for _ in range(4):
            logits = forward(params, jnp.asarray([ids + [0] * (8 - len(ids))]))
            token = int(np.argmax(np.asarray(logits[len(ids) - 1])))
            if token == 256:
                break
            ids.append(token)
            new.append(token)
        assert row == hf.decode(new).encode()


def test_whitespace_healing_predicts_the_same_bytes():
    """Healing prompts without the trailing space and asks for it first: the continuation of
    "ab " is the healed one minus that space, or a certain miss when the model wrote no space."""
    hf = byte_tokenizer()
    tok = TextTokenizer(hf=hf, bos_id=256, eos_id=256, pad_id=256, doc_start_id=256)
    cfg = LlamaConfig(vocab_size=257, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64,
                      max_seq_len=64)
    model = Llama(cfg)
    params = nn.unbox(model.init(jax.random.key(2), jnp.zeros((1, 4), jnp.int32))["params"])
    plain = TokenLMContinuer(model, params, tok)(["ab"], 5)[0]
    healed = TokenLMContinuer(model, params, tok, heal_whitespace=True)(["ab "], 4)[0]
    assert healed == (plain[1:] if plain.startswith(b" ") else b"\0" + plain)
