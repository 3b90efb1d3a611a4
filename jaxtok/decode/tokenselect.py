"""TokenSelect: token-level KV cache selection for long-context decoding and chunked prefill.

Per layer, a query (decode) or the mean query of a chunk (prefill; RoPE applied in both) scores
every cached token per head (q . k / sqrt(D)); each head's scores are softmax-normalised over the
visible cache and summed over heads (a soft vote: over all heads of the layer, ``share="layer"``,
one list for every key/value head; or over the query heads of each key/value head,
``share="kv_head"``). The attended set of a chunk starting at cache slot ``end`` is

  the first ``n_init`` tokens  U  the top-``k`` voted tokens in between  U  the ``n_local``
  tokens just before the chunk  U  the chunk itself (causal by position).

A decode step is a chunk of one, so chunked prefill with C = 1 equals decoding. The three parts
are disjoint slot ranges by construction (the kernel needs lists without repeats). The cache is
assumed filled contiguously from its first valid slot (left-padded prompts, then one token after
another), as :func:`jaxtok.decode.generate.generate` and :func:`chunked_prefill` fill it:
"first n_init tokens" are the n_init slots from the first valid one.

Selection cache (off by default, never in evaluation): while the cosine similarity of consecutive
decode queries (per row, over all heads) stays >= ``cache_threshold`` for every row, the previous
top-k is reused and scoring, the only part that reads the whole cache, is skipped; the initial and
local parts are always current.

Where layers stay dense (``dense_layers``, e.g. the first ones, as Quest does), they attend to
the whole cache. The top-k runs in jnp (``lax.top_k``): Mosaic has no in-kernel sort.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jaxtok.nn import attention as attn
from jaxtok.nn.layers import matmul

_SHARES = ("layer", "kv_head")


@dataclasses.dataclass(frozen=True)
class TokenSelectConfig:
    """Attributes:
      k: voted tokens per list (2048 in the paper at 128k contexts).
      n_init, n_local: always-attended tokens at the start and just before the queries.
      share: ``layer`` (one ranking for all heads of a layer) or ``kv_head`` (one per key/value head).
      chunk: queries per prefill chunk (one selection from their mean query).
      dense_layers: layer indices that attend to the whole cache.
      cache_threshold: selection-cache cosine threshold (decode only); None = off.
    """

    k: int = 2048
    n_init: int = 128
    n_local: int = 512
    share: str = "layer"
    chunk: int = 512
    dense_layers: tuple[int, ...] = ()
    cache_threshold: float | None = None

    def __post_init__(self):
        if self.share not in _SHARES:
            raise ValueError(f"share must be one of {_SHARES}, got {self.share!r}")
        for name in ("k", "n_init", "n_local"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {self.chunk}")
        if self.cache_threshold is not None and not -1.0 <= self.cache_threshold <= 1.0:
            raise ValueError(f"cache_threshold is a cosine in [-1, 1], got {self.cache_threshold}")
        object.__setattr__(self, "dense_layers", tuple(int(i) for i in self.dense_layers))

    def lists(self, kv_heads: int) -> int:
        return 1 if self.share == "layer" else kv_heads


@struct.dataclass
class Request:
    """What a model call passes to every layer instead of a :class:`Visibility`: select here."""

    config: TokenSelectConfig = struct.field(pytree_node=False)


@struct.dataclass
class SelectionState:
    """Per-layer selection cache (leading ``layers`` axis in a model's cache).

    query: (L, B, H, D) previous decode query; top: (L, B, lists, k) its top-k slots;
    hits: (L,) int32 steps that reused the selection; steps: (L,) int32 selecting steps."""

    query: jax.Array
    top: jax.Array
    hits: jax.Array
    steps: jax.Array

    @classmethod
    def create(cls, config: TokenSelectConfig, n_layers: int, batch: int, n_heads: int, n_kv_heads: int,
               head_dim: int, dtype=jnp.float32) -> SelectionState:
        lists = config.lists(n_kv_heads)
        return cls(query=jnp.zeros((n_layers, batch, n_heads, head_dim), dtype),
                   top=jnp.full((n_layers, batch, lists, config.k), -1, jnp.int32),
                   hits=jnp.zeros((n_layers,), jnp.int32), steps=jnp.zeros((n_layers,), jnp.int32))


# ---------------------------------------------------------------------------------------------
# Scores, vote, top-k

def mean_query(q: jax.Array, q_positions: jax.Array) -> jax.Array:
    """(B, T, H, D) queries -> (B, H, D) float32 mean over the valid ones (position >= 0)."""
    valid = (q_positions >= 0).astype(jnp.float32)[:, :, None, None]
    return jnp.sum(q.astype(jnp.float32) * valid, axis=1) / jnp.maximum(jnp.sum(valid, axis=1), 1.0)


def vote(query: jax.Array, k: jax.Array, visible: jax.Array, share: str, scale: float) -> jax.Array:
    """Soft vote: (B, H, D) query, (B, S, K, D) keys, (B, S) visible -> (B, lists, S) float32,
    the per-head softmax over the visible keys summed over the heads that share a list."""
    b, h, d = query.shape
    kv_heads = k.shape[2]
    qg = query.reshape(b, kv_heads, h // kv_heads, d).astype(k.dtype)  # (B, K, G, D)
    logits = matmul("bkgd,bskd->bkgs", qg, k, k.dtype, jnp.float32) * scale
    logits = jnp.where(visible[:, None, None, :], logits, -jnp.inf)
    # a row with nothing visible would give NaN: it has no candidates either, so 0 is as good
    probs = jnp.nan_to_num(jax.nn.softmax(logits, axis=-1))
    votes = jnp.sum(probs, axis=2)  # (B, K, S)
    return jnp.sum(votes, axis=1, keepdims=True) if share == "layer" else votes


def _gather_positions(k_positions, slots):
    """Positions of ``slots`` (B, ..., N) (-1 where the slot is out of range)."""
    s = k_positions.shape[1]
    flat = slots.reshape(slots.shape[0], -1)
    pos = jnp.take_along_axis(k_positions, jnp.clip(flat, 0, s - 1), axis=1).reshape(slots.shape)
    return jnp.where((slots >= 0) & (slots < s), pos, -1)


def regions(k_positions: jax.Array, end, t: int, config: TokenSelectConfig):
    """Slot ranges of a chunk of ``t`` queries written at slots [end, end + t).

    Returns (forced_head (B, n_init), forced_tail (B, n_local + t), middle (B, S) bool): the
    always-attended slots (-1 where not a visible token) and the top-k candidates."""
    s = k_positions.shape[1]
    slot = jnp.arange(s)[None, :]
    first = jnp.argmax(k_positions >= 0, axis=1)[:, None]  # (B, 1); 0 for an empty row
    head = first + jnp.arange(config.n_init)[None, :]
    head = jnp.where((head < end) & (_gather_positions(k_positions, head) >= 0), head, -1)
    tail = end - config.n_local + jnp.arange(config.n_local + t)[None, :]  # local window + chunk
    tail = jnp.broadcast_to(tail, (k_positions.shape[0], tail.shape[1]))
    # the local window starts after the initial tokens (no slot twice); the chunk is always in
    after_head = (tail >= first + config.n_init) | (tail >= end)
    tail = jnp.where(after_head & (_gather_positions(k_positions, tail) >= 0), tail, -1)
    middle = (k_positions >= 0) & (slot >= first + config.n_init) & (slot < end - config.n_local)
    return head, tail, middle


def top_slots(votes: jax.Array, middle: jax.Array, k: int) -> jax.Array:
    """(B, lists, S) votes, (B, S) candidates -> (B, lists, k) best candidate slots, -1 past
    the candidates (fewer than k; always k entries, so a cached selection keeps its shape)."""
    s = votes.shape[-1]
    ranked = jnp.where(middle[:, None, :], votes, -1.0)  # votes are >= 0
    value, index = jax.lax.top_k(ranked, min(k, s))
    top = jnp.where(value >= 0, index, -1).astype(jnp.int32)
    return jnp.pad(top, ((0, 0), (0, 0), (0, k - top.shape[-1])), constant_values=-1)


def assemble(head, top, tail, lists: int) -> jax.Array:
    """(B, lists, n_init + k + n_local + t) slots: forced head, top-k, forced tail."""
    b = head.shape[0]
    return jnp.concatenate([jnp.broadcast_to(head[:, None], (b, lists, head.shape[1])), top,
                            jnp.broadcast_to(tail[:, None], (b, lists, tail.shape[1]))], axis=-1)


def select(q: jax.Array, k: jax.Array, k_positions: jax.Array, q_positions: jax.Array, end,
           config: TokenSelectConfig, scale: float | None = None) -> jax.Array:
    """The attended slots (B, lists, N) of the T queries ``q`` (B, T, H, D) written at cache slots
    [end, end + T) of keys ``k`` (B, S, K, D) with ``k_positions`` (B, S)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    head, tail, middle = regions(k_positions, end, q.shape[1], config)
    visible = (k_positions >= 0) & (jnp.arange(k.shape[1])[None, :] < end)  # the cache before the chunk
    votes = vote(mean_query(q, q_positions), k, visible, config.share, scale)
    return assemble(head, top_slots(votes, middle, config.k), tail, config.lists(k.shape[2]))


def select_cached(q, k, k_positions, q_positions, end, config: TokenSelectConfig, state, scale=None):
    """:func:`select` with the selection cache: ``state`` = (query (B, H, D), top (B, lists, k),
    hits (), steps ()) of this layer; returns (slots, new state)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    prev_query, prev_top, hits, steps = state
    query = mean_query(q, q_positions)
    flat, prev = query.reshape(query.shape[0], -1), prev_query.reshape(query.shape[0], -1).astype(jnp.float32)
    cosine = jnp.sum(flat * prev, -1) / jnp.maximum(jnp.linalg.norm(flat, axis=-1) * jnp.linalg.norm(prev, axis=-1),
                                                    1e-30)
    hit = jnp.all(cosine >= config.cache_threshold) & (steps > 0)  # the first step always selects
    head, tail, middle = regions(k_positions, end, q.shape[1], config)

    def fresh():
        visible = (k_positions >= 0) & (jnp.arange(k.shape[1])[None, :] < end)
        return top_slots(vote(query, k, visible, config.share, scale), middle, config.k)

    # a cond, not a select: on a hit the scoring (the pass over the whole cache) does not run
    top = jax.lax.cond(hit, lambda: prev_top, fresh)
    slots = assemble(head, top, tail, config.lists(k.shape[2]))
    return slots, (query.astype(prev_query.dtype), top, hits + hit.astype(jnp.int32), steps + 1)


# ---------------------------------------------------------------------------------------------
# The layer's attention (called by the model's attention block)

def attend(q, k, v, q_positions, k_positions, end, config: TokenSelectConfig, impl: attn.AttentionImpl,
           layer_state: Any = None, dense: jax.Array | None = None):
    """TokenSelect attention of one layer over its cache (this call's keys already written at
    [end, end + T)). ``layer_state``: the layer's selection-cache entries or None; ``dense``: a
    () bool, this layer attends to the whole cache. Returns (out (B, T, H, D), new layer_state)."""
    def sparse():
        if layer_state is None:
            slots, state = select(q, k, k_positions, q_positions, end, config), None
        else:
            slots, state = select_cached(q, k, k_positions, q_positions, end, config, layer_state)
        out = attn.dot_product_attention(q, k, v, q_positions=q_positions, k_positions=k_positions, causal=True,
                                         impl=impl, visibility=attn.Visibility(selected=slots))
        return out, state

    if dense is None:
        return sparse()

    def full():  # a dense layer neither scores nor touches its selection cache
        return attn.dot_product_attention(q, k, v, q_positions=q_positions, k_positions=k_positions, causal=True,
                                          impl=impl), layer_state

    return jax.lax.cond(dense, full, sparse)


def dense_flags(config: TokenSelectConfig, n_layers: int) -> jax.Array | None:
    """(L,) bool, layer attends densely; None when no layer does."""
    bad = [i for i in config.dense_layers if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"dense_layers {bad} outside the model's {n_layers} layers")
    if not config.dense_layers:
        return None
    return jnp.zeros((n_layers,), bool).at[jnp.asarray(config.dense_layers)].set(True)


# ---------------------------------------------------------------------------------------------
# Chunked prefill

def chunked_prefill(model, params, tokens: jax.Array, positions: jax.Array, config: TokenSelectConfig, *,
                    cache=None, targets: jax.Array | None = None):
    """Runs ``tokens`` (B, T) through ``model`` in chunks of ``config.chunk`` (T a multiple of
    it), each chunk attending to its selection and itself; the cache (created when None, with T
    slots) carries over.

    Returns (cache, last logits (B, V)), or with ``targets`` (B, T) the per-token NLL (B, T)
    instead of logits (the (B, T, V) logits of a long text are never held at once).
    """
    from jaxtok.models.llama import KVCache
    from jaxtok.objectives import token_nll

    b, t = tokens.shape
    c = config.chunk
    if t % c:
        raise ValueError(f"chunked prefill: length {t} is not a multiple of the chunk {c}")
    cache = KVCache.create(model.config, b, t) if cache is None else cache
    split = lambda x: x.reshape(b, t // c, c).swapaxes(0, 1)  # noqa: E731 (n, B, C)

    def step(cache, chunk):
        tok, pos = chunk[0], chunk[1]
        out = model.apply({"params": params}, tok, positions=pos, cache=cache, sparse=config,
                          last_logits_only=targets is None)
        if targets is None:
            return out.cache, out.logits[:, -1]
        return out.cache, token_nll(out.logits, chunk[2])

    xs = (split(tokens), split(positions)) + (() if targets is None else (split(targets),))
    cache, ys = jax.lax.scan(step, cache, xs)
    if targets is None:
        return cache, ys[-1]
    return cache, ys.swapaxes(0, 1).reshape(b, t)


def make_nll_fn(model, config: TokenSelectConfig):
    """Jitted (params, inputs, targets, mask, positions) -> summed nats, the text scored through
    :func:`chunked_prefill` (the contract of :func:`jaxtok.evaluate.make_nll_fn`)."""

    @jax.jit
    def summed_nll(params, inputs, targets, mask, positions):
        if inputs.shape[1] % config.chunk:
            raise ValueError(f"the evaluation window {inputs.shape[1]} is not a multiple of the chunk {config.chunk}")
        _, nll = chunked_prefill(model, params, inputs, positions, config, targets=targets)
        return jnp.sum(nll * mask)

    return summed_nll
