"""Boundary ids for batch-level BPE: which base tokens may end up in one unit.

Negative ids are boundaries of their own (never merged): special tokens (``word_ids`` None)
and padding.

- ``pretoken``: the base tokenizer's pre-tokens, i.e. ``Encoding.word_ids`` (HF tokenizers).
  For byte-level BPE (SmolLM2) a pre-token is e.g. ``" world"`` or ``","``; for WordPiece
  (MiniLM) a whitespace-and-punctuation split word (``"un ##bel ##ie"`` share one).
- ``word``: whitespace-delimited words of the text. A token belongs to the word holding the
  first non-whitespace character of its character span (``Encoding.offsets``); a token that is
  only whitespace (byte-level ``"Ġ"``, ``"Ċ"``) belongs to the word that follows it, as the
  byte-level convention puts a word's leading space in its first token (none follows: -1).
  So ``"it's"`` or ``"x=1"`` are one word although they are several pre-tokens.
- ``none``: every token of a sequence has id 0 (merges may cross words).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MODES = ("pretoken", "word", "none")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown boundary mode {mode!r}: expected one of {', '.join(MODES)}")
    return mode


def _word_of_chars(text: str) -> tuple[np.ndarray, np.ndarray]:
    """(word index of each character or -1 on whitespace, index of the next non-space
    character at or after each position, len(text) if none)."""
    space = np.array([c.isspace() for c in text] + [True], bool)
    starts = ~space & np.concatenate([[True], space[:-1]])
    word = np.where(space, -1, np.cumsum(starts) - 1)
    idx = np.where(~space, np.arange(len(space)), len(text))
    next_solid = np.minimum.accumulate(idx[::-1])[::-1]
    return word, next_solid


def boundary_ids(encoding, text: str, mode: str) -> list[int]:
    """Boundary ids of one ``tokenizers.Encoding`` of ``text`` (module docstring)."""
    check_mode(mode)
    word_ids = encoding.word_ids
    if mode == "pretoken":
        return [-1 if w is None else int(w) for w in word_ids]
    if mode == "none":
        return [-1 if w is None else 0 for w in word_ids]
    word, next_solid = _word_of_chars(text)
    out = []
    for w, (s, _) in zip(word_ids, encoding.offsets):
        if w is None:
            out.append(-1)
            continue
        first = next_solid[min(s, len(text))]  # in the token, or after it if it is all whitespace
        out.append(int(word[first]) if first < len(text) else -1)
    return out


def encode_lines(tokenizer, lines: Sequence[str], seq_len: int, mode: str) -> tuple[list[list[int]], list[list[int]]]:
    """(ids, boundary ids) of each line: encoded without special tokens, with the tokenizer's
    own padding and truncation switched off (on a copy), cut to the first ``seq_len`` tokens."""
    from tokenizers import Tokenizer

    check_mode(mode)
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.no_padding()
    tok.no_truncation()
    ids, bounds = [], []
    for line, enc in zip(lines, tok.encode_batch(list(lines), add_special_tokens=False)):
        ids.append(list(enc.ids[:seq_len]))
        bounds.append(boundary_ids(enc, line, mode)[:seq_len])
    return ids, bounds
