"""SmolLM2-135M-Instruct loaded from its GGUF against transformers on the same file (float32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtok.decode.generate import generate
from jaxtok.models.llama import KVCache, Llama

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "In 1969, 3 astronauts flew 384400 km to the Moon — une aventure extraordinaire! 月へ行く。",
]
TOKENIZER_TEXTS = PROMPTS + [
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "<|im_start|>user\nHi there<|im_end|>\n",
    "Numbers: 3.14159, 1,000,000 and -42e10; emoji 🙂 and accents: naïve café.",
]


def jax_logits(smollm2, ids):
    model = Llama(smollm2.config)
    return np.asarray(model.apply({"params": smollm2.params}, jnp.asarray([ids])).logits[0])


def test_tokenizer_ids_equal_reference(smollm2, smollm2_reference):
    _, ref_tok = smollm2_reference
    for text in TOKENIZER_TEXTS:
        ours = smollm2.tokenizer.encode(text)
        assert ours == ref_tok(text, add_special_tokens=False)["input_ids"], text
        assert smollm2.tokenizer.decode(ours, skip_special_tokens=False) == text


def test_digits_are_split_one_by_one(smollm2):
    # llama.cpp's 'smollm' pre-tokenizer isolates every digit
    tok = smollm2.tokenizer
    ids = tok.encode("2024")
    assert [tok.decode([i]) for i in ids] == ["2", "0", "2", "4"]


def test_logits_match_reference(smollm2, smollm2_reference):
    import torch

    ref_model, _ = smollm2_reference
    worst = 0.0
    for text in PROMPTS:
        ids = smollm2.tokenizer.encode(text)
        with torch.no_grad():
            ref = ref_model(torch.tensor([ids])).logits[0].numpy()
        ours = jax_logits(smollm2, ids)
        diff = float(np.abs(ours - ref).max())
        worst = max(worst, diff)
        # logits reach ~40 in magnitude; measured worst difference is ~1.3e-4
        assert diff < 1e-3, (text, diff)
        np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))
    print(f"max |logit difference| vs transformers: {worst:.2e}")


def test_greedy_continuation_matches_reference(smollm2, smollm2_reference):
    import torch

    ref_model, _ = smollm2_reference
    tok = smollm2.tokenizer
    prompts = [tok.encode(p) for p in PROMPTS[:2]]
    # eos_id=-1: never stop, so exactly 32 tokens are compared (EOS included if produced)
    ours = generate(Llama(smollm2.config), smollm2.params, prompts, max_new_tokens=32, eos_id=-1,
                    pad_id=tok.pad_id)
    for ids, got in zip(prompts, ours):
        seq = list(ids)
        with torch.no_grad():  # plain greedy loop on the reference with its own KV cache
            out = ref_model(torch.tensor([seq]), use_cache=True)
            for _ in range(32):
                seq.append(int(out.logits[0, -1].argmax()))
                out = ref_model(torch.tensor([seq[-1:]]), past_key_values=out.past_key_values, use_cache=True)
        assert got == seq[len(ids):]


def test_kv_cache_decode_equals_full_forward(smollm2):
    model = Llama(smollm2.config)
    ids = jnp.asarray([smollm2.tokenizer.encode(PROMPTS[2])])
    t = ids.shape[1]

    @jax.jit
    def step(params, tokens, cache):
        out = model.apply({"params": params}, tokens, cache=cache)
        return out.logits, out.cache

    full = jax_logits(smollm2, ids[0].tolist())
    logits, cache = step(smollm2.params, ids[:, :t - 4], KVCache.create(smollm2.config, 1, t + 4))
    pieces = [logits[0]]
    for i in range(t - 4, t):
        logits, cache = step(smollm2.params, ids[:, i:i + 1], cache)
        pieces.append(logits[0])
    np.testing.assert_allclose(np.concatenate(pieces), full, atol=2e-4, rtol=0)


def test_chat_template_renders_chatml(smollm2):
    text = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
