"""Tokenizers: HF ``tokenizers`` objects plus the few facts a model needs about them.

Every tokenizer in jaxtok is an HF ``tokenizers.Tokenizer`` (interoperable ``tokenizer.json``);
``TextTokenizer`` only adds the special ids, the document-start convention used for bits per
byte, and chat formatting.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers


class TokenizerError(ValueError):
    """A tokenizer file or tokenizer description is malformed."""


@dataclasses.dataclass(frozen=True)
class TextTokenizer:
    """An HF tokenizer with the special ids jaxtok needs.

    Attributes:
      hf: the ``tokenizers.Tokenizer``.
      bos_id, eos_id, pad_id: special ids (None when the tokenizer has none).
      doc_start_id: the token put before a document so that its first token is scored too
        (bits per byte counts every byte of the text); ``None`` scores from the second token.
      chat_template: a Jinja chat template, if the model ships one.
    """

    hf: Tokenizer
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    doc_start_id: int | None = None
    chat_template: str | None = None

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = True) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """Renders ``messages`` ([{role, content}]) with the model's own template."""
        if self.chat_template is None:
            raise TokenizerError("this tokenizer has no chat template")
        import jinja2.sandbox

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        template = env.from_string(self.chat_template)
        tok = self.hf
        return template.render(
            messages=list(messages), add_generation_prompt=add_generation_prompt,
            bos_token=tok.id_to_token(self.bos_id) if self.bos_id is not None else "",
            eos_token=tok.id_to_token(self.eos_id) if self.eos_id is not None else "")

    def check_ids(self, ids: np.ndarray, vocab_size: int | None = None) -> None:
        """Raises if an id is outside [0, vocab_size)."""
        limit = self.vocab_size if vocab_size is None else vocab_size
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= limit):
            raise ValueError(f"token ids out of range [0, {limit}): min {ids.min()}, max {ids.max()}")


# llama.cpp's pre-types on top of GPT-2's regex: ``smollm`` & co split digits one by one first.
_PRE_TOKENIZERS = {
    "gpt2": (),
    "default": (),
    "smollm": (pre_tokenizers.Digits(individual_digits=True),),
    "starcoder": (pre_tokenizers.Digits(individual_digits=True),),
    "refact": (pre_tokenizers.Digits(individual_digits=True),),
}


def byte_level_bpe(tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int],
                   pre: str = "gpt2") -> Tokenizer:
    """Builds a GPT-2 style byte-level BPE tokenizer from a GGUF vocabulary.

    ``token_types`` follow GGUF (1 normal, 3 control, 4 user-defined): control and user-defined
    tokens become added tokens so that text containing them is never split.
    """
    if pre not in _PRE_TOKENIZERS:
        raise TokenizerError(f"unsupported pre-tokenizer type {pre!r}; known: {sorted(_PRE_TOKENIZERS)}")
    if len(tokens) != len(token_types):
        raise TokenizerError(f"{len(tokens)} tokens but {len(token_types)} token types")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise TokenizerError("duplicate token strings in the vocabulary")
    pairs = []
    for line in merges:
        left, sep, right = line.partition(" ")
        if not sep or left not in vocab or right not in vocab:
            raise TokenizerError(f"bad merge rule {line!r}")
        pairs.append((left, right))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        *_PRE_TOKENIZERS[pre],
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False)
               for t, kind in zip(tokens, token_types) if kind in (3, 4)]
    tok.add_special_tokens(special)
    return tok


def load_tokenizer_json(path: str | Path, **special) -> TextTokenizer:
    """Loads a ``tokenizer.json`` with a clear error for a malformed file."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"{path}: tokenizer file not found")
    text = path.read_text(encoding="utf-8")
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{path}: not valid JSON ({exc})") from exc
    try:
        hf = Tokenizer.from_str(text)
    except Exception as exc:  # tokenizers raises a bare Exception on schema errors
        raise TokenizerError(f"{path}: not a valid HF tokenizer.json ({exc})") from exc
    hf.no_padding()
    return TextTokenizer(hf=hf, **special)
