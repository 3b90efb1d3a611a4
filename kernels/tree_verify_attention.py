"""Tree-verification attention: a block of T draft queries over the KV cache plus the block itself.

Speculative decoding verifies a tree of draft tokens in one forward pass. Every draft node sees
the cached prefix (by position, as usual) and, inside the block, only its own ancestors and
itself: a tree cannot be expressed by positions alone (a node's position is prefix + depth, so
causal-by-position would let it see other branches' shallower nodes). The kernel therefore takes
two key sets:

* the cache, visible by positions only: key slot s is visible to query t iff
  ``k_positions[s] >= 0`` and ``k_positions[s] <= q_positions[t]`` (no (T, S) mask exists);
* the block's own keys, visible by the tree: ``tree_mask[t, j]`` (T x T, the ancestor mask
  including the diagonal, see :func:`ancestor_mask`).

Layout: the grid walks (batch row, key/value head); the G query heads sharing a key/value head
are rows of one (T*G, D) query tile, so grouped-query attention reads each key once. Inside, a
flash-style online softmax runs over key blocks of ``block_kv`` slots (a ``fori_loop``), then over
the block's keys, and normalises once. The cache tile of one (row, head) stays resident (S x D);
long caches on a TPU would walk the key blocks in the grid instead (not needed for decode-length
caches here: 8192 x 64 float32 is 2 MiB).

The same kernel body lowers for TPU (Mosaic) and, with ``backend="triton"``, for GPUs (Triton:
row and key tiles are padded to powers of two >= 16, which Triton's ``dot`` needs).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# Finite (as in jaxtok.nn.attention), so a row that has seen nothing yet keeps finite maxima.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """block_kv: cache slots per online-softmax step (the cache is padded to a multiple)."""

    block_kv: int = 128

    def __post_init__(self):
        if self.block_kv < 16 or self.block_kv & (self.block_kv - 1):
            raise ValueError(f"block_kv must be a power of two >= 16, got {self.block_kv}")


# ---------------------------------------------------------------------------------------------
# Kernel body (one (batch row, key/value head) per program)

def _online_update(carry, scores, visible, v):
    """One flash-attention step: fold (R, N) ``scores`` (masked by ``visible``) and values
    (N, D) into the running maximum m, denominator and accumulator acc."""
    m, denom, acc = carry
    scores = jnp.where(visible, scores, _MASKED)
    m_new = jnp.maximum(m, jnp.max(scores, axis=-1, keepdims=True))
    p = jnp.where(visible, jnp.exp(scores - m_new), 0.0)  # exact zeros for hidden keys
    alpha = jnp.exp(m - m_new)
    denom = alpha * denom + jnp.sum(p, axis=-1, keepdims=True)
    pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
    return m_new, denom, alpha * acc + pv


def _scores(q, k, scale):
    # q (R, D) . k (N, D) over D: float32 scores from 16-bit (or float32) operands
    return jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale


def _tree_verify_kernel(qpos_ref, kpos_ref, q_ref, k_ref, v_ref, tree_ref, kb_ref, vb_ref, o_ref, *,
                        scale: float, block_kv: int, num_kv_blocks: int):
    q = q_ref[...]  # (R, D)
    qpos = qpos_ref[...]  # (R, 1)
    rows, dv = q.shape[0], v_ref.shape[-1]
    carry = (jnp.full((rows, 1), _MASKED, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
             jnp.zeros((rows, dv), jnp.float32))

    def cache_step(i, carry):
        start = pl.multiple_of(i * block_kv, block_kv)
        k = k_ref[pl.ds(start, block_kv), :]  # (Bk, D)
        v = v_ref[pl.ds(start, block_kv), :]
        kpos = kpos_ref[:, pl.ds(start, block_kv)]  # (1, Bk)
        visible = (kpos >= 0) & (kpos <= qpos)  # (R, Bk) from positions: no mask in memory
        return _online_update(carry, _scores(q, k, scale), visible, v)

    carry = jax.lax.fori_loop(0, num_kv_blocks, cache_step, carry)
    # the draft block: the tree decides (ancestors and self)
    carry = _online_update(carry, _scores(q, kb_ref[...], scale), tree_ref[...] != 0, vb_ref[...])
    _, denom, acc = carry
    # padded rows see nothing (denominator 0); real rows always see themselves
    o_ref[...] = (acc / jnp.where(denom == 0.0, 1.0, denom)).astype(o_ref.dtype)


# ---------------------------------------------------------------------------------------------
# pallas_call wrapper

def _tile(n: int) -> int:
    """Rows and block keys are padded to a power of two >= 16 (Triton's dot; TPU's 8-row tiles)."""
    return max(16, 1 << max(0, (n - 1).bit_length()))


def _compiler_params(backend: str | None):
    if backend in (None, "tpu", "mosaic"):
        return None
    if backend == "triton":
        from jax.experimental.pallas import triton as pl_triton

        return pl_triton.CompilerParams(num_warps=4, num_stages=1)
    raise ValueError(f"unknown backend {backend!r}: use None/'tpu' (Mosaic) or 'triton'")


def _tree_verify_call(qpos, kpos, q, k, v, tree, kb, vb, *, scale, block_sizes, interpret, backend):
    b, kv_heads, rows, d = q.shape
    s, t, dv = k.shape[2], kb.shape[2], v.shape[-1]
    kernel = functools.partial(_tree_verify_kernel, scale=scale, block_kv=block_sizes.block_kv,
                               num_kv_blocks=s // block_sizes.block_kv)
    per_row = lambda i, h: (i, 0, 0)  # noqa: E731 (shared by the kv heads of a row)
    per_head = lambda i, h: (i, h, 0, 0)  # noqa: E731
    in_specs = [
        pl.BlockSpec((None, rows, 1), per_row),  # query positions (B, R, 1)
        pl.BlockSpec((None, 1, s), per_row),  # cache key positions (B, 1, S)
        pl.BlockSpec((None, None, rows, d), per_head),  # queries (B, K, R, D)
        pl.BlockSpec((None, None, s, d), per_head),  # cache keys (B, K, S, D)
        pl.BlockSpec((None, None, s, dv), per_head),
        pl.BlockSpec((None, rows, t), per_row),  # tree mask (B, R, Tb)
        pl.BlockSpec((None, None, t, d), per_head),  # block keys (B, K, Tb, D)
        pl.BlockSpec((None, None, t, dv), per_head),
    ]
    itemsize = q.dtype.itemsize
    cost = pl.CostEstimate(
        flops=2 * b * kv_heads * rows * (s + t) * (d + dv), transcendentals=b * kv_heads * rows * (s + t),
        bytes_accessed=itemsize * b * kv_heads * ((s + t) * (d + dv) + 2 * rows * d))
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((b, kv_heads, rows, dv), q.dtype), grid=(b, kv_heads),
        in_specs=in_specs, out_specs=pl.BlockSpec((None, None, rows, dv), per_head),
        compiler_params=_compiler_params(backend), cost_estimate=cost, interpret=interpret,
        name="tree_verify_attention",
    )(qpos, kpos, q, k, v, tree, kb, vb)


# ---------------------------------------------------------------------------------------------
# Public function

def _cache_problems(q, k_cache, v_cache, k_positions, q_positions) -> list[str]:
    """What is wrong with a (B, T, H, D) query against a (B, S, K, D) cache and its positions
    (shared by the decode kernels' input checks)."""
    b, t, h, d = q.shape
    problems = []
    if k_cache.ndim != 4 or k_cache.shape[0] != b or k_cache.shape[3] != d:
        problems.append(f"k_cache {k_cache.shape} is not (B={b}, S, K, D={d})")
    elif h % k_cache.shape[2]:
        problems.append(f"query heads {h} not a multiple of key/value heads {k_cache.shape[2]}")
    if v_cache.shape[:3] != k_cache.shape[:3]:
        problems.append(f"v_cache {v_cache.shape} does not match k_cache {k_cache.shape}")
    if k_positions.shape != k_cache.shape[:2]:
        problems.append(f"k_positions {k_positions.shape} is not (B, S) = {k_cache.shape[:2]}")
    if q_positions.shape != (b, t):
        problems.append(f"q_positions {q_positions.shape} is not (B, T) = {(b, t)}")
    return problems


def _check_shapes(q, k_cache, v_cache, k_positions, q_positions, k_block, v_block, tree_mask):
    b, t = q.shape[:2]
    problems = _cache_problems(q, k_cache, v_cache, k_positions, q_positions)
    if k_block.shape != (b, t) + k_cache.shape[2:] or v_block.shape[:3] != k_block.shape[:3]:
        problems.append(f"k_block/v_block {k_block.shape}/{v_block.shape} are not (B, T, K, D)")
    if tree_mask.shape != (b, t, t):
        problems.append(f"tree_mask {tree_mask.shape} is not (B, T, T) = {(b, t, t)}")
    if problems:
        raise ValueError("tree_verify_attention: " + "; ".join(problems))


@functools.partial(jax.jit, static_argnames=("scale", "block_sizes", "interpret", "backend"))
def tree_verify_attention(q, k_cache, v_cache, k_positions, q_positions, k_block, v_block, tree_mask, *,
                          scale: float | None = None, block_sizes: BlockSizes = BlockSizes(),
                          interpret=False, backend: str | None = None):
    """Attention of draft queries over the cache (by positions) and the draft block (by the tree).

    Args:
      q: (B, T, H, D) queries of the T draft nodes (RoPE applied).
      k_cache, v_cache: (B, S, K, D); H a multiple of K (grouped queries).
      k_positions: (B, S) int, position of each cache slot; -1 hides it (empty slots, padding, and
        the slots where the block itself is written).
      q_positions: (B, T) int: a cache key is visible iff 0 <= its position <= the query's.
      k_block, v_block: (B, T, K, D) keys/values of the draft nodes themselves.
      tree_mask: (B, T, T) bool, query node i sees block node j (ancestors and itself).
      interpret: False, True (CPU) or ``pltpu.InterpretParams()`` (TPU semantics checked on CPU).
      backend: None (Mosaic, TPU) or ``"triton"`` (GPU).
    Returns (B, T, H, Dv) in q's dtype.
    """
    _check_shapes(q, k_cache, v_cache, k_positions, q_positions, k_block, v_block, tree_mask)
    b, t, h, d = q.shape
    s, kv_heads, dv = k_cache.shape[1], k_cache.shape[2], v_cache.shape[-1]
    g = h // kv_heads
    scale = d ** -0.5 if scale is None else scale
    rows, rows_p, t_p = t * g, _tile(t * g), _tile(t)
    bk = block_sizes.block_kv
    s_p = max(1, -(-s // bk)) * bk  # an empty cache still makes one (fully hidden) key block

    # queries: the G heads of a key/value head as rows (row r = node r // G), padded rows hidden
    qh = q.reshape(b, t, kv_heads, g, d).transpose(0, 2, 1, 3, 4).reshape(b, kv_heads, rows, d)
    qh = jnp.pad(qh, ((0, 0), (0, 0), (0, rows_p - rows), (0, 0)))
    qpos = jnp.pad(jnp.repeat(q_positions.astype(jnp.int32), g, axis=1), ((0, 0), (0, rows_p - rows)),
                   constant_values=-1)[:, :, None]  # (B, Rp, 1)
    tree = jnp.repeat(tree_mask.astype(jnp.int32), g, axis=1)  # (B, R, T)
    tree = jnp.pad(tree, ((0, 0), (0, rows_p - rows), (0, t_p - t)))
    # head-major cache (B, K, Sp, D); padded slots get position -1
    kh = jnp.pad(k_cache.astype(q.dtype).transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, s_p - s), (0, 0)))
    vh = jnp.pad(v_cache.astype(q.dtype).transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, s_p - s), (0, 0)))
    kpos = jnp.pad(k_positions.astype(jnp.int32), ((0, 0), (0, s_p - s)), constant_values=-1)[:, None, :]
    kb = jnp.pad(k_block.astype(q.dtype).transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, t_p - t), (0, 0)))
    vb = jnp.pad(v_block.astype(q.dtype).transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, t_p - t), (0, 0)))

    out = _tree_verify_call(qpos, kpos, qh, kh, vh, tree, kb, vb, scale=scale, block_sizes=block_sizes,
                            interpret=interpret, backend=backend)  # (B, K, Rp, Dv)
    out = out[:, :, :rows].reshape(b, kv_heads, t, g, dv).transpose(0, 2, 1, 3, 4)  # (B, T, K, G, Dv)
    return out.reshape(b, t, h, dv)


def ancestor_mask(parents: jax.Array) -> jax.Array:
    """(..., T) parent indices (-1 for a root; a parent comes before its child) -> (..., T, T)
    bool, entry [i, j] true iff j is i or an ancestor of i."""
    t = parents.shape[-1]
    eye = jnp.eye(t, dtype=bool)
    reach = eye | (parents[..., :, None] == jnp.arange(t))  # self or parent: paths of length <= 1
    for _ in range(max(1, (t - 1).bit_length())):  # squaring doubles the path length covered
        reach = reach | (jnp.einsum("...ij,...jk->...ik", reach.astype(jnp.int32), reach.astype(jnp.int32)) > 0)
    return reach


# ---------------------------------------------------------------------------------------------
# Reference: the definition, with the dense mask

def tree_verify_attention_reference(q, k_cache, v_cache, k_positions, q_positions, k_block, v_block,
                                    tree_mask, *, scale: float | None = None):
    """Same contract as :func:`tree_verify_attention`, by concatenating the block's keys to the
    cache and materialising the (B, T, S + T) mask."""
    from jaxtok.nn.attention import attention_reference

    _check_shapes(q, k_cache, v_cache, k_positions, q_positions, k_block, v_block, tree_mask)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    cache_visible = (k_positions[:, None, :] >= 0) & (k_positions[:, None, :] <= q_positions[:, :, None])
    mask = jnp.concatenate([cache_visible, tree_mask.astype(bool)], axis=-1)  # (B, T, S + T)
    k = jnp.concatenate([k_cache, k_block], axis=1).astype(q.dtype)
    v = jnp.concatenate([v_cache, v_block], axis=1).astype(q.dtype)
    return attention_reference(q, k, v, mask, scale)
