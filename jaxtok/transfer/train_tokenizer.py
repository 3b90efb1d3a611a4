"""Target tokenizers for transfer: byte-level BPE or Unigram trained with HF ``tokenizers``.

With a base tokenizer, the new one keeps the base's special tokens (same strings, so they map by
content: chat templates keep working), its normalizer (e.g. BERT's lower-casing), its byte-level
pre-tokenizer (e.g. SmolLM2's digit splitting) and its post-processor (``[CLS] ... [SEP]``, with
the ids renumbered).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from jaxtok.transfer.decompose import TransferError, vocabulary

KINDS = ("bpe", "unigram")


def _special_tokens(base: Tokenizer | None) -> list[str]:
    if base is None:
        return ["<|endoftext|>"]
    added = base.get_added_tokens_decoder()
    return [added[i].content for i in sorted(added) if added[i].special]


def _renumbered_post_processor(base: Tokenizer, new: Tokenizer):
    """The base's post-processor with the ids of its special tokens looked up in ``new``."""
    spec = json.loads(base.to_str()).get("post_processor")
    if not spec:
        return None
    text = json.dumps(spec)

    def fix(node):
        if isinstance(node, dict):
            if "ids" in node and "tokens" in node:  # TemplateProcessing special_tokens entries
                node["ids"] = [new.token_to_id(t) for t in node["tokens"]]
            if "sep" in node and "cls" in node:  # BertProcessing / RobertaProcessing
                node["sep"] = [node["sep"][0], new.token_to_id(node["sep"][0])]
                node["cls"] = [node["cls"][0], new.token_to_id(node["cls"][0])]
            for value in node.values():
                fix(value)
        elif isinstance(node, list):
            for value in node:
                fix(value)

    spec = json.loads(text)
    fix(spec)
    holder = json.loads(new.to_str())
    holder["post_processor"] = spec
    return Tokenizer.from_str(json.dumps(holder)).post_processor


def train_tokenizer(texts: Iterable[str], kind: str = "bpe", vocab_size: int = 8000,
                    base: Tokenizer | None = None) -> Tokenizer:
    """A ``kind`` tokenizer of ``vocab_size`` tokens trained on ``texts``."""
    if kind not in KINDS:
        raise TransferError(f"unknown tokenizer kind {kind!r}; expected one of {KINDS}")
    specials = _special_tokens(base)
    if vocab_size <= len(specials) + (256 if kind == "bpe" else 0):
        raise TransferError(f"vocab size {vocab_size} leaves no room beyond the {len(specials)} special tokens"
                            + (" and 256 bytes" if kind == "bpe" else ""))
    base_spec = json.loads(base.to_str()) if base is not None else {}
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        byte_level_base = base is not None and vocabulary(base).kind == "byte_level"
        tok.pre_tokenizer = (base.pre_tokenizer if byte_level_base
                             else pre_tokenizers.ByteLevel(add_prefix_space=False))
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        unk = next((t for t in specials if t in ("<unk>", "[UNK]")), None)
        if unk is None:
            unk = "<unk>"
            specials = [*specials, unk]
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token=unk,
                                          show_progress=False)
    if base is not None and base_spec.get("normalizer"):
        tok.normalizer = base.normalizer
    tok.train_from_iterator(texts, trainer)
    if base is not None:
        post = _renumbered_post_processor(base, tok)
        if post is not None:
            tok.post_processor = post
    elif kind == "bpe":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok
