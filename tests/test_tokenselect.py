"""TokenSelect: the selection against a plain-Python twin (hypothesis), chunked prefill with every
token selected equals dense attention, C = 1 equals decoding, generation, the selection cache,
dense layers, the kernel behind a model call, and clear errors."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxtok.decode import tokenselect as ts
from jaxtok.decode.generate import generate
from jaxtok.models.llama import PRESETS, KVCache, Llama, init_params
from jaxtok.objectives import token_nll

CFG = dataclasses.replace(PRESETS["llama-tiny"], n_layers=2)


@pytest.fixture(scope="module")
def tiny():
    return Llama(CFG), nn.unbox(init_params(CFG, jax.random.key(0)))


# --- the selection against its plain twin ----------------------------------------------------

def twin_select(q, k, kpos, qpos, end, cfg):
    """Per row and list, in numpy: forced head / local / chunk slots, top-k of the soft vote over
    the slots between them (a sorted list), as sets."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    g = h // kv
    out = []
    for r in range(b):
        valid_s = [s for s in range(k.shape[1]) if kpos[r, s] >= 0]
        first = valid_s[0] if valid_s else 0
        head = {s for s in range(first, first + cfg.n_init) if s < end and kpos[r, s] >= 0}
        local = {s for s in range(end - cfg.n_local, end) if s >= first + cfg.n_init and s >= 0 and kpos[r, s] >= 0}
        own = {s for s in range(end, end + t) if s < k.shape[1] and kpos[r, s] >= 0}
        visible = [s for s in range(min(end, k.shape[1])) if kpos[r, s] >= 0]
        qv = [i for i in range(t) if qpos[r, i] >= 0]
        query = q[r, qv].mean(0) if qv else np.zeros((h, d))
        votes = np.zeros((h, k.shape[1]))
        if visible:
            for head_i in range(h):
                logit = k[r, visible, head_i // g] @ query[head_i] / np.sqrt(d)
                p = np.exp(logit - logit.max())
                votes[head_i, visible] = p / p.sum()
        groups = [list(range(h))] if cfg.share == "layer" else [list(range(i * g, (i + 1) * g)) for i in range(kv)]
        middle = [s for s in visible if first + cfg.n_init <= s < end - cfg.n_local]
        lists = []
        for grp in groups:
            score = votes[grp].sum(0)
            top = sorted(middle, key=lambda s: -score[s])[:cfg.k]
            lists.append(head | local | own | set(top))
        out.append(lists)
    return out


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**16), s=st.integers(1, 40), end_frac=st.floats(0, 1), t=st.integers(1, 3),
       pad=st.integers(0, 5), k=st.integers(0, 12), n_init=st.integers(0, 4), n_local=st.integers(0, 6),
       share=st.sampled_from(["layer", "kv_head"]))
def test_select_matches_its_plain_twin(seed, s, end_frac, t, pad, k, n_init, n_local, share):
    rng = np.random.default_rng(seed)
    b, h, kv, d = 2, 4, 2, 8
    s = max(s, t)
    end = int(end_frac * (s - t))  # queries at slots [end, end + t)
    kpos = np.full((b, s), -1, np.int32)
    for r in range(b):  # row 1 left-padded by `pad` slots (contiguous after its first token)
        lead = min(pad * r, end)
        kpos[r, lead:end + t] = np.arange(end + t - lead)
    qpos = kpos[:, end:end + t]
    q = rng.standard_normal((b, t, h, d)).astype(np.float32)
    keys = rng.standard_normal((b, s, kv, d)).astype(np.float32)
    cfg = ts.TokenSelectConfig(k=k, n_init=n_init, n_local=n_local, share=share)
    got = np.asarray(ts.select(jnp.asarray(q), jnp.asarray(keys), jnp.asarray(kpos), jnp.asarray(qpos), end, cfg))
    chex.assert_shape(got, (b, cfg.lists(kv), n_init + k + n_local + t))
    want = twin_select(q, keys, kpos, qpos, end, cfg)
    for r in range(b):
        for i, expected in enumerate(want[r]):
            entries = got[r, i][got[r, i] >= 0].tolist()
            assert len(entries) == len(set(entries)), "a slot twice in one list"
            assert set(entries) == expected


# --- through the model -----------------------------------------------------------------------

def _tokens(b, t, seed=1):
    tokens = jax.random.randint(jax.random.key(seed), (b, t), 0, CFG.vocab_size)
    return tokens, jnp.broadcast_to(jnp.arange(t), (b, t))


prefill_nll = jax.jit(lambda model, params, tokens, positions, cfg: ts.chunked_prefill(
    model, params, tokens, positions, cfg, targets=tokens)[1], static_argnums=(0, 4))


def test_everything_selected_equals_dense(tiny):
    model, params = tiny
    tokens, positions = _tokens(2, 64)
    dense = token_nll(model.apply({"params": params}, tokens, positions=positions).logits, tokens)
    everything = ts.TokenSelectConfig(k=64, n_init=4, n_local=8, chunk=16)  # budget >= every prefix
    chex.assert_trees_all_close(prefill_nll(model, params, tokens, positions, everything), dense, atol=2e-5)
    sparse = prefill_nll(model, params, tokens, positions, dataclasses.replace(everything, k=4))
    assert float(jnp.max(jnp.abs(sparse - dense))) > 1e-3  # selection does change later chunks
    chex.assert_trees_all_close(sparse[:, :32], dense[:, :32], atol=2e-5)  # the first 4+4+8 + chunk: all seen
    # the first layers dense (all of them here): dense again
    all_dense = dataclasses.replace(everything, k=4, dense_layers=(0, 1))
    chex.assert_trees_all_close(prefill_nll(model, params, tokens, positions, all_dense), dense, atol=2e-5)


@pytest.mark.parametrize("share", ["layer", "kv_head"])
def test_chunk_of_one_equals_decoding(tiny, share):
    model, params = tiny
    t = 40
    tokens, positions = _tokens(2, t, seed=2)
    cfg = ts.TokenSelectConfig(k=5, n_init=3, n_local=6, chunk=1, share=share)
    chunked = prefill_nll(model, params, tokens, positions, cfg)
    step = jax.jit(lambda p, tok, pos, c: model.apply({"params": p}, tok, positions=pos, cache=c, sparse=cfg))
    cache, logits = KVCache.create(CFG, 2, t), []
    for i in range(t):
        out = step(params, tokens[:, i:i + 1], positions[:, i:i + 1], cache)
        cache, logits = out.cache, logits + [out.logits]
    decoded = token_nll(jnp.concatenate(logits, axis=1), tokens)
    chex.assert_trees_all_close(chunked, decoded, atol=2e-5)


def test_kernel_behind_the_model():
    """A decode step with the Pallas kernel (interpret mode) equals the CPU gathered path."""
    one_layer = dataclasses.replace(CFG, n_layers=1)  # the kernel in interpret mode: one layer is enough
    model, params = Llama(one_layer), nn.unbox(init_params(one_layer, jax.random.key(0)))
    tokens, positions = _tokens(1, 33, seed=3)
    cfg = ts.TokenSelectConfig(k=6, n_init=2, n_local=4, chunk=1)
    cache = model.apply({"params": params}, tokens[:, :32], positions=positions[:, :32],
                        cache=KVCache.create(one_layer, 1, 33)).cache  # a dense prefill: the step selects
    kernel_model = Llama(dataclasses.replace(one_layer, attention="pallas_interpret"))
    out = {name: m.apply({"params": params}, tokens[:, 32:], positions=positions[:, 32:], cache=cache, sparse=cfg)
           for name, m in (("auto", model), ("kernel", kernel_model))}
    chex.assert_trees_all_close(out["kernel"].logits, out["auto"].logits, atol=1e-4, rtol=1e-5)


def test_generate_with_tokenselect(tiny):
    model, params = tiny
    prompts = [list(range(3, 40)), list(range(7, 30))]  # two lengths: left padding
    kw = dict(max_new_tokens=12, eos_id=0)
    dense = generate(model, params, prompts, **kw)
    everything = ts.TokenSelectConfig(k=64, n_init=4, n_local=8, chunk=16)
    assert generate(model, params, prompts, sparse=everything, **kw) == dense
    # a small budget with the selection cache on: decodes as many tokens
    small = dataclasses.replace(everything, k=2, n_local=2, cache_threshold=0.5)
    assert [len(r) for r in generate(model, params, prompts, sparse=small, **kw)] == [len(r) for r in dense]


def test_selection_cache(tiny):
    """A threshold of -1 always hits after the first step: the top-k stays the first one's while
    the head and the local window move; a threshold of 1 (nothing is that similar) never hits."""
    rng = np.random.default_rng(4)
    b, h, kv, d, s = 1, 4, 2, 8, 48
    keys = jnp.asarray(rng.standard_normal((b, s, kv, d)), jnp.float32)
    kpos = jnp.asarray(np.arange(s)[None], jnp.int32)
    cfg = ts.TokenSelectConfig(k=5, n_init=2, n_local=4, cache_threshold=-1.0)
    state = (jnp.zeros((b, h, d)), jnp.full((b, 1, 5), -1, jnp.int32), jnp.int32(0), jnp.int32(0))
    firsts = []
    for end in (30, 31, 32):
        q = jnp.asarray(rng.standard_normal((b, 1, h, d)), jnp.float32)
        slots, state = ts.select_cached(q, keys, kpos, jnp.full((b, 1), end), end, cfg, state)
        fresh = ts.select(q, keys, kpos, jnp.full((b, 1), end), end, cfg)
        firsts.append(fresh)
        np.testing.assert_array_equal(slots[..., :2], fresh[..., :2])  # head
        np.testing.assert_array_equal(slots[..., 7:], fresh[..., 7:])  # local window + the query
        np.testing.assert_array_equal(slots[..., 2:7], firsts[0][..., 2:7])  # the first top-k, reused
    assert int(state[2]) == 2 and int(state[3]) == 3
    assert not np.array_equal(firsts[2][..., 2:7], firsts[0][..., 2:7])  # fresh selections did move
    never = dataclasses.replace(cfg, cache_threshold=1.0)
    _, state = ts.select_cached(-q, keys, kpos, jnp.full((b, 1), 33), 33, never, state)
    _, state = ts.select_cached(0.5 * q, keys, kpos, jnp.full((b, 1), 34), 34, never, state)
    assert int(state[2]) == 2  # no new hits (cosine -1, then -1 again)
    # through the model: layer 0 dense (never scores, never counts), layer 1 hits after its first step
    model, params = tiny
    tokens, positions = _tokens(1, 35, seed=5)
    base = ts.TokenSelectConfig(k=3, n_init=2, n_local=3, chunk=8)
    cache = ts.chunked_prefill(model, params, tokens[:, :32], positions[:, :32], base,
                               cache=KVCache.create(CFG, 1, 35))[0]
    cfg = dataclasses.replace(base, cache_threshold=-1.0, dense_layers=(0,))
    cache = cache.replace(selection=ts.SelectionState.create(cfg, 2, 1, CFG.n_heads, CFG.n_kv_heads, CFG.head_dim))
    step = jax.jit(lambda p, tok, pos, c: model.apply({"params": p}, tok, positions=pos, cache=c, sparse=cfg))
    for i in range(32, 35):
        cache = step(params, tokens[:, i:i + 1], positions[:, i:i + 1], cache).cache
    assert cache.selection.hits.tolist() == [0, 2] and cache.selection.steps.tolist() == [0, 3]
    # k larger than the whole cache: the cached selection keeps its fixed size (k entries, -1 past the cache)
    long_k = ts.TokenSelectConfig(k=64, n_init=2, n_local=4, cache_threshold=-1.0)
    state = (jnp.zeros((b, h, d)), jnp.full((b, 1, 64), -1, jnp.int32), jnp.int32(0), jnp.int32(0))
    slots, state = ts.select_cached(q, keys, kpos, jnp.full((b, 1), 40), 40, long_k, state)
    chex.assert_shape(state[1], (b, 1, 64))
    assert set(np.asarray(slots[0, 0])[np.asarray(slots[0, 0]) >= 0].tolist()) == set(range(41))


def test_errors_name_the_problem(tiny):
    model, params = tiny
    with pytest.raises(ValueError, match="share"):
        ts.TokenSelectConfig(share="head")
    with pytest.raises(ValueError, match="cache_threshold"):
        ts.TokenSelectConfig(cache_threshold=1.5)
    with pytest.raises(ValueError, match="chunk"):
        ts.TokenSelectConfig(chunk=0)
    tokens, positions = _tokens(1, 24)
    with pytest.raises(ValueError, match="KV cache"):
        model.apply({"params": params}, tokens, sparse=ts.TokenSelectConfig())
    with pytest.raises(ValueError, match="multiple of the chunk"):
        ts.chunked_prefill(model, params, tokens, positions, ts.TokenSelectConfig(chunk=16))
    with pytest.raises(ValueError, match="dense_layers"):
        ts.dense_flags(ts.TokenSelectConfig(dense_layers=(5,)), 2)
