"""``transfer``: a loaded LM and a new tokenizer in, the same model speaking the new tokenizer out.

    lm = load_pretrained_lm("smollm2-135m")
    new = transfer(lm, load_tokenizer_json("de.json").hf, "fvt")
    evaluate_bpb(..., new.params, new.tokenizer, text)         # anywhere a loaded LM goes
    export_hf_folder(new, "smollm2-de")                        # transformers loads the folder

Where a family keeps its embedding matrices is a table (``EMBEDDING_SLOTS``, keyed by config
class); a new family registers its slots with :func:`register_embedding_slots`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from tokenizers import Tokenizer

from jaxtok.models.bert import BertConfig
from jaxtok.models.llama import LlamaConfig
from jaxtok.tokenization import TextTokenizer
from jaxtok.transfer import methods as methods_lib
from jaxtok.transfer.decompose import Decomposition, TransferError, decompose, map_specials, vocabulary


@dataclasses.dataclass(frozen=True)
class EmbeddingSlots:
    """Parameter keys of a family's input matrix and (when not tied) output matrix;
    ``tied(config)`` says whether the output layer reuses the input matrix."""

    input: str
    output: str | None = None
    tied_field: str | None = None

    def names(self, config: Any) -> dict[str, str]:
        slots = {"input": self.input}
        if self.output is not None and not (self.tied_field and getattr(config, self.tied_field)):
            slots["output"] = self.output
        return slots


EMBEDDING_SLOTS: dict[type, EmbeddingSlots] = {
    LlamaConfig: EmbeddingSlots("embedding", "lm_head", "tie_embeddings"),
    BertConfig: EmbeddingSlots("word_embeddings"),
}


def register_embedding_slots(config_cls: type, slots: EmbeddingSlots) -> None:
    EMBEDDING_SLOTS[config_cls] = slots


def _slots(config: Any) -> dict[str, str]:
    if type(config) not in EMBEDDING_SLOTS:
        raise TransferError(f"no embedding slots registered for {type(config).__name__} "
                            "(jaxtok.transfer.register_embedding_slots)")
    return EMBEDDING_SLOTS[type(config)].names(config)


def embedding_matrices(config: Any, params: Mapping[str, Any]) -> dict[str, Any]:
    """{"input": (V, D)[, "output": (V, D)]} of a model (one matrix when tied)."""
    return {role: params[key] for role, key in _slots(config).items()}


def with_embeddings(config: Any, params: Mapping[str, Any], matrices: Mapping[str, Any]) -> tuple[Any, dict]:
    """(config with the new vocabulary size, params with the new matrices)."""
    params = dict(params)
    for role, key in _slots(config).items():
        params[key] = jnp.asarray(matrices[role], params[key].dtype)
    return dataclasses.replace(config, vocab_size=int(matrices["input"].shape[0])), params


@dataclasses.dataclass(frozen=True)
class TransferredLM:
    """A model with a new tokenizer: the fields of ``LoadedLM`` (config, params, tokenizer, path)
    plus ``record`` (method, options, base, tokenizer hash: written as ``transfer.json``)."""

    config: Any
    params: Any
    tokenizer: TextTokenizer
    path: Path | None = None
    record: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def tokenizer_hash(hf: Tokenizer) -> str:
    return hashlib.sha256(hf.to_str().encode("utf-8")).hexdigest()


def new_text_tokenizer(base: TextTokenizer, new: Tokenizer, keep_chat_template: bool = True) -> TextTokenizer:
    """``new`` with base's roles (bos/eos/pad/document start) carried over to the new ids."""
    base_vocab, new_vocab = vocabulary(base.hf), vocabulary(new)
    _, roles = map_specials(base, base_vocab, new_vocab, require_chat_tokens=keep_chat_template)
    doc_start = None
    if base.doc_start_id is not None:
        content = base.hf.id_to_token(base.doc_start_id)
        doc_start = new.token_to_id(content) if content is not None else None
        if doc_start is None:
            for role in ("bos", "eos"):
                if getattr(base, f"{role}_id") == base.doc_start_id and role in roles:
                    doc_start = roles[role]
    new = Tokenizer.from_str(new.to_str())
    new.no_padding()
    return TextTokenizer(hf=new, bos_id=roles.get("bos"), eos_id=roles.get("eos"), pad_id=roles.get("pad"),
                         doc_start_id=doc_start, chat_template=base.chat_template if keep_chat_template else None)


def transfer(base: Any, new_tokenizer: Tokenizer | TextTokenizer, method: str = "fvt",
             options: Sequence[str] | Mapping[str, Any] | Any = (), *, texts: Sequence[str] | None = None,
             donor: Any = None, embedder: Any = None, aux: Mapping[str, Any] | None = None,
             keep_chat_template: bool = True, base_name: str | None = None,
             decomposition: Decomposition | None = None) -> TransferredLM:
    """``base`` (anything with config, params, tokenizer) re-embedded for ``new_tokenizer``.

    ``options``: ``key=value`` strings, a mapping or the method's options dataclass.
    ``texts`` (focus: target-domain text), ``donor`` (omp: an LM using the new tokenizer),
    ``embedder`` (tokenadapt: texts -> vectors; default all-MiniLM-L6-v2), ``aux`` (precomputed
    auxiliary arrays). ``keep_chat_template=False`` drops the template instead of failing when
    the new tokenizer lacks one of its tokens.
    """
    hf = new_tokenizer.hf if isinstance(new_tokenizer, TextTokenizer) else new_tokenizer
    spec = methods_lib.get_method(method)
    if not isinstance(options, spec.options_cls):
        options = methods_lib.parse_options(method, options)
    start = time.perf_counter()
    dec = decomposition or decompose(base.tokenizer, hf, require_chat_tokens=keep_chat_template)
    ctx = methods_lib.MethodContext(base=base, new=TextTokenizer(hf=hf), texts=texts, donor=donor,
                                    embedder=embedder, aux=aux or {}, base_name=base_name)
    aux_arrays = spec.prepare(ctx, dec, options)
    base_matrices = {role: jnp.asarray(m) for role, m in embedding_matrices(base.config, base.params).items()}
    new_matrices = spec.apply(base_matrices, dec, aux_arrays, options)
    new_matrices = jax.block_until_ready(new_matrices)  # stays on device (sharded over `vocab` on a mesh)
    seconds = time.perf_counter() - start
    config, params = with_embeddings(base.config, base.params, new_matrices)
    record = {"method": method, "options": methods_lib.options_dict(options),
              "base_model": base_name or str(getattr(base, "path", "") or ""),
              "base_tokenizer_sha256": tokenizer_hash(base.tokenizer.hf),
              "tokenizer_sha256": tokenizer_hash(hf), "decomposition": dec.summary(),
              "seconds": round(seconds, 3)}
    return TransferredLM(config=config, params=params, tokenizer=new_text_tokenizer(base.tokenizer, hf,
                                                                                    keep_chat_template),
                         path=None, record=record)


def check_output_dir(out_dir: str | Path, overwrite: bool) -> None:
    """Fails early (before any slow work) on an output folder that export would refuse."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise TransferError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise TransferError(f"{out_dir} is not empty; pass --overwrite to replace it")


def transfer_to_folder(model: str, tokenizer_path: str | Path, method: str, out_dir: str | Path, *,
                       model_path: str | Path | None = None, options: Sequence[str] = (),
                       text_paths: Sequence[str | Path] = (), donor: str | Path | None = None,
                       overwrite: bool = False, keep_chat_template: bool = True) -> TransferredLM:
    """What ``jaxtok transfer`` does: load, transfer, export to ``out_dir`` (an HF model folder)."""
    from jaxtok.models.registry import load_pretrained_lm
    from jaxtok.tokenization import load_tokenizer_json
    from jaxtok.transfer.export import export_hf_folder

    check_output_dir(out_dir, overwrite)
    new = load_tokenizer_json(tokenizer_path)
    if not isinstance(options, methods_lib.get_method(method).options_cls):
        options = methods_lib.parse_options(method, options)  # bad options fail before loading
    texts = [Path(p).read_text(encoding="utf-8") for p in text_paths]
    base = load_pretrained_lm(model, model_path)
    donor_lm = load_pretrained_lm(str(donor), str(donor)) if donor is not None else None
    result = transfer(base, new.hf, method, options, texts=texts or None, donor=donor_lm,
                      keep_chat_template=keep_chat_template, base_name=model)
    result = dataclasses.replace(result, record={**result.record, "tokenizer_file": str(tokenizer_path)})
    path = export_hf_folder(result, out_dir, overwrite=overwrite)
    return dataclasses.replace(result, path=path)
