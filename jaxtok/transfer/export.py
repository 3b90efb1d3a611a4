"""A (transferred) jaxtok LM as a Hugging Face model folder, written atomically.

The folder holds config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
generation_config.json and transfer.json (method, options, base model, tokenizer hash).
Everything is written into a hidden sibling folder first and renamed into place at the end, so
an interrupted export leaves no half-written folder and never damages an existing one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.numpy import save_file

from jaxtok.io.hf_folder import TRANSFER_RECORD, family_for_config
from jaxtok.transfer.decompose import TransferError


def _token(tok, token_id: int | None) -> str | None:
    return None if token_id is None else tok.hf.id_to_token(token_id)


def tokenizer_config(tok, model_type: str, max_length: int) -> dict[str, Any]:
    """tokenizer_config.json for ``PreTrainedTokenizerFast`` (roles by content)."""
    cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
                           "clean_up_tokenization_spaces": False}
    for role in ("bos", "eos", "pad"):
        content = _token(tok, getattr(tok, f"{role}_id"))
        if content is not None:
            cfg[f"{role}_token"] = content
    if model_type == "bert":  # the roles a BERT pipeline asks for, when the vocabulary has them
        for role, content in (("cls", "[CLS]"), ("sep", "[SEP]"), ("mask", "[MASK]"), ("unk", "[UNK]"),
                              ("pad", "[PAD]")):
            if tok.hf.token_to_id(content) is not None:
                cfg[f"{role}_token"] = content
    if tok.chat_template:
        cfg["chat_template"] = tok.chat_template
    return cfg


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def export_hf_folder(lm: Any, out_dir: str | Path, *, overwrite: bool = False,
                     record: Mapping[str, Any] | None = None) -> Path:
    """Writes ``lm`` (config, params, tokenizer[, record]) to ``out_dir``; refuses a non-empty
    ``out_dir`` unless ``overwrite``. Returns the folder."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise TransferError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise TransferError(f"{out_dir} is not empty; pass --overwrite to replace it")
    model_type, family = family_for_config(lm.config)
    record = dict(record if record is not None else getattr(lm, "record", {}) or {})
    tok = lm.tokenizer
    if tok.doc_start_id is not None:
        record["doc_start_token"] = tok.hf.id_to_token(tok.doc_start_id)
    max_length = getattr(lm.config, "max_seq_len", None) or getattr(lm.config, "max_positions", 512)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        config = family.config_to_hf(lm.config)
        for role in ("bos", "eos", "pad"):
            config[f"{role}_token_id"] = getattr(tok, f"{role}_id")
        _write_json(tmp / "config.json", config)
        save_file(family.to_tensors(lm.config, lm.params), str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        hf = type(tok.hf).from_str(tok.hf.to_str())
        hf.no_padding()
        hf.no_truncation()
        hf.save(str(tmp / "tokenizer.json"))
        _write_json(tmp / "tokenizer_config.json", tokenizer_config(tok, model_type, max_length))
        _write_json(tmp / "generation_config.json",
                    {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id})
        _write_json(tmp / TRANSFER_RECORD, record)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _replace_dir(new: Path, target: Path) -> None:
    """Renames ``new`` to ``target``; an existing ``target`` is moved aside first and removed only
    after the rename succeeded (the window between the two renames is the only one without it)."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rmdir(old)
        os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
