"""Named pretrained language models: where their files come from and how they load."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxtok.io.gguf_io import LoadedLM, load_gguf, smollm2_path


def _load_smollm2(local_path: str | Path | None) -> LoadedLM:
    return load_gguf(smollm2_path(local_path))


PRETRAINED_LMS: dict[str, Callable[[str | Path | None], LoadedLM]] = {
    "smollm2-135m": _load_smollm2,
}


def load_pretrained_lm(name: str, local_path: str | Path | None = None, dtype: str = "float32",
                       param_dtype: str = "float32") -> LoadedLM:
    """Loads a named pretrained LM (``local_path`` overrides the cached download); parameters are
    device arrays in ``param_dtype``, compute runs in ``dtype``."""
    if name not in PRETRAINED_LMS:
        raise ValueError(f"unknown pretrained model {name!r}; available: {sorted(PRETRAINED_LMS)}")
    loaded = PRETRAINED_LMS[name](local_path)
    config = dataclasses.replace(loaded.config, dtype=dtype, param_dtype=param_dtype)
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype=param_dtype), loaded.params)
    return LoadedLM(config=config, params=params, tokenizer=loaded.tokenizer, path=loaded.path)
