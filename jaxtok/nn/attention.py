"""The one attention entry point of jaxtok.

Masks are never passed in materialised: they follow from key/query positions and segment ids,
which is what a fused kernel needs (and what packing and KV caches produce anyway):

* a key is visible iff its position is >= 0 and its segment id is not 0 (0 marks padding);
* with segments, a query sees only keys of its own segment;
* with ``causal``, a query at position p sees keys at positions <= p.

Every implementation returns the same thing; REFERENCE is the plain-jnp definition the others are
tested against.
"""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp

from jaxtok.nn.layers import matmul

# Finite, so fully-masked rows (padding queries) give a uniform average instead of NaN.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


class AttentionImpl(enum.Enum):
    AUTO = "auto"
    REFERENCE = "reference"  # plain jnp einsums
    XLA = "xla"  # jax.nn.dot_product_attention


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
    """q (B, T, H, D); k, v (B, S, K, D) with H a multiple of K (grouped queries); mask (B, T, S)."""
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
    scores = jnp.where(mask[:, None, :, None, :], scores, _MASKED)
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
) -> jax.Array:
    """Multi-head (grouped-query) attention. Returns (B, T, H, D)."""
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} not a multiple of key/value heads {k.shape[2]}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask = attention_mask(q_positions, k_positions, q_segment_ids, k_segment_ids, causal)
    if impl in (AttentionImpl.AUTO, AttentionImpl.REFERENCE):
        return attention_reference(q, k, v, mask, scale)
    if impl is AttentionImpl.XLA:
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale,
                                            implementation="xla")
    raise ValueError(f"unknown attention implementation {impl}")
