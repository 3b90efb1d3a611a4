"""Batch-level BPE ("Retrofitting LMs with Dynamic Tokenization", Feher et al.) in plain Python.

This file is the definition: the jitted :func:`jaxtok.dynamic.merge.merge_batch` is tested
to give exactly what :func:`dynamic_bpe_reference` gives. The algorithm:

- every base token starts as a unit; a unit is a tuple of base ids (its flattened ids), so
  ``(ab, c)`` and ``(a, bc)`` both make the unit ``abc``;
- a pair is ``(left unit, right unit)`` of adjacent units in one sequence with the same
  boundary id; a negative boundary id is a boundary of its own (padding, special tokens:
  never merged); with ``max_unit_tokens`` > 0 a pair whose merged unit would be longer is
  ineligible;
- count every eligible adjacent pair over the whole batch (overlapping occurrences count);
  the best pair has the highest count, ties going to the pair whose first eligible
  occurrence comes first (sequences in batch order, units left to right);
- stop when the best count is below ``min_count`` or ``max_merges`` merges are done;
  otherwise merge the best pair in every sequence left to right, non-overlapping, and repeat.
"""

from __future__ import annotations

from collections.abc import Sequence

Unit = tuple[int, ...]
Pair = tuple[Unit, Unit]


def _eligible(left: Unit, right: Unit, b_left: int, b_right: int, max_unit_tokens: int) -> bool:
    if b_left < 0 or b_left != b_right:
        return False
    return max_unit_tokens <= 0 or len(left) + len(right) <= max_unit_tokens


def dynamic_bpe_reference(sequences: Sequence[Sequence[int]], boundaries: Sequence[Sequence[int]],
                          max_merges: int, min_count: int = 2,
                          max_unit_tokens: int = 0) -> tuple[list[list[Unit]], list[Pair]]:
    """(each sequence's units, the ordered merges) of batch-level BPE (module docstring)."""
    if len(sequences) != len(boundaries) or any(len(s) != len(b) for s, b in zip(sequences, boundaries)):
        raise ValueError("sequences and boundaries must have the same shape")
    units = [[(int(t),) for t in seq] for seq in sequences]
    bounds = [[int(b) for b in bs] for bs in boundaries]
    merges: list[Pair] = []
    while len(merges) < max_merges:
        counts: dict[Pair, int] = {}
        first: dict[Pair, tuple[int, int]] = {}
        for s, (us, bs) in enumerate(zip(units, bounds)):
            for i in range(len(us) - 1):
                if _eligible(us[i], us[i + 1], bs[i], bs[i + 1], max_unit_tokens):
                    pair = (us[i], us[i + 1])
                    counts[pair] = counts.get(pair, 0) + 1
                    first.setdefault(pair, (s, i))
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], first[p]))
        if counts[best] < min_count:
            break
        merges.append(best)
        for s, (us, bs) in enumerate(zip(units, bounds)):
            new_units, new_bounds, i = [], [], 0
            while i < len(us):
                if (i + 1 < len(us) and (us[i], us[i + 1]) == best
                        and _eligible(us[i], us[i + 1], bs[i], bs[i + 1], max_unit_tokens)):
                    new_units.append(us[i] + us[i + 1])
                    i += 2
                else:
                    new_units.append(us[i])
                    i += 1
                new_bounds.append(bs[i - 1])
            units[s], bounds[s] = new_units, new_bounds
    return units, merges


def dynamic_bpe_counter(sequences: Sequence[Sequence[int]], boundaries: Sequence[Sequence[int]],
                        max_merges: int, min_count: int = 2,
                        max_unit_tokens: int = 0) -> tuple[list[list[Unit]], list[Pair]]:
    """The same algorithm as the paper's public code runs it: a ``collections.Counter`` of all
    pairs rebuilt after every merge, ``most_common(1)`` (ties: first inserted = first
    occurrence). The benchmark's host baseline; tested equal to :func:`dynamic_bpe_reference`."""
    from collections import Counter

    units = [[(int(t),) for t in seq] for seq in sequences]
    bounds = [[int(b) for b in bs] for bs in boundaries]
    merges: list[Pair] = []
    for _ in range(max_merges):
        counts = Counter((us[i], us[i + 1]) for us, bs in zip(units, bounds) for i in range(len(us) - 1)
                         if _eligible(us[i], us[i + 1], bs[i], bs[i + 1], max_unit_tokens))
        if not counts or counts.most_common(1)[0][1] < min_count:
            break
        best = counts.most_common(1)[0][0]
        merges.append(best)
        for s, (us, bs) in enumerate(zip(units, bounds)):
            i, new_units, new_bounds = 0, [], []
            while i < len(us):
                step = 2 if (i + 1 < len(us) and (us[i], us[i + 1]) == best
                             and _eligible(*best, bs[i], bs[i + 1], max_unit_tokens)) else 1
                new_units.append(sum(us[i:i + step], ()))
                new_bounds.append(bs[i])
                i += step
            units[s], bounds[s] = new_units, new_bounds
    return units, merges
