"""Merged units as model inputs, on tiny models: the jitted merge-and-embed step gives the
reference's units, FVT and hypernetwork embeddings of the new units (both sources; the host LRU
cache returns the same rows), MiniLM on merged batches (no merges = the plain encoder), and a
decoder prefilled with merged units scoring / generating the continuation through the KV cache
exactly as one plain forward over the shorter sequence."""

import chex
import jax
import numpy as np
import pytest
from _transfer_models import ENGLISH, tiny_bert, tiny_llama
from flax import linen as nn

from jaxtok.dynamic import dynamic_bpe_reference
from jaxtok.dynamic.apply import (
    UnitCache,
    UnitEmbedder,
    bert_sentence_embeddings,
    embedder_for,
    merge_and_embed,
    merge_with_cache,
    prefill_and_generate,
    prefill_and_score,
    unit_vectors,
    with_specials,
)
from jaxtok.dynamic.boundaries import encode_lines
from jaxtok.dynamic.merge import pad_batch
from jaxtok.models import llama
from jaxtok.models.bert import sentence_embedding
from jaxtok.transfer import hypernet as hn

# words the tiny tokenizers never saw whole, repeated across lines: several merges per batch
LINES = ["Retrofitting tokenizers: retrofitted tokenizers merge subwords.",
         "Merging frequent subwords shortens retrofitted sequences.",
         "Subwords, subwords everywhere; merging merging merging.",
         "Tokenizers retrofitted twice are still tokenizers.",
         ENGLISH[0], "the the the lazy lazy dog"]


def _batch(lm, seq_len=24, mode="word"):
    ids, bounds = encode_lines(lm.tokenizer.hf, LINES, seq_len, mode)
    return ids, bounds


def _hypernet(lm, seed=0):
    """A tiny hypernetwork with every parameter randomised (heads included: the zero-initialised
    heads would make it return the first piece)."""
    table = lm.params["embedding"]
    cfg = hn.HypernetConfig(embed_dim=table.shape[1], tied=True, max_pieces=4, d_model=16, n_layers=1, n_heads=2)
    params = nn.unbox(hn.init_params(cfg, jax.random.key(seed)))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    return cfg, params


@pytest.mark.parametrize("source", ["fvt", "hypernet"])
def test_merge_and_embed_units_and_new_embeddings(source):
    lm = tiny_llama(tie=True)
    table = lm.params["embedding"]
    v = table.shape[0]
    cfg, hn_params = _hypernet(lm) if source == "hypernet" else (None, None)
    embedder = UnitEmbedder(cfg)
    cap = embedder.max_pieces
    ids, bounds = _batch(lm)
    grid, bnd, lengths = pad_batch(ids, bounds)
    base = {"input": table}
    stats = hn.embedding_stats(base)
    merged = merge_and_embed(grid, bnd, lengths, base, stats, hn_params, embedder=embedder, max_merges=8,
                             max_unit_tokens=cap)
    want_units, want_merges = dynamic_bpe_reference(ids, bounds, 8, max_unit_tokens=cap)
    assert len(want_merges) >= 4
    r = merged.merge
    new_rows = {tuple(int(x) for x in r.new_ids[k, :r.new_len[k]]): k for k in range(int(r.num_new))}
    units, n = np.asarray(merged.units), np.asarray(merged.lengths)
    for row, want in enumerate(want_units):
        got = [(int(u),) if u < v else tuple(int(x) for x in r.new_ids[u - v, :r.new_len[u - v]])
               for u in units[row, :n[row]]]
        assert got == want
        assert all(u - v == new_rows[w] for u, w in zip(units[row, :n[row]], want) if u >= v)
    # the new units' embeddings, computed here from their base ids
    k = int(r.num_new)
    flat = [tuple(int(x) for x in r.new_ids[i, :r.new_len[i]]) for i in range(k)]
    fvt = np.stack([np.asarray(table)[list(f)].mean(axis=0) for f in flat])
    # the host LRU cache embeds the same units from host-built pieces; a repeated batch is all hits
    cache = UnitCache(embedder, hn_params, base, stats, capacity=64)
    width = cap or grid.shape[1]
    from_cache = cache.lookup(flat, width)
    cache.lookup(flat[::-1], width)
    assert (cache.misses, cache.hits) == (k, k)
    if source == "fvt":
        np.testing.assert_allclose(from_cache, fvt, rtol=2e-5, atol=2e-6)
    else:
        assert np.abs(from_cache - fvt).max() > 1e-3  # really another source
    np.testing.assert_allclose(merged.new_embeddings[:k], from_cache, rtol=2e-5, atol=2e-6)
    vec = unit_vectors(merged, table)
    chex.assert_shape(vec, grid.shape + (table.shape[1],))
    # the same batch through the host cache: same units, same embeddings, now all cache hits
    via_cache = merge_with_cache(grid, bnd, lengths, cache, max_merges=8, max_unit_tokens=cap)
    np.testing.assert_array_equal(via_cache.units, merged.units)
    np.testing.assert_allclose(via_cache.new_embeddings[:k], merged.new_embeddings[:k], rtol=2e-5, atol=2e-6)
    assert cache.hits == 2 * k
    rows = [(r, j) for r in range(len(ids)) for j in range(n[r])]
    want_vec = [np.asarray(table)[units[r, j]] if units[r, j] < v else from_cache[units[r, j] - v] for r, j in rows]
    np.testing.assert_allclose(np.asarray(vec)[tuple(np.array(rows).T)], np.stack(want_vec), rtol=2e-5, atol=2e-6)


def test_embedder_for_falls_back_to_fvt_and_loads_a_path(tmp_path):
    said = []
    assert embedder_for("no-such-model", say=lambda *a, **k: said.append(a[0]))[0].name == "fvt"
    assert "FVT" in said[0]
    lm = tiny_llama(tie=True)
    cfg, params = _hypernet(lm)
    hn.save_hypernet(tmp_path / "hn", cfg, params)
    loaded, loaded_params = embedder_for("no-such-model", str(tmp_path / "hn"))
    assert loaded.name == "hypernet" and loaded.config == cfg
    chex.assert_trees_all_close(loaded_params, params, atol=1e-2)  # stored in bf16


def test_minilm_on_merged_batches():
    lm = tiny_bert()
    tok = lm.tokenizer
    ids, bounds = encode_lines(tok.hf, LINES, 30, "word")
    seqs, bnds = with_specials(ids, bounds, tok.bos_id, tok.eos_id)
    assert all(s[0] == tok.bos_id and s[-1] == tok.eos_id and b[0] == b[-1] == -1 for s, b in zip(seqs, bnds))
    grid, bnd, lengths = pad_batch(seqs, bnds)
    base = {"input": lm.params["word_embeddings"]}
    mask = (np.arange(grid.shape[1]) < lengths[:, None]).astype(np.int32)
    plain = jax.jit(sentence_embedding, static_argnums=0)(lm.config, lm.params, grid, mask)
    on_merged = jax.jit(bert_sentence_embeddings, static_argnums=0)
    no_merge = merge_and_embed(grid, bnd, lengths, base, min_count=10**6, embedder=UnitEmbedder(), max_merges=6)
    np.testing.assert_allclose(on_merged(lm.config, lm.params, no_merge), plain, atol=1e-5)
    merged = merge_and_embed(grid, bnd, lengths, base, embedder=UnitEmbedder(), max_merges=6)
    assert int(merged.lengths.sum()) < int(lengths.sum())
    got = np.asarray(on_merged(lm.config, lm.params, merged))
    # CLS/SEP never merge: each sequence still starts and ends with them
    units, n = np.asarray(merged.units), np.asarray(merged.lengths)
    assert all(units[i, 0] == tok.bos_id and units[i, n[i] - 1] == tok.eos_id for i in range(len(seqs)))
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    assert np.abs(got - np.asarray(plain)).max() > 1e-4


def test_decoder_prefill_with_merged_units_is_a_shorter_sequence():
    """Scoring and greedy generation after a merged prefill (KV cache, positions one per unit)
    equal a plain forward over [the prompt's unit vectors, the continuation's embeddings]."""
    lm = tiny_llama(tie=True)
    model = llama.Llama(lm.config)
    # N(0, 0.02) weights barely look at positions: larger q/k make an off-by-one position visible
    blocks = {**lm.params["blocks"], **{k: {"kernel": lm.params["blocks"][k]["kernel"] * 40} for k in ("q", "k")}}
    params = {**lm.params, "blocks": blocks}
    table = params["embedding"]
    ids, bounds = _batch(lm, seq_len=16)
    grid, bnd, lengths = pad_batch(ids, bounds)
    merged = merge_and_embed(grid, bnd, lengths, {"input": table}, embedder=UnitEmbedder(), max_merges=6)
    vec, n = np.asarray(unit_vectors(merged, table)), np.asarray(merged.lengths)
    assert n.sum() < lengths.sum()
    steps = 4
    cont = np.tile(np.asarray([[5, 9, 17, 3]], np.int32), (len(ids), 1))
    cmask = np.ones_like(cont, bool)
    cmask[0, 3] = False
    nll = np.asarray(prefill_and_score(model, params, vec, merged.mask, cont, cmask))
    gen = np.asarray(prefill_and_generate(model, params, vec, merged.mask, steps=steps))
    # the plain forward: row r = [units (n_r), continuation, zeros]; causal, so the zeros after
    # a row's end change nothing before it
    forward = jax.jit(lambda x: jax.nn.log_softmax(model.apply({"params": params}, embeds=x).logits, axis=-1))
    width = grid.shape[1] + steps
    x = np.zeros((len(ids), width, table.shape[1]), np.float32)
    for r in range(len(ids)):
        x[r, :n[r]], x[r, n[r]:n[r] + steps] = vec[r, :n[r]], np.asarray(table)[cont[r]]
    logp = np.asarray(forward(x))
    for r in range(len(ids)):
        want = -sum(logp[r, n[r] - 1 + i, cont[r, i]] for i in range(steps) if cmask[r, i])
        np.testing.assert_allclose(nll[r], want, rtol=1e-4)
    greedy = np.zeros((len(ids), steps), np.int32)  # greedy decoding, one plain forward per token
    for i in range(steps):
        logp = np.asarray(forward(x))
        for r in range(len(ids)):
            greedy[r, i] = logp[r, n[r] - 1 + i].argmax()
            x[r, n[r] + i] = np.asarray(table)[greedy[r, i]]
    np.testing.assert_array_equal(gen, greedy)
