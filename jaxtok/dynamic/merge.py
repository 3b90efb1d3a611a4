"""Batch-level BPE on device: all merges of a batch in one jitted, static-shape function.

Equal to :func:`jaxtok.dynamic.reference.dynamic_bpe_reference` (property-tested). Layout:
everything lives on the (B, T) grid of base-token positions, flattened to N = B * T; a unit is
stored at the position of its first token (``start``), with its id (``uid``) and its length in
base tokens (``ulen``); the unit after the one at ``g`` starts at ``g + ulen[g]``.

- Unit ids: a base token's id is its rank among the batch's sorted base ids (< N, so tables
  stay N-sized whatever the vocabulary); the k-th *distinct* new unit is ``N + k``. New units
  are interned by their flattened base ids (a (M, L) table compared row by row: exact, no
  hash), so ``(ab, c)`` and ``(a, bc)`` give one id.
- Pair groups: ``rep[g]`` is, for every position whose unit forms an eligible pair with the
  next unit, the position of that pair's *first* eligible occurrence in the batch (else N).
  Counts are then one ``segment_sum`` over ``rep``, and ``argmax`` returns the smallest
  position among the highest counts: the reference's tie rule, for free.
- ``MergeImpl.SORT`` recomputes ``rep`` after every merge with one ``lax.sort`` of all pairs
  (the full recount). ``MergeImpl.INCREMENTAL`` only regroups what a merge touched: pairs
  that contain the new unit ``w`` are grouped by their other unit through two direct-address
  tables (``(x, w)`` keyed by ``x``, ``(w, y)`` by ``y``), and every other pair keeps its group,
  whose first occurrence is refreshed; one scatter-min does all three. No sort inside the loop:
  per merge two scatters over the N positions (counts, regrouping) plus vectorised work.
- Applying the best pair (L, R) left to right without overlap: occurrences only overlap when
  L == R, in chains of units of equal length ``len(L)``; within a chain, every second
  occurrence counted from the chain's start is taken.

Sharding: the function is plain jnp over the global batch. Given ids sharded over the batch
axis, XLA partitions the per-position work by rows; the two batch-global reductions per merge
(``segment_sum`` of the counts over first-occurrence positions, and the argmax) become a
reduction across the batch shards (an all-reduce of the N counts), since a pair's count is
global over the batch. Tested equal on a 4-device CPU mesh.
"""

from __future__ import annotations

import enum
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxtok.dynamic.reference import Pair, Unit

BIG = np.iinfo(np.int32).max


class MergeImpl(enum.Enum):
    AUTO = "auto"  # INCREMENTAL
    SORT = "sort"  # full recount of all pairs after every merge (one lax.sort)
    INCREMENTAL = "incremental"  # regroup only the pairs a merge touched


@struct.dataclass
class MergeResult:
    """The merged batch. (B, T) arrays are indexed by base-token position.

    Attributes:
      start: a unit begins here.
      ulen: the number of base tokens of the unit that begins here (meaningless elsewhere).
      uid: its unit id: < ``num_base`` the rank of a base id, ``num_base + k`` the k-th new unit.
      new_ids, new_len, num_new: the distinct new units' flattened base ids (M, L), -1 padded.
      merge_ids, merge_left, merge_len, num_merges: merge k joined ``merge_ids[k, :merge_left[k]]``
        and ``merge_ids[k, merge_left[k]:merge_len[k]]``.
      new_of_merge: merge k made new unit ``new_of_merge[k]``.
      merge_count: how many occurrences merge k joined (units it removed from the batch).
    """

    start: jax.Array
    ulen: jax.Array
    uid: jax.Array
    new_ids: jax.Array
    new_len: jax.Array
    num_new: jax.Array
    merge_ids: jax.Array
    merge_left: jax.Array
    merge_len: jax.Array
    num_merges: jax.Array
    new_of_merge: jax.Array
    merge_count: jax.Array

    @property
    def num_base(self) -> int:
        return self.start.shape[0] * self.start.shape[1]


def merge_batch(ids, boundaries, lengths=None, *, max_merges: int, min_count: int = 2,
                max_unit_tokens: int = 0, capacity: int | None = None,
                impl: MergeImpl | str = MergeImpl.AUTO) -> MergeResult:
    """Batch-level BPE of a (B, T) batch of base ids with (B, T) boundary ids (negative: a
    boundary of its own) and (B,) lengths (positions past a length are padding), as
    :func:`jaxtok.dynamic.reference.dynamic_bpe_reference` defines it, in one jitted call.

    ``capacity`` (static; default ``max_merges``) sizes the merge tables: one compiled program
    serves every ``max_merges <= capacity``, ``min_count`` and ``max_unit_tokens`` (all traced)."""
    impl = MergeImpl(impl)
    ids, boundaries = jnp.asarray(ids, jnp.int32), jnp.asarray(boundaries, jnp.int32)
    if ids.ndim != 2 or ids.shape != boundaries.shape:
        raise ValueError(f"ids and boundaries must be (B, T) arrays of one shape, got {ids.shape}, {boundaries.shape}")
    capacity = max_merges if capacity is None else capacity
    if not 0 <= max_merges <= capacity:
        raise ValueError(f"max_merges must be >= 0 and <= capacity {capacity}, got {max_merges}")
    lengths = jnp.full(ids.shape[:1], ids.shape[1], jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
    return _merge(ids, boundaries, lengths, jnp.int32(min_count), jnp.int32(max_merges), jnp.int32(max_unit_tokens),
                  capacity=capacity, incremental=impl != MergeImpl.SORT)


def intern_unit(new_ids, new_len, num_new, merged, total) -> tuple[jax.Array, jax.Array]:
    """(slot, found) of the unit with flattened ids ``merged`` (-1 padded, ``total`` long) in the
    table of the ``num_new`` units made so far: its row if there, else the next free row."""
    same = (jnp.arange(new_ids.shape[0]) < num_new) & (new_len == total) & jnp.all(new_ids == merged, axis=1)
    found = jnp.any(same)
    return jnp.where(found, jnp.argmax(same), num_new).astype(jnp.int32), found


def running_max(x, axis: int = 0):
    """``lax.cummax`` as a log-depth scan: XLA:CPU lowers cummax as a reduce-window, whose cost
    grows with the length of the axis per element (3.5x slower at T = 512)."""
    return jax.lax.associative_scan(jnp.maximum, x, axis=axis)


@functools.partial(jax.jit, static_argnames=("capacity", "incremental"))
def _merge(ids, boundaries, lengths, min_count, max_merges, max_unit_tokens, *, capacity: int,
           incremental: bool) -> MergeResult:
    b, t = ids.shape
    n, m, width = b * t, max(capacity, 1), t  # a unit is at most a whole row
    g = jnp.arange(n, dtype=jnp.int32)  # global position, also the tie order
    col = g % t
    bnd = jnp.where(col < jnp.repeat(lengths, t), boundaries.reshape(n), -1)  # padding: alone
    flat_ids = ids.reshape(n)
    rank = jnp.searchsorted(jnp.sort(flat_ids), flat_ids).astype(jnp.int32)  # dense base unit ids
    padded_ids = jnp.pad(flat_ids, (0, width), constant_values=-1)

    def pairs(uid, ulen, start):
        """(eligible, next unit's position, next unit's id) at every position."""
        nxt = jnp.minimum(g + ulen, n - 1)
        ok = start & (col + ulen < t) & (bnd >= 0) & (bnd == bnd[nxt])
        ok &= (max_unit_tokens <= 0) | (ulen + ulen[nxt] <= max_unit_tokens)
        return ok, nxt, uid[nxt]

    def full_rep(uid, ulen, start):
        ok, _, right = pairs(uid, ulen, start)
        keys = jax.lax.sort((jnp.where(ok, uid, BIG), jnp.where(ok, right, BIG), g), num_keys=3)
        left_s, right_s, pos_s = keys
        new_group = jnp.concatenate([jnp.ones(1, bool), (left_s[1:] != left_s[:-1]) | (right_s[1:] != right_s[:-1])])
        first = pos_s[running_max(jnp.where(new_group, g, 0))]  # sorted by position within a group
        return jnp.zeros(n, jnp.int32).at[pos_s].set(jnp.where(left_s != BIG, first, n))

    def regroup(rep, uid, ulen, start, w):
        """``rep`` after a merge that made unit ``w`` (see the module docstring)."""
        ok, _, right = pairs(uid, ulen, start)
        as_left = ok & (right == w)  # pairs (x, w), (w, w) included: grouped by x
        as_right = ok & (uid == w) & ~as_left  # pairs (w, y): grouped by y
        keep = ok & ~as_left & ~as_right  # every other pair keeps its group
        # one scatter-min computes all three groupings: slots [0, n] old groups, then the
        # (x, w) table by x, then the (w, y) table by y (unit ids < n + m)
        size = n + m
        slot = jnp.where(keep, rep, jnp.where(as_left, n + 1 + uid, jnp.where(as_right, n + 1 + size + right, n)))
        first = jnp.full(n + 1 + 2 * size, n, jnp.int32).at[slot].min(g)
        return jnp.where(ok, first[slot], n)

    def body(carry):
        step, _, uid, ulen, start, rep, tables = carry
        new_ids, new_len, num_new, merge_ids, merge_left, merge_len, new_of_merge, merge_count = tables
        counts = jax.ops.segment_sum(jnp.ones(n, jnp.int32), rep, num_segments=n + 1)[:n]
        best = jnp.argmax(counts).astype(jnp.int32)
        go = (counts[best] > 0) & (counts[best] >= min_count)
        len_l = ulen[best]
        total = len_l + ulen[best + len_l]
        lane = jnp.arange(width, dtype=jnp.int32)
        merged = jnp.where(lane < total, jax.lax.dynamic_slice(padded_ids, (best,), (width,)), -1)
        k, found = intern_unit(new_ids, new_len, num_new, merged, total)
        w = n + k
        # occurrences of the best pair (none when stopping, so the state carries over unchanged:
        # cheaper than selecting between old and new state); chains (only when L == R) take
        # every second one
        match = (rep == best) & go
        behind = g - len_l

        def every_second():
            prev_match = (col >= len_l) & match[jnp.maximum(behind, 0)]
            chain_start = running_max(jnp.where(match & ~prev_match, col, -1).reshape(b, t), axis=1).reshape(n)
            return match & (((col - chain_start) // len_l) % 2 == 0)

        # the scan is skipped when L != R: occurrences of such a pair cannot overlap
        take = jax.lax.cond(uid[best] == uid[best + len_l], every_second, lambda: match)
        removed = (col >= len_l) & take[jnp.maximum(behind, 0)]
        new_uid = jnp.where(take, w, uid)
        new_ulen = jnp.where(take, total, ulen)
        new_start = start & ~removed
        if incremental:
            new_rep = regroup(rep, new_uid, new_ulen, new_start, w)
        else:
            new_rep = full_rep(new_uid, new_ulen, new_start)
        # when stopping, the table writes go to row m, which does not exist: dropped
        row, slot = jnp.where(go, k, m), jnp.where(go, step, m)
        put = lambda table, i, value: table.at[i].set(value, mode="drop")  # noqa: E731
        new_tables = (put(new_ids, row, merged), put(new_len, row, total), num_new + (go & ~found).astype(jnp.int32),
                      put(merge_ids, slot, merged), put(merge_left, slot, len_l), put(merge_len, slot, total),
                      put(new_of_merge, slot, k), put(merge_count, slot, take.sum(dtype=jnp.int32)))
        return (step + go.astype(jnp.int32), ~go, new_uid, new_ulen, new_start, new_rep, new_tables)

    ones = jnp.ones(n, jnp.int32)
    start = jnp.ones(n, bool)
    tables = (jnp.full((m, width), -1, jnp.int32), jnp.zeros(m, jnp.int32), jnp.int32(0),
              jnp.full((m, width), -1, jnp.int32), jnp.zeros(m, jnp.int32), jnp.zeros(m, jnp.int32),
              jnp.zeros(m, jnp.int32), jnp.zeros(m, jnp.int32))
    carry = (jnp.int32(0), jnp.bool_(False), rank, ones, start, full_rep(rank, ones, start), tables)
    cond = lambda c: (c[0] < jnp.minimum(max_merges, capacity)) & ~c[1]  # noqa: E731
    step, _, uid, ulen, start, _, tables = jax.lax.while_loop(cond, body, carry)
    new_ids, new_len, num_new, merge_ids, merge_left, merge_len, new_of_merge, merge_count = tables
    grid = lambda x: x.reshape(b, t)  # noqa: E731
    c = capacity
    return MergeResult(start=grid(start), ulen=grid(ulen), uid=grid(uid), new_ids=new_ids[:c], new_len=new_len[:c],
                       num_new=num_new, merge_ids=merge_ids[:c], merge_left=merge_left[:c], merge_len=merge_len[:c],
                       num_merges=step, new_of_merge=new_of_merge[:c], merge_count=merge_count[:c])


def compile_merge(batch: int, seq_len: int, *, max_merges: int, max_unit_tokens: int = 0,
                  impl: MergeImpl | str = MergeImpl.AUTO):
    """The merge compiled ahead of time for (batch, seq_len) int32 inputs: a callable
    ``(ids, boundaries, lengths, min_count) -> MergeResult`` (so callers can time compilation)."""
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    compiled = _merge.lower(spec(batch, seq_len), spec(batch, seq_len), spec(batch), spec(), spec(), spec(),
                            capacity=max_merges, incremental=MergeImpl(impl) != MergeImpl.SORT).compile()
    limits = (np.int32(max_merges), np.int32(max_unit_tokens))
    return lambda ids, boundaries, lengths, min_count: compiled(ids, boundaries, lengths, min_count, *limits)


# ---------------------------------------------------------------------------------------------
# Between Python lists and the (B, T) grid


def pad_batch(sequences, boundaries, seq_len: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, boundaries, lengths) numpy arrays of a list of sequences, padded to ``seq_len``
    (default: the longest; a longer sequence is an error)."""
    lengths = np.array([len(s) for s in sequences], np.int32)
    if len(sequences) == 0:
        raise ValueError("empty batch")
    if any(len(s) != len(bs) for s, bs in zip(sequences, boundaries)) or len(sequences) != len(boundaries):
        raise ValueError("sequences and boundaries must have the same shape")
    t = int(lengths.max()) if seq_len is None else seq_len
    if t < 1 or lengths.max() > t:
        raise ValueError(f"seq_len {t} is shorter than the longest sequence ({lengths.max()}) or < 1")
    ids, bnd = np.zeros((len(sequences), t), np.int32), np.full((len(sequences), t), -1, np.int32)
    for i, (s, bs) in enumerate(zip(sequences, boundaries)):
        ids[i, :len(s)], bnd[i, :len(s)] = s, bs
    return ids, bnd, lengths


def result_units(result: MergeResult, ids, lengths) -> list[list[Unit]]:
    """Each sequence's units (tuples of base ids), as the reference returns them."""
    start, ulen, ids = np.asarray(result.start), np.asarray(result.ulen), np.asarray(ids)
    return [[tuple(int(x) for x in ids[i, j:j + ulen[i, j]]) for j in range(int(n)) if start[i, j]]
            for i, n in enumerate(np.asarray(lengths))]


def result_merges(result: MergeResult) -> list[Pair]:
    """The ordered merges ((left ids), (right ids)), as the reference returns them."""
    ids, left, total = (np.asarray(x) for x in (result.merge_ids, result.merge_left, result.merge_len))
    return [(tuple(int(x) for x in ids[k, :left[k]]), tuple(int(x) for x in ids[k, left[k]:total[k]]))
            for k in range(int(result.num_merges))]


def dynamic_bpe(sequences, boundaries, max_merges: int, min_count: int = 2, max_unit_tokens: int = 0,
                seq_len: int | None = None, capacity: int | None = None, impl: MergeImpl | str = MergeImpl.AUTO):
    """:func:`merge_batch` on Python lists: the same signature and result as the reference."""
    ids, bnd, lengths = pad_batch(sequences, boundaries, seq_len)
    result = merge_batch(ids, bnd, lengths, max_merges=max_merges, min_count=min_count,
                         max_unit_tokens=max_unit_tokens, capacity=capacity, impl=impl)
    return result_units(result, ids, lengths), result_merges(result)
