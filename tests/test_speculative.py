"""Speculative decoding on a tiny random Llama: greedy is token-identical to plain greedy (Token
Recycling on device and on the host, Lookahead trie; EOS inside an accepted path, the budget
reached mid-path), sampling reproduces plain sampling's distribution (exact enumeration, chi-square),
and the drafters' pieces against hand-made cases."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from scipy import stats

from jaxtok.decode import drafters as dr
from jaxtok.decode import speculative as sp
from jaxtok.decode.generate import SamplingConfig, generate, left_pad
from jaxtok.models.llama import PRESETS, Llama, init_params

CFG = PRESETS["llama-tiny"]


@functools.cache
def scaled_params(scale):
    """The random tiny model with its matrices scaled: 1 gives a model that repeats itself (long
    accepted paths), 3 a varied one (mostly short paths, many rejections)."""
    params = nn.unbox(init_params(CFG, jax.random.key(0)))
    return jax.tree.map(lambda a: a * scale if a.ndim >= 2 else a, params)


PROMPTS = [np.random.default_rng(i).integers(0, CFG.vocab_size, 5 + 3 * i).tolist() for i in range(4)]


def plain(params, prompt, n, eos_id=-1):
    return generate(Llama(CFG), params, [prompt], max_new_tokens=n, eos_id=eos_id, pad_id=0)[0]


def near_tie(params, prompt, plain_tokens, spec_tokens):
    """At the first difference, plain greedy's top-2 logit margin (float32 reordering can flip a
    near tie, which is not a bug); None when the outputs are identical."""
    i = next((j for j, (a, b) in enumerate(zip(plain_tokens, spec_tokens)) if a != b), None)
    if i is None:
        return None
    logits = Llama(CFG).apply({"params": params}, jnp.asarray([prompt + plain_tokens[:i]])).logits[0, -1]
    top2 = jax.lax.top_k(logits, 2)[0]
    return float(top2[0] - top2[1])


def assert_identical(params, prompt, want, got):
    margin = near_tie(params, prompt, want, got)
    assert margin is None or margin < 1e-4, f"differs where plain greedy's margin is {margin}:\n{want}\n{got}"
    if margin is not None:
        print(f"near-tie flip (margin {margin:.2e}) at a position of {prompt}")


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_recycling_greedy_is_token_identical(scale):
    params = scaled_params(scale)
    drafter = dr.TokenRecycling(CFG.vocab_size, dr.template("p16"))  # hot: one matrix for all prompts
    mats = []
    for prompt in PROMPTS[1:]:
        want = plain(params, prompt, 40)
        got = sp.speculative_generate(Llama(CFG), params, prompt, drafter, max_new_tokens=40, eos_id=-1, pad_id=0)
        assert_identical(params, prompt, want, got.tokens)
        assert sum(got.counts) >= len(got.tokens) - 1 and got.forward_passes == len(got.counts)
        mats.append(got.mat)
    # the two models exercise both regimes: long accepted paths and mostly rejections
    assert (min(mats) > 3.0) if scale == 1.0 else (max(mats) < 3.0 and max(mats) > 1.0)


def test_host_loop_full_tree_and_lookahead_are_token_identical():
    params = scaled_params(3.0)
    # both trees have 16 nodes and depth <= 4: one compiled forward and acceptance for both
    recycling = dr.TokenRecycling(CFG.vocab_size, dr.template("p16"))
    lookahead = dr.LookaheadTrie(tree_size=16, max_depth=4)
    for i, prompt in enumerate(PROMPTS[:2]):
        prompt = prompt + prompt  # repeats: something for the n-gram trie to find
        want = plain(params, prompt, 40)[:24]
        for drafter in (recycling, lookahead)[i:]:  # recycling's host loop once, the trie on both
            got = sp.speculative_generate(Llama(CFG), params, prompt, drafter, max_new_tokens=24,
                                          eos_id=-1, pad_id=0, loop="host")
            assert_identical(params, prompt, want, got.tokens)
            assert set(got.seconds) == {"prefill", "draft", "forward", "accept", "update"}
    assert lookahead.nodes > 0


def test_eos_inside_an_accepted_path_and_budget_mid_path():
    params = scaled_params(2.5)
    prompt = PROMPTS[1]
    free = sp.speculative_generate(Llama(CFG), params, prompt, dr.TokenRecycling(CFG.vocab_size, dr.template("p16")),
                                   max_new_tokens=40, eos_id=-1, pad_id=0)
    # a pass that emitted >= 3 tokens; its middle token, not seen earlier, becomes the EOS
    ends = np.cumsum([1] + free.counts)
    p = next(i for i, c in enumerate(free.counts)
             if c >= 3 and free.tokens[ends[i] + 1] not in free.tokens[:ends[i] + 1])
    eos = free.tokens[ends[p] + 1]
    want = plain(params, prompt, 40)
    want = want[:want.index(eos) + 1]  # what generate(..., eos_id=eos) returns
    got = sp.speculative_generate(Llama(CFG), params, prompt, dr.TokenRecycling(CFG.vocab_size, dr.template("p16")),
                                  max_new_tokens=40, eos_id=eos, pad_id=0)
    assert got.tokens == want and want[-1] == eos and len(want) < 40
    # the same passes up to the EOS, which came second in a pass that had accepted more after it
    assert len(got.tokens) == ends[p] + 2 and got.counts[-1] >= 3
    # the budget reached in the middle of a long path
    budget = int(ends[p]) + 2
    cut = sp.speculative_generate(Llama(CFG), params, prompt, dr.TokenRecycling(CFG.vocab_size, dr.template("p16")),
                                  max_new_tokens=budget, eos_id=-1, pad_id=0)
    assert cut.tokens == free.tokens[:budget] and sum(cut.counts) > len(cut.tokens) - 1


def test_kernel_through_the_model_matches_reference_path():
    """A verification pass of the model with the Pallas kernel (interpret mode) behind the
    attention entry point equals the reference path: logits and the cache written."""
    cfg = dataclasses.replace(CFG, n_layers=1)  # one layer is enough to route through the kernel
    full = scaled_params(3.0)
    params = {**full, "blocks": jax.tree.map(lambda a: a[:1], full["blocks"])}
    prompt = PROMPTS[2]
    tokens, positions = (jnp.asarray(a) for a in left_pad([prompt], 0))
    cache, _, _ = sp._prefill(Llama(cfg), params, tokens, positions, extra_slots=30, top_k=0)
    tree = dr.template("p8")
    draft = jax.random.randint(jax.random.key(5), (1, tree.size), 0, CFG.vocab_size).at[0, 0].set(7)
    parents = jnp.asarray([tree.parents])
    next_pos = jnp.asarray([len(prompt)])
    out = {}
    for impl in ("reference", "pallas_interpret"):
        model = Llama(dataclasses.replace(cfg, attention=impl))
        out[impl] = jax.jit(sp._forward, static_argnums=0)(model, params, cache, draft, parents, next_pos)[:2]
    chex.assert_trees_all_close(out["pallas_interpret"], out["reference"], atol=1e-4, rtol=1e-5)


# --- acceptance rules -------------------------------------------------------------------------

#        0
#      1   2        tokens: 1 -> 7, 2 -> 9, 3 -> 4, 4 -> 4, 5 -> 2
#     3 4   5
TREE_PARENTS = jnp.asarray([-1, 0, 0, 1, 1, 2])
TREE_TOKENS = jnp.asarray([0, 7, 9, 4, 4, 2])


def test_accept_greedy_takes_the_longest_matching_path():
    logits = np.zeros((6, 10), np.float32)
    for node, nxt in {0: 9, 1: 4, 2: 2, 5: 3, 3: 1, 4: 1}.items():
        logits[node, nxt] = 1.0  # argmax after each node
    tree = sp.ancestor_mask(TREE_PARENTS)
    path, n, bonus = sp.accept_greedy(jnp.asarray(logits), TREE_TOKENS, TREE_PARENTS, jnp.ones(6, bool), tree, 3)
    # 0 -> 2 (9 is the argmax at 0) -> 5 (2 is the argmax at 2); the bonus is the argmax at 5
    assert path[:3].tolist() == [0, 2, 5] and int(n) == 2 and int(bonus) == 3
    valid = jnp.ones(6, bool).at[5].set(False)  # an invalid node is never accepted
    path, n, bonus = sp.accept_greedy(jnp.asarray(logits), TREE_TOKENS, TREE_PARENTS, valid, tree, 3)
    assert int(n) == 1 and int(bonus) == 2


def chi2_p(observed, probs):
    """Chi-square goodness-of-fit p-value of counts against a distribution (float64 throughout)."""
    observed = np.asarray(observed, np.float64)
    expected = np.asarray(probs, np.float64) / np.sum(probs, dtype=np.float64) * observed.sum()
    return stats.chisquare(observed, expected).pvalue


def test_accept_sampling_emits_the_target_distributions():
    """First token ~ p(root); the second, when the first is an accepted child, ~ p(child)."""
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(10, 0.7), size=6)
    probs[0] = 0.6 * probs[0] + 0.25 * np.eye(10)[7] + 0.15 * np.eye(10)[9]  # drafts likely at the root
    probs = probs.astype(np.float32)
    tokens = TREE_TOKENS.at[2].set(7)  # two siblings with the same token: the second never adds mass
    n_samples = 40_000
    keys = jax.random.split(jax.random.key(1), n_samples)
    run = jax.jit(jax.vmap(lambda key: sp.accept_sampling(jnp.asarray(probs), tokens, TREE_PARENTS,
                                                          jnp.ones(6, bool), key, 2)))
    path, n, bonus = (np.asarray(a) for a in run(keys))
    first = np.where(n >= 1, np.asarray(tokens)[path[:, 1]], bonus)
    p_first = chi2_p(np.bincount(first, minlength=10), probs[0])
    assert p_first > 1e-3
    # given the first token is node 1's (7), the next emitted token follows p(node 1)
    after = np.where(n >= 2, np.asarray(tokens)[path[:, 2]], bonus)[(n >= 1) & (path[:, 1] == 1)]
    p_second = chi2_p(np.bincount(after, minlength=10), probs[1])
    assert p_second > 1e-3 and len(after) > 8000


def exact_sequence_distribution(params, prompt, sampling, length):
    """P(x1..x_length) of plain sampling, by enumeration over the top-k support (one compiled
    shape: rows right-padded, causal, so the padding changes nothing before it)."""
    rows = sampling.top_k ** (length - 1)
    forward = jax.jit(lambda p, batch: Llama(CFG).apply({"params": p}, batch).logits)
    seqs, probs = [[]], np.ones(1)
    for step in range(length):
        batch = np.zeros((rows, len(prompt) + length), np.int32)
        batch[:len(seqs), :len(prompt) + step] = [prompt + s for s in seqs]
        logits = forward(params, jnp.asarray(batch))[:len(seqs), len(prompt) + step - 1]
        p = np.asarray(jax.nn.softmax(sp.filtered_logits(logits, sampling), axis=-1), np.float64)
        support = np.argsort(-p, axis=1)[:, :sampling.top_k]
        seqs = [s + [int(x)] for s, row in zip(seqs, support) for x in row]
        probs = np.concatenate([pr * p[i, support[i]] for i, pr in enumerate(probs)])
    return {tuple(s): pr for s, pr in zip(seqs, probs)}


def test_speculative_sampling_matches_plain_sampling_distribution():
    params = scaled_params(2.5)
    prompt = PROMPTS[1]
    sampling = SamplingConfig(temperature=0.7, top_k=3)
    length = 3  # 27 sequences; one or two passes per sample, with accepted paths and rejections
    exact = exact_sequence_distribution(params, prompt, sampling, length)
    drafter = dr.TokenRecycling(CFG.vocab_size, dr.template("p16"))
    # hot start: a greedy run fills the rows of the tokens that follow the prompt
    sp.speculative_generate(Llama(CFG), params, prompt, drafter, max_new_tokens=40, eos_id=-1, pad_id=0)
    tokens, positions = (jnp.asarray(a) for a in left_pad([prompt], 0))
    model = Llama(CFG)
    loop = jax.jit(jax.vmap(lambda key: sp._recycling_loop(
        model, model, params, tokens, positions, drafter.matrix, key, length, -1, tree=drafter.tree,
        sampling=sampling, capacity=length, pad_id=0)[:4]))
    n_samples = 4000
    generated, n_gen, passes, counts = loop(jax.random.split(jax.random.key(0), n_samples))
    assert np.all(np.asarray(n_gen) == length)
    counts = np.asarray(counts)
    accepted = np.bincount(counts.ravel(), minlength=4)
    assert accepted[2] > 300 and accepted[3] > 50, accepted  # passes emitting 2 and 3 tokens: drafts accepted
    seqs = [tuple(row) for row in np.asarray(generated)[:, 0, :length].tolist()]
    assert set(seqs) <= set(exact)
    keys = sorted(exact)
    observed = np.array([seqs.count(k) for k in keys], float)
    expected = np.array([exact[k] for k in keys]) * n_samples
    big = expected >= 5  # chi-square cells; the rare sequences pooled into one
    pooled = [observed[~big].sum()] if (~big).any() else []
    p_value = chi2_p(np.append(observed[big], pooled), np.append(expected[big], [expected[~big].sum()][:len(pooled)]))
    # total variation against its sampling noise: E|f - p| = sqrt(2 p (1 - p) / (pi n)) per cell
    p_exact = expected / n_samples
    tv = 0.5 * np.abs(observed / n_samples - p_exact).sum()
    tv_noise = 0.5 * np.sqrt(2 * p_exact * (1 - p_exact) / (np.pi * n_samples)).sum()
    assert p_value > 1e-3 and tv < 2 * tv_noise, (p_value, tv, tv_noise)


def test_filtered_logits_is_sample_tokens_distribution():
    logits = jax.random.normal(jax.random.key(3), (4, 50)) * 3
    keys = jax.random.split(jax.random.key(4), 20)
    for sampling in (SamplingConfig(0.7), SamplingConfig(1.0, top_k=5), SamplingConfig(1.3, top_p=0.8),
                     SamplingConfig(0.9, top_k=7, top_p=0.6)):
        want = jax.vmap(lambda key, s=sampling: sp.sample_token(logits, key, s))(keys)
        got = jax.vmap(lambda key, s=sampling: jax.random.categorical(key, sp.filtered_logits(logits, s)))(keys)
        chex.assert_trees_all_equal(got.astype(jnp.int32), want)


# --- drafters ---------------------------------------------------------------------------------

def test_templates_and_recycling_draft():
    full = dr.template("2.2.2")
    assert full.size == 81 and np.bincount(full.depths).tolist() == [1, 8, 21, 25, 15, 8, 3]
    tree = dr.TreeTemplate.from_paths("t", [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]])
    matrix = jnp.asarray(np.arange(20 * 3).reshape(20, 3) % 20, jnp.int32)  # row r: r*3, r*3+1, r*3+2 (mod 20)
    tokens = dr.recycling_draft(matrix, jnp.asarray([2]), tree)[0].tolist()
    # root 2 -> ranks 0, 1: 6, 7; 6 -> 18, 19; 7 -> 1; 18 -> M[18, 0] = 54 % 20 = 14
    assert tokens == [2, 6, 7, 18, 19, 1, 14]
    with pytest.raises(ValueError, match="no parent"):
        dr.TreeTemplate.from_paths("bad", [[0, 0]])
    with pytest.raises(ValueError, match="rank"):
        dr.TokenRecycling(CFG.vocab_size, full, k=4)
    with pytest.raises(ValueError, match="unknown tree template"):
        dr.template("nope")


def test_recycling_matrix_update_and_hot_start():
    params = scaled_params(3.0)
    drafter = dr.TokenRecycling(CFG.vocab_size, dr.template("p16"))
    prompt = PROMPTS[3]
    # one new token: the prefill only, whose pass writes every prompt token's row
    sp.speculative_generate(Llama(CFG), params, prompt, drafter, max_new_tokens=1, eos_id=-1, pad_id=0)
    matrix = np.asarray(drafter.matrix)
    logits = jax.jit(lambda p, x: Llama(CFG).apply({"params": p}, x).logits)(params, jnp.asarray([prompt]))[0]
    top = np.asarray(jax.lax.top_k(logits, 8)[1])
    last = {t: i for i, t in enumerate(prompt)}  # a repeated token keeps one of its rows
    assert all(set(matrix[t]) == set(top[i]) or prompt.count(t) > 1 for t, i in last.items())
    assert np.count_nonzero(matrix.any(axis=1)) == len(set(prompt))
    first = sp.speculative_generate(Llama(CFG), params, prompt, drafter, max_new_tokens=20, eos_id=-1, pad_id=0)
    again = sp.speculative_generate(Llama(CFG), params, prompt, drafter, max_new_tokens=20, eos_id=-1, pad_id=0)
    assert again.tokens == first.tokens and again.forward_passes <= first.forward_passes
    drafter.reset()
    assert not np.asarray(drafter.matrix).any()


def test_lookahead_trie_multi_branch_drafts():
    trie = dr.LookaheadTrie(tree_size=6, max_depth=3, ngram=4)
    trie.insert([1, 2, 3, 4, 1, 2, 3, 5, 1, 2, 6])
    tokens, parents, valid = trie.draft([9, 1, 2])
    # after "1 2": 3 (twice, then 4 or 5) and 6 (once): two branches, the frequent one first
    assert tokens[:5].tolist() == [2, 3, 4, 5, 6] and parents[:5].tolist() == [-1, 0, 1, 1, 0]
    assert valid.tolist() == [True] * 5 + [False]
    trie.insert([1, 2, 3, 4, 1, 2, 3, 5, 1, 2, 6, 1, 2, 6], start=11)  # output appended: counts grow
    tokens, parents, valid = trie.draft([1, 2])
    assert tokens[1] == 3 and 6 in tokens[valid].tolist()
    empty = dr.LookaheadTrie(tree_size=4).draft([42])
    assert empty[0][0] == 42 and empty[2].tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match="tree_size"):
        dr.LookaheadTrie(tree_size=1)


def test_errors_name_the_problem():
    params = scaled_params(1.0)
    with pytest.raises(ValueError, match="context"):
        sp.speculative_generate(Llama(CFG), params, [1], dr.TokenRecycling(CFG.vocab_size), eos_id=2,
                                max_new_tokens=CFG.max_seq_len)
    with pytest.raises(ValueError, match="host"):
        sp.speculative_generate(Llama(CFG), params, [1], dr.LookaheadTrie(), eos_id=2, max_new_tokens=4,
                                loop="device")
    with pytest.raises(ValueError, match="vocabulary"):
        sp.speculative_generate(Llama(CFG), params, [1], dr.TokenRecycling(100), eos_id=2, max_new_tokens=4)


def test_cli_speculative_prints_the_greedy_text_and_a_result_line(monkeypatch, capsys):
    """`jaxtok generate --speculative`: same continuation for none / recycling / lookahead (greedy,
    lossless), RESULT line last, mat 1 for none."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from _transfer_models import tiny_llama

    from jaxtok import cli

    lm = tiny_llama(tie=True)
    monkeypatch.setattr(cli, "_load", lambda args: lm)
    outputs = {}
    for method in ("none", "recycling", "lookahead"):
        assert cli.main(["generate", "--prompt", "The quick brown fox", "--raw", "--max-new-tokens", "8",
                         "--speculative", method]) == 0
        *text, result = capsys.readouterr().out.rstrip("\n").split("\n")
        fields = dict(item.split("=") for item in result.removeprefix("RESULT ").split())
        assert set(fields) == {"new_tokens", "mat", "tokens_per_s", "forward_passes"}, result
        outputs[method] = ("\n".join(text), int(fields["new_tokens"]))
        if method == "none":
            assert float(fields["mat"]) == 1.0
    assert outputs["recycling"] == outputs["none"] == outputs["lookahead"]
