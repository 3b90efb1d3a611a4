"""Tree-verification attention: the Pallas kernel (interpret mode, CPU and TPU semantics) against
its reference on random trees; the reference against the plain definition; the attention entry
point's Visibility; lowering for TPU (libtpu AOT) and GPU (Triton export)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _lowering import compile_for_tpu, export_for
from jax.experimental.pallas import tpu as pltpu

from jaxtok.kernels.tree_verify_attention import (
    BlockSizes,
    ancestor_mask,
    tree_verify_attention,
    tree_verify_attention_reference,
)
from jaxtok.nn import attention as attn

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}  # max |kernel - reference|, outputs of size ~1


def random_tree(rng, t):
    """Parent of node i is a uniformly chosen earlier node (node 0 is the root)."""
    return np.array([-1] + [int(rng.integers(0, i)) for i in range(1, t)])


def depths(parents):
    d = np.zeros(len(parents), int)
    for i in range(1, len(parents)):
        d[i] = d[parents[i]] + 1
    return d


def make_case(seed, *, b=2, t=7, h=4, kv=2, d=16, s=37, filled=None, q_start=None, dtype=jnp.float32):
    """Random queries/keys; row r's cache holds ``filled[r]`` tokens at positions 0.. (the rest -1),
    the block's root at position ``q_start[r]`` (default: filled, right after the cache) + depth:
    a smaller q_start leaves cache keys in the queries' future, hidden by causality."""
    rng = np.random.default_rng(seed)
    filled = [s] * b if filled is None else filled
    parents = np.stack([random_tree(rng, t) for _ in range(b)])
    kpos = np.stack([np.where(np.arange(s) < f, np.arange(s), -1) for f in filled]).astype(np.int32)
    q_start = filled if q_start is None else q_start
    qpos = np.stack([q + depths(p) for q, p in zip(q_start, parents)]).astype(np.int32)

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), dtype)

    return dict(q=normal(b, t, h, d), k_cache=normal(b, s, kv, d), v_cache=normal(b, s, kv, d),
                k_positions=jnp.asarray(kpos), q_positions=jnp.asarray(qpos), k_block=normal(b, t, kv, d),
                v_block=normal(b, t, kv, d), tree_mask=ancestor_mask(jnp.asarray(parents)))


CASES = {
    # cache length (37) not a multiple of the block (16); rows: full, full with keys past the
    # queries' positions (hidden by causality), partly filled, all hidden; GQA 2:1; a 21-node tree
    "partial_full_future_hidden_gqa": dict(seed=0, b=4, t=21, s=37, filled=[37, 37, 5, 0], q_start=[37, 17, 5, 0]),
    "empty_cache": dict(seed=1, s=0, filled=[0, 0]),
}


# each case in one interpret mode (both modes on every case cost more CI time for little)
@pytest.mark.parametrize("name,interpret", [(name, ("cpu", "tpu")[i]) for i, name in enumerate(CASES)])
def test_kernel_matches_reference(name, interpret):
    case = make_case(**CASES[name])
    params = True if interpret == "cpu" else pltpu.InterpretParams()
    got = tree_verify_attention(**case, block_sizes=BlockSizes(16), interpret=params)
    want = tree_verify_attention_reference(**case)
    chex.assert_shape(got, case["q"].shape)
    chex.assert_trees_all_close(got, want, atol=TOL[jnp.float32], rtol=0)


def test_kernel_bfloat16_and_default_block():
    case = make_case(5, h=2, kv=2, s=150, filled=[150, 77], dtype=jnp.bfloat16)  # MHA here
    got = tree_verify_attention(**case, interpret=True)  # block 128: a full and a partial block
    want = tree_verify_attention_reference(**{k: v.astype(jnp.float32) if v.dtype == jnp.bfloat16 else v
                                              for k, v in case.items()})
    assert got.dtype == jnp.bfloat16
    chex.assert_trees_all_close(got.astype(jnp.float32), want, atol=TOL[jnp.bfloat16], rtol=0)


def dense_definition(case):
    """softmax over the cache keys visible by position and the block keys visible by the tree,
    one query and one head at a time (numpy, float64)."""
    c = {k: np.asarray(v, np.float64) for k, v in case.items()}
    b, t, h, d = c["q"].shape
    g = h // c["k_cache"].shape[2]
    out = np.zeros((b, t, h, d))
    for r in range(b):
        for i in range(t):
            seen = (c["k_positions"][r] >= 0) & (c["k_positions"][r] <= c["q_positions"][r, i])
            in_tree = c["tree_mask"][r, i] > 0
            for head in range(h):
                keys = np.concatenate([c["k_cache"][r, seen, head // g], c["k_block"][r, in_tree, head // g]])
                vals = np.concatenate([c["v_cache"][r, seen, head // g], c["v_block"][r, in_tree, head // g]])
                logits = keys @ c["q"][r, i, head] / np.sqrt(d)
                p = np.exp(logits - logits.max())
                out[r, i, head] = (p / p.sum()) @ vals
    return out


def test_reference_is_the_definition():
    case = make_case(6, s=12, filled=[9, 3])
    np.testing.assert_allclose(np.asarray(tree_verify_attention_reference(**case)), dense_definition(case), atol=1e-5)


def test_ancestor_mask():
    #        0
    #      1   2
    #     3 4   5
    #           6
    mask = np.asarray(ancestor_mask(jnp.asarray([-1, 0, 0, 1, 1, 2, 5])))
    assert mask[6].nonzero()[0].tolist() == [0, 2, 5, 6]
    assert mask[4].nonzero()[0].tolist() == [0, 1, 4]
    assert mask[0].nonzero()[0].tolist() == [0]
    chain = np.asarray(ancestor_mask(jnp.arange(-1, 39)))  # a 40-deep chain: several squarings
    np.testing.assert_array_equal(chain, np.tril(np.ones((40, 40), bool)))


def test_bad_shapes_name_the_problem():
    case = make_case(0)
    with pytest.raises(ValueError, match="tree_mask"):
        tree_verify_attention_reference(**{**case, "tree_mask": case["tree_mask"][:, :3]})
    with pytest.raises(ValueError, match="k_positions"):
        tree_verify_attention(**{**case, "k_positions": case["k_positions"][:, :5]}, interpret=True)
    with pytest.raises(ValueError, match="block_kv"):
        BlockSizes(100)


# --- the attention entry point --------------------------------------------------------------

def entry_case(seed, b=2, t=6, s=24, start=(11, 4), h=4, kv=2, d=16):
    """A KV cache (B, S) with the draft block written at slots [start, start + t) of each row:
    prefix positions 0..start-1, block positions start + depth, empty slots -1. Entry-point
    callers pass one scalar block_start, so rows share it here when ``start`` is an int."""
    rng = np.random.default_rng(seed)
    parents = np.stack([random_tree(rng, t) for _ in range(b)])
    start_ = start if isinstance(start, int) else start[0]
    kpos = np.full((b, s), -1, np.int32)
    qpos = np.zeros((b, t), np.int32)
    for r in range(b):
        kpos[r, :start_] = np.arange(start_)
        qpos[r] = start_ + depths(parents[r])
        kpos[r, start_:start_ + t] = qpos[r]
    q = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, s, kv, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, s, kv, d)), jnp.float32)
    vis = attn.Visibility.from_parents(jnp.asarray(parents), start_)
    return q, k, v, jnp.asarray(qpos), jnp.asarray(kpos), vis


# jitted: one compiled program per call instead of op-by-op dispatch (seconds of CI time)
attention = jax.jit(attn.dot_product_attention, static_argnames=("impl", "causal"))


def test_entry_point_tree_paths_agree():
    """Reference vs jax.nn (XLA) with a tree; the kernel path through the entry point is
    test_speculative.py's test_kernel_through_the_model_matches_reference_path."""
    q, k, v, qpos, kpos, vis = entry_case(7, start=11)
    kw = dict(q_positions=qpos, k_positions=kpos, visibility=vis)
    want = attention(q, k, v, impl=attn.AttentionImpl.REFERENCE, **kw)
    got = attention(q, k, v, impl=attn.AttentionImpl.XLA, **kw)
    chex.assert_trees_all_close(got, want, atol=2e-5, rtol=0)
    # the tree matters: positions alone let a node see other branches' shallower nodes
    flat = attention(q, k, v, q_positions=qpos, k_positions=kpos)
    assert float(jnp.max(jnp.abs(flat - want))) > 1e-2


def test_chain_tree_equals_causal_attention():
    """A chain (each node the child of the previous) is ordinary causal decoding of T tokens."""
    q, k, v, _, _, _ = entry_case(8, b=1, start=9)
    t = q.shape[1]
    kpos = jnp.asarray(np.where(np.arange(24) < 9 + t, np.arange(24), -1)[None], jnp.int32)
    qpos = jnp.arange(9, 9 + t)[None]
    vis = attn.Visibility.from_parents(jnp.arange(-1, t - 1)[None], 9)
    got = attention(q, k, v, q_positions=qpos, k_positions=kpos, visibility=vis)
    want = attention(q, k, v, q_positions=qpos, k_positions=kpos)
    chex.assert_trees_all_close(got, want, atol=2e-5, rtol=0)


def test_selected_slots_equal_attention_over_the_gathered_keys():
    """Issue 13's half of the interface (reference path): per (row, kv head) selected slots."""
    rng = np.random.default_rng(9)
    b, t, s, h, kv, d, n = 2, 1, 30, 4, 2, 8, 5
    q = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, s, kv, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, s, kv, d)), jnp.float32)
    kpos = jnp.broadcast_to(jnp.arange(s), (b, s))
    qpos = jnp.full((b, t), s)
    selected = np.stack([[rng.choice(s, n, replace=False) for _ in range(kv)] for _ in range(b)])
    padded = np.concatenate([selected, -np.ones((b, kv, 2), int)], axis=-1)  # unused entries
    got = attention(q, k, v, q_positions=qpos, k_positions=kpos,
                    visibility=attn.Visibility(selected=jnp.asarray(padded)))
    # the same attention over keys gathered per (row, kv head): (B, N, K, D)
    index = jnp.asarray(selected.transpose(0, 2, 1))[..., None]
    k_sel, v_sel = (jnp.take_along_axis(x, index, axis=1) for x in (k, v))
    k_pos_sel = jnp.take_along_axis(kpos, index[:, :, 0, 0], axis=1)
    want = attention(q, k_sel, v_sel, q_positions=qpos, k_positions=k_pos_sel)
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=0)
    everything = attn.Visibility(selected=jnp.broadcast_to(jnp.arange(s), (b, kv, s)))
    chex.assert_trees_all_close(attention(q, k, v, q_positions=qpos, k_positions=kpos, visibility=everything),
                                attention(q, k, v, q_positions=qpos, k_positions=kpos), atol=1e-6, rtol=0)


def test_visibility_errors():
    q, k, v, qpos, kpos, vis = entry_case(10, start=11)
    kw = dict(q_positions=qpos, k_positions=kpos)
    with pytest.raises(ValueError, match="exactly one"):
        attn.dot_product_attention(q, k, v, visibility=attn.Visibility(), **kw)
    with pytest.raises(ValueError, match="block_start"):
        attn.dot_product_attention(q, k, v, visibility=attn.Visibility(tree=vis.tree), **kw)
    with pytest.raises(ValueError, match=r"\(B, T, T\)"):
        attn.dot_product_attention(q, k, v, visibility=vis.replace(tree=vis.tree[:, :2, :2]), **kw)
    with pytest.raises(ValueError, match="segment"):
        attn.dot_product_attention(q, k, v, visibility=vis, impl=attn.AttentionImpl.PALLAS_INTERPRET,
                                   q_segment_ids=jnp.ones(qpos.shape, jnp.int32),
                                   k_segment_ids=jnp.ones(kpos.shape, jnp.int32), **kw)


# --- lowering for the accelerators ------------------------------------------------------------

def _abstract(case):
    return tuple(jax.ShapeDtypeStruct(v.shape, v.dtype) for v in case.values())


def test_exports_for_tpu_and_gpu():
    case = make_case(0, b=1, t=21, h=9, kv=3, d=64, s=300, dtype=jnp.bfloat16)
    tpu = export_for(jax.jit(lambda *a: tree_verify_attention(*a)), _abstract(case), "tpu")
    assert "tpu_custom_call" in tpu
    gpu = export_for(jax.jit(lambda *a: tree_verify_attention(*a, backend="triton")), _abstract(case), "cuda",
                     triton=True)
    assert "__gpu$xla.gpu.triton" in gpu


def test_compiles_for_tpu_v5e_with_libtpu():
    """A real Mosaic compile (VMEM, layouts): SmolLM2's heads, an 81-node tree, 2000 cached tokens."""
    report = compile_for_tpu("""
import jax.numpy as jnp
from jaxtok.kernels.tree_verify_attention import tree_verify_attention
B, T, H, K, D, S = 2, 81, 9, 3, 64, 2000
shapes = [((B, T, H, D), jnp.bfloat16), ((B, S, K, D), jnp.bfloat16), ((B, S, K, D), jnp.bfloat16),
          ((B, S), jnp.int32), ((B, T), jnp.int32), ((B, T, K, D), jnp.bfloat16), ((B, T, K, D), jnp.bfloat16),
          ((B, T, T), jnp.bool_)]
args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
fn = jax.jit(tree_verify_attention)
""")
    assert report["mosaic"] and report["argument_size_in_bytes"] > 2 * 2000 * 3 * 64 * 2 * 2
