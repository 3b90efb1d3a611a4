"""Draft trees for speculative decoding, behind one interface.

A drafter proposes a tree of candidate tokens rooted at the last emitted token: ``tokens`` (T,),
``parents`` (T,) (-1 for the root, a parent before its children) and ``valid`` (T,) (padding
nodes of a smaller tree are never accepted). After each verification pass it learns from what
the model saw. Two kinds:

* :class:`TokenRecycling` (Luo et al., 2024, "Turning Trash into Treasure"): an adjacency matrix
  M (V, k) holding, for every token, the top-k successors the model predicted the last time the
  token was in a verified input. The tree shape is a static template (data: paths of child
  ranks); node tokens are filled breadth-first, ``token(child) = M[token(parent), rank]``. Drafting
  and updating run on device, inside the decode loop. M persists across calls ("hot start").
* :class:`LookaheadTrie` (Zhao et al., 2023, Ant Group's "Lookahead"): a host-side trie of the
  n-grams of the prompt and of the output; the draft is a multi-branch tree of the most frequent
  continuations of the longest context suffix found in the trie.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Token Recycling's "2.2.2" tree: 80 nodes over 6 depths (8/21/25/15/8/3), each node a path of
# child ranks from the root; earlier ranks (likelier successors) get more children. The shape is
# the paper's (public code: model/recycling/tree_template_.py), written here as rank strings.
_TREE_222 = (
    "0 1 2 3 4 5 6 7 "
    "00 01 02 03 04 05 06 07 10 11 12 13 20 21 22 30 31 40 50 60 70 "
    "000 001 002 003 004 005 006 007 010 011 012 020 021 030 040 050 060 070 100 101 110 200 300 400 500 "
    "0000 0001 0002 0003 0004 0010 0011 0020 0030 0040 0100 0200 1000 2000 3000 "
    "00000 00001 00002 00010 00020 00100 01000 10000 "
    "000000 000001 000100"
).split()


@dataclasses.dataclass(frozen=True)
class TreeTemplate:
    """A static draft-tree shape. Node 0 is the root (the last emitted token); node i > 0 is
    the ``ranks[i]``-th candidate successor of node ``parents[i]``.

    Attributes:
      name: for reports.
      parents, ranks: (T,) tuples; parents[0] = -1.
    """

    name: str
    parents: tuple[int, ...]
    ranks: tuple[int, ...]

    @classmethod
    def from_paths(cls, name: str, paths: Sequence[Sequence[int]]) -> TreeTemplate:
        """From root-to-node rank paths (each path's prefixes must be in the list)."""
        index = {(): 0}
        parents, ranks = [-1], [0]
        for path in sorted((tuple(p) for p in paths), key=len):  # stable: BFS order kept per depth
            if path[:-1] not in index:
                raise ValueError(f"tree template {name!r}: path {path} has no parent {path[:-1]}")
            if path in index:
                raise ValueError(f"tree template {name!r}: path {path} appears twice")
            index[path] = len(parents)
            parents.append(index[path[:-1]])
            ranks.append(path[-1])
        return cls(name, tuple(parents), tuple(ranks))

    @property
    def size(self) -> int:
        return len(self.parents)

    @property
    def depths(self) -> np.ndarray:
        d = np.zeros(self.size, np.int32)
        for i in range(1, self.size):
            d[i] = d[self.parents[i]] + 1
        return d

    @property
    def max_depth(self) -> int:
        return int(self.depths.max())

    @property
    def max_rank(self) -> int:
        return max(self.ranks)


def _paths(codes):
    return [[int(c) for c in code] for code in codes]


def _pruned(name, max_depth, max_rank_sum):
    """The 2.2.2 tree cut to smaller budgets (prefix-closed: a path's prefix has a smaller depth
    and rank sum), for hardware where verifying 81 tokens costs more than it returns."""
    keep = [p for p in _paths(_TREE_222) if len(p) <= max_depth and sum(p) + len(p) <= max_rank_sum]
    return TreeTemplate.from_paths(name, keep)


TEMPLATES: dict[str, TreeTemplate] = {
    "2.2.2": TreeTemplate.from_paths("2.2.2", _paths(_TREE_222)),
    "chain4": TreeTemplate.from_paths("chain4", [[0] * n for n in range(1, 5)]),
    # 2.2.2 pruned, named by node count (root included)
    "p8": _pruned("p8", 3, 3),
    "p16": _pruned("p16", 4, 4),
    "p32": _pruned("p32", 5, 5),
    "p54": _pruned("p54", 6, 6),
}


def template(name: str) -> TreeTemplate:
    if name not in TEMPLATES:
        raise ValueError(f"unknown tree template {name!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[name]


# ---------------------------------------------------------------------------------------------
# Token Recycling (device)

@dataclasses.dataclass
class TokenRecycling:
    """Adjacency-matrix drafter. ``matrix`` (V, k) int32 persists across calls (hot start);
    :meth:`reset` starts cold.

    Attributes:
      vocab_size, k: the matrix shape (k successors per token; the paper uses 8).
      tree: the static template; its ranks must be < k.
    """

    vocab_size: int
    tree: TreeTemplate = TEMPLATES["2.2.2"]
    k: int = 8
    matrix: jax.Array | None = None

    kind = "recycling"

    def __post_init__(self):
        if self.tree.max_rank >= self.k:
            raise ValueError(f"template {self.tree.name!r} uses rank {self.tree.max_rank}, k is {self.k}")
        if self.matrix is None:
            self.reset()

    def reset(self) -> None:
        self.matrix = jnp.zeros((self.vocab_size, self.k), jnp.int32)  # the paper's zero start


def recycling_draft(matrix: jax.Array, root: jax.Array, tree: TreeTemplate) -> jax.Array:
    """(B,) root tokens -> (B, T) tree tokens, filled depth by depth from the matrix."""
    parents, ranks, depths = np.asarray(tree.parents), np.asarray(tree.ranks), tree.depths
    tokens = jnp.zeros((root.shape[0], tree.size), jnp.int32).at[:, 0].set(root)
    for d in range(1, tree.max_depth + 1):
        nodes = np.nonzero(depths == d)[0]  # static indices: one gather per depth
        tokens = tokens.at[:, nodes].set(matrix[tokens[:, parents[nodes]], ranks[nodes]])
    return tokens


def recycling_update(matrix: jax.Array, tokens: jax.Array, valid: jax.Array, top_k_ids: jax.Array) -> jax.Array:
    """Rows of every (valid) verified token overwritten with its top-k successors (B, T, k); a
    token seen twice in one pass keeps one of its rows (the paper's parallel overwrite)."""
    rows = jnp.where(valid, tokens, matrix.shape[0])  # out of range: dropped
    return matrix.at[rows.reshape(-1)].set(top_k_ids[..., :matrix.shape[1]].reshape(-1, matrix.shape[1]),
                                           mode="drop")


# ---------------------------------------------------------------------------------------------
# Lookahead trie (host)

class LookaheadTrie:
    """Ant Group's Lookahead drafts from an n-gram trie (host side).

    Every window of up to ``ngram`` tokens of the prompt and of the output is inserted (counts
    on the nodes). A draft takes the longest suffix of the context (``ngram - 1`` tokens down to
    1) found in the trie with continuations, and grows a tree of at most ``tree_size`` nodes
    (root included), best-first by count, depth at most ``max_depth``: several branches, not
    one. The trie is kept across calls (as the paper's global trie) unless :meth:`reset`.
    """

    kind = "lookahead"

    def __init__(self, tree_size: int = 16, max_depth: int = 6, ngram: int = 8, max_nodes: int = 2_000_000):
        if tree_size < 2 or max_depth < 1 or ngram < 2:
            raise ValueError(f"LookaheadTrie needs tree_size >= 2, max_depth >= 1, ngram >= 2 "
                             f"(got {tree_size}, {max_depth}, {ngram})")
        self.tree_size, self.max_depth, self.ngram, self.max_nodes = tree_size, max_depth, ngram, max_nodes
        self.reset()

    def reset(self) -> None:
        self.root: dict = {}  # token -> [count, children dict]
        self.nodes = 0

    def insert(self, tokens: Sequence[int], start: int = 0) -> None:
        """Windows of ``tokens`` beginning at ``start`` or later (earlier ones are in already)."""
        if self.nodes > self.max_nodes:  # a crude bound on host memory: start over
            self.reset()
            start = 0
        tokens = list(tokens)
        for i in range(max(0, start - self.ngram + 1), len(tokens)):
            level = self.root
            for j in range(i, min(i + self.ngram, len(tokens))):
                entry = level.get(tokens[j])
                if entry is None:
                    entry = level[tokens[j]] = [0, {}]
                    self.nodes += 1
                if j >= start:  # an n-gram ending at a new token: one more occurrence
                    entry[0] += 1
                level = entry[1]

    def _find(self, context: Sequence[int]):
        for length in range(min(self.ngram - 1, len(context)), 0, -1):
            level = self.root
            for tok in context[-length:]:
                entry = level.get(tok)
                if entry is None:
                    break
                level = entry[1]
            else:
                if level:
                    return level
        return None

    def draft(self, context: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tree (tokens, parents, valid), each (tree_size,), rooted at ``context[-1]``."""
        size = self.tree_size
        tokens = np.zeros(size, np.int32)
        parents = np.zeros(size, np.int32)  # padding nodes hang off the root, never valid
        valid = np.zeros(size, bool)
        tokens[0], parents[0], valid[0] = context[-1], -1, True
        level = self._find(context)
        if level is None:
            return tokens, parents, valid
        # best-first by count over (count, node index, depth, children)
        frontier = [(-c, tok, 0, 1, kids) for tok, (c, kids) in level.items()]
        n = 1
        while frontier and n < size:
            frontier.sort(key=lambda e: (e[0], e[1]))
            neg, tok, parent, depth, kids = frontier.pop(0)
            tokens[n], parents[n], valid[n] = tok, parent, True
            if depth < self.max_depth:
                frontier.extend((-c, t, n, depth + 1, k) for t, (c, k) in kids.items())
            n += 1
        return tokens, parents, valid
