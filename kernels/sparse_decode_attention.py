"""Sparse decode attention: a few queries per row over key slots selected per (row, key/value head).

TokenSelect (and any token-level KV selection) attends, for each key/value head, to a short list
of cache slots: ``selected[b, h, :]``, N slot indices, -1 for unused entries. The kernel reads only
those keys and values; the rest of the cache is never touched, so its cost follows N, not the
cache length S. A selected key is visible to a query iff it is also visible by position
(``0 <= k_positions[slot] <= q_position``): a chunk of queries can select its own slots and still
be causal inside itself. Slots must be unique within a (row, head) list (a repeated slot would be
counted twice; :mod:`jaxtok.decode.tokenselect` builds its lists without repeats).

Layout: the grid walks (batch row, key/value head, tile of ``block_n`` selected entries); the G
query heads sharing a key/value head are rows of one (T*G, D) query tile, so each gathered key is
read once for all of them. The cache stays in its (B, S, K, D) layout in HBM (no per-call
transpose or copy of the cache):

* TPU (Mosaic): the tile's slot indices sit in SMEM; each selected key/value row is one DMA from
  HBM (``memory_space=pl.ANY``) into a VMEM tile, then one online-softmax step runs over the tile
  (running max / denominator / accumulator in VMEM scratch across the tile axis of the grid).
* GPU (Triton): one program per (row, head) loops over the tiles and loads the rows by index
  arithmetic (the index vector indexes the cache ref: a gathered load).

The selection itself (scores over the whole cache, vote, top-k) is outside this kernel, in
:mod:`jaxtok.decode.tokenselect`: a top-k needs a sort, which Mosaic cannot lower.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

# the online-softmax step and the finite mask value are tree verification's (one flash-attention update)
from .tree_verify_attention import _MASKED, _cache_problems, _online_update


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """block_n: selected entries gathered per online-softmax step (N is padded to a multiple)."""

    block_n: int = 128

    def __post_init__(self):
        if self.block_n < 16 or self.block_n & (self.block_n - 1):
            raise ValueError(f"block_n must be a power of two >= 16, got {self.block_n}")


# ---------------------------------------------------------------------------------------------
# Kernel bodies

def _scores(q, k, scale):
    # q (R, D) . k (N, D) over D, float32 scores
    return jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale


def _finish(denom, acc):
    # a row that saw nothing (padding, or nothing visible) has denominator 0: output zeros
    return acc / jnp.where(denom == 0.0, 1.0, denom)


def _tpu_kernel(sel_ref, qpos_ref, spos_ref, q_ref, k_hbm, v_hbm, o_ref, k_buf, v_buf, m_ref, l_ref, acc_ref,
                sem, *, scale: float, block_n: int):
    """One (batch row, tile of selected entries) per program, every key/value head in it.

    A DMA moves whole token rows (all K heads: (K, D)), because Mosaic slices tiled dimensions
    only at tile-aligned offsets: a row's own head is a sublane of the tiled (K, D) minor pair,
    and a single token is a sublane of a (tokens, D) tile. With one list shared by the heads
    (``sel_ref`` has one head) each row is fetched once for all heads; with a list per head, each
    head fetches its own rows (K times the bytes of that head alone).
    """
    b, tile = pl.program_id(0), pl.program_id(1)
    kv_heads, lists = q_ref.shape[0], sel_ref.shape[0]

    @pl.when(tile == 0)
    def _():
        m_ref[...] = jnp.full(m_ref.shape, _MASKED, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def gather(lst):
        def copies(j):
            slot = jnp.maximum(sel_ref[lst, 0, j], 0)  # unused entries (-1) read slot 0, masked below
            return (pltpu.make_async_copy(k_hbm.at[b, slot], k_buf.at[j], sem.at[0]),
                    pltpu.make_async_copy(v_hbm.at[b, slot], v_buf.at[j], sem.at[1]))

        def start(j, _):
            for c in copies(j):
                c.start()

        def wait(j, _):
            for c in copies(j):
                c.wait()

        jax.lax.fori_loop(0, block_n, start, None)  # the whole tile in flight at once
        jax.lax.fori_loop(0, block_n, wait, None)

    for h in range(kv_heads):  # static: Mosaic slices the head out of the (Bn, K, D) tile
        lst = h if lists > 1 else 0
        if h == 0 or lists > 1:
            gather(lst)
        spos = spos_ref[lst]  # (1, Bn)
        visible = (spos >= 0) & (spos <= qpos_ref[...])  # (R, Bn) from positions: no mask in memory
        carry = (m_ref[h], l_ref[h], acc_ref[h])
        m, denom, acc = _online_update(carry, _scores(q_ref[h], k_buf[:, h, :], scale), visible, v_buf[:, h, :])
        m_ref[h], l_ref[h], acc_ref[h] = m, denom, acc

    @pl.when(tile == pl.num_programs(1) - 1)
    def _():
        for h in range(kv_heads):
            o_ref[h] = _finish(l_ref[h], acc_ref[h]).astype(o_ref.dtype)


def _gpu_kernel(sel_ref, qpos_ref, spos_ref, q_ref, k_ref, v_ref, o_ref, *, scale: float, block_n: int,
                num_tiles: int):
    q, qpos = q_ref[...], qpos_ref[...]  # (R, D), (R, 1)
    rows, dv = q.shape[0], v_ref.shape[-1]
    carry = (jnp.full((rows, 1), _MASKED, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
             jnp.zeros((rows, dv), jnp.float32))

    def step(i, carry):
        entries = pl.ds(pl.multiple_of(i * block_n, block_n), block_n)
        slots = jnp.maximum(sel_ref[0, entries], 0)  # (Bn,) index vector: a gathered load below
        spos = spos_ref[:, entries]  # (1, Bn)
        visible = (spos >= 0) & (spos <= qpos)
        return _online_update(carry, _scores(q, k_ref[slots, :], scale), visible, v_ref[slots, :])

    _, denom, acc = jax.lax.fori_loop(0, num_tiles, step, carry)
    o_ref[...] = _finish(denom, acc).astype(o_ref.dtype)


# ---------------------------------------------------------------------------------------------
# pallas_call wrappers

def _tile(n: int) -> int:
    """Query rows are padded to a power of two >= 16 (Triton's dot; TPU's 8/16-row tiles)."""
    return max(16, 1 << max(0, (n - 1).bit_length()))


def _cost(q, k, n, itemsize):
    b, kv_heads, rows, d = q.shape
    return pl.CostEstimate(flops=4 * b * kv_heads * rows * n * d, transcendentals=b * kv_heads * rows * n,
                           bytes_accessed=itemsize * b * kv_heads * (2 * n * d + 2 * rows * d) + 8 * b * kv_heads * n)


def _tpu_call(sel, qpos, spos, q, k, v, *, scale, block_n, interpret):
    b, kv_heads, rows, d = q.shape
    lists, n, dv = sel.shape[1], sel.shape[-1], v.shape[-1]
    kernel = functools.partial(_tpu_kernel, scale=scale, block_n=block_n)
    per_row = lambda i, t: (i, 0, 0, 0)  # noqa: E731 (queries and output stay over the tiles)
    per_tile = lambda i, t: (i, 0, 0, t)  # noqa: E731
    in_specs = [
        pl.BlockSpec((None, lists, 1, block_n), per_tile, memory_space=pltpu.SMEM),  # slots (B, L, 1, N)
        pl.BlockSpec((None, rows, 1), lambda i, t: (i, 0, 0)),  # query positions (B, R, 1)
        pl.BlockSpec((None, lists, 1, block_n), per_tile),  # positions of the selected slots
        pl.BlockSpec((None, kv_heads, rows, d), per_row),  # queries (B, K, R, D)
        pl.BlockSpec(memory_space=pl.ANY),  # the cache stays in HBM: rows come by DMA
        pl.BlockSpec(memory_space=pl.ANY),
    ]
    scratch = [pltpu.VMEM((block_n, kv_heads, d), k.dtype), pltpu.VMEM((block_n, kv_heads, dv), v.dtype),
               pltpu.VMEM((kv_heads, rows, 1), jnp.float32), pltpu.VMEM((kv_heads, rows, 1), jnp.float32),
               pltpu.VMEM((kv_heads, rows, dv), jnp.float32), pltpu.SemaphoreType.DMA((2,))]
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((b, kv_heads, rows, dv), q.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=0, grid=(b, n // block_n), in_specs=in_specs,
            out_specs=pl.BlockSpec((None, kv_heads, rows, dv), per_row), scratch_shapes=scratch),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        cost_estimate=_cost(q, k, n, q.dtype.itemsize), interpret=interpret, name="sparse_decode_attention",
    )(sel[:, :, None, :], qpos, spos, q, k, v)


def _gpu_call(sel, qpos, spos, q, k, v, *, scale, block_n, interpret):
    from jax.experimental.pallas import triton as pl_triton

    b, kv_heads, rows, d = q.shape
    s, n, dv = k.shape[1], sel.shape[-1], v.shape[-1]
    # one program per (row, head): a list shared by the heads is read by each of them
    sel, spos = jnp.broadcast_to(sel, (b, kv_heads, n)), jnp.broadcast_to(spos, (b, kv_heads, 1, n))
    kernel = functools.partial(_gpu_kernel, scale=scale, block_n=block_n, num_tiles=n // block_n)
    per_head = lambda i, h: (i, h, 0, 0)  # noqa: E731
    in_specs = [
        pl.BlockSpec((None, None, 1, n), per_head),  # slots (B, K, 1, N)
        pl.BlockSpec((None, rows, 1), lambda i, h: (i, 0, 0)),
        pl.BlockSpec((None, None, 1, n), per_head),
        pl.BlockSpec((None, None, rows, d), per_head),
        pl.BlockSpec((None, s, None, d), lambda i, h: (i, 0, h, 0)),  # this head's cache rows, by index
        pl.BlockSpec((None, s, None, dv), lambda i, h: (i, 0, h, 0)),
    ]
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((b, kv_heads, rows, dv), q.dtype), grid=(b, kv_heads),
        in_specs=in_specs, out_specs=pl.BlockSpec((None, None, rows, dv), per_head),
        compiler_params=pl_triton.CompilerParams(num_warps=4, num_stages=1),
        cost_estimate=_cost(q, k, n, q.dtype.itemsize), interpret=interpret, name="sparse_decode_attention",
    )(sel[:, :, None, :], qpos, spos, q, k, v)


# ---------------------------------------------------------------------------------------------
# Public function

def _check_shapes(q, k_cache, v_cache, k_positions, q_positions, selected):
    b = q.shape[0]
    problems = _cache_problems(q, k_cache, v_cache, k_positions, q_positions)
    if selected.ndim != 3 or selected.shape[0] != b or selected.shape[1] not in (1, k_cache.shape[2]):
        problems.append(f"selected {selected.shape} is not (B, K, N) or (B, 1, N) with (B, K) = "
                        f"{(b, k_cache.shape[2])}")
    elif not jnp.issubdtype(selected.dtype, jnp.integer):
        problems.append(f"selected must hold integer slots, got {selected.dtype}")
    if problems:
        raise ValueError("sparse_decode_attention: " + "; ".join(problems))


@functools.partial(jax.jit, static_argnames=("scale", "block_sizes", "interpret", "backend"))
def sparse_decode_attention(q, k_cache, v_cache, k_positions, q_positions, selected, *,
                            scale: float | None = None, block_sizes: BlockSizes = BlockSizes(),
                            interpret=False, backend: str | None = None):
    """Attention of T queries per row over the selected cache slots of each key/value head.

    Args:
      q: (B, T, H, D) queries (RoPE applied); T is small (decode: 1; a prefill chunk: C).
      k_cache, v_cache: (B, S, K, D) in the cache's own layout; H a multiple of K.
      k_positions: (B, S) int, position of each slot (-1: empty or padding).
      q_positions: (B, T) int; a selected key is visible iff 0 <= its position <= the query's.
      selected: (B, K, N) int slots per (row, key/value head), unique, -1 for unused entries; or
        (B, 1, N): one list shared by every key/value head (gathered once on TPU).
      interpret: False, True (CPU) or ``pltpu.InterpretParams()`` (TPU semantics checked on CPU).
      backend: None / ``"tpu"`` (Mosaic: DMA gathers) or ``"triton"`` (GPU: index-vector loads).
    Returns (B, T, H, Dv) in q's dtype; a query that sees no key gets zeros.
    """
    _check_shapes(q, k_cache, v_cache, k_positions, q_positions, selected)
    b, t, h, d = q.shape
    kv_heads, dv = k_cache.shape[2], v_cache.shape[-1]
    g = h // kv_heads
    scale = d ** -0.5 if scale is None else scale
    rows, rows_p = t * g, _tile(t * g)
    bn = block_sizes.block_n
    n_p = max(1, -(-selected.shape[-1] // bn)) * bn

    qh = q.reshape(b, t, kv_heads, g, d).transpose(0, 2, 1, 3, 4).reshape(b, kv_heads, rows, d)  # (B, K, R, D)
    qh = jnp.pad(qh, ((0, 0), (0, 0), (0, rows_p - rows), (0, 0)))
    qpos = jnp.pad(jnp.repeat(q_positions.astype(jnp.int32), g, axis=1), ((0, 0), (0, rows_p - rows)),
                   constant_values=-1)[:, :, None]  # (B, Rp, 1): padded rows see nothing
    sel = jnp.pad(selected.astype(jnp.int32), ((0, 0), (0, 0), (0, n_p - selected.shape[-1])), constant_values=-1)
    # positions of the selected slots (N small ints per head: a cheap gather outside the kernel)
    spos = jnp.take_along_axis(k_positions.astype(jnp.int32)[:, None, :], jnp.maximum(sel, 0), axis=2)
    spos = jnp.where(sel >= 0, spos, -1)[:, :, None, :]  # (B, K, 1, Np)
    k, v = k_cache.astype(q.dtype), v_cache.astype(q.dtype)
    if backend in (None, "tpu", "mosaic"):
        out = _tpu_call(sel, qpos, spos, qh, k, v, scale=scale, block_n=bn, interpret=interpret)
    elif backend == "triton":
        out = _gpu_call(sel, qpos, spos, qh, k, v, scale=scale, block_n=bn, interpret=interpret)
    else:
        raise ValueError(f"unknown backend {backend!r}: use None/'tpu' (Mosaic) or 'triton'")
    out = out[:, :, :rows].reshape(b, kv_heads, t, g, dv).transpose(0, 2, 1, 3, 4)  # (B, T, K, G, Dv)
    return out.reshape(b, t, h, dv)


# ---------------------------------------------------------------------------------------------
# Reference: gather the selected rows, then plain attention over them

def sparse_decode_attention_reference(q, k_cache, v_cache, k_positions, q_positions, selected, *,
                                      scale: float | None = None):
    """Same contract as :func:`sparse_decode_attention`: gathers the (B, N, K, D) selected keys and
    values and runs :func:`jaxtok.nn.attention.attention_reference` with one mask per key/value
    head. Also the fast path on CPU (it reads only the selected rows too)."""
    from jaxtok.nn.attention import attention_reference

    _check_shapes(q, k_cache, v_cache, k_positions, q_positions, selected)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kv_heads = k_cache.shape[2]
    selected = jnp.broadcast_to(selected, (selected.shape[0], kv_heads, selected.shape[-1]))
    index = jnp.maximum(selected, 0).transpose(0, 2, 1)  # (B, N, K)
    k_sel = jnp.take_along_axis(k_cache, index[..., None], axis=1).astype(q.dtype)  # (B, N, K, D)
    v_sel = jnp.take_along_axis(v_cache, index[..., None], axis=1).astype(q.dtype)
    pos = jnp.where(selected >= 0, jnp.take_along_axis(k_positions[:, None, :], jnp.maximum(selected, 0), axis=2),
                    -1)  # (B, K, N)
    mask = (pos[:, :, None, :] >= 0) & (pos[:, :, None, :] <= q_positions[:, None, :, None])  # (B, K, T, N)
    out = attention_reference(q, k_sel, v_sel, mask, scale)
    # a query that sees nothing gets zeros, as in the kernel (the reference would average)
    seen = jnp.any(mask, axis=-1).transpose(0, 2, 1)  # (B, T, K)
    seen = jnp.repeat(seen, q.shape[2] // kv_heads, axis=2)[..., None]
    return jnp.where(seen, out, 0).astype(q.dtype)
