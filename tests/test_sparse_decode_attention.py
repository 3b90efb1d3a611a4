"""Sparse decode attention: the Pallas kernel (interpret mode, CPU and TPU semantics, and the Triton
body) against its reference; the reference against a numpy definition and against dense attention
when every token is selected; the attention entry point's ``Visibility.selected``; lowering for
TPU (export + libtpu AOT) and GPU (Triton export)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _lowering import compile_for_tpu, export_for
from jax.experimental.pallas import tpu as pltpu

from jaxtok.kernels.sparse_decode_attention import (
    BlockSizes,
    sparse_decode_attention,
    sparse_decode_attention_reference,
)
from jaxtok.nn import attention as attn

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}  # max |kernel - reference|, outputs of size ~1


def make_case(seed, *, b=2, t=3, h=4, kv=2, d=16, s=50, n=20, unused=3, filled=None, shared=False,
              dtype=jnp.float32):
    """Row r's cache holds ``filled[r]`` tokens at positions 0.. (the rest -1); its T queries sit at
    the last T filled positions (earlier queries do not see later selected keys: causality);
    each (row, head) selects ``n - unused`` distinct random slots (some of them empty) + ``unused`` -1."""
    rng = np.random.default_rng(seed)
    filled = [s] * b if filled is None else filled
    kpos = np.stack([np.where(np.arange(s) < f, np.arange(s), -1) for f in filled]).astype(np.int32)
    qpos = np.stack([np.arange(f - t, f) for f in filled]).astype(np.int32)
    lists = 1 if shared else kv
    sel = np.stack([[np.concatenate([rng.permutation(rng.choice(s, n - unused, replace=False)), [-1] * unused])
                     for _ in range(lists)] for _ in range(b)]).astype(np.int32)

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), dtype)

    return dict(q=normal(b, t, h, d), k_cache=normal(b, s, kv, d), v_cache=normal(b, s, kv, d),
                k_positions=jnp.asarray(kpos), q_positions=jnp.asarray(qpos), selected=jnp.asarray(sel))


CASES = {
    # 20 entries in tiles of 16 (a partial tile), 3 unused, GQA 2:1, chunk of 3 causal queries,
    # a partly filled row (selected empty slots hidden)
    "per_head_partial": dict(seed=0, filled=[50, 30]),
    "shared_by_heads": dict(seed=1, shared=True, h=6, kv=3, n=40, unused=5),
}
MODES = {"cpu": lambda: True, "tpu": pltpu.InterpretParams}


@pytest.mark.parametrize("name,mode,backend", [("per_head_partial", "tpu", None), ("shared_by_heads", "tpu", None),
                                               ("shared_by_heads", "cpu", "triton")])
def test_kernel_matches_reference(name, mode, backend):
    case = make_case(**CASES[name])
    got = sparse_decode_attention(**case, block_sizes=BlockSizes(16), interpret=MODES[mode](), backend=backend)
    want = sparse_decode_attention_reference(**case)
    chex.assert_shape(got, case["q"].shape)
    chex.assert_trees_all_close(got, want, atol=TOL[jnp.float32], rtol=0)


def test_kernel_bfloat16_default_block():
    case = make_case(2, h=9, kv=3, d=64, s=300, n=150, unused=7, dtype=jnp.bfloat16)  # 128-tiles: 2 of them
    got = sparse_decode_attention(**case, interpret=True)
    want = sparse_decode_attention_reference(**{k: v.astype(jnp.float32) if v.dtype == jnp.bfloat16 else v
                                                for k, v in case.items()})
    assert got.dtype == jnp.bfloat16
    chex.assert_trees_all_close(got.astype(jnp.float32), want, atol=TOL[jnp.bfloat16], rtol=0)


def definition(case):
    """Per query and head: softmax over the selected slots visible by position (numpy, float64)."""
    c = {k: np.asarray(v, np.float64) for k, v in case.items()}
    b, t, h, d = c["q"].shape
    kv = c["k_cache"].shape[2]
    g = h // kv
    out = np.zeros((b, t, h, d))
    for r in range(b):
        for head in range(h):
            slots = c["selected"][r, min(head // g, c["selected"].shape[1] - 1)].astype(int)
            slots = slots[slots >= 0]
            for i in range(t):
                pos = c["k_positions"][r, slots]
                seen = slots[(pos >= 0) & (pos <= c["q_positions"][r, i])]
                if not len(seen):
                    continue  # sees nothing: zeros
                logits = c["k_cache"][r, seen, head // g] @ c["q"][r, i, head] / np.sqrt(d)
                p = np.exp(logits - logits.max())
                out[r, i, head] = (p / p.sum()) @ c["v_cache"][r, seen, head // g]
    return out


def test_reference_is_the_definition():
    for name in CASES:
        case = make_case(**CASES[name])
        np.testing.assert_allclose(np.asarray(sparse_decode_attention_reference(**case)), definition(case), atol=1e-5)


def test_everything_selected_is_dense_attention():
    case = make_case(3, s=40, n=40, unused=0, filled=[40, 26])
    everything = jnp.broadcast_to(jnp.arange(40, dtype=jnp.int32), case["selected"].shape)
    case["selected"] = everything[..., ::-1]  # order does not matter
    mask = attn.attention_mask(case["q_positions"], case["k_positions"], None, None, causal=True)
    dense = attn.attention_reference(case["q"], case["k_cache"], case["v_cache"], mask, 16 ** -0.5)
    got = sparse_decode_attention(**case, block_sizes=BlockSizes(16), interpret=pltpu.InterpretParams())
    chex.assert_trees_all_close(got, dense, atol=TOL[jnp.float32], rtol=0)


def test_bad_inputs_name_the_problem():
    case = make_case(0)
    with pytest.raises(ValueError, match=r"selected \(1, 2, 20\) is not \(B, K, N\)"):
        sparse_decode_attention(**{**case, "selected": case["selected"][:1]}, interpret=True)
    with pytest.raises(ValueError, match="integer"):
        sparse_decode_attention_reference(**{**case, "selected": case["selected"].astype(jnp.float32)})
    with pytest.raises(ValueError, match="q_positions"):
        sparse_decode_attention(**{**case, "q_positions": case["q_positions"][:, :1]}, interpret=True)
    with pytest.raises(ValueError, match="block_n"):
        BlockSizes(48)
    with pytest.raises(ValueError, match="backend"):
        sparse_decode_attention(**case, interpret=True, backend="cuda")


# --- the attention entry point --------------------------------------------------------------

attention = jax.jit(attn.dot_product_attention, static_argnames=("impl", "causal"))


def test_entry_point_paths_agree():
    """REFERENCE (dense mask from the slots), AUTO on CPU (gathered jnp), XLA, and the kernel, with
    one list shared by the key/value heads (per-head lists: the kernel tests above)."""
    case = make_case(4, shared=True, filled=[50, 33])
    q, k, v = case["q"], case["k_cache"], case["v_cache"]
    kw = dict(q_positions=case["q_positions"], k_positions=case["k_positions"],
              visibility=attn.Visibility(selected=case["selected"]))
    want = attention(q, k, v, impl=attn.AttentionImpl.REFERENCE, **kw)
    chex.assert_trees_all_close(want, definition(case).astype(np.float32), atol=1e-5, rtol=0)
    for impl in (attn.AttentionImpl.AUTO, attn.AttentionImpl.XLA, attn.AttentionImpl.PALLAS_INTERPRET):
        chex.assert_trees_all_close(attention(q, k, v, impl=impl, **kw), want, atol=2e-5, rtol=0)


def test_entry_point_rejects_what_the_kernel_does_not_cover():
    case = make_case(5)
    with pytest.raises(ValueError, match="segment"):
        attn.dot_product_attention(
            case["q"], case["k_cache"], case["v_cache"], q_positions=case["q_positions"],
            k_positions=case["k_positions"], visibility=attn.Visibility(selected=case["selected"]),
            impl=attn.AttentionImpl.PALLAS_INTERPRET, q_segment_ids=jnp.ones((2, 3), jnp.int32),
            k_segment_ids=jnp.ones((2, 50), jnp.int32))


# --- lowering for the accelerators ------------------------------------------------------------

SMOLLM2 = dict(B=1, T=1, H=9, K=3, D=64, S=8192, N=2688)


def _shapes(B, T, H, K, D, S, N, lists=None):
    lists = K if lists is None else lists
    return [jax.ShapeDtypeStruct(s, d) for s, d in (
        ((B, T, H, D), jnp.bfloat16), ((B, S, K, D), jnp.bfloat16), ((B, S, K, D), jnp.bfloat16),
        ((B, S), jnp.int32), ((B, T), jnp.int32), ((B, lists, N), jnp.int32))]


def test_exports_for_tpu_and_gpu():
    for lists in (3, 1):
        args = _shapes(**SMOLLM2, lists=lists)
        assert "tpu_custom_call" in export_for(jax.jit(sparse_decode_attention), args, "tpu")
        gpu = export_for(jax.jit(lambda *a: sparse_decode_attention(*a, backend="triton")), args, "cuda", triton=True)
        assert "__gpu$xla.gpu.triton" in gpu


def test_compiles_for_tpu_v5e_with_libtpu():
    """A real Mosaic compile (DMA alignment, VMEM): SmolLM2's heads, k=2048 + 640 forced slots,
    a 64k cache, lists per head and shared."""
    report = compile_for_tpu("""
import jax.numpy as jnp
from jaxtok.kernels.sparse_decode_attention import sparse_decode_attention
B, T, H, K, D, S, N = 2, 1, 9, 3, 64, 65536, 2688
shapes = [((B, T, H, D), jnp.bfloat16), ((B, S, K, D), jnp.bfloat16), ((B, S, K, D), jnp.bfloat16),
          ((B, S), jnp.int32), ((B, T), jnp.int32), ((B, K, N), jnp.int32), ((B, 1, N), jnp.int32)]
args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
fn = jax.jit(lambda q, k, v, kp, qp, sel, shared: (sparse_decode_attention(q, k, v, kp, qp, sel),
                                                   sparse_decode_attention(q, k, v, kp, qp, shared)))
""")
    assert report["mosaic"] and report["argument_size_in_bytes"] > 2 * 2 * 65536 * 3 * 64 * 2
