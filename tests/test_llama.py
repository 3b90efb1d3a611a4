"""The Llama decoder on tiny configs: shapes, jit, cache, padding, packing, embedding swaps."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerance import assert_close_at_scale, reduction_rtol
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


# ---------------------------------------------------------------------------------------------
# against transformers: an outside anchor for what the tests above only compare with itself
# (a rotary sign flip or a norm without eps keeps prefix, cache and packing consistent)

# rms_eps 1e-2 is large next to mean(x^2) of the residual stream here (~1e-2 after the 0.1-scale
# embedding), so a norm that drops it is visibly off; 0.1-scale weights make attention peaked
# enough that the rotary angles matter.
REF_CFG = LlamaConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128,
                      rope_theta=10_000.0, rms_eps=1e-2, max_seq_len=512)


@pytest.fixture(scope="module")
def hf():
    """torch and transformers; skips without the [ref] extra."""
    return pytest.importorskip("torch"), pytest.importorskip("transformers")


def hf_llama(torch, transformers, cfg: LlamaConfig, seed: int = 0):
    """A random transformers LlamaForCausalLM of ``cfg``'s shape, float32, norm scales not 1."""
    config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_eps, max_position_embeddings=cfg.max_seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings, initializer_range=0.1, attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # a swapped or missing norm scale must show
                p.add_(0.3 * torch.randn_like(p))
    return model


def params_from_hf(state_dict, cfg: LlamaConfig) -> dict:
    """transformers' Llama state dict -> jaxtok's tree: Linear weights are (out, in), so each is
    transposed and its head dims split out; per-layer tensors are stacked on a leading
    ``layers`` axis (nn.scan). The rotary layout is the same (half-split, ``rotate_half``)."""
    w = {k: v.detach().numpy().astype(np.float32) for k, v in state_dict.items()}
    d, hd = cfg.d_model, cfg.head_dim

    def stacked(name, to_jaxtok):
        return np.stack([to_jaxtok(w[f"model.layers.{i}.{name}"]) for i in range(cfg.n_layers)])

    def heads(n):
        return lambda m: m.T.reshape(d, n, hd)  # (n*hd, d) -> (d, n, hd)

    blocks = {
        "q": {"kernel": stacked("self_attn.q_proj.weight", heads(cfg.n_heads))},
        "k": {"kernel": stacked("self_attn.k_proj.weight", heads(cfg.n_kv_heads))},
        "v": {"kernel": stacked("self_attn.v_proj.weight", heads(cfg.n_kv_heads))},
        "o": {"kernel": stacked("self_attn.o_proj.weight", lambda m: m.T.reshape(cfg.n_heads, hd, d))},
        "gate": {"kernel": stacked("mlp.gate_proj.weight", np.transpose)},
        "up": {"kernel": stacked("mlp.up_proj.weight", np.transpose)},
        "down": {"kernel": stacked("mlp.down_proj.weight", np.transpose)},
        "attn_norm": {"scale": stacked("input_layernorm.weight", np.asarray)},
        "mlp_norm": {"scale": stacked("post_attention_layernorm.weight", np.asarray)},
    }
    params = {"embedding": w["model.embed_tokens.weight"], "blocks": blocks,
              "final_norm": {"scale": w["model.norm.weight"]}}
    if not cfg.tie_embeddings:
        params["lm_head"] = w["lm_head.weight"]
    return params


@pytest.mark.reference
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_tiny_llama_matches_transformers(hf, tied):
    torch, transformers = hf
    cfg = dataclasses.replace(REF_CFG, tie_embeddings=tied)
    model = hf_llama(torch, transformers, cfg)
    params = jax.tree.map(jnp.asarray, params_from_hf(model.state_dict(), cfg))
    chex.assert_trees_all_equal_shapes_and_dtypes(
        params, jax.eval_shape(lambda: nn.unbox(init_params(cfg, jax.random.key(0)))))
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        want = model(torch.as_tensor(tokens)).logits.numpy()
    apply = jax.jit(lambda p, t, cache=None: Llama(cfg).apply({"params": p}, t, cache=cache))
    got = apply(params, jnp.asarray(tokens)).logits
    # sums of up to d_ff = 128 terms chained through 2 layers, in another order (torch vs XLA)
    rtol = reduction_rtol(cfg.d_ff * cfg.n_layers)
    assert_close_at_scale(got, want, rtol=rtol, err_msg="logits")
    # prefill 11 tokens, then one decode step through the KV cache at position 11
    prefill = apply(params, jnp.asarray(tokens[:, :11]), KVCache.create(cfg, 2, 16))
    step = apply(params, jnp.asarray(tokens[:, 11:]), prefill.cache)
    assert_close_at_scale(prefill.logits, want[:, :11], rtol=rtol, err_msg="prefill logits")
    assert_close_at_scale(step.logits, want[:, 11:], rtol=rtol, err_msg="decode logits")
