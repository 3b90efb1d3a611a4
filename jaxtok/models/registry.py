"""Named pretrained language models: where their files come from and how they load."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxtok.io.gguf_io import LoadedLM, load_gguf, smollm2_path


def _load_smollm2(local_path: str | Path | None) -> LoadedLM:
    return load_gguf(smollm2_path(local_path))


def _load_minilm(local_path: str | Path | None) -> LoadedLM:
    from jaxtok.io.safetensors_io import load_minilm
    from jaxtok.tokenization import TextTokenizer

    config, params, hf = load_minilm(local_path)
    cls, sep, pad = (hf.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    return LoadedLM(config=config, params=params, tokenizer=TextTokenizer(hf=hf, bos_id=cls, eos_id=sep, pad_id=pad),
                    path=Path(local_path) if local_path else None)


PRETRAINED_LMS: dict[str, Callable[[str | Path | None], LoadedLM]] = {
    "smollm2-135m": _load_smollm2,
    "minilm-l6": _load_minilm,  # an encoder: sentence embeddings, tokenizer transfer
}


def _is_hf_folder(path: Path) -> bool:
    from jaxtok.io.hf_folder import is_hf_folder

    return is_hf_folder(path)


def _is_run_dir(path: Path) -> bool:
    from jaxtok.io.run_dir import is_run_dir

    return is_run_dir(path)


def _load_hf_folder(path: Path) -> LoadedLM:
    from jaxtok.io.hf_folder import load_hf_folder

    return load_hf_folder(path)


def _load_run_dir(path: Path) -> LoadedLM:
    from jaxtok.io.run_dir import load_run_dir

    return load_run_dir(path)


# Folders that load as an LM whatever the model name: (recognise, load), first match wins.
PATH_LOADERS: list[tuple[Callable[[Path], bool], Callable[[Path], LoadedLM]]] = [
    (_is_hf_folder, _load_hf_folder),  # config.json + model.safetensors (e.g. `jaxtok transfer` output)
    (_is_run_dir, _load_run_dir),  # a `jaxtok pretrain` run directory
]


def path_loader(path: str | Path | None) -> Callable[[Path], LoadedLM] | None:
    """The loader of the folder ``path`` (HF model folder or run directory), if it is one."""
    if path is None or not Path(path).is_dir():
        return None
    return next((load for recognise, load in PATH_LOADERS if recognise(Path(path))), None)


def module_for(config) -> Any:
    """The flax module of a model config (through the families table of ``jaxtok.train.configs``)."""
    from jaxtok.models.bert import Bert, BertConfig
    from jaxtok.train.configs import MODEL_FAMILIES

    modules = {family.config_cls: family.module_cls for family in MODEL_FAMILIES.values()}
    modules.setdefault(BertConfig, Bert)
    if type(config) not in modules:
        raise ValueError(f"no model family for {type(config).__name__}")
    return modules[type(config)](config)


def load_pretrained_lm(name: str, local_path: str | Path | None = None, dtype: str = "float32",
                       param_dtype: str = "float32") -> LoadedLM:
    """Loads a named pretrained LM (``local_path`` overrides the cached download); parameters are
    device arrays in ``param_dtype``, compute runs in ``dtype``. A ``local_path`` (or ``name``)
    that is an HF model folder or a ``jaxtok pretrain`` run directory loads that folder."""
    loader = path_loader(local_path) or path_loader(name)
    if loader is not None:
        loaded = loader(Path(local_path if path_loader(local_path) else name))
    elif name not in PRETRAINED_LMS:
        raise ValueError(f"unknown pretrained model {name!r}; available: {sorted(PRETRAINED_LMS)} "
                         "(or the path of an HF model folder / jaxtok run directory)")
    else:
        loaded = PRETRAINED_LMS[name](local_path)
    config = dataclasses.replace(loaded.config, dtype=dtype, param_dtype=param_dtype)
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype=param_dtype), loaded.params)
    return LoadedLM(config=config, params=params, tokenizer=loaded.tokenizer, path=loaded.path)
