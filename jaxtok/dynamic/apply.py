"""Merged units as model inputs: embed the batch's new units (hypernetwork or FVT), shorten the
sequences, and run MiniLM (sentence embeddings) or a decoder's prefill on them.

A merged batch is ``units`` (B, T): each sequence's units in order, left-aligned; a unit is a
base id (< V) or ``V + k``, the k-th new unit of this batch, whose input embedding is row k of
``new_embeddings`` (M, D); ``mask`` marks real units. A new unit's pieces for the hypernetwork
are its base ids (no re-decomposition), cut to the hypernetwork's ``max_pieces`` (so merge with
``max_unit_tokens = max_pieces``).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxtok.dynamic.merge import MergeResult, _merge


@dataclasses.dataclass(frozen=True)
class UnitEmbedder:
    """Where new units' input embeddings come from: the ZeTT hypernetwork of ``config`` (its
    parameters are an argument of every call) or, with ``config`` None, FVT (the mean of the
    pieces' base embeddings). Hashable: a static argument of jitted steps."""

    config: Any = None

    @property
    def name(self) -> str:
        return "fvt" if self.config is None else "hypernet"

    @property
    def max_pieces(self) -> int:
        return 0 if self.config is None else self.config.max_pieces

    def __call__(self, params, base: Mapping[str, jax.Array], stats: Mapping[str, jax.Array] | None,
                 pieces: jax.Array, mask: jax.Array) -> jax.Array:
        """(N, D) input embeddings of units given as base-id pieces (N, P) + mask; jit-able."""
        from jaxtok.transfer.methods import piece_mean

        mask = mask.at[:, 0].set(True)  # an unused row still attends somewhere (no NaN)
        pieces = jnp.where(mask, pieces, 0)
        if self.config is None:
            return piece_mean(base["input"], pieces, mask)
        from jaxtok.transfer.hypernet import predict

        return predict(self.config, params, pieces, mask, base, stats)["input"]


def embedder_for(base_name: str, hypernet_path: str | None = None, say=print) -> tuple[UnitEmbedder, Any]:
    """(embedder, its parameters): the hypernetwork at ``hypernet_path``, else the one shipped
    for ``base_name``, else FVT (saying so: the SmolLM2 hypernetwork ships once trained, MiniLM
    has none yet)."""
    from jaxtok.transfer.hypernet import load_hypernet, shipped_hypernet

    folder = hypernet_path or shipped_hypernet(base_name)
    if not folder:
        say(f"no hypernetwork for {base_name} (none shipped, no --hypernet PATH): new units get FVT "
            "embeddings (mean of their pieces)", file=sys.stderr)
        return UnitEmbedder(None), None
    config, params, _ = load_hypernet(folder)
    return UnitEmbedder(config), params


@struct.dataclass
class MergedBatch:
    units: jax.Array  # (B, T) int32: base id or V + new-unit row, left-aligned
    mask: jax.Array  # (B, T) bool
    new_embeddings: jax.Array  # (M, D)
    merge: MergeResult

    @property
    def lengths(self) -> jax.Array:
        return self.mask.sum(axis=1)


def compact_units(result: MergeResult, ids: jax.Array, lengths: jax.Array,
                  vocab_size: int) -> tuple[jax.Array, jax.Array]:
    """(units, mask) (B, T): each sequence's units moved to the front (see module docstring)."""
    b, t = ids.shape
    real = result.start & (jnp.arange(t)[None] < lengths[:, None])
    unit = jnp.where(result.uid >= result.num_base, vocab_size + result.uid - result.num_base, ids)
    slot = jnp.where(real, jnp.cumsum(real, axis=1) - 1, t)  # t: dropped
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
    units = jnp.zeros((b, t), jnp.int32).at[rows, slot].set(unit, mode="drop")
    mask = jnp.arange(t)[None] < real.sum(axis=1, keepdims=True)
    return units, mask


def new_unit_pieces(result: MergeResult, max_pieces: int = 0) -> tuple[jax.Array, jax.Array]:
    """(pieces, mask) (M, P) of the batch's new units: their base ids (P = max_pieces if set)."""
    pieces = result.new_ids if max_pieces <= 0 else result.new_ids[:, :max_pieces]
    mask = (jnp.arange(pieces.shape[1])[None] < result.new_len[:, None]) & (
        jnp.arange(pieces.shape[0]) < result.num_new)[:, None]
    return pieces, mask


@functools.partial(jax.jit, static_argnames=("embedder", "max_merges", "max_unit_tokens"))
def merge_and_embed(ids, boundaries, lengths, base: Mapping[str, jax.Array], stats=None, params=None, min_count=2, *,
                    embedder: UnitEmbedder, max_merges: int, max_unit_tokens: int = 0) -> MergedBatch:
    """Merge (``merge_batch``), embed the new units and compact, all in one jitted step."""
    ids, boundaries, lengths = (jnp.asarray(x, jnp.int32) for x in (ids, boundaries, lengths))
    result = _merge(ids, boundaries, lengths, jnp.int32(min_count), jnp.int32(max_merges), jnp.int32(max_unit_tokens),
                    capacity=max_merges, incremental=True)
    pieces, mask = new_unit_pieces(result, embedder.max_pieces)
    new = embedder(params, base, stats, pieces, mask) if max_merges else jnp.zeros((0, base["input"].shape[1]))
    units, unit_mask = compact_units(result, ids, lengths, base["input"].shape[0])
    return MergedBatch(units=units, mask=unit_mask, new_embeddings=new.astype(base["input"].dtype), merge=result)


def unit_vectors(merged: MergedBatch, table: jax.Array) -> jax.Array:
    """(B, T, D) input vectors of a merged batch: base rows for base ids, new rows for new units."""
    v = table.shape[0]
    base = jnp.take(table, jnp.minimum(merged.units, v - 1), axis=0)
    new = jnp.take(merged.new_embeddings, jnp.clip(merged.units - v, 0, max(merged.new_embeddings.shape[0] - 1, 0)),
                   axis=0) if merged.new_embeddings.shape[0] else base
    return jnp.where((merged.units >= v)[..., None], new, base)


class UnitCache:
    """Host LRU cache of new-unit embeddings keyed by the unit's base-id sequence: repeated
    batches (and units recurring across batches) skip the hypernetwork."""

    def __init__(self, embedder: UnitEmbedder, params, base: Mapping[str, jax.Array], stats=None,
                 capacity: int = 65536):
        self.params, self.base, self.stats, self.capacity = params, base, stats, capacity
        self.embedder_width = embedder.max_pieces  # 0: FVT takes every piece
        self.store: collections.OrderedDict[tuple[int, ...], np.ndarray] = collections.OrderedDict()
        self.hits = self.misses = 0
        self._embed = jax.jit(embedder.__call__)

    def lookup(self, units: list[tuple[int, ...]], width: int) -> np.ndarray:
        """(len(units), D) embeddings; misses are embedded in one call (rows padded to a power of 2)."""
        missing = [u for u in dict.fromkeys(units) if u not in self.store]
        self.hits += len(units) - len(missing)
        self.misses += len(missing)
        if missing:
            rows = 1 << (len(missing) - 1).bit_length()
            pieces = np.zeros((rows, width), np.int32)
            mask = np.zeros((rows, width), bool)
            for i, u in enumerate(missing):
                pieces[i, :min(len(u), width)], mask[i, :min(len(u), width)] = u[:width], True
            out = np.asarray(self._embed(self.params, self.base, self.stats, pieces, mask))
            for u, row in zip(missing, out):
                self.store[u] = row
        for u in units:
            self.store.move_to_end(u)
        while len(self.store) > self.capacity:
            self.store.popitem(last=False)
        return np.stack([self.store[u] for u in units]) if units else np.zeros((0, self.base["input"].shape[1]))


def merge_with_cache(ids, boundaries, lengths, cache: UnitCache, *, max_merges: int, min_count: int = 2,
                     max_unit_tokens: int = 0) -> MergedBatch:
    """:func:`merge_and_embed` with the new units' embeddings taken from (and added to) a host
    :class:`UnitCache`: one host round trip per batch, none per merge."""
    from jaxtok.dynamic.merge import merge_batch

    ids, lengths = jnp.asarray(ids, jnp.int32), jnp.asarray(lengths, jnp.int32)
    result = merge_batch(ids, boundaries, lengths, max_merges=max_merges, min_count=min_count,
                         max_unit_tokens=max_unit_tokens)
    new_ids, new_len = np.asarray(result.new_ids), np.asarray(result.new_len)
    units = [tuple(int(x) for x in new_ids[k, :new_len[k]]) for k in range(int(result.num_new))]
    width = cache.embedder_width or ids.shape[1]
    rows = cache.lookup(units, width)
    new = np.zeros((max_merges, cache.base["input"].shape[1]), np.float32)
    new[:len(units)] = rows
    table = cache.base["input"]
    compacted, mask = jax.jit(compact_units, static_argnums=3)(result, ids, lengths, table.shape[0])
    return MergedBatch(units=compacted, mask=mask, new_embeddings=jnp.asarray(new, table.dtype), merge=result)


# ---------------------------------------------------------------------------------------------
# MiniLM: sentence embeddings of merged batches


def with_specials(seqs, bounds, first: int | None, last: int | None):
    """Sequences with [CLS]/[SEP]-style ids around them; specials get boundary -1 (never merged)."""
    pre, post = ([first] if first is not None else []), ([last] if last is not None else [])
    return ([pre + list(s) + post for s in seqs], [[-1] * len(pre) + list(b) + [-1] * len(post) for b in bounds])


def bert_sentence_embeddings(config, params, merged: MergedBatch) -> jax.Array:
    """Unit-norm sentence vectors (B, D) of MiniLM run on a merged batch (new units' embeddings
    appended to the word-embedding table)."""
    from jaxtok.models.bert import sentence_embedding
    from jaxtok.transfer.api import embedding_matrices

    table = embedding_matrices(config, params)["input"]
    full = jnp.concatenate([table, merged.new_embeddings.astype(table.dtype)])
    return sentence_embedding(config, params, merged.units, merged.mask.astype(jnp.int32), input_embeddings=full)


# ---------------------------------------------------------------------------------------------
# Decoder prefill with merged units, continued with the original tokenizer


def right_align(vectors: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Left-aligned (B, T, D) inputs moved to the right end of each row, with positions
    (0..n-1 on the units, -1 on the padding in front): the last column is every row's last unit."""
    b, t = mask.shape
    n = mask.sum(axis=1, keepdims=True)
    src = jnp.arange(t)[None] - (t - n)  # column j holds unit j - (t - n)
    ok = src >= 0
    moved = jnp.take_along_axis(vectors, jnp.clip(src, 0, t - 1)[..., None], axis=1)
    return jnp.where(ok[..., None], moved, 0), jnp.where(ok, src, -1).astype(jnp.int32)


def _prefill(model, params, vectors, mask, room: int):
    """(output with the last unit's logits and the cache, units per row) of a decoder prefilled
    with input vectors (B, T, D); the cache has ``room`` more slots."""
    from jaxtok.models.llama import KVCache

    b, t = mask.shape
    x, positions = right_align(vectors, mask)
    out = model.apply({"params": params}, embeds=x, positions=positions,
                      cache=KVCache.create(model.config, b, t + room), last_logits_only=True)
    return out, mask.sum(axis=1)


@functools.partial(jax.jit, static_argnames=("model",))
def prefill_last_logits(model, params, vectors, mask) -> jax.Array:
    """(B, V) logits after the last unit: the prefill alone (what the benchmark times)."""
    return _prefill(model, params, vectors, mask, 0)[0].logits[:, -1]


@functools.partial(jax.jit, static_argnames=("model",))
def prefill_and_score(model, params, vectors, mask, continuation, continuation_mask) -> jax.Array:
    """Prefill a decoder with input vectors (B, T, D) (merged units or plain tokens), then score
    ``continuation`` (B, C) base tokens after it through the KV cache: summed NLL in nats per
    row (the first continuation token is predicted by the prefill's last logits). Positions
    advance by one per unit: the model sees the shorter sequence."""
    c = continuation.shape[1]
    out, n = _prefill(model, params, vectors, mask, c)
    cont_pos = (n[:, None] + jnp.arange(c)[None]).astype(jnp.int32)
    nxt = model.apply({"params": params}, continuation, positions=cont_pos, cache=out.cache)
    logits = jnp.concatenate([out.logits, nxt.logits[:, :-1]], axis=1)  # row i predicts continuation[:, i]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, continuation[..., None], axis=-1)[..., 0]
    return jnp.where(continuation_mask, nll, 0.0).sum(axis=1)


@functools.partial(jax.jit, static_argnames=("model", "steps"))
def prefill_and_generate(model, params, vectors, mask, *, steps: int) -> jax.Array:
    """Greedy ``steps`` base tokens (B, steps) after a prefill of input vectors (B, T, D)."""
    out, n = _prefill(model, params, vectors, mask, steps)

    def step(carry, i):
        cache, token = carry
        o = model.apply({"params": params}, token[:, None], positions=(n + i)[:, None].astype(jnp.int32), cache=cache)
        return (o.cache, jnp.argmax(o.logits[:, -1], axis=-1).astype(jnp.int32)), token

    first = jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32)
    _, tokens = jax.lax.scan(step, (out.cache, first), jnp.arange(steps))
    return tokens.T
