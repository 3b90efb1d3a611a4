"""transformers Mamba / Mamba-2 checkpoints (a folder of ``config.json`` + safetensors) into jaxtok.

    config, params = load_mamba_folder("path/to/state-spaces--mamba-130m-hf")
    logits = Mamba(config).apply({"params": params}, tokens).logits

Tensor names and layouts are transformers' ``MambaForCausalLM`` / ``Mamba2ForCausalLM``:
``backbone.layers.{i}.mixer.*``, Linear weights (out, in), conv1d weights (channels, 1, taps);
Mamba-2's in_proj rows are [z | x | B | C | dt] and its conv channels [x | B | C].
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxtok.models.mamba import MambaConfig

__all__ = ["config_from_hf", "params_from_hf", "load_mamba_folder"]


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> MambaConfig:
    """A :class:`MambaConfig` from a transformers ``config.json`` dict (model_type mamba/mamba2)."""
    kind = hf.get("model_type")
    if kind not in ("mamba", "mamba2"):
        raise ValueError(f"not a Mamba config: model_type {kind!r} (expected 'mamba' or 'mamba2')")
    common = dict(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                  d_state=hf["state_size"], d_conv=hf.get("conv_kernel", 4), expand=hf.get("expand", 2),
                  conv_bias=hf.get("use_conv_bias", True), proj_bias=hf.get("use_bias", False),
                  norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                  tie_embeddings=hf.get("tie_word_embeddings", kind == "mamba"))
    if common["proj_bias"]:
        raise ValueError("in_proj/out_proj biases (use_bias=True) are not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"only the SiLU activation is supported, got {hf.get('hidden_act')!r}")
    if kind == "mamba":
        if hf.get("intermediate_size", common["expand"] * common["d_model"]) != common["expand"] * common["d_model"]:
            raise ValueError("intermediate_size must equal expand * hidden_size")
        rank = hf.get("time_step_rank", "auto")
        rank = math.ceil(common["d_model"] / 16) if rank == "auto" else int(rank)
        return MambaConfig(version=1, dt_rank=rank, **common, **overrides)
    limit = hf.get("time_step_limit", (0.0, float("inf")))
    if limit and (float(limit[0]) > 0.0 or math.isfinite(_as_float(limit[1]))):
        raise ValueError(f"time_step_limit {limit} (a clamped Δ) is not supported")
    if hf["num_heads"] * hf["head_dim"] != common["expand"] * common["d_model"]:
        raise ValueError("num_heads * head_dim must equal expand * hidden_size")
    return MambaConfig(version=2, head_dim=hf["head_dim"], n_groups=hf.get("n_groups", 1),
                       chunk_size=hf.get("chunk_size", 256), **common, **overrides)


def _as_float(value: Any) -> float:
    return float(value["__float__"]) if isinstance(value, Mapping) else float(value)


def params_from_hf(config: MambaConfig, tensors: Mapping[str, np.ndarray], dtype: Any = np.float32) -> dict:
    """The jaxtok parameter tree (plain arrays, layers stacked) from transformers tensors."""
    def get(name):
        if name not in tensors:
            raise KeyError(f"tensor {name!r} missing from the checkpoint")
        return np.asarray(tensors[name], dtype)

    def layer(i, name):
        return get(f"backbone.layers.{i}.mixer.{name}")

    d, di, n, k = config.d_model, config.d_inner, config.d_state, config.d_conv
    blocks = []
    for i in range(config.n_layers):
        conv_w = layer(i, "conv1d.weight")[:, 0, :].T  # (taps, channels)
        conv_b = layer(i, "conv1d.bias") if config.conv_bias else None
        if config.version == 1:
            mixer = {
                "in_proj": layer(i, "in_proj.weight").T.reshape(d, 2, di),
                "conv_kernel": conv_w,
                "x_proj": layer(i, "x_proj.weight").T,
                "dt_proj": layer(i, "dt_proj.weight").T,
                "dt_bias": layer(i, "dt_proj.bias"),
                "A_log": layer(i, "A_log"),
                "D": layer(i, "D"),
                "out_proj": layer(i, "out_proj.weight").T,
            }
            if conv_b is not None:
                mixer["conv_bias"] = conv_b
        else:
            h, p, g = config.n_ssm_heads, config.head_dim, config.n_groups
            w = layer(i, "in_proj.weight").T  # (d, [z | x | B | C | dt])
            z, x, bc, dt = np.split(w, [di, 2 * di, 2 * di + 2 * g * n], axis=1)
            mixer = {
                "in_z": z.reshape(d, h, p), "in_x": x.reshape(d, h, p), "in_bc": bc.reshape(d, 2, g, n),
                "in_dt": dt,
                "conv_kernel": conv_w[:, :di].reshape(k, h, p),
                "conv_kernel_bc": conv_w[:, di:].reshape(k, 2, g, n),
                "dt_bias": layer(i, "dt_bias"), "A_log": layer(i, "A_log"), "D": layer(i, "D"),
                "norm": layer(i, "norm.weight").reshape(h, p),
                "out_proj": layer(i, "out_proj.weight").T.reshape(h, p, d),
            }
            if conv_b is not None:
                mixer["conv_bias"] = conv_b[:di].reshape(h, p)
                mixer["conv_bias_bc"] = conv_b[di:].reshape(2, g, n)
        blocks.append({"mixer": mixer, "norm": {"scale": get(f"backbone.layers.{i}.norm.weight")}})
    stacked = {key: _stack([b[key] for b in blocks]) for key in ("mixer", "norm")}
    params = {"embedding": get("backbone.embeddings.weight"), "blocks": stacked,
              "final_norm": {"scale": get("backbone.norm_f.weight")}}
    if not config.tie_embeddings:
        params["lm_head"] = get("lm_head.weight")
    return params


def _stack(trees):
    if isinstance(trees[0], dict):
        return {key: _stack([t[key] for t in trees]) for key in trees[0]}
    return np.stack(trees)


def load_mamba_folder(folder: str | Path, dtype: Any = np.float32, **overrides: Any) -> tuple[MambaConfig, dict]:
    """``(config, params)`` from a transformers Mamba/Mamba-2 folder (``config.json`` plus
    ``model.safetensors`` or sharded ``*.safetensors``). ``overrides`` go to the config
    (``scan="chunked"``, ``dtype="bfloat16"`` ...)."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: expected a transformers Mamba folder")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {folder}")
    config = config_from_hf(json.loads(config_path.read_text(encoding="utf-8")), **overrides)
    tensors: dict[str, np.ndarray] = {}
    for path in files:
        tensors.update(load_file(str(path)))
    if config.tie_embeddings or "lm_head.weight" not in tensors:
        tensors.setdefault("lm_head.weight", tensors.get("backbone.embeddings.weight"))
    return config, params_from_hf(config, tensors, dtype)
