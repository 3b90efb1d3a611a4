"""Lossless speculative decoding: draft a tree, verify it in one forward pass, accept a path.

Each step takes the last emitted token (the root, not yet in the KV cache) and a drafter's tree
of candidates (:mod:`jaxtok.decode.drafters`), runs the model once over the T tree nodes with a
tree :class:`~jaxtok.nn.attention.Visibility` (each node sees the cache and its own ancestors;
positions = prefix length + depth), then

* **greedy** accepts the longest root-to-node path whose every token is the argmax at its parent
  (token-identical to greedy decoding, up to reduction-order flips of near-tied logits), plus the
  model's own next token at the path's end (the bonus);
* **sampling** (temperature, top-k, top-p) walks the tree from the root with recursive
  rejection sampling for deterministic multi-drafts (SpecInfer, Miao et al. 2024, Alg. 2; the
  multi-draft case of Leviathan et al. 2023 / Chen et al. 2023): at a node with target
  distribution p, keep a residual r = p; for each child c in turn accept it with probability
  r(c) / sum(r), else set r(c) = 0; when no child is accepted, the bonus is sampled from r
  normalised. With point-mass drafts q = δ_c this is min(1, r/q) acceptance with the residual
  max(0, r - q) ∝ r without c, so every emitted token is distributed exactly as p: the output
  distribution is plain sampling's.

The accepted path's keys/values are moved to consecutive cache slots (the root, then the
accepted drafts); the rest of the block is hidden (position -1) and overwritten next step. For
Token Recycling the whole loop (draft, verify, accept, update M) is one jitted
``lax.while_loop``; a host drafter (the Lookahead trie) drives a Python loop over the same jitted
forward and acceptance, which also gives the step-time split (draft, forward, accept, update).

Batch size 1 (one prompt per call): rows with independent acceptance would need a per-row cache
end; the functions below keep a batch axis so that this is a change of the loop only.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtok.decode import drafters as dr
from jaxtok.decode.generate import (
    DECODE_LAYER_LOOP,
    SamplingConfig,
    _grow,
    _skip_float_normalization,
    left_pad,
    sample_token,
    with_layer_loop,
)
from jaxtok.kernels.tree_verify_attention import ancestor_mask
from jaxtok.models.llama import KVCache
from jaxtok.nn.attention import Visibility
from jaxtok.nn.layers import matmul, split_layers

GREEDY = SamplingConfig()

# ---------------------------------------------------------------------------------------------
# Acceptance (one row; vmapped over the batch)


def filtered_logits(logits: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Logits (..., V) of the distribution :func:`~jaxtok.decode.generate.sample_token` samples
    from (temperature, then top-k, then top-p; -inf outside the kept set)."""
    logits = logits / sampling.temperature
    if sampling.top_k > 0:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        cutoff_index = jnp.sum(cumulative < sampling.top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def accept_greedy(logits, tokens, parents, valid, tree, max_depth: int):
    """One row: logits (T, V), tokens/parents/valid (T,), tree (T, T) ancestor mask.
    Returns (path (T,) node indices root first, accepted drafts n, bonus token)."""
    t = tokens.shape[0]
    index = jnp.arange(t)
    # the model's next token after each node (top_k: XLA:CPU's argmax over 49k logits is ~4x slower)
    target = jax.lax.top_k(logits, 1)[1][..., 0].astype(jnp.int32)
    up = jnp.maximum(parents, 0)
    match = valid & (tokens == target[up]) & (index > 0)
    accepted = index == 0
    for _ in range(max_depth):  # a node is accepted when it matches and its parent is accepted
        accepted = (index == 0) | (match & accepted[up])
    depth = jnp.sum(tree, axis=-1) - 1
    best = jnp.argmax(jnp.where(accepted, depth * (t + 1) + (t - index), -1))  # deepest, then first
    path = jnp.nonzero(tree[best], size=t, fill_value=0)[0]  # ancestors in index = depth order
    return path.astype(jnp.int32), depth[best].astype(jnp.int32), target[best]


def accept_sampling(probs, tokens, parents, valid, key, max_depth: int):
    """One row: probs (T, V) target distributions at each node. Recursive rejection sampling
    down the tree (module docstring). Returns (path, accepted drafts n, bonus token)."""
    t = tokens.shape[0]

    def child(j, carry):
        node, r, chosen, active, level_key = carry
        tok = tokens[j]
        candidate = active & valid[j] & (parents[j] == node) & (j > 0) & (chosen < 0)
        total = jnp.sum(r)
        rest = total - r[tok]
        # the last candidate mass standing is accepted surely (guards a rounding-empty residual)
        prob = jnp.where(rest <= 0.0, 1.0, r[tok] / jnp.maximum(total, 1e-30))
        take = candidate & (jax.random.uniform(jax.random.fold_in(level_key, j)) < prob)
        r = jnp.where(candidate & ~take, r.at[tok].set(0.0), r)
        return node, r, jnp.where(take, j, chosen), active, level_key

    def level(d, carry):
        node, r, path, n, active = carry
        _, r, chosen, _, _ = jax.lax.fori_loop(0, t, child, (node, r, -1, active, jax.random.fold_in(key, d)))
        go = active & (chosen >= 0)
        node = jnp.where(go, chosen, node)
        r = jnp.where(go, probs[jnp.maximum(chosen, 0)], r)
        path = path.at[d + 1].set(jnp.where(go, chosen, 0))
        return node, r, path, n + go.astype(jnp.int32), go

    carry = (jnp.int32(0), probs[0], jnp.zeros((t,), jnp.int32), jnp.int32(0), jnp.bool_(True))
    _, r, path, n, _ = jax.lax.fori_loop(0, max_depth, level, carry)
    bonus = jax.random.categorical(jax.random.fold_in(key, max_depth + 1), jnp.log(r))
    return path, n, bonus.astype(jnp.int32)


def accept(logits, tokens, parents, valid, tree, rng, *, sampling: SamplingConfig, max_depth: int):
    """Batched acceptance. Returns path (B, T), accepted drafts (B,), emitted tokens (B, T)
    (accepted drafts then the bonus) and their count (B,) = accepted + 1."""
    if sampling.temperature == 0.0:
        path, n, bonus = jax.vmap(accept_greedy, in_axes=(0, 0, 0, 0, 0, None))(
            logits, tokens, parents, valid, tree, max_depth)
    else:
        probs = jax.nn.softmax(filtered_logits(logits, sampling), axis=-1)
        keys = jax.random.split(rng, tokens.shape[0])
        path, n, bonus = jax.vmap(accept_sampling, in_axes=(0, 0, 0, 0, 0, None))(
            probs, tokens, parents, valid, keys, max_depth)
    t = tokens.shape[1]
    drafts = jnp.take_along_axis(tokens, jnp.roll(path, -1, axis=1), axis=1)  # path[1:], shifted left
    j = jnp.arange(t)[None]
    emitted = jnp.where(j < n[:, None], drafts, bonus[:, None])
    return path, n, emitted.astype(jnp.int32), n + 1


def compact_cache(cache: KVCache, start, path, n, next_pos) -> KVCache:
    """Moves the accepted path's keys/values (root first) to the block's first slots, hides the
    rest of the block and ends the cache after the path. The block sits at ``start``."""
    t = path.shape[1]
    gather = path[None, :, :, None, None]  # (1, B, T, 1, 1) against (L, B, T, K, D)

    def move(x):
        block = jax.lax.dynamic_slice_in_dim(x, start, t, axis=2)
        return jax.lax.dynamic_update_slice_in_dim(x, jnp.take_along_axis(block, gather, axis=2), start, axis=2)

    j = jnp.arange(t)[None]
    positions = jnp.where(j <= n[:, None], next_pos[:, None] + j, -1).astype(jnp.int32)
    return KVCache(k=move(cache.k), v=move(cache.v),
                   positions=jax.lax.dynamic_update_slice_in_dim(cache.positions, positions, start, axis=1),
                   end=start + jnp.max(n) + 1)


# ---------------------------------------------------------------------------------------------
# The jitted pieces


def _forward(model, params, cache, tokens, parents, next_pos):
    """Model over the tree: (logits (B, T, V), cache with the block written at its old end)."""
    tree = ancestor_mask(parents)
    depth = jnp.sum(tree, axis=-1) - 1
    out = model.apply({"params": params}, tokens, positions=next_pos[:, None] + depth, cache=cache,
                      visibility=Visibility(tree=tree, block_start=cache.end))
    return out.logits, out.cache, tree


def _verify(model, params, cache, tokens, parents, valid, next_pos, rng, *, sampling, max_depth, top_k):
    """Forward + accept + compact: (cache, emitted (B, T), count (B,), top-k ids (B, T, k) | None)."""
    start = cache.end
    logits, cache, tree = _forward(model, params, cache, tokens, parents, next_pos)
    path, n, emitted, count = accept(logits, tokens, parents, valid, tree, rng, sampling=sampling,
                                     max_depth=max_depth)
    cache = compact_cache(cache, start, path, n, next_pos)
    top = jax.lax.top_k(logits, top_k)[1].astype(jnp.int32) if top_k else None
    return cache, emitted, count, top


def _emit(generated, n_gen, emitted, count, max_new_tokens, eos_id):
    """Row 0's emitted tokens into the output buffer, cut at EOS (kept) and at the budget."""
    t = emitted.shape[-1]
    budget = jnp.minimum(count[0], max_new_tokens - n_gen)
    j = jnp.arange(t)
    is_eos = (j < budget) & (emitted[0] == eos_id)
    done = jnp.any(is_eos)
    taken = jnp.where(done, jnp.argmax(is_eos) + 1, budget)
    generated = jax.lax.dynamic_update_slice_in_dim(generated, emitted, n_gen, axis=1)
    return generated, n_gen + taken, done


def _prefill(model, params, tokens, positions, *, extra_slots: int, top_k: int):
    """Prompt pass: (cache grown by ``extra_slots``, last logits (B, V), prompt top-k ids or None).
    The last logits come from the same computation as plain ``generate``'s prefill."""
    cache = KVCache.create(model.config, tokens.shape[0], tokens.shape[1])
    out = model.apply({"params": params}, tokens, positions=positions, cache=cache, last_logits_only=True,
                      return_hidden=top_k > 0)
    top = None
    if top_k:  # every prompt token's successors, for the adjacency matrix
        table = params["embedding"] if model.config.tie_embeddings else params["lm_head"]
        logits = matmul("btd,vd->btv", out.hidden, table, model.config.compute_dtype).astype(jnp.float32)
        top = jax.lax.top_k(logits, top_k)[1].astype(jnp.int32)
    return _grow(out.cache, extra_slots), out.logits[:, -1], top


def _capacity(max_new_tokens: int) -> int:
    """Buffers sized for up to this many new tokens: budgets share a compiled loop per 64."""
    return -(-max_new_tokens // 64) * 64


def _recycling_loop(model, decode_model, params, tokens, positions, matrix, rng, max_new_tokens, eos_id, *, tree,
                    sampling, capacity: int, pad_id: int):
    """The whole Token Recycling generation on device (``max_new_tokens`` <= ``capacity`` and
    ``eos_id`` are traced: one compile serves every budget and stop token)."""
    t, k = tree.size, matrix.shape[1]
    cache, last_logits, top = _prefill(model, params, tokens, positions, extra_slots=capacity + t + 1, top_k=k)
    matrix = dr.recycling_update(matrix, tokens, positions >= 0, top)
    rng, first_rng = jax.random.split(rng)
    first = sample_token(last_logits, first_rng, sampling)
    next_pos = positions[:, -1] + 1
    generated = jnp.full((1, capacity + t), pad_id, jnp.int32).at[:, 0].set(first)
    parents = jnp.broadcast_to(jnp.asarray(tree.parents, jnp.int32), (1, t))
    valid = jnp.ones((1, t), bool)
    split = split_layers(params) if decode_model.config.layer_loop == "unrolled" else params

    def cond(state):
        return (state["n_gen"] < max_new_tokens) & ~state["done"]

    def body(state):
        rng, step_rng = jax.random.split(state["rng"])
        draft = dr.recycling_draft(state["matrix"], state["root"], tree)
        cache, emitted, count, top = _verify(decode_model, split, state["cache"], draft, parents, valid,
                                             state["next_pos"], step_rng, sampling=sampling,
                                             max_depth=tree.max_depth, top_k=k)
        generated, n_gen, done = _emit(state["generated"], state["n_gen"], emitted, count, max_new_tokens, eos_id)
        return dict(
            cache=cache, root=jnp.take_along_axis(emitted, count[:, None] - 1, axis=1)[:, 0],
            next_pos=state["next_pos"] + count, generated=generated, n_gen=n_gen, done=done,
            matrix=dr.recycling_update(state["matrix"], draft, valid, top), rng=rng,
            passes=state["passes"] + 1, counts=state["counts"].at[state["passes"]].set(count[0]))

    state = dict(cache=cache, root=first, next_pos=next_pos, generated=generated, n_gen=jnp.int32(1),
                 done=first[0] == eos_id, matrix=matrix, rng=rng, passes=jnp.int32(0),
                 counts=jnp.zeros((capacity,), jnp.int32))
    state = jax.lax.while_loop(cond, body, state)
    return state["generated"], state["n_gen"], state["passes"], state["counts"], state["matrix"]


_STATIC = ("model", "decode_model", "tree", "sampling", "capacity", "pad_id")
_CPU_BF16 = {"xla_disable_hlo_passes": "float-normalization-bf16"}  # see generate.py's note
_recycling_jit = {False: jax.jit(_recycling_loop, static_argnames=_STATIC),
                  True: jax.jit(_recycling_loop, static_argnames=_STATIC, compiler_options=_CPU_BF16)}
_prefill_jit = {False: jax.jit(_prefill, static_argnames=("model", "extra_slots", "top_k")),
                True: jax.jit(_prefill, static_argnames=("model", "extra_slots", "top_k"), compiler_options=_CPU_BF16)}
_forward_jit = {False: jax.jit(_forward, static_argnames=("model",)),
                True: jax.jit(_forward, static_argnames=("model",), compiler_options=_CPU_BF16)}


@functools.partial(jax.jit, static_argnames=("sampling", "max_depth"))
def _accept_jit(logits, tokens, parents, valid, tree, rng, cache, start, next_pos, *, sampling, max_depth):
    path, n, emitted, count = accept(logits, tokens, parents, valid, tree, rng, sampling=sampling,
                                     max_depth=max_depth)
    return compact_cache(cache, start, path, n, next_pos), emitted, count


_draft_jit = jax.jit(dr.recycling_draft, static_argnames=("tree",))
_update_jit = jax.jit(dr.recycling_update)
_topk_jit = jax.jit(lambda logits, k: jax.lax.top_k(logits, k)[1].astype(jnp.int32), static_argnames=("k",))


# ---------------------------------------------------------------------------------------------
# Public API


@dataclasses.dataclass
class SpeculativeResult:
    """tokens: the continuation (stops after EOS, kept, or at max_new_tokens); forward_passes:
    verification passes (the prefill not counted); counts: tokens emitted per pass (accepted +
    bonus, the last pass counting what it emitted); seconds: time per stage (host loop only)."""

    tokens: list[int]
    forward_passes: int
    counts: list[int]
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def mat(self) -> float:
        """Mean accepted tokens per verification pass: new tokens after the prefill's first one."""
        return (len(self.tokens) - 1) / self.forward_passes if self.forward_passes else 1.0


def _check(model, prompt, max_new_tokens, tree_size, pad_multiple):
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    if len(prompt) == 0:
        raise ValueError("the prompt needs at least one token")
    padded = -(-len(prompt) // pad_multiple) * pad_multiple
    if padded + max_new_tokens + tree_size + 1 > model.config.max_seq_len:
        raise ValueError(f"prompt ({padded} padded) + {max_new_tokens} new tokens + a {tree_size}-node tree "
                         f"exceeds the model's context of {model.config.max_seq_len}")


def speculative_generate(model: Any, params: Any, prompt: Sequence[int], drafter: Any, *, max_new_tokens: int,
                         eos_id: int, pad_id: int | None = None, sampling: SamplingConfig = GREEDY,
                         rng: jax.Array | None = None, loop: str = "auto", pad_multiple: int = 16) -> SpeculativeResult:
    """Continuation of one ``prompt`` (token ids) with ``drafter`` (``TokenRecycling`` or
    ``LookaheadTrie``; its state is updated and kept for the next call).

    ``loop``: ``device`` (one jitted while_loop; Token Recycling only), ``host`` (a Python loop
    over jitted steps, timing each stage), ``auto`` (device when the drafter allows).
    ``pad_multiple``: the prompt is left-padded to a multiple of this (prompts of one bucket share
    a compiled program).
    """
    if loop not in ("auto", "device", "host"):
        raise ValueError(f"loop must be auto, device or host, got {loop!r}")
    device_drafter = isinstance(drafter, dr.TokenRecycling)
    if loop == "device" and not device_drafter:
        raise ValueError(f"{type(drafter).__name__} drafts on the host: use loop='host'")
    if device_drafter and drafter.vocab_size != model.config.vocab_size:
        raise ValueError(f"drafter vocabulary {drafter.vocab_size} != model vocabulary {model.config.vocab_size}")
    tree_size = drafter.tree.size if device_drafter else drafter.tree_size
    _check(model, prompt, max_new_tokens, tree_size, pad_multiple)
    pad_id = eos_id if pad_id is None else pad_id
    rng = jax.random.key(0) if rng is None else rng
    tokens, positions = (jnp.asarray(a) for a in left_pad([list(prompt)], pad_id, pad_multiple))
    bf16_cpu = _skip_float_normalization(model, params)
    decode_model = with_layer_loop(model, DECODE_LAYER_LOOP)
    if device_drafter and loop in ("auto", "device"):
        out, n_gen, passes, counts, drafter.matrix = _recycling_jit[bf16_cpu](
            model, decode_model, params, tokens, positions, drafter.matrix, rng, jnp.int32(max_new_tokens),
            jnp.int32(eos_id), tree=drafter.tree, sampling=sampling, capacity=_capacity(max_new_tokens), pad_id=pad_id)
        passes = int(passes)
        return SpeculativeResult(np.asarray(out)[0, :int(n_gen)].tolist(), passes,
                                 np.asarray(counts)[:passes].tolist())
    return _host_loop(model, decode_model, params, tokens, positions, drafter, rng, sampling=sampling,
                      max_new_tokens=max_new_tokens, eos_id=eos_id, bf16_cpu=bf16_cpu, prompt=list(prompt))


def _host_loop(model, decode_model, params, tokens, positions, drafter, rng, *, sampling, max_new_tokens, eos_id,
               bf16_cpu, prompt):
    recycling = isinstance(drafter, dr.TokenRecycling)
    t = drafter.tree.size if recycling else drafter.tree_size
    max_depth = drafter.tree.max_depth if recycling else drafter.max_depth
    seconds = dict(prefill=0.0, draft=0.0, forward=0.0, accept=0.0, update=0.0)
    clock = time.perf_counter()

    def lap(stage, value=None):
        nonlocal clock
        if value is not None:
            jax.block_until_ready(value)
        now = time.perf_counter()
        seconds[stage] += now - clock
        clock = now
        return value

    k = drafter.k if recycling else 0
    cache, last_logits, top = _prefill_jit[bf16_cpu](model, params, tokens, positions,
                                                     extra_slots=_capacity(max_new_tokens) + t + 1, top_k=k)
    rng, first_rng = jax.random.split(rng)
    first = int(sample_token(last_logits, first_rng, sampling)[0])
    if recycling:
        drafter.matrix = _update_jit(drafter.matrix, tokens, positions >= 0, top)
    else:
        drafter.insert(prompt)
    lap("prefill", drafter.matrix if recycling else None)
    split = split_layers(params) if decode_model.config.layer_loop == "unrolled" else params
    out, counts = [first], []
    next_pos = jnp.asarray([len(prompt)], jnp.int32)
    if recycling:
        parents = jnp.asarray([drafter.tree.parents], jnp.int32)
        valid = jnp.ones((1, t), bool)
    while len(out) < max_new_tokens and out[-1] != eos_id:
        rng, step_rng = jax.random.split(rng)
        if recycling:
            draft = lap("draft", _draft_jit(drafter.matrix, jnp.asarray([out[-1]], jnp.int32), drafter.tree))
        else:
            d_tokens, d_parents, d_valid = drafter.draft(prompt + out)
            draft, parents, valid = (jnp.asarray(a)[None] for a in (d_tokens, d_parents, d_valid))
            lap("draft")
        start = cache.end
        logits, written, tree = lap("forward", _forward_jit[bf16_cpu](decode_model, split, cache, draft, parents,
                                                                      next_pos))
        cache, emitted, count = _accept_jit(logits, draft, parents, valid, tree, step_rng, written, start, next_pos,
                                            sampling=sampling, max_depth=max_depth)
        emitted, count = lap("accept", (np.asarray(emitted)[0], int(count[0])))
        counts.append(count)
        next_pos = next_pos + count
        new = emitted[:min(count, max_new_tokens - len(out))].tolist()
        if eos_id in new:
            new = new[:new.index(eos_id) + 1]
        before = len(prompt) + len(out)
        out.extend(new)
        if recycling:
            drafter.matrix = lap("update", _update_jit(drafter.matrix, draft, valid, _topk_jit(logits, drafter.k)))
        else:
            drafter.insert(prompt + out, start=before)
            lap("update")
    return SpeculativeResult(out, len(counts), counts, seconds)


# ---------------------------------------------------------------------------------------------
# One call for the command line and notebooks

METHODS = ("none", "recycling", "lookahead")


def make_drafter(method: str, vocab_size: int, *, tree: str = "p16", tree_size: int = 16) -> Any:
    """The drafter of a method name (``none`` has none)."""
    if method not in METHODS:
        raise ValueError(f"unknown speculative method {method!r}; valid: {METHODS}")
    if method == "recycling":
        return dr.TokenRecycling(vocab_size, dr.template(tree))
    if method == "lookahead":
        return dr.LookaheadTrie(tree_size=tree_size)
    return None


def decode_with(method: str, model: Any, params: Any, prompt: Sequence[int], *, max_new_tokens: int, eos_id: int,
                pad_id: int | None = None, sampling: SamplingConfig = GREEDY, rng: jax.Array | None = None,
                drafter: Any = None, tree: str = "p16") -> tuple[SpeculativeResult, float]:
    """(result, seconds of the generation call) for ``none`` (plain :func:`generate`: one pass
    per token, mat 1) or a drafter; ``drafter`` reuses a hot one."""
    from jaxtok.decode.generate import generate

    start = time.perf_counter()
    if method == "none":
        tokens = generate(model, params, [list(prompt)], max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                          sampling=sampling, rng=rng)[0]
        result = SpeculativeResult(tokens, len(tokens) - 1, [1] * (len(tokens) - 1))
    else:
        drafter = make_drafter(method, model.config.vocab_size, tree=tree) if drafter is None else drafter
        result = speculative_generate(model, params, prompt, drafter, max_new_tokens=max_new_tokens, eos_id=eos_id,
                                      pad_id=pad_id, sampling=sampling, rng=rng)
    return result, time.perf_counter() - start


def result_line(result: SpeculativeResult, seconds: float) -> str:
    n = len(result.tokens)
    mat = result.mat if result.forward_passes else 1.0
    return (f"RESULT new_tokens={n} mat={mat:.3f} tokens_per_s={n / max(seconds, 1e-9):.2f} "
            f"forward_passes={result.forward_passes}")
