"""Batch-level BPE: the plain reference on hand-worked batches, the paper-style Counter loop and
the jitted merge (both counting paths) equal to the reference on random batches (ties, repeated
units, single tokens, padding, boundaries, min_count / max_merges / max_unit_tokens edges),
the unit table interning by flattened ids, and the batch-sharded call equal to one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxtok.dynamic import MergeImpl, dynamic_bpe, dynamic_bpe_counter, dynamic_bpe_reference, merge_batch
from jaxtok.dynamic.merge import intern_unit, pad_batch, result_merges, result_units

B, T = 4, 12  # one padded shape for every example: few compilations


def test_reference_overlapping_pairs_ties_and_boundaries():
    # three equal units in a row: the pair (1, 1) occurs twice and merges left to right
    units, merges = dynamic_bpe_reference([[1, 1, 1]], [[0, 0, 0]], max_merges=5)
    assert merges == [((1,), (1,))] and units == [[(1, 1), (1,)]]
    # (5, 6) and (7, 8) both occur twice: the tie goes to the first occurrence in batch order
    seqs = [[7, 8, 5, 6], [5, 6, 7, 8]]
    units, merges = dynamic_bpe_reference(seqs, [[0] * 4] * 2, max_merges=1)
    assert merges == [((7,), (8,))] and units == [[(7, 8), (5,), (6,)], [(5,), (6,), (7, 8)]]
    # different boundary ids (and negative ones) never merge; min_count stops
    units, merges = dynamic_bpe_reference([[1, 2, 1, 2, 3, 3]], [[0, 0, 1, 2, -1, -1]], max_merges=5, min_count=1)
    assert merges == [((1,), (2,))] and units == [[(1, 2), (1,), (2,), (3,), (3,)]]
    assert dynamic_bpe_reference([[1, 2, 1, 2]], [[0] * 4], 5, min_count=3) == ([[(1,), (2,), (1,), (2,)]], [])
    # merged units are pairs of units: ((1 2), 3) after (1, 2); the cap refuses 3-token units
    seqs, bnd = [[1, 2, 3, 1, 2, 3]], [[0] * 6]
    assert dynamic_bpe_reference(seqs, bnd, 5)[1] == [((1,), (2,)), ((1, 2), (3,))]
    assert dynamic_bpe_reference(seqs, bnd, 5, max_unit_tokens=2)[1] == [((1,), (2,))]


@st.composite
def batches(draw):
    b = draw(st.integers(1, B))
    vocab = draw(st.integers(1, 4))  # few distinct ids: repeats, chains and ties everywhere
    seqs = [draw(st.lists(st.integers(0, vocab - 1), max_size=T)) for _ in range(b)]
    mode = draw(st.sampled_from(["none", "words", "random"]))
    bounds = []
    for s in seqs:
        if mode == "none":
            bounds.append([0] * len(s))
        elif mode == "words":  # non-decreasing word ids, some specials (-1) mixed in
            steps = draw(st.lists(st.integers(0, 2), min_size=len(s), max_size=len(s)))
            bounds.append([-1 if x == 2 else int(v) for v, x in zip(np.cumsum(steps), steps)])
        else:
            bounds.append(draw(st.lists(st.integers(-1, 1), min_size=len(s), max_size=len(s))))
    return seqs, bounds


def _padded(seqs, bounds):
    """The batch padded with empty sequences to B rows (they take part in nothing)."""
    extra = B - len(seqs)
    return seqs + [[]] * extra, bounds + [[]] * extra


COMMON = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@COMMON
@given(batch=batches(), min_count=st.integers(0, 3), max_merges=st.sampled_from([3, 30]),
       max_unit_tokens=st.sampled_from([0, 3]))
def test_counter_loop_equals_reference(batch, min_count, max_merges, max_unit_tokens):
    seqs, bounds = batch
    assert (dynamic_bpe_counter(seqs, bounds, max_merges, min_count, max_unit_tokens)
            == dynamic_bpe_reference(seqs, bounds, max_merges, min_count, max_unit_tokens))


CAPACITY = 30  # one compiled program per counting path serves every max_merges, min_count, cap


@COMMON
@given(batch=batches(), min_count=st.integers(0, 3), max_merges=st.integers(0, CAPACITY),
       max_unit_tokens=st.integers(0, 4), impl=st.sampled_from([MergeImpl.SORT, MergeImpl.INCREMENTAL]))
def test_jitted_merge_equals_reference(batch, min_count, max_merges, max_unit_tokens, impl):
    seqs, bounds = batch
    want = dynamic_bpe_reference(seqs, bounds, max_merges, min_count, max_unit_tokens)
    units, merges = dynamic_bpe(*_padded(seqs, bounds), max_merges, min_count, max_unit_tokens, seq_len=T,
                                capacity=CAPACITY, impl=impl)
    assert merges == want[1]
    assert units[:len(seqs)] == want[0]


def test_merge_result_tables():
    """New units are listed once each with their base ids; max_merges 0 is the identity."""
    seqs = [[1, 2, 3, 1, 2, 3, 9], [1, 2, 4, 4, 4, 4]]
    ids, bnd, lengths = pad_batch(seqs, [[0] * len(s) for s in seqs], seq_len=8)
    r = merge_batch(ids, bnd, lengths, max_merges=4)
    merges = result_merges(r)  # (4, 4) counts 3 (overlapping) and beats (1 2, 3) at 2
    assert merges == [((1,), (2,)), ((4,), (4,)), ((1, 2), (3,))]
    assert int(r.num_new) == 3
    assert r.merge_count.tolist() == [3, 2, 2, 0]  # occurrences joined: (4, 4) twice in a chain of four
    made = [tuple(int(x) for x in r.new_ids[k, :r.new_len[k]]) for k in range(3)]
    assert made == [(1, 2), (4, 4), (1, 2, 3)]
    assert result_units(r, ids, lengths) == [[(1, 2, 3), (1, 2, 3), (9,)], [(1, 2), (4, 4), (4, 4)]]
    # every unit's id points at its table row (new units) or is a base rank (single tokens)
    uid, start = np.asarray(r.uid), np.asarray(r.start)
    assert uid[1, 2] == uid[1, 4] == r.num_base + 1 and uid[0, 0] == uid[0, 3] == r.num_base + 2
    assert np.all(uid[start & (np.asarray(r.ulen) == 1)] < r.num_base)
    r0 = merge_batch(ids, bnd, lengths, max_merges=0, capacity=4)  # the same program
    assert int(r0.num_merges) == 0 and result_units(r0, ids, lengths) == [[(x,) for x in s] for s in seqs]


def test_intern_unit_maps_one_flattened_sequence_to_one_row():
    """(ab, c) and (a, bc) both flatten to abc: one row. (Batch-level BPE rarely makes the same
    unit twice, so the table is checked directly.)"""
    table = jnp.full((4, 5), -1, jnp.int32).at[0, :3].set(jnp.array([7, 8, 9])).at[1, :2].set(jnp.array([7, 8]))
    lens, num = jnp.array([3, 2, 0, 0]), jnp.int32(2)
    row = lambda *x: jnp.array(list(x) + [-1] * (5 - len(x)), jnp.int32)  # noqa: E731
    k, found = intern_unit(table, lens, num, row(7, 8, 9), 3)
    assert (int(k), bool(found)) == (0, True)
    k, found = intern_unit(table, lens, num, row(7, 8, 9, 1), 4)  # a longer unit with the same prefix
    assert (int(k), bool(found)) == (2, False)
    k, found = intern_unit(table, lens, jnp.int32(1), row(7, 8), 2)  # row 1 is not in use yet
    assert (int(k), bool(found)) == (1, False)


def test_sharded_batch_equals_one_device():
    devices = jax.devices()
    if len(devices) < 4:
        pytest.skip("needs 4 devices")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 5, (8, 16)).astype(np.int32)
    bnd = np.cumsum(rng.random((8, 16)) < 0.3, axis=1).astype(np.int32)
    lengths = rng.integers(1, 17, 8).astype(np.int32)
    sharding = NamedSharding(Mesh(np.array(devices[:4]), ("data",)), PartitionSpec("data"))
    placed = [jax.device_put(x, sharding) for x in (ids, bnd, lengths)]
    got = merge_batch(*placed, max_merges=10)
    want = merge_batch(ids, bnd, lengths, max_merges=10)
    assert got.uid.sharding.is_equivalent_to(sharding, 2)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), jax.device_get(want))
    assert result_merges(want) == dynamic_bpe_reference(
        [list(i[:n]) for i, n in zip(ids, lengths)], [list(b[:n]) for b, n in zip(bnd, lengths)], 10)[1]


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="of one shape"):
        merge_batch(np.zeros((2, 3)), np.zeros((2, 4)), max_merges=1)
    with pytest.raises(ValueError, match="max_merges"):
        merge_batch(np.zeros((2, 3)), np.zeros((2, 3)), max_merges=-1)
    with pytest.raises(ValueError, match="capacity 2"):
        merge_batch(np.zeros((2, 3)), np.zeros((2, 3)), max_merges=3, capacity=2)
    with pytest.raises(ValueError, match="shorter than the longest"):
        pad_batch([[1, 2, 3]], [[0, 0, 0]], seq_len=2)
    with pytest.raises(ValueError, match="same shape"):
        dynamic_bpe_reference([[1, 2]], [[0]], 1)
