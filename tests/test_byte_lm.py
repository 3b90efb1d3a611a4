"""Word-pooled byte LM: packing of words, no leaks through padding or across words/documents,
cached generation against the uncached definition, sharding, and the pretrain/generate path."""

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxtok.data.words import expand, pack_word_documents
from jaxtok.models import byte_lm
from jaxtok.models.byte_lm import EOW, ByteLM, ByteLMConfig
from jaxtok.sharding import PARAM_RULES, make_mesh, tree_shardings

CFG = ByteLMConfig(max_word_bytes=8, prefix_slots=2, d_model=32, n_layers=1, n_heads=2, head_dim=16, d_ff=64,
                   byte_d_model=32, encoder_layers=1, decoder_layers=1, byte_heads=2, byte_head_dim=16,
                   byte_d_ff=64, max_seq_len=64)
DOCS = ["def f(x):\n    return x", "naïve café 👍🏽 ok", "東京 is big."]


@pytest.fixture(scope="module")
def params():
    return nn.unbox(byte_lm.init_params(CFG, jax.random.key(0)))


def batch_of(docs, seq_words=12):
    rows, table = pack_word_documents(docs, seq_words, CFG.max_word_bytes)
    return {k: jnp.asarray(v) for k, v in expand(rows, *table.arrays()).items()}, rows, table


@jax.jit
def logits_of(params, batch):
    return ByteLM(CFG).apply({"params": params}, batch["in_bytes"], batch["in_lens"], batch["tgt_bytes"],
                             batch["tgt_lens"], segment_ids=batch["segment_ids"],
                             positions=batch["positions"]).logits


def scored(batch):
    _, mask = byte_lm.word_targets(batch["tgt_bytes"], batch["tgt_lens"])
    return np.asarray(mask * (batch["loss_mask"][..., None] > 0)) > 0


def test_packing_counts_every_byte_once():
    docs = DOCS + ["x" * 30]  # a word longer than the cap is cut into 8-byte pieces
    batch, rows, table = batch_of(docs, seq_words=5)  # documents run over several rows
    assert int(batch["num_bytes"].sum()) == sum(len(d.encode()) for d in docs)
    # the targets of each document, in order, rejoin to it (BOS predicts the first word)
    words = [w for w in table.words]
    flat = [(int(s), words[t]) for r in range(len(rows["targets"])) for s, t, m in
            zip(rows["segment_ids"][r], rows["targets"][r], rows["loss_mask"][r]) if m]
    assert b"".join(w for _, w in flat) == "".join(docs).encode()
    assert int(batch["tgt_lens"].max()) <= CFG.max_word_bytes
    # padding words (a short document does not start in a row it would not fit): segment 0, not scored
    batch, _, _ = batch_of(DOCS, seq_words=12)
    pad = np.asarray(batch["segment_ids"]) == 0
    assert pad.any() and not np.asarray(batch["loss_mask"])[pad].any()


def test_padding_bytes_change_no_logit(params):
    batch, _, _ = batch_of(DOCS)
    want = logits_of(params, batch)
    rng = np.random.default_rng(0)
    noisy = dict(batch)
    for key, lens in (("in_bytes", "in_lens"), ("tgt_bytes", "tgt_lens")):
        data = np.array(batch[key])
        beyond = np.arange(CFG.max_word_bytes) >= np.asarray(batch[lens])[..., None]
        pad_word = (np.asarray(batch["segment_ids"]) == 0)[..., None]
        junk = rng.integers(1, 256, data.shape)
        noisy[key] = jnp.asarray(np.where(beyond | pad_word, junk, data))
    noisy["in_lens"] = jnp.where(batch["segment_ids"] == 0, 5, batch["in_lens"])  # padding words "hold" bytes
    got = logits_of(params, noisy)
    assert not np.array_equal(np.asarray(noisy["in_bytes"]), np.asarray(batch["in_bytes"]))
    mask = scored(batch)
    np.testing.assert_array_equal(np.asarray(got)[mask], np.asarray(want)[mask])


def test_no_attention_across_documents_or_into_later_words(params):
    together, _, _ = batch_of(DOCS[:2], seq_words=24)  # both documents in one row
    alone, _, _ = batch_of(DOCS[1:2], seq_words=24)
    seg = np.asarray(together["segment_ids"][0])
    second = seg == 2
    n = int(second.sum())
    got = np.asarray(logits_of(params, together))[0, second]
    want = np.asarray(logits_of(params, alone))[0, :n]
    m = scored(alone)[0, :n]
    np.testing.assert_allclose(got[m], want[m], atol=1e-5)
    # a word changed: no earlier word's prediction moves, and the other document's does not
    changed = dict(together)
    j = int(np.flatnonzero(second)[3])
    changed["in_bytes"] = together["in_bytes"].at[0, j, 0].set(ord("Z"))
    after = np.asarray(logits_of(params, changed))[0]
    before = np.asarray(logits_of(params, together))[0]
    keep = np.arange(len(seg)) < j
    np.testing.assert_array_equal(after[keep], before[keep])
    assert not np.allclose(after[j], before[j])  # the changed word does matter where it may


def test_loss_is_per_symbol_with_eow(params):
    batch, _, _ = batch_of(DOCS)
    loss, metrics = byte_lm.objective(ByteLM(CFG))(params, batch, None)
    targets, mask = byte_lm.word_targets(batch["tgt_bytes"], batch["tgt_lens"])
    words = int(batch["loss_mask"].sum())
    assert float(metrics["weight"]) == float(batch["num_bytes"].sum()) + words  # bytes + one EOW each
    assert int((np.asarray(targets) == EOW)[scored(batch)].sum()) == words
    # an untrained model is near uniform over the 257 symbols
    assert abs(float(loss) - math.log(257)) < 0.3


def test_cached_generation_equals_uncached(params):
    model = ByteLM(CFG)
    prompts = [b"def f(x):", b"caf\xc3\xa9 "]
    got = byte_lm.generate_bytes(model, params, [list(p) for p in prompts], max_new_bytes=14)
    for prompt, row in zip(prompts, got):
        words = byte_lm.generate_uncached(model, params, list(prompt), 14)
        want = b"".join(words)[:14]
        assert bytes(row) == want
        assert len(row) == 14
    with pytest.raises(ValueError, match="UTF-8"):
        byte_lm.generate_bytes(model, params, [[0xff]], max_new_bytes=2)


def test_sharded_forward_equals_single_device(params):
    batch, _, _ = batch_of(DOCS)
    want = logits_of(params, batch)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
    boxed = jax.eval_shape(lambda k: byte_lm.init_params(CFG, k), jax.random.key(0))
    shardings = tree_shardings(params, nn.get_partition_spec(boxed), mesh, PARAM_RULES)
    assert shardings["word_lm"]["blocks"]["q"]["kernel"].spec[2] == "tensor"  # (layers, embed, heads, head_dim)
    with jax.set_mesh(mesh):
        got = logits_of(jax.device_put(params, shardings), batch)
    chex.assert_trees_all_close(np.asarray(got), np.asarray(want), atol=2e-5)


def test_config_checks_and_counts(params):
    assert CFG.num_params() == sum(x.size for x in jax.tree.leaves(params))
    assert CFG.flops_per_word() > 6 * CFG.num_params()  # every word runs p + L byte slots
    with pytest.raises(ValueError, match="max_word_bytes"):
        ByteLMConfig(max_word_bytes=3)
    with pytest.raises(ValueError, match="prefix_slots"):
        dataclasses.replace(CFG, prefix_slots=0)
