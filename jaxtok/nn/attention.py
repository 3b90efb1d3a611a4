"""The one attention entry point of jaxtok.

Masks are never passed in materialised: they follow from key/query positions and segment ids,
which is what a fused kernel needs (and what packing and KV caches produce anyway):

* a key is visible iff its position is >= 0 and its segment id is not 0 (0 marks padding);
* with segments, a query sees only keys of its own segment;
* with ``causal``, a query at position p sees keys at positions <= p.

What positions cannot say comes as an optional explicit :class:`Visibility`, and a key must pass
both: a draft *tree* (speculative decoding: a node sees only its ancestors inside the block,
whatever their positions) or *selected* key slots per (row, key/value head) (sparse attention such
as TokenSelect). The Pallas kernels take these structures as they are (an ancestor mask over the
block, index lists), never as a dense (T, S) mask over the cache.

Every implementation returns the same thing; REFERENCE is the plain-jnp definition the others are
tested against.
"""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp
from flax import struct

from jaxtok.nn.layers import matmul

# Finite, so fully-masked rows (padding queries) give a uniform average instead of NaN.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


class AttentionImpl(enum.Enum):
    AUTO = "auto"
    REFERENCE = "reference"  # plain jnp einsums
    XLA = "xla"  # jax.nn.dot_product_attention
    # the Pallas kernel of the call's Visibility (tree: kernels/tree_verify_attention.py); calls
    # without one have no kernel and take the reference path
    PALLAS = "pallas"
    PALLAS_INTERPRET = "pallas_interpret"  # the same kernels in Pallas interpret mode (CPU tests)


@struct.dataclass
class Visibility:
    """Explicit visibility on top of the positional rules (a key must pass both). Set one field.

    Attributes:
      tree: (B, T, T) bool for a draft block: the call's T queries are the block's nodes, whose
        keys sit in key slots ``[block_start, block_start + T)``; query i sees block slot
        ``block_start + j`` iff ``tree[b, i, j]`` (its ancestors and itself: :meth:`from_parents`).
        Keys outside the block follow positions alone.
      block_start: () int, first key slot of the block (the KV cache's ``end`` when the block is
        written into the cache).
      selected: (B, K, N) int key slots per (row, key/value head), or (B, 1, N) shared by every
        key/value head; -1 for unused entries, no slot twice in a list: only these slots are
        visible (sparse selection: :mod:`jaxtok.decode.tokenselect`; kernel
        ``kernels/sparse_decode_attention.py``).
    """

    tree: jax.Array | None = None
    block_start: jax.Array | None = None
    selected: jax.Array | None = None

    @classmethod
    def from_parents(cls, parents: jax.Array, block_start) -> Visibility:
        """A tree from a (B, T) parent array (-1 for the root; a parent before its child)."""
        from jaxtok.kernels.tree_verify_attention import ancestor_mask

        return cls(tree=ancestor_mask(parents), block_start=jnp.asarray(block_start, jnp.int32))

    def check(self, q_shape, k_shape) -> None:
        b, t = q_shape[:2]
        if (self.tree is None) == (self.selected is None):
            raise ValueError("Visibility: set exactly one of tree (with block_start) and selected")
        if self.tree is not None:
            if self.block_start is None:
                raise ValueError("Visibility.tree needs block_start (the block's first key slot)")
            if self.tree.shape != (b, t, t):
                raise ValueError(f"Visibility.tree {self.tree.shape} is not (B, T, T) = {(b, t, t)} "
                                 f"for queries (B, T) = {(b, t)}")
        if self.selected is not None and (self.selected.ndim != 3 or self.selected.shape[0] != b
                                          or self.selected.shape[1] not in (1, k_shape[2])):
            raise ValueError(f"Visibility.selected {self.selected.shape} is not (B, K, N) or (B, 1, N) "
                             f"with (B, K) = {(b, k_shape[2])}")

    def restrict(self, mask: jax.Array) -> jax.Array:
        """The dense form (reference paths): positional mask (B, T, S) -> (B, T, S) for a tree,
        (B, K, T, S) for a selection."""
        s = mask.shape[-1]
        slots = jnp.arange(s)
        if self.tree is not None:
            t = self.tree.shape[-1]
            offset = slots - self.block_start
            in_block = (offset >= 0) & (offset < t)
            tree_cols = jnp.take(self.tree.astype(bool), jnp.clip(offset, 0, t - 1), axis=2)  # (B, T, S)
            return mask & jnp.where(in_block, tree_cols, True)
        b, kv_heads, _ = self.selected.shape
        index = jnp.where(self.selected < 0, s, self.selected)  # -1 would wrap around: drop it
        chosen = jnp.zeros((b, kv_heads, s), bool).at[
            jnp.arange(b)[:, None, None], jnp.arange(kv_heads)[None, :, None], index].set(True, mode="drop")
        return mask[:, None] & chosen[:, :, None, :]


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, q_seg: jax.Array | None,
                   k_seg: jax.Array | None, causal: bool) -> jax.Array:
    """Boolean (B, T, S) mask from positions (B, T)/(B, S) and optional segment ids."""
    mask = (k_pos >= 0)[:, None, :]
    if causal:
        mask = mask & (k_pos[:, None, :] <= q_pos[:, :, None])
    if k_seg is not None:
        mask = mask & (k_seg != 0)[:, None, :]
        if q_seg is not None:
            mask = mask & (q_seg[:, :, None] == k_seg[:, None, :])
    return mask


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                        scale: float) -> jax.Array:
    """q (B, T, H, D); k, v (B, S, K, D) with H a multiple of K (grouped queries); mask (B, T, S),
    or (B, K, T, S) for one mask per key/value head."""
    b, t, h, d = q.shape
    kv_heads, s = k.shape[2], k.shape[1]
    g = h // kv_heads
    # The G query heads sharing a key/value head become rows of one (T*G, S) score matrix per
    # key/value head, keys last: both products are then plain row-major matrix products (about
    # 2x faster on CPU than (G, T, S) scores, which need the probabilities transposed).
    q = q.reshape(b, t, kv_heads, g, d).transpose(0, 2, 1, 3, 4).reshape(b, kv_heads, t * g, d)  # (B, K, T*G, D)
    # float32 scores and outputs; 16-bit operands in both directions (``matmul``)
    scores = matmul("bkqd,bskd->bkqs", q, k, q.dtype, jnp.float32) * scale
    scores = scores.reshape(b, kv_heads, t, g, s)  # (B, K, T, G, S)
    head_mask = mask[:, None, :, None, :] if mask.ndim == 3 else mask[:, :, :, None, :]
    scores = jnp.where(head_mask, scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, kv_heads, t * g, s)
    out = matmul("bkqs,bskd->bkqd", probs, v, v.dtype, jnp.float32)  # (B, K, T*G, Dv)
    out = out.reshape(b, kv_heads, t, g, v.shape[-1]).transpose(0, 2, 1, 3, 4)  # (B, T, K, G, Dv)
    return out.reshape(b, t, h, v.shape[-1]).astype(q.dtype)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_positions: jax.Array,
    k_positions: jax.Array,
    q_segment_ids: jax.Array | None = None,
    k_segment_ids: jax.Array | None = None,
    causal: bool = True,
    scale: float | None = None,
    impl: AttentionImpl = AttentionImpl.AUTO,
    visibility: Visibility | None = None,
) -> jax.Array:
    """Multi-head (grouped-query) attention. Returns (B, T, H, D).

    ``visibility`` narrows what positions and segments allow (see :class:`Visibility`). AUTO runs
    it through its Pallas kernel on TPU and GPU; on CPU a tree takes the reference path and a
    selection the gathered jnp path (only the selected keys are read; REFERENCE densifies it).
    """
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} not a multiple of key/value heads {k.shape[2]}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if visibility is not None:
        visibility.check(q.shape, k.shape)
        if impl is AttentionImpl.AUTO and jax.default_backend() in ("tpu", "gpu"):
            impl = AttentionImpl.PALLAS
        if impl is AttentionImpl.AUTO and visibility.selected is not None:
            return _gathered_attention(q, k, v, q_positions, k_positions, q_segment_ids, k_segment_ids, causal,
                                       scale, visibility)
        if impl in (AttentionImpl.PALLAS, AttentionImpl.PALLAS_INTERPRET):
            return _pallas_attention(q, k, v, q_positions, k_positions, q_segment_ids, k_segment_ids, causal,
                                     scale, visibility, impl is AttentionImpl.PALLAS_INTERPRET)
    mask = attention_mask(q_positions, k_positions, q_segment_ids, k_segment_ids, causal)
    if visibility is not None:
        mask = visibility.restrict(mask)
    if impl in (AttentionImpl.AUTO, AttentionImpl.REFERENCE, AttentionImpl.PALLAS, AttentionImpl.PALLAS_INTERPRET):
        return attention_reference(q, k, v, mask, scale)
    if impl is AttentionImpl.XLA:
        # jax.nn wants one mask per query head: (B, H, T, S)
        if mask.ndim == 4:  # per key/value head (a shared selection has one)
            mask = jnp.broadcast_to(mask, (mask.shape[0], k.shape[2]) + mask.shape[2:])
        heads = jnp.repeat(mask, q.shape[2] // k.shape[2], axis=1) if mask.ndim == 4 else mask[:, None]
        return jax.nn.dot_product_attention(q, k, v, mask=heads, scale=scale, implementation="xla")
    raise ValueError(f"unknown attention implementation {impl}")


def _pallas_attention(q, k, v, q_positions, k_positions, q_segment_ids, k_segment_ids, causal, scale,
                      visibility: Visibility, interpret: bool) -> jax.Array:
    """The kernel for ``visibility``; what it does not cover is an error, not a silent fallback."""
    if not causal or q_segment_ids is not None or k_segment_ids is not None:
        raise ValueError("the tree-verification and sparse kernels take causal attention without segment ids")
    backend = "triton" if jax.default_backend() == "gpu" and not interpret else None
    if visibility.selected is not None:
        from jaxtok.kernels.sparse_decode_attention import sparse_decode_attention

        return sparse_decode_attention(q, k, v, k_positions, q_positions, visibility.selected, scale=scale,
                                       interpret=interpret, backend=backend)
    from jaxtok.kernels.tree_verify_attention import tree_verify_attention

    t, s = q.shape[1], k.shape[1]
    # the block's own keys go to the kernel separately; their cache slots are hidden from the
    # cache pass (position -1), so each key is counted once
    offset = jnp.arange(s) - visibility.block_start
    cache_positions = jnp.where((offset >= 0) & (offset < t), -1, k_positions)
    k_block = jax.lax.dynamic_slice_in_dim(k, visibility.block_start, t, axis=1)
    v_block = jax.lax.dynamic_slice_in_dim(v, visibility.block_start, t, axis=1)
    return tree_verify_attention(q, k, v, cache_positions, q_positions, k_block, v_block, visibility.tree,
                                 scale=scale, interpret=interpret, backend=backend)


def _gathered_attention(q, k, v, q_positions, k_positions, q_segment_ids, k_segment_ids, causal, scale,
                        visibility: Visibility) -> jax.Array:
    """Selected slots on CPU: gather the (B, N, K, D) selected keys/values, attend over them."""
    if not causal or q_segment_ids is not None or k_segment_ids is not None:
        raise ValueError("attention over selected slots is causal by position and takes no segment ids")
    from jaxtok.kernels.sparse_decode_attention import sparse_decode_attention_reference

    return sparse_decode_attention_reference(q, k, v, k_positions, q_positions, visibility.selected, scale=scale)
