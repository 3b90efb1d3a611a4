"""Pattention, the TokenFormer decoder, growth by parameter tokens, and their sharding."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerance import EPS_F32, assert_close_at_scale, reduction_rtol
from flax import linen as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec

from jaxtok.models.growth import grow_params, grown_config
from jaxtok.models.llama import KVCache, LMOutput
from jaxtok.models.tokenformer import PRESETS, TokenFormer, TokenFormerConfig, init_params
from jaxtok.nn.pattention import NORMALIZATIONS, Pattention, default_tau, pattention
from jaxtok.train.flops import model_flops_per_token

TINY = PRESETS["tokenformer-tiny"]


# ----------------------------------------------------------------------------- Pattention


def _gelu(z: np.ndarray) -> np.ndarray:
    erf = np.vectorize(math.erf)
    return 0.5 * z * (1.0 + erf(z / math.sqrt(2.0)))


def _numpy_pattention(x, keys, values, normalization, tau):
    """The reference formulas, written out in float64 numpy."""
    a = x @ keys.T
    if normalization == "l2_norm_gelu":
        theta = _gelu(a / np.linalg.norm(a, axis=-1, keepdims=True) * tau)
    elif normalization == "gelu_l2_norm":
        g = _gelu(a)
        theta = g / np.linalg.norm(g, axis=-1, keepdims=True) * tau
    else:
        e = np.exp(a - a.max(axis=-1, keepdims=True))
        theta = e / e.sum(axis=-1, keepdims=True) * tau
    return theta @ values


# x = [1, 0], K_P = I, V_P = diag(1, 2): A = [1, 0], n = 2. By hand:
#   l2_norm_gelu: GeLU([√2, 0]) = [1.3029862, 0]                        -> out [1.3029862, 0]
#   gelu_l2_norm: GeLU([1, 0]) = [0.8413447, 0] -> unit -> ·√2 = [√2, 0] -> out [1.4142136, 0]
#   softmax:      [e, 1] / (e + 1) · 2 = [1.4621172, 0.5378828]        -> out [1.4621172, 1.0757656]
HAND_CASES = {
    "l2_norm_gelu": [1.3029862, 0.0],
    "gelu_l2_norm": [1.4142136, 0.0],
    "softmax": [1.4621172, 1.0757656],
}


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_pattention_hand_values(normalization):
    x = jnp.array([[1.0, 0.0]])
    keys = jnp.eye(2)
    values = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    out = pattention(x, keys, values, normalization)  # default τ: √2, √2, 2
    np.testing.assert_allclose(np.asarray(out[0]), HAND_CASES[normalization], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_pattention_matches_numpy(normalization):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 5))
    keys = rng.normal(size=(7, 5))
    values = rng.normal(size=(7, 4))
    tau = 1.7
    expected = _numpy_pattention(x, keys, values, normalization, tau)
    out = pattention(jnp.asarray(x, jnp.float32), jnp.asarray(keys, jnp.float32),
                     jnp.asarray(values, jnp.float32), normalization, tau)
    assert out.shape == (2, 3, 4)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=2e-5, atol=2e-5)


def test_default_tau():
    assert default_tau(16, "l2_norm_gelu") == 4.0
    assert default_tau(16, "gelu_l2_norm") == 4.0
    assert default_tau(16, "softmax") == 16.0
    with pytest.raises(ValueError, match="unknown normalization"):
        default_tau(16, "relu")


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_pattention_zero_input_is_finite(normalization):
    keys = jax.random.normal(jax.random.key(0), (6, 4))
    values = jax.random.normal(jax.random.key(1), (6, 3))
    x = jnp.zeros((2, 4))

    def loss(x, keys, values):
        return jnp.sum(pattention(x, keys, values, normalization) ** 2)

    out = pattention(x, keys, values, normalization)
    grads = jax.grad(loss, argnums=(0, 1, 2))(x, keys, values)
    assert np.isfinite(np.asarray(out)).all()
    for g in grads:
        assert np.isfinite(np.asarray(g)).all()
    if normalization != "softmax":  # A = 0 -> Θ = GeLU(0) = 0 (L2 forms)
        np.testing.assert_array_equal(np.asarray(out), 0.0)


def test_pattention_module_params_and_default_tau():
    module = Pattention(in_dim=4, out_dim=3, num_tokens=9)
    x = jax.random.normal(jax.random.key(0), (2, 5, 4))
    variables = module.init(jax.random.key(1), x)
    boxed = variables["params"]
    assert boxed["key_tokens"].names == ("param_tokens", "embed")
    assert boxed["value_tokens"].names == ("param_tokens", "embed")
    params = nn.unbox(boxed)
    assert params["key_tokens"].shape == (9, 4)
    assert params["value_tokens"].shape == (9, 3)
    out = module.apply({"params": params}, x)
    keys, values = (np.asarray(params[k], np.float64) for k in ("key_tokens", "value_tokens"))
    expected = _numpy_pattention(np.asarray(x, np.float64), keys, values, "l2_norm_gelu", 3.0)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=2e-5, atol=2e-6)


@settings(max_examples=8, deadline=None, database=None)
@given(n=st.integers(1, 12), extra=st.integers(1, 12), seed=st.integers(0, 2**16),
       normalization=st.sampled_from(["l2_norm_gelu", "gelu_l2_norm"]))
def test_pattention_zero_tokens_with_fixed_tau_preserve_output(n, extra, seed, normalization):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
    keys = jnp.asarray(rng.normal(size=(n, 5)), jnp.float32)
    values = jnp.asarray(rng.normal(size=(n, 2)), jnp.float32)
    tau = default_tau(n)
    grown_keys = jnp.concatenate([keys, jnp.zeros((extra, 5))])
    grown_values = jnp.concatenate([values, jnp.zeros((extra, 2))])
    before = pattention(x, keys, values, normalization, tau)
    after = pattention(x, grown_keys, grown_values, normalization, tau)
    chex.assert_trees_all_close(after, before, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- model


def _tokens(shape=(2, 12), vocab=TINY.vocab_size, seed=1):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


def _logits(config, params, tokens):
    # jitted: op-by-op flax on CPU costs seconds per call
    return jax.jit(lambda p, t: TokenFormer(config).apply({"params": p}, t).logits)(params, tokens)


@pytest.fixture(scope="module")
def tiny_params():
    return nn.unbox(jax.jit(lambda r: init_params(TINY, r))(jax.random.key(0)))


def test_config_presets_and_validation():
    cfg = PRESETS["tokenformer-150m"]
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads) == (12, 768, 12)
    assert (cfg.qkv_tokens, cfg.proj_tokens, cfg.ffn_tokens) == (768, 768, 3072)
    assert cfg.vocab_size == 49152
    assert cfg.head_dim == 64 and cfg.rotary_dims == 16
    assert TokenFormerConfig(vocab_size=50304).vocab_size == 50304
    with pytest.raises(ValueError, match="normalization"):
        TokenFormerConfig(normalization="relu")
    with pytest.raises(ValueError, match="multiple"):
        TokenFormerConfig(d_model=100, n_heads=12)


def test_num_params_and_flops():
    cfg = PRESETS["tokenformer-150m"]
    abstract = jax.eval_shape(lambda: nn.unbox(init_params(cfg, jax.random.key(0))))
    assert sum(x.size for x in jax.tree.leaves(abstract)) == cfg.num_params() == 150_996_480
    variant = TokenFormerConfig(**_tiny_kwargs(), tie_embeddings=False, final_norm_scale=False)
    abstract = jax.eval_shape(lambda: nn.unbox(init_params(variant, jax.random.key(0))))
    assert sum(x.size for x in jax.tree.leaves(abstract)) == variant.num_params()
    # forward, by hand: per layer Pattention 2·(3·768 + 768 + 3072)·2·768, attention 4·2048·768;
    # logits 2·768·49152 (the count every family shares, jaxtok.train.flops)
    per_layer = 2 * 6144 * 1536 + 4 * 2048 * 768
    assert model_flops_per_token(cfg, 2048, training=False) == 12 * per_layer + 2 * 768 * 49152


def test_forward_shapes_and_output_type(tiny_params):
    tokens = _tokens()
    out = jax.jit(lambda p, t: TokenFormer(TINY).apply({"params": p}, t, return_hidden=True))(
        tiny_params, tokens)
    assert isinstance(out, LMOutput)
    assert out.logits.shape == (2, 12, TINY.vocab_size) and out.logits.dtype == jnp.float32
    assert out.hidden.shape == (2, 12, TINY.d_model)
    assert np.isfinite(np.asarray(out.logits)).all()


def test_prefill_then_decode_matches_full_forward(tiny_params):
    apply = jax.jit(lambda p, t, c: TokenFormer(TINY).apply({"params": p}, t, cache=c))
    tokens = _tokens((2, 10))
    full = _logits(TINY, tiny_params, tokens)
    prefill = apply(tiny_params, tokens[:, :7], KVCache.create(TINY, batch=2, length=16))
    step = apply(tiny_params, tokens[:, 7:], prefill.cache)
    chex.assert_trees_all_close(jnp.concatenate([prefill.logits, step.logits], axis=1), full,
                                rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- growth


def test_grown_config_pins_tau_and_counts_params():
    new = grown_config(TINY, qkv_tokens=48, proj_tokens=40, ffn_tokens=192)
    assert (new.qkv_tokens, new.proj_tokens, new.ffn_tokens) == (48, 40, 192)
    assert (new.qkv_tau_tokens, new.proj_tau_tokens, new.ffn_tau_tokens) == (32, 32, 128)
    assert new.tau("qkv") == TINY.tau("qkv") and new.tau("ffn") == TINY.tau("ffn")
    # 2 layers · (3·16 + 8 + 64) extra tokens · (key + value) · d
    assert new.num_params() - TINY.num_params() == 2 * (3 * 16 + 8 + 64) * 2 * 64
    again = grown_config(new, ffn_tokens=256)
    assert again.ffn_tau_tokens == 128 and again.qkv_tokens == 48  # τ of the first model
    with pytest.raises(ValueError, match="only grow"):
        grown_config(TINY, qkv_tokens=16)


def test_grow_zero_preserves_logits_random_changes_them(tiny_params):
    new = grown_config(TINY, qkv_tokens=48, proj_tokens=48, ffn_tokens=192)
    tokens = _tokens()
    before = _logits(TINY, tiny_params, tokens)

    zero = grow_params(tiny_params, TINY, new, mode="zero")
    assert sum(x.size for x in jax.tree.leaves(zero)) == new.num_params()
    assert zero["blocks"]["ffn"]["key_tokens"].shape == (2, 192, 64)
    after = _logits(new, zero, tokens)
    chex.assert_trees_all_close(after, before, rtol=1e-5, atol=1e-5)

    random = grow_params(tiny_params, TINY, new, mode="random", rng=jax.random.key(3))
    np.testing.assert_array_equal(random["blocks"]["query"]["key_tokens"][:, :32],
                                  tiny_params["blocks"]["query"]["key_tokens"])
    changed = _logits(new, random, tokens)
    assert float(jnp.max(jnp.abs(changed - before))) > 1e-2


def test_grow_boxed_tree_keeps_axis_names():
    boxed = jax.jit(lambda r: init_params(TINY, r))(jax.random.key(0))
    new = grown_config(TINY, ffn_tokens=160)
    grown = grow_params(boxed, TINY, new)
    leaf = grown["blocks"]["ffn"]["value_tokens"]
    assert leaf.names == ("layers", "param_tokens", "embed") and leaf.value.shape == (2, 160, 64)


def test_grow_rejects_bad_inputs(tiny_params):
    new = grown_config(TINY, ffn_tokens=160)
    with pytest.raises(ValueError, match="non-growable"):
        grow_params(tiny_params, TINY, grown_config(TINY.__class__(n_layers=3, **_tiny_kwargs()),
                                                      ffn_tokens=160))
    with pytest.raises(ValueError, match="needs an rng"):
        grow_params(tiny_params, TINY, new, mode="random")
    with pytest.raises(ValueError, match="old config says"):
        grow_params(tiny_params, new, grown_config(new, ffn_tokens=192))


def _tiny_kwargs():
    return {"vocab_size": 256, "d_model": 64, "n_heads": 4, "qkv_tokens": 32,
            "proj_tokens": 32, "ffn_tokens": 128, "max_seq_len": 512}


# ----------------------------------------------------------------------------- sharding


def test_sharded_forward_and_growth_match_single_device(tiny_params):
    from jax.sharding import NamedSharding

    from jaxtok.sharding import ACTIVATION_RULES, PARAM_RULES, logical_to_spec, make_mesh, tree_shardings
    from jaxtok.train.trainer import place_params

    new = grown_config(TINY, qkv_tokens=48, proj_tokens=48, ffn_tokens=192)
    tokens = _tokens((4, 16))
    single = _logits(TINY, tiny_params, tokens)  # no mesh: one device
    single_random = grow_params(tiny_params, TINY, new, "random", jax.random.key(5))

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})

    def param_shardings(config):
        boxed = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
        return tree_shardings(nn.unbox(boxed), nn.get_partition_spec(boxed), mesh, PARAM_RULES)

    def act(axes, shape):
        return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, ACTIVATION_RULES))

    def forward(config, p_sh):
        return jax.jit(lambda p, t: TokenFormer(config).apply({"params": p}, t).logits,
                       in_shardings=(p_sh, tok_sh), out_shardings=act(("batch", "length", "vocab"), single.shape))

    def spec(tree, group, name):
        return tree["blocks"][group][name].sharding.spec

    # Pattention sums over at most 128 parameter tokens (ffn), chained through 2 layers; growth
    # appends tokens whose contribution is exactly 0, so the grown model is held to the same
    logits_rtol = reduction_rtol(TINY.ffn_tokens * TINY.n_layers)
    tok_sh = act(("batch", "length"), tokens.shape)
    with jax.set_mesh(mesh):
        sh = param_shardings(TINY)
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tiny_params, sh)
        p = place_params(tiny_params, abstract)  # the library's host -> mesh placement
        t = jax.device_put(tokens, tok_sh)
        sharded = forward(TINY, sh)(p, t)

        new_sh = param_shardings(new)
        grown = jax.jit(lambda p: grow_params(p, TINY, new, "zero"), out_shardings=new_sh)(p)
        eager = grow_params(p, TINY, new, "zero")  # eager concatenate of sharded arrays
        grown_logits = forward(new, new_sh)(grown, t)
        rand = jax.jit(lambda p, r: grow_params(p, TINY, new, "random", r), out_shardings=new_sh)(
            p, jax.random.key(5))

    assert_close_at_scale(sharded, single, rtol=logits_rtol, err_msg="sharded logits")
    assert_close_at_scale(grown_logits, single, rtol=logits_rtol, err_msg="grown sharded logits")
    chex.assert_trees_all_equal(jax.device_get(eager), jax.device_get(grown))
    # same random stream as one device (threefry is partitionable); no reduction, only the
    # fusion of std * normal under jit: a few ulps
    assert_close_at_scale(rand, single_random, rtol=4 * EPS_F32, err_msg="random growth")
    # (layers, param_tokens, embed) -> (None, tensor, fsdp): tokens split over `tensor`
    tokens_over_tensor = PartitionSpec(None, "tensor", "fsdp")
    assert spec(p, "ffn", "key_tokens") == spec(p, "query", "value_tokens") == tokens_over_tensor
    assert spec(grown, "ffn", "key_tokens") == spec(eager, "ffn", "key_tokens") == tokens_over_tensor
    assert grown["blocks"]["ffn"]["key_tokens"].shape == (2, 192, 64)
    assert len({str(s.index) for s in sharded.addressable_shards}) > 1  # the logits really are split
