"""The ZeTT hypernetwork on tiny models: the residual form starts at the first piece's embedding,
without it the identity objective learns the base embeddings back, only hypernetwork parameters
train, the sharded step equals the single-device one, batches (tokenizer included) are a function
of the step alone, and saved weights load back (bad folders refused)."""

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _tolerance import assert_close_at_scale, reduction_rtol
from _transfer_models import ENGLISH, GERMAN, tiny_llama
from flax import linen as nn

from jaxtok.models import llama
from jaxtok.sharding import make_mesh
from jaxtok.train import hypernet as hn_train
from jaxtok.train.trainer import OptimizerConfig, Trainer
from jaxtok.transfer import hypernet as hn
from jaxtok.transfer.decompose import TransferError
from jaxtok.transfer.sampler import SamplerConfig

SAMPLER = SamplerConfig(vocab_range=(100, 200), max_len=8, max_word=16)


def small_config(lm, **kw) -> hn.HypernetConfig:
    tables = hn_train.base_tables(lm.config, lm.params)
    fields = {"d_model": 32, "n_layers": 2, "n_heads": 4, "chunk": 64, **kw}
    return hn.for_base(hn.HypernetConfig(embed_dim=0, **fields), tables)


@pytest.mark.parametrize("tie", [True, False])
def test_residual_prediction_at_init_is_the_first_piece(tie):
    lm = tiny_llama(tie=tie)
    cfg = small_config(lm)
    tables = hn_train.base_tables(lm.config, lm.params)
    params = nn.unbox(hn.init_params(cfg, jax.random.key(0)))
    rng = np.random.default_rng(0)
    pieces = rng.integers(0, lm.config.vocab_size, (150, cfg.max_pieces)).astype(np.int32)
    mask = np.arange(cfg.max_pieces)[None] < rng.integers(1, cfg.max_pieces + 1, (150, 1))
    out = jax.jit(lambda p: hn.predict(cfg, p, pieces, mask, tables, hn.embedding_stats(tables)))(params)
    assert set(out) == ({"input"} if tie else {"input", "output"})
    for role, table in tables.items():
        chex.assert_shape(out[role], (150, lm.config.d_model))
        np.testing.assert_array_equal(out[role], np.asarray(table)[pieces[:, 0]])


def test_identity_objective_learns_the_base_embeddings_without_the_residual():
    """Each base token as its own single piece -> its base embedding: from the mean (the
    non-residual start) to within 5% of the embeddings' scale in 300 Adam steps."""
    lm = tiny_llama(tie=True)
    cfg = small_config(lm, residual=False, n_layers=1, d_model=64)
    tables = hn_train.base_tables(lm.config, lm.params)
    stats = hn.embedding_stats(tables)
    v = lm.config.vocab_size
    pieces, mask = np.arange(v, dtype=np.int32)[:, None], np.ones((v, 1), bool)
    target = tables["input"]

    def loss(p):
        pred = hn.predict(cfg, p, pieces, mask, tables, stats)["input"]
        return jnp.mean(jnp.sum(jnp.square(pred - target), -1)) / jnp.mean(jnp.sum(jnp.square(target), -1))

    opt = optax.adam(3e-3)
    params = nn.unbox(hn.init_params(cfg, jax.random.key(0)))
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        value, grads = jax.value_and_grad(loss)(params)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(params, updates), state, value

    first = float(loss(params))
    for _ in range(300):
        params, state, value = step(params, state)
    assert first > 0.9  # the mean is no answer: relative error ~1 at the start
    assert float(value) < 0.05 ** 2, float(value)


def _task_and_frozen(lm, cfg):
    module = llama.Llama(lm.config)
    axes = nn.get_partition_spec(jax.eval_shape(lambda: llama.init_params(lm.config, jax.random.key(0))))
    return hn_train.hypernet_task(cfg, module, axes), hn_train.frozen_state(lm.config, lm.params)


def _steps(mesh_shape, lm, cfg, batches):
    task, frozen = _task_and_frozen(lm, cfg)
    devices = jax.devices()[:1] if mesh_shape is None else None
    opt = OptimizerConfig(lr=1e-3, warmup_steps=0, weight_decay=0.01, clip_norm=0.1, eps=1e-3)
    trainer = Trainer(task, opt, make_mesh(mesh_shape, devices), total_steps=10)
    trainer.set_frozen(frozen)
    state = trainer.init_state(jax.random.key(0))
    history = []
    for batch in batches:
        state, metrics = trainer.train_step(state, trainer.device_batch(batch))
        history.append(jax.device_get(metrics))
    return jax.device_get(state.params), history


@pytest.fixture(scope="module")
def untied_run():
    lm = tiny_llama(tie=False)
    cfg = small_config(lm)
    data = hn_train.HypernetBatches(ENGLISH + GERMAN, lm.tokenizer, cfg, SAMPLER, rows=8, seq_len=16, queue=1, seed=0)
    batches = [data.batch(0), data.batch(1)]
    return lm, cfg, batches, _steps(None, lm, cfg, batches)


def test_only_hypernetwork_parameters_train_and_every_one_gets_a_gradient(untied_run):
    lm, cfg, batches, (params, history) = untied_run
    task, frozen = _task_and_frozen(lm, cfg)
    init = nn.unbox(hn.init_params(cfg, jax.random.key(0)))
    grad_fn = jax.jit(jax.grad(lambda p, f, b: task.objective(p, b, None, f)[0]))
    grads = grad_fn(init, frozen, batches[0])
    assert jax.tree.structure(grads) == jax.tree.structure(init)  # the frozen LM is not differentiated
    # the zero-initialised heads get a gradient at once; the layers below them only after the
    # heads moved (their gradient flows through the heads' weights), so check after two steps
    grads2 = grad_fn(params, frozen, batches[1])
    norms = {jax.tree_util.keystr(k): float(jnp.abs(g).max()) for k, g in jax.tree_util.tree_leaves_with_path(grads2)}
    assert all(n > 0 for n in norms.values()), {k: n for k, n in norms.items() if n == 0}
    assert all(np.isfinite(h["loss"]) for h in history)


def test_sharded_step_equals_single_device(untied_run):
    lm, cfg, batches, (params, history) = untied_run
    sharded_params, sharded_history = _steps("data=2,fsdp=4", lm, cfg, batches)
    for h, ref in zip(sharded_history, history):
        assert_close_at_scale(h["loss"], ref["loss"], rtol=reduction_rtol(2048))
    # two Adam steps of lr 1e-3 move a parameter by at most ~2e-3: compare at that scale
    for got, want in zip(jax.tree.leaves(sharded_params), jax.tree.leaves(params)):
        np.testing.assert_allclose(got, want, atol=2e-3 * 5e-3)


def test_batches_are_a_function_of_the_step():
    """Resume exactness: a fresh iterator set to step k gives exactly batch k (tokenizer, queue
    and noise included), whatever was drawn before."""
    lm = tiny_llama(tie=True)
    cfg = small_config(lm)
    make = lambda: hn_train.HypernetBatches(ENGLISH + GERMAN, lm.tokenizer, cfg, SAMPLER, rows=2, seq_len=16,
                                            queue=2, seed=3)
    first = make()
    run = [next(first) for _ in range(4)]
    resumed = make()
    resumed.set_state({"step": 2})
    for want in run[2:]:
        got = next(resumed)
        chex.assert_trees_all_equal(got, want)
    assert first.get_state() == {"step": 4}
    # different steps sample different tokenizers
    assert not np.array_equal(run[0]["pieces"], run[1]["pieces"])


def test_batch_fields_are_consistent():
    lm = tiny_llama(tie=True)
    cfg = small_config(lm)
    data = hn_train.HypernetBatches(ENGLISH + GERMAN, lm.tokenizer, cfg, SAMPLER, rows=2, seq_len=16, queue=0, seed=0)
    b = data.batch(0)
    v = int(b["valid"].sum())
    assert b["tokens"].max() < v and b["targets"].max() < v  # every id inside the sampled vocabulary
    assert not b["piece_mask"][v:].any() and (b["copied"][v:] == -1).all()
    assert (b["copied"] >= 0).sum() >= 1  # <|endoftext|> maps to the base's special token
    assert (b["num_bytes"] > 0).all()


def test_saved_weights_load_back_and_bad_folders_are_refused(tmp_path):
    lm = tiny_llama(tie=True)
    cfg = small_config(lm)
    params = nn.unbox(hn.init_params(cfg, jax.random.key(1)))
    out = hn.save_hypernet(tmp_path / "hn", cfg, params, {"base_model": "tiny"})
    config, loaded, meta = hn.load_hypernet(out)
    assert config == cfg and meta["base_model"] == "tiny"
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):  # bf16 on disk
        np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-6)
    with pytest.raises(FileExistsError, match="not empty"):
        hn.save_hypernet(out, cfg, params)
    assert (out / "model.safetensors").is_file()  # the refused save left the folder alone
    meta_path = out / "config.json"
    wrong = json.loads(meta_path.read_text())
    wrong["hypernet"]["d_model"] = 64
    meta_path.write_text(json.dumps(wrong))
    with pytest.raises(ValueError, match="does not fit its config"):
        hn.load_hypernet(out)
    (out / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        hn.load_hypernet(out)
    with pytest.raises(FileNotFoundError, match="not a hypernetwork folder"):
        hn.load_hypernet(tmp_path)


def test_length_buckets_give_the_unbucketed_prediction():
    lm = tiny_llama(tie=False)
    cfg = small_config(lm)
    tables = hn_train.base_tables(lm.config, lm.params)
    stats = hn.embedding_stats(tables)
    params = jax.tree.map(lambda x: x + 0.05, nn.unbox(hn.init_params(cfg, jax.random.key(0))))  # heads nonzero
    rng = np.random.default_rng(1)
    counts = rng.choice([1, 2, 3, 5, 7], size=96, p=[0.3, 0.3, 0.2, 0.1, 0.1])
    pieces = rng.integers(0, lm.config.vocab_size, (96, cfg.max_pieces)).astype(np.int32)
    mask = np.arange(cfg.max_pieces)[None] < counts[:, None]
    order = np.argsort(counts, kind="stable").astype(np.int32)
    rows = int((counts <= 3).sum()) // 8 * 8
    plain = hn.predict(cfg, params, pieces, mask, tables, stats)
    bucketed = jax.jit(lambda p: hn.predict(cfg, p, pieces, mask, tables, stats, order=order, short=(rows, 3)))(params)
    for role in plain:
        np.testing.assert_allclose(bucketed[role], plain[role], rtol=1e-5, atol=1e-6)


def test_resumed_run_reproduces_the_uninterrupted_losses(tmp_path):
    """train-hypernet's job: 4 steps at once == 2 steps, stop, resume to 4 (checkpoint, data
    position, sampled tokenizers); the run exports weights that load and act as a method."""
    lm = tiny_llama(tie=True)
    docs, held = ENGLISH + GERMAN, GERMAN[:2]
    base = dataclasses.replace(hn_train.tiny(), steps=4, eval_every=0, checkpoint_every=2, progress=False)
    # the three runs compile the same step: a persistent cache for this test lets two of them load it
    saved = {k: getattr(jax.config, k) for k in ("jax_compilation_cache_dir",
                                                  "jax_persistent_cache_min_compile_time_secs")}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    try:
        _resume_runs(tmp_path, lm, docs, held, base)
    finally:
        for k, v in saved.items():
            jax.config.update(k, v)


def _resume_runs(tmp_path, lm, docs, held, base):
    from jaxtok.train.observe import read_metrics
    from jaxtok.transfer import transfer

    def losses(run_dir):
        return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("split") == "train"]

    whole = hn_train.run(dataclasses.replace(base, run_dir=str(tmp_path / "a")), base=lm, documents=docs,
                         held_out=held, devices=jax.devices()[:1])
    hn_train.run(dataclasses.replace(base, run_dir=str(tmp_path / "b"), steps=2), base=lm, documents=docs,
                 held_out=held, devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="already holds checkpoints"):
        hn_train.run(dataclasses.replace(base, run_dir=str(tmp_path / "b")), base=lm, documents=docs,
                     held_out=held, devices=jax.devices()[:1])
    # --export-only: the latest checkpoint's weights, nothing trained
    exported = hn_train.run(dataclasses.replace(base, run_dir=str(tmp_path / "b")), base=lm, documents=docs,
                            held_out=held, devices=jax.devices()[:1], resume=True, export_only=True)
    at_two = hn.load_hypernet(exported.weights)
    assert at_two[2]["steps"] == 2 and len(losses(tmp_path / "b")) == 2
    with pytest.raises(FileNotFoundError, match="no checkpoint to export"):
        hn_train.run(dataclasses.replace(base, run_dir=str(tmp_path / "c")), base=lm, documents=docs,
                     held_out=held, devices=jax.devices()[:1], resume=True, export_only=True)
    hn_train.run(dataclasses.replace(base, run_dir=str(tmp_path / "b")), base=lm, documents=docs, held_out=held,
                 devices=jax.devices()[:1], resume=True)
    np.testing.assert_array_equal(losses(tmp_path / "b"), losses(tmp_path / "a"))
    # --export-step: an older checkpoint's weights, as they were exported when it was the latest
    again = hn_train.run(dataclasses.replace(base, run_dir=str(tmp_path / "b")), base=lm, documents=docs,
                         held_out=held, devices=jax.devices()[:1], resume=True, export_only=True, export_step=2)
    older = hn.load_hypernet(again.weights)
    assert older[2]["steps"] == 2
    chex.assert_trees_all_equal(older[1], at_two[1])
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(older[1]),
                                                         jax.tree.leaves(hn.load_hypernet(whole.weights)[1])))
    with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 3 \(saved: \[2, 4\]\)"):
        hn_train.run(dataclasses.replace(base, run_dir=str(tmp_path / "b")), base=lm, documents=docs,
                     held_out=held, devices=jax.devices()[:1], resume=True, export_only=True, export_step=3)
    # --init-from: a fresh run from the step-2 export reads the text of steps 2 and 3, so its first
    # loss is the uninterrupted run's third (up to the bf16 export); 2 + 2 steps behind its weights
    warm = hn_train.run(dataclasses.replace(base, run_dir=str(tmp_path / "d"), steps=2, init_from=str(again.weights)),
                        base=lm, documents=docs, held_out=held, devices=jax.devices()[:1])
    first, uninterrupted = losses(tmp_path / "d")[0], losses(tmp_path / "a")
    assert abs(first - uninterrupted[2]) < 0.1 * min(abs(first - uninterrupted[0]), abs(first - uninterrupted[1]))
    assert hn.load_hypernet(warm.weights)[2]["steps"] == 4 and hn.load_hypernet(whole.weights)[2]["steps"] == 4
    record = json.loads((tmp_path / "d" / hn_train.WARM_START_FILE).read_text())
    assert record == {"from": str(again.weights), "steps": 2, "sha256": hn_train.weights_digest(again.weights)}
    # its checkpoint exports as 4 steps too (the data position, not the optimizer's count); the record stays
    hn_train.run(dataclasses.replace(base, run_dir=str(tmp_path / "d"), steps=2), base=lm, documents=docs,
                 held_out=held, devices=jax.devices()[:1], resume=True, export_only=True)
    assert hn.load_hypernet(warm.weights)[2]["steps"] == 4
    assert json.loads((tmp_path / "d" / hn_train.WARM_START_FILE).read_text()) == record
    other = hn.save_hypernet(tmp_path / "deeper", dataclasses.replace(older[0], n_layers=2),
                             hn.init_params(dataclasses.replace(older[0], n_layers=2), jax.random.key(0)))
    with pytest.raises(ValueError, match="does not fit this run's hypernetwork: n_layers 2 there, 1 here"):
        hn_train.run(dataclasses.replace(base, run_dir=str(tmp_path / "e"), init_from=str(other)), base=lm,
                     documents=docs, held_out=held, devices=jax.devices()[:1])
    # the exported weights are the method `hypernet`: specials copied, every row predicted
    new_tok = __import__("_transfer_models").german_tokenizer()
    moved = transfer(lm, new_tok, "hypernet", [f"path={whole.weights}"], keep_chat_template=False)
    assert moved.config.vocab_size == new_tok.get_vocab_size()
    assert np.isfinite(np.asarray(moved.params["embedding"])).all()
    # copy_overlap: the tokens the base has verbatim take its rows, every other row is unchanged
    copied = transfer(lm, new_tok, "hypernet", [f"path={whole.weights}", "copy_overlap=true"],
                      keep_chat_template=False)
    base_vocab = lm.tokenizer.hf.get_vocab()
    specials = {t.content for t in new_tok.get_added_tokens_decoder().values()}
    same = {i: base_vocab[t] for t, i in new_tok.get_vocab().items() if t in base_vocab and t not in specials}
    new_rows, old_rows = np.asarray(copied.params["embedding"]), np.asarray(moved.params["embedding"])
    base_rows = np.asarray(lm.params["embedding"], np.float32)
    assert len(same) > 10
    np.testing.assert_allclose(new_rows[list(same)], base_rows[list(same.values())], rtol=1e-6)
    others = np.setdiff1d(np.arange(len(new_rows)), list(same))
    np.testing.assert_array_equal(new_rows[others], old_rows[others])
    assert not np.allclose(old_rows[list(same)], new_rows[list(same)])
    with pytest.raises(TransferError, match="copy_overlap: expected true or false"):
        transfer(lm, new_tok, "hypernet", [f"path={whole.weights}", "copy_overlap=maybe"])


# ---------------------------------------------------------------------------------------------
# The encoder (MiniLM-like): sentence-embedding distillation


def test_sentence_rows_embed_the_same_text_under_both_tokenizers():
    from _transfer_models import tiny_bert

    enc = tiny_bert()
    tok = __import__("_transfer_models").german_tokenizer()  # byte-level BPE: another segmentation
    specials = hn_train.special_strings(enc.tokenizer)
    tok.add_special_tokens(specials)
    texts = [GERMAN[0], ENGLISH[0] * 3, "kurz"]
    seq_len = 24
    rows = hn_train.sentence_rows(texts, tok, enc.tokenizer, seq_len)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    for r, text in enumerate(texts):
        n, nb = int(rows["mask"][r].sum()), int(rows["base_mask"][r].sum())
        assert n <= seq_len and nb <= seq_len
        assert rows["tokens"][r, 0] == cls and rows["tokens"][r, n - 1] == sep
        base_row = rows["base_tokens"][r]
        assert base_row[0] == enc.tokenizer.bos_id and base_row[nb - 1] == enc.tokenizer.eos_id
        covered = tok.decode(rows["tokens"][r, 1:n - 1].tolist())
        assert text.startswith(covered)  # a prefix of the text ...
        base_covered = enc.tokenizer.hf.decode(rows["base_tokens"][r, 1:nb - 1].tolist())
        # ... the same one under the (lower-casing, space-normalising) base tokenizer
        assert base_covered.replace(" ", "") == enc.tokenizer.hf.decode(
            enc.tokenizer.hf.encode(covered, add_special_tokens=False).ids).replace(" ", "")
    assert tok.decode(rows["tokens"][2, 1:int(rows["mask"][2].sum()) - 1].tolist()) == "kurz"  # short: whole
    assert int(rows["mask"][1].sum()) == seq_len or int(rows["base_mask"][1].sum()) == seq_len  # long: cut


def _bert_task(enc, cfg):
    from jaxtok.models import bert

    module = bert.Bert(enc.config)
    axes = nn.get_partition_spec(jax.eval_shape(lambda: bert.init_params(enc.config, jax.random.key(0))))
    return hn_train.distill_task(cfg, module, axes), hn_train.frozen_state(enc.config, enc.params)


def test_distillation_is_exact_on_the_base_tokenizer_and_trains_on_a_new_one():
    """Known value: with the base tokenizer as the 'sampled' one, every token is its own single
    piece, the residual hypernetwork at init returns the base embeddings, and the student is the
    teacher: cosine 1, MSE 0, auxiliary loss 0. Under another tokenizer the loss is positive and
    a few steps lower it."""
    from _transfer_models import tiny_bert

    enc = tiny_bert()
    cfg = small_config(enc)
    task, frozen = _bert_task(enc, cfg)
    init = nn.unbox(hn.init_params(cfg, jax.random.key(0)))
    capacity = 512
    vocab, _ = hn_train.vocabulary_arrays(enc.tokenizer.hf, enc.tokenizer, cfg, capacity)
    del vocab["truncated"]
    same = {**vocab, **hn_train.sentence_rows(ENGLISH[:4], enc.tokenizer.hf, enc.tokenizer, 32),
            "truncated": np.zeros(4, np.float32)}
    np.testing.assert_array_equal(same["tokens"], same["base_tokens"])
    loss, metrics = jax.jit(lambda p, b, f: task.objective(p, b, None, f))(init, same, frozen)
    np.testing.assert_allclose(metrics["cosine"] / metrics["weight"], 1.0, atol=1e-5)
    np.testing.assert_allclose([loss, metrics["mse"], metrics["aux_loss"]], 0.0, atol=1e-5)

    data = hn_train.HypernetBatches(ENGLISH + GERMAN, enc.tokenizer, cfg, SAMPLER, rows=8, seq_len=24, queue=0,
                                    seed=0, sentences=True)
    batch = data.batch(0)
    opt = OptimizerConfig(lr=3e-3, warmup_steps=0, weight_decay=0.0, clip_norm=1.0)
    trainer = Trainer(task, opt, make_mesh(None, jax.devices()[:1]), total_steps=30)
    trainer.set_frozen(frozen)
    state = trainer.init_state(jax.random.key(0))
    losses = []
    for _ in range(15):
        state, m = trainer.train_step(state, trainer.device_batch(batch))
        losses.append(float(m["loss"]))
        assert 0.0 < float(m["cosine"]) <= 1.0  # logged as a mean per row
    assert losses[0] > 0.0 and losses[-1] < 0.8 * losses[0], losses
