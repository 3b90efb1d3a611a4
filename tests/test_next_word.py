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


def _greedy_reference(model, params, ids, steps, allowed=None):
    """Plain greedy decoding by full forwards over a right-padded row; ``allowed`` masks the first
    step's logits."""
    forward = jax.jit(lambda p, row: model.apply({"params": p}, row).logits[0])
    ids, new = list(ids), []
    for step in range(steps):
        logits = np.asarray(forward(params, jnp.asarray([ids + [0] * (32 - len(ids))])))[len(ids) - 1]
        if step == 0 and allowed is not None:
            logits = np.where(allowed, logits, -np.inf)
        new.append(int(np.argmax(logits)))
        ids.append(new[-1])
    return new


def test_first_allowed_constrains_the_first_token_only():
    from jaxtok.decode.generate import generate

    cfg = LlamaConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64,
                      max_seq_len=64)
    model = Llama(cfg)
    params = nn.unbox(model.init(jax.random.key(3), jnp.zeros((1, 4), jnp.int32))["params"])
    prompts = [[5, 9, 11], [7]]
    plain = generate(model, params, prompts, max_new_tokens=5, eos_id=-1)
    everything = generate(model, params, prompts, max_new_tokens=5, eos_id=-1, first_allowed=np.ones((2, 64), bool))
    assert everything == plain
    allowed = np.zeros((2, 64), bool)
    allowed[0, [3, 40]] = True  # two choices: the better of them
    allowed[1, plain[1][0] ^ 1] = True  # one choice, not the unconstrained one
    got = generate(model, params, prompts, max_new_tokens=5, eos_id=-1, first_allowed=allowed)
    for prompt, row, mask in zip(prompts, got, allowed):
        assert mask[row[0]]
        assert row == _greedy_reference(model, params, prompt, 5, mask)
    with pytest.raises(ValueError, match="no token to start with"):
        generate(model, params, prompts, max_new_tokens=2, eos_id=-1, first_allowed=np.zeros((2, 64), bool))
    with pytest.raises(ValueError, match="expected"):
        generate(model, params, prompts, max_new_tokens=2, eos_id=-1, first_allowed=np.ones((2, 63), bool))


def test_token_healing_drops_the_last_token_and_asks_for_its_bytes_first():
    """A context cut inside a merged piece: the continuation is greedy decoding from the prompt
    without its last token, the first new token starting with that token's bytes, those bytes
    given back; the same as plain decoding's output when the model keeps the dropped token."""
    from jaxtok.train.pretrain import train_bpe

    hf = train_bpe(["the cat sat on the mat and the cat ran to the hat"] * 20, 300, special_tokens=["<s>"])
    bos = hf.token_to_id("<s>")
    tok = TextTokenizer(hf=hf, bos_id=bos, eos_id=bos, pad_id=bos, doc_start_id=bos)
    cfg = LlamaConfig(vocab_size=384, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64,
                      max_seq_len=64)
    model = Llama(cfg)
    params = nn.unbox(model.init(jax.random.key(4), jnp.zeros((1, 4), jnp.int32))["params"])
    context = "the cat sat on the ma"
    ids = [bos] + tok.encode(context)
    last = hf.id_to_token(ids[-1])  # ASCII here: the token's string is its bytes
    allowed = np.zeros(384, bool)
    allowed[[i for t, i in hf.get_vocab().items() if i != bos and t.startswith(last)]] = True
    assert allowed.sum() >= 2  # the cut is inside longer pieces the model may now choose
    n = len(last)
    want = _greedy_reference(model, params, ids[:-1], 3 + n, allowed)  # the continuer's token budget
    text = hf.decode(want).encode()
    expected = text[n:] if text.startswith(last.encode()) else b"\0" + text
    got = TokenLMContinuer(model, params, tok, heal_tokens=True)([context], 3)[0]
    assert got == expected
    # a context whitespace healing cut is not healed again: it already ends where the tokenizer cuts
    both = TokenLMContinuer(model, params, tok, heal_whitespace=True, heal_tokens=True)(["the cat "], 3)[0]
    assert both == TokenLMContinuer(model, params, tok, heal_whitespace=True)(["the cat "], 3)[0]
    # nor one ending in a special token (no token's bytes start with it)
    special = TokenLMContinuer(model, params, tok, heal_tokens=True)(["the cat<s>"], 3)[0]
    assert special == TokenLMContinuer(model, params, tok)(["the cat<s>"], 3)[0]
    from tokenizers import Tokenizer, models

    plain = Tokenizer(models.WordLevel({"a": 0, "<s>": 1}, unk_token="a"))
    with pytest.raises(ValueError, match="byte-level"):
        TokenLMContinuer(model, params, TextTokenizer(hf=plain, bos_id=1, eos_id=1, pad_id=1, doc_start_id=1),
                         heal_tokens=True)(["a"], 2)
