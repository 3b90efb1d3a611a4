"""The Llama decoder on tiny configs: shapes, jit, cache, padding, packing, embedding swaps."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxtok.models.llama import PRESETS, KVCache, Llama, LlamaConfig, init_params

CFG = PRESETS["llama-tiny"]


@pytest.fixture(scope="module")
def params():
    return nn.unbox(init_params(CFG, jax.random.key(0)))


@jax.jit
def forward(params, tokens, **kw):
    return Llama(CFG).apply({"params": params}, tokens, **kw)


def random_tokens(seed, shape):
    return jax.random.randint(jax.random.key(seed), shape, 0, CFG.vocab_size)


class TestForward(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_shapes_and_hidden(self):
        p = nn.unbox(init_params(CFG, jax.random.key(0)))
        tokens = random_tokens(1, (3, 7))
        fn = self.variant(lambda p, t: Llama(CFG).apply({"params": p}, t, return_hidden=True))
        out = fn(p, tokens)
        chex.assert_shape(out.logits, (3, 7, CFG.vocab_size))
        chex.assert_shape(out.hidden, (3, 7, CFG.d_model))
        chex.assert_tree_all_finite(out.logits)
        # logits are the hidden states against the tied embedding matrix
        np.testing.assert_allclose(out.logits, out.hidden @ p["embedding"].T, rtol=1e-5, atol=1e-5)


def test_causal_prefix_invariance(params):
    tokens = random_tokens(2, (2, 12))
    full = forward(params, tokens).logits
    prefix = forward(params, tokens[:, :5]).logits
    chex.assert_trees_all_close(full[:, :5], prefix, atol=1e-5, rtol=1e-5)


def test_kv_cache_decode_equals_full_forward(params):
    tokens = random_tokens(3, (2, 11))
    full = forward(params, tokens).logits
    cache = KVCache.create(CFG, 2, 16)
    out = forward(params, tokens[:, :4], cache=cache)
    pieces = [out.logits]
    for i in range(4, 11):
        out = forward(params, tokens[:, i:i + 1], cache=out.cache)
        pieces.append(out.logits)
    chex.assert_trees_all_close(jnp.concatenate(pieces, axis=1), full, atol=1e-5, rtol=1e-5)
    assert int(out.cache.end) == 11


def test_left_padding_does_not_leak(params):
    tokens = random_tokens(4, (1, 6))
    alone = forward(params, tokens).logits
    padded = jnp.concatenate([jnp.full((1, 3), 7), tokens], axis=1)
    positions = jnp.array([[-1, -1, -1, 0, 1, 2, 3, 4, 5]])
    out = forward(params, padded, positions=positions).logits
    chex.assert_trees_all_close(out[:, 3:], alone, atol=1e-5, rtol=1e-5)


def test_packed_segments_equal_separate_documents(params):
    a, b = random_tokens(5, (1, 5)), random_tokens(6, (1, 4))
    packed = jnp.concatenate([a, b, jnp.zeros((1, 3), jnp.int32)], axis=1)
    segments = jnp.array([[1] * 5 + [2] * 4 + [0] * 3])
    positions = jnp.array([list(range(5)) + list(range(4)) + [0, 1, 2]])
    out = forward(params, packed, positions=positions, segment_ids=segments).logits
    chex.assert_trees_all_close(out[:, :5], forward(params, a).logits, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(out[:, 5:9], forward(params, b).logits, atol=1e-5, rtol=1e-5)


def test_substituted_embeddings_match_swapped_params(params):
    new_vocab = 40
    key_in, key_out = jax.random.split(jax.random.key(7))
    e_in = jax.random.normal(key_in, (new_vocab, CFG.d_model)) * 0.02
    e_out = jax.random.normal(key_out, (new_vocab, CFG.d_model)) * 0.02
    tokens = jax.random.randint(jax.random.key(8), (2, 6), 0, new_vocab)
    out = forward(params, tokens, input_embeddings=e_in, output_embeddings=e_out)
    chex.assert_shape(out.logits, (2, 6, new_vocab))
    # the same model with the new matrices put into an untied parameter tree
    untied = LlamaConfig(**{**dataclasses.asdict(CFG), "vocab_size": new_vocab, "tie_embeddings": False})
    swapped = {**params, "embedding": e_in, "lm_head": e_out}
    ref = Llama(untied).apply({"params": swapped}, tokens).logits
    chex.assert_trees_all_close(out.logits, ref, atol=1e-6, rtol=1e-6)
    # inputs given as vectors equal the embedding lookup
    by_vectors = forward(params, None, embeds=e_in[tokens], output_embeddings=e_out).logits
    chex.assert_trees_all_close(by_vectors, out.logits, atol=1e-6, rtol=1e-6)


def test_bfloat16_compute_close_to_float32(params):
    tokens = random_tokens(9, (2, 8))
    f32 = forward(params, tokens).logits
    bf16 = Llama(dataclasses.replace(CFG, dtype="bfloat16")).apply({"params": params}, tokens).logits
    assert bf16.dtype == jnp.float32  # logits are always returned in float32
    np.testing.assert_allclose(bf16, f32, atol=0.05 * float(jnp.abs(f32).max()))


@pytest.mark.parametrize("name", ["smollm2-135m", "llama-1b"])
def test_full_size_abstract_init_allocates_nothing(name):
    cfg = PRESETS[name]
    abstract = jax.eval_shape(lambda: nn.unbox(init_params(cfg, jax.random.key(0))))
    leaves = jax.tree.leaves(abstract)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert sum(int(np.prod(x.shape)) for x in leaves) == cfg.num_params()
    chex.assert_shape(abstract["blocks"]["q"]["kernel"], (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.head_dim))


def test_smollm2_preset_size():
    # SmolLM2-135M: 134.5M parameters with tied embeddings
    assert PRESETS["smollm2-135m"].num_params() == 134_515_008


@pytest.mark.parametrize("bad", [dict(n_heads=5, n_kv_heads=2), dict(d_model=0), dict(attention="nope")])
def test_bad_config_is_rejected(bad):
    with pytest.raises(ValueError):
        LlamaConfig(**{**dataclasses.asdict(CFG), **bad})
