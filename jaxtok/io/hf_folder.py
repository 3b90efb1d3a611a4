"""Hugging Face model folders (config.json + model.safetensors + tokenizer.json) as jaxtok LMs.

Loading dispatches on ``model_type`` through ``HF_FAMILIES`` (llama -> ``Llama``, bert ->
``Bert``); each family knows its tensor names both ways, so ``jaxtok.transfer.export`` writes
exactly what this module reads and what transformers' ``LlamaForCausalLM`` / ``BertModel`` load.
Layouts: HF Linear weights are (out, in); jaxtok kernels are (in, *out) with heads split out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxtok.io.cache import ModelFileError, read_json, require_file
from jaxtok.io.gguf_io import LoadedLM
from jaxtok.models.bert import BertConfig
from jaxtok.models.llama import LlamaConfig
from jaxtok.tokenization import TextTokenizer, load_tokenizer_json

TRANSFER_RECORD = "transfer.json"


# ---------------------------------------------------------------------------------------------
# Llama


def llama_config_to_hf(c: LlamaConfig) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
        "hidden_size": c.d_model, "intermediate_size": c.d_ff, "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim,
        "hidden_act": "silu", "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.rms_eps,
        "rope_theta": c.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "tie_word_embeddings": c.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "torch_dtype": "float32", "dtype": "float32",
    }


def llama_config_from_hf(raw: Mapping[str, Any], path: Path) -> LlamaConfig:
    try:
        theta = raw.get("rope_theta") or (raw.get("rope_parameters") or {}).get("rope_theta", 10_000.0)
        heads = raw["num_attention_heads"]
        return LlamaConfig(
            vocab_size=raw["vocab_size"], d_model=raw["hidden_size"], n_layers=raw["num_hidden_layers"],
            n_heads=heads, n_kv_heads=raw.get("num_key_value_heads", heads),
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads, d_ff=raw["intermediate_size"],
            rope_theta=float(theta), rms_eps=raw.get("rms_norm_eps", 1e-6),
            max_seq_len=raw.get("max_position_embeddings", 2048),
            tie_embeddings=raw.get("tie_word_embeddings", False))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: not a usable Llama config ({exc!r})") from exc


def llama_tensors(c: LlamaConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """jaxtok Llama parameters -> HF ``LlamaForCausalLM`` state dict (numpy, float32)."""
    a = lambda x: np.asarray(x, np.float32)
    d, hd = c.d_model, c.head_dim
    blocks = params["blocks"]
    out = {"model.embed_tokens.weight": a(params["embedding"]), "model.norm.weight": a(params["final_norm"]["scale"])}
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = a(blocks["q"]["kernel"][i]).reshape(d, c.n_heads * hd).T
        out[p + "self_attn.k_proj.weight"] = a(blocks["k"]["kernel"][i]).reshape(d, c.n_kv_heads * hd).T
        out[p + "self_attn.v_proj.weight"] = a(blocks["v"]["kernel"][i]).reshape(d, c.n_kv_heads * hd).T
        out[p + "self_attn.o_proj.weight"] = a(blocks["o"]["kernel"][i]).reshape(c.n_heads * hd, d).T
        out[p + "mlp.gate_proj.weight"] = a(blocks["gate"]["kernel"][i]).T
        out[p + "mlp.up_proj.weight"] = a(blocks["up"]["kernel"][i]).T
        out[p + "mlp.down_proj.weight"] = a(blocks["down"]["kernel"][i]).T
        out[p + "input_layernorm.weight"] = a(blocks["attn_norm"]["scale"][i])
        out[p + "post_attention_layernorm.weight"] = a(blocks["mlp_norm"]["scale"][i])
    if not c.tie_embeddings:
        out["lm_head.weight"] = a(params["lm_head"])
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def llama_params(c: LlamaConfig, tensors: Mapping[str, np.ndarray], path: Path) -> dict[str, Any]:
    """HF ``LlamaForCausalLM`` state dict -> jaxtok Llama parameters (layers stacked)."""
    d, hd = c.d_model, c.head_dim

    def get(name, shape):
        if name not in tensors:
            raise ModelFileError(f"{path}: tensor {name!r} is missing")
        t = np.asarray(tensors[name], np.float32)
        if t.shape != shape:
            raise ModelFileError(f"{path}: tensor {name!r} has shape {t.shape}, config.json implies {shape}")
        return t

    layer = {
        "q": ("self_attn.q_proj.weight", (c.n_heads * hd, d), lambda w: w.T.reshape(d, c.n_heads, hd)),
        "k": ("self_attn.k_proj.weight", (c.n_kv_heads * hd, d), lambda w: w.T.reshape(d, c.n_kv_heads, hd)),
        "v": ("self_attn.v_proj.weight", (c.n_kv_heads * hd, d), lambda w: w.T.reshape(d, c.n_kv_heads, hd)),
        "o": ("self_attn.o_proj.weight", (d, c.n_heads * hd), lambda w: w.T.reshape(c.n_heads, hd, d)),
        "gate": ("mlp.gate_proj.weight", (c.d_ff, d), lambda w: w.T),
        "up": ("mlp.up_proj.weight", (c.d_ff, d), lambda w: w.T),
        "down": ("mlp.down_proj.weight", (d, c.d_ff), lambda w: w.T),
        "attn_norm": ("input_layernorm.weight", (d,), lambda w: w),
        "mlp_norm": ("post_attention_layernorm.weight", (d,), lambda w: w),
    }
    blocks = {}
    for key, (name, shape, fn) in layer.items():
        stacked = np.stack([fn(get(f"model.layers.{i}.{name}", shape)) for i in range(c.n_layers)])
        blocks[key] = {"scale" if key.endswith("norm") else "kernel": stacked}
    params = {"embedding": get("model.embed_tokens.weight", (c.vocab_size, d)), "blocks": blocks,
              "final_norm": {"scale": get("model.norm.weight", (d,))}}
    if not c.tie_embeddings:
        params["lm_head"] = get("lm_head.weight", (c.vocab_size, d))
    return params


# ---------------------------------------------------------------------------------------------
# BERT (the reading side is jaxtok.io.safetensors_io)


def bert_config_to_hf(c: BertConfig) -> dict[str, Any]:
    return {
        "architectures": ["BertModel"], "model_type": "bert", "vocab_size": c.vocab_size,
        "hidden_size": c.d_model, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
        "intermediate_size": c.d_ff, "max_position_embeddings": c.max_positions,
        "type_vocab_size": c.type_vocab_size, "layer_norm_eps": c.layer_norm_eps, "hidden_act": "gelu",
        "position_embedding_type": "absolute", "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0, "torch_dtype": "float32", "dtype": "float32",
    }


def bert_tensors(c: BertConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """jaxtok Bert parameters -> HF ``BertModel`` state dict (no pooler: jaxtok mean-pools)."""
    a = lambda x: np.asarray(x, np.float32)
    d, f = c.d_model, c.d_ff
    layers = params["layers"]
    out = {"embeddings.word_embeddings.weight": a(params["word_embeddings"]),
           "embeddings.position_embeddings.weight": a(params["position_embeddings"]),
           "embeddings.token_type_embeddings.weight": a(params["token_type_embeddings"]),
           "embeddings.LayerNorm.weight": a(params["embed_norm"]["scale"]),
           "embeddings.LayerNorm.bias": a(params["embed_norm"]["bias"])}
    for i in range(c.n_layers):
        p = f"encoder.layer.{i}."
        for hf_name, key in (("query", "q"), ("key", "k"), ("value", "v")):
            out[p + f"attention.self.{hf_name}.weight"] = a(layers[key]["kernel"][i]).reshape(d, d).T
            out[p + f"attention.self.{hf_name}.bias"] = a(layers[key]["bias"][i]).reshape(d)
        out[p + "attention.output.dense.weight"] = a(layers["o"]["kernel"][i]).reshape(d, d).T
        out[p + "attention.output.dense.bias"] = a(layers["o"]["bias"][i])
        out[p + "attention.output.LayerNorm.weight"] = a(layers["attn_norm"]["scale"][i])
        out[p + "attention.output.LayerNorm.bias"] = a(layers["attn_norm"]["bias"][i])
        out[p + "intermediate.dense.weight"] = a(layers["up"]["kernel"][i]).reshape(d, f).T
        out[p + "intermediate.dense.bias"] = a(layers["up"]["bias"][i])
        out[p + "output.dense.weight"] = a(layers["down"]["kernel"][i]).reshape(f, d).T
        out[p + "output.dense.bias"] = a(layers["down"]["bias"][i])
        out[p + "output.LayerNorm.weight"] = a(layers["mlp_norm"]["scale"][i])
        out[p + "output.LayerNorm.bias"] = a(layers["mlp_norm"]["bias"][i])
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# Families and loading


@dataclasses.dataclass(frozen=True)
class HFFamily:
    """How one ``model_type`` maps between a jaxtok config/params and an HF folder."""

    config_cls: type
    config_to_hf: Callable[[Any], dict[str, Any]]
    to_tensors: Callable[[Any, Mapping[str, Any]], dict[str, np.ndarray]]
    load: Callable[[Path], tuple[Any, dict[str, Any]]]


def _load_llama(folder: Path) -> tuple[LlamaConfig, dict[str, Any]]:
    from jaxtok.io.safetensors_io import _read_safetensors

    config_path = require_file(folder / "config.json", "config.json")
    weights = require_file(folder / "model.safetensors", "safetensors weights")
    config = llama_config_from_hf(read_json(config_path), config_path)
    return config, llama_params(config, _read_safetensors(weights), weights)


def _load_bert(folder: Path) -> tuple[BertConfig, dict[str, Any]]:
    from jaxtok.io.safetensors_io import load_bert_dir

    config, params, _ = load_bert_dir(folder)
    return config, params


HF_FAMILIES: dict[str, HFFamily] = {
    "llama": HFFamily(LlamaConfig, llama_config_to_hf, llama_tensors, _load_llama),
    "bert": HFFamily(BertConfig, bert_config_to_hf, bert_tensors, _load_bert),
}


def family_for_config(config: Any) -> tuple[str, HFFamily]:
    for name, family in HF_FAMILIES.items():
        if isinstance(config, family.config_cls):
            return name, family
    raise ModelFileError(f"no Hugging Face export for {type(config).__name__}")


def is_hf_folder(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def _special_id(tok: TextTokenizer, value: Any) -> int | None:
    if isinstance(value, dict):  # {"content": "<s>", ...}
        value = value.get("content")
    return tok.hf.token_to_id(value) if isinstance(value, str) else None


def read_tokenizer(folder: Path) -> TextTokenizer:
    """tokenizer.json with roles from tokenizer_config.json (and transfer.json's document start)."""
    tok = load_tokenizer_json(require_file(folder / "tokenizer.json", "tokenizer.json"))
    cfg = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    record = read_json(folder / TRANSFER_RECORD) if (folder / TRANSFER_RECORD).is_file() else {}
    bos, eos, pad = (_special_id(tok, cfg.get(f"{r}_token")) for r in ("bos", "eos", "pad"))
    doc_start = _special_id(tok, record.get("doc_start_token"))
    if doc_start is None:  # the rule the GGUF loader uses
        doc_start = bos if cfg.get("add_bos_token") else tok.hf.token_to_id("<|endoftext|>")
        doc_start = eos if doc_start is None else doc_start
    template = cfg.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return dataclasses.replace(tok, bos_id=bos, eos_id=eos, pad_id=pad, doc_start_id=doc_start,
                               chat_template=template)


def load_hf_folder(folder: str | Path) -> LoadedLM:
    """A HF Llama or BERT folder (e.g. written by ``jaxtok transfer``) as a ``LoadedLM``."""
    folder = Path(folder)
    raw = read_json(require_file(folder / "config.json", "config.json"))
    model_type = raw.get("model_type")
    if model_type not in HF_FAMILIES:
        raise ModelFileError(f"{folder}: model_type {model_type!r} is not supported; "
                             f"known: {sorted(HF_FAMILIES)}")
    config, params = HF_FAMILIES[model_type].load(folder)
    tokenizer = read_tokenizer(folder)
    params = {k: (v if isinstance(v, dict) else jnp.asarray(v)) for k, v in params.items()}
    return LoadedLM(config=config, params=_as_jax(params), tokenizer=tokenizer, path=folder)


def _as_jax(tree):
    if isinstance(tree, dict):
        return {k: _as_jax(v) for k, v in tree.items()}
    return jnp.asarray(tree)
