"""Tokenize documents and pack them into fixed-length rows.

A packed corpus is a dict of numpy arrays, one entry per row (all int32):

=============  ==========  =================================================================
key            shape       meaning
=============  ==========  =================================================================
tokens         [R, S]      input ids; 0 on padding
targets        [R, S]      the next token of the same document; 0 where there is none
segment_ids    [R, S]      1, 2, 3 ... for each document piece in the row; 0 on padding
positions      [R, S]      position within the piece, restarting at 0; 0 on padding
loss_mask      [R, S]      1 where ``targets`` is a real next token of the same document
num_bytes      [R]         UTF-8 bytes of text covered by the scored targets of the row
=============  ==========  =================================================================

Packing is greedy and keeps order. A document that fits in a row is never split: when it does
not fit in what is left of the current row, the rest of that row is padding. A document longer
than a row starts in the current row and runs on through as many rows as it needs; each piece
gets its own segment id in its row and positions restarting at 0 (a row is a separate sequence
to the model, which cannot attend across rows, and restarting keeps positions below ``S``).
Targets are taken from the document, not the row, so the last token of a piece still predicts
the first token of the next piece: every token of a document but its first is a target exactly
once, and padding appears only at the end of a row.

Bytes: each token is given the UTF-8 bytes of the original text up to the end of its span (the
tokenizer's character offsets, mapped to byte offsets), counted from where the previous token
ended; bytes after the last token go to the last token. So a document's tokens share out its
bytes exactly, also when the normalizer drops text (whitespace, accents). Special tokens added
here (BOS/EOS) cover 0 bytes. For byte-level BPE each token then gets exactly its own bytes,
except a character split over two tokens, whose bytes all go to the first (row sums can be
off by a few bytes at such a split; document and corpus sums are exact). Without a BOS the first
token of each document is not a target, so its bytes are not in ``num_bytes``; with a BOS, the
sum of ``num_bytes`` over a corpus equals its UTF-8 size.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import numpy as np
from tokenizers import Encoding, Tokenizer

ROW_FIELDS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")
FIELDS = (*ROW_FIELDS, "num_bytes")


def special_token_id(tokenizer: Tokenizer, token: str | None) -> int | None:
    """The id of ``token`` (None passes through); a ValueError if the vocabulary lacks it."""
    if token is None:
        return None
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ValueError(f"token {token!r} is not in the tokenizer's vocabulary")
    return token_id


def token_byte_lengths(text: str, offsets: np.ndarray) -> np.ndarray:
    """UTF-8 bytes attributed to each token of ``text`` given character ``offsets`` [n, 2].

    Token i gets the bytes from the furthest end reached by tokens before it to its own end, so
    the lengths sum to the byte length of ``text``.
    """
    encoded = text.encode("utf-8")
    raw_len = len(encoded)
    if len(offsets) == 0:
        return np.zeros(0, np.int64)
    ends = offsets[:, 1].astype(np.int64)
    if raw_len != len(text):
        # Non-ASCII: map character index -> byte offset via the UTF-8 lead bytes.
        raw = np.frombuffer(encoded, np.uint8)
        char_starts = np.flatnonzero((raw & 0xC0) != 0x80)
        ends = np.append(char_starts, raw_len)[ends]
    ends = np.maximum.accumulate(ends)
    lengths = np.diff(ends, prepend=0)
    lengths[-1] += raw_len - ends[-1]
    return lengths


def _with_specials(
    enc: Encoding, text: str, bos_id: int | None, eos_id: int | None
) -> tuple[np.ndarray, np.ndarray] | None:
    ids = np.asarray(enc.ids, np.int64)
    if ids.size == 0:
        return None  # nothing to learn from; an EOS alone would teach "empty document"
    # fromiter over the flattened pairs: ~2x faster than np.asarray on a list of tuples
    flat = np.fromiter(itertools.chain.from_iterable(enc.offsets), np.int64, 2 * ids.size)
    nbytes = token_byte_lengths(text, flat.reshape(-1, 2))
    if bos_id is not None:
        ids, nbytes = np.concatenate([[bos_id], ids]), np.concatenate([[0], nbytes])
    if eos_id is not None:
        ids, nbytes = np.concatenate([ids, [eos_id]]), np.concatenate([nbytes, [0]])
    return ids, nbytes


def encode_documents(
    docs: Iterable[str],
    tokenizer: Tokenizer,
    *,
    bos_id: int | None = None,
    eos_id: int | None = None,
    batch_size: int = 256,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(ids, byte_lengths)`` per document, batch-encoded without the tokenizer's own special
    tokens (BOS/EOS are added here, the same way for every tokenizer). Documents that encode
    to no tokens are dropped. A tokenizer set to pad or truncate is used through a copy with
    both switched off (packing needs whole documents; the caller's object is left as is)."""
    if tokenizer.padding is not None or tokenizer.truncation is not None:
        tokenizer = Tokenizer.from_str(tokenizer.to_str())
        tokenizer.no_padding()
        tokenizer.no_truncation()
    docs = iter(docs)
    while batch := list(itertools.islice(docs, batch_size)):
        encodings = tokenizer.encode_batch(batch, add_special_tokens=False)
        for text, enc in zip(batch, encodings):
            encoded = _with_specials(enc, text, bos_id, eos_id)
            if encoded is not None:
                yield encoded


def _row_starts(lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, int]:
    """Flat start offset of each document and the total length (greedy, order kept)."""
    starts = np.empty(len(lengths), np.int64)
    cursor = 0
    # Sequential by nature (each start depends on the previous); plain ints keep it fast.
    for i, length in enumerate(lengths.tolist()):
        room = seq_len - cursor % seq_len
        if length <= seq_len and length > room:
            cursor += room  # a document that fits a row is not split: pad to the next row
        starts[i] = cursor
        cursor += length
    return starts, cursor


def _segments_and_positions(doc_flat: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    valid = doc_flat >= 0
    index = np.arange(doc_flat.size)
    previous = np.concatenate([[-1], doc_flat[:-1]])
    piece_start = valid & ((index % seq_len == 0) | (doc_flat != previous))
    segment_ids = np.cumsum(piece_start.reshape(-1, seq_len), axis=1).reshape(-1) * valid
    last_start = np.maximum.accumulate(np.where(piece_start, index, 0))
    positions = (index - last_start) * valid
    return segment_ids, positions


def pack_encoded(
    encoded: Iterable[tuple[np.ndarray, np.ndarray]], seq_len: int
) -> dict[str, np.ndarray]:
    """Packs ``(ids, byte_lengths)`` documents into rows of ``seq_len`` (see module docstring)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    encoded = list(encoded)
    if not encoded:
        raise ValueError("no documents to pack (every document was empty after tokenization)")
    ids = [e[0] for e in encoded]
    lengths = np.array([len(x) for x in ids], np.int64)
    starts, total = _row_starts(lengths, seq_len)
    num_rows = -(-total // seq_len)
    # flat position of every token: its document's start plus its index within the document
    within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    where = np.repeat(starts, lengths) + within
    is_target = np.ones(lengths.sum(), bool)
    is_target[np.cumsum(lengths) - 1] = False  # a document's last token predicts nothing
    flat_tokens = np.concatenate(ids)
    next_tokens = np.where(is_target, np.roll(flat_tokens, -1), 0)
    next_bytes = np.where(is_target, np.roll(np.concatenate([e[1] for e in encoded]), -1), 0)

    def scatter(values: np.ndarray, fill: int = 0) -> np.ndarray:
        out = np.full(num_rows * seq_len, fill, np.int64)
        out[where] = values
        return out

    doc_flat = scatter(np.repeat(np.arange(len(ids)), lengths), fill=-1)
    segment_ids, positions = _segments_and_positions(doc_flat, seq_len)
    rows = {
        "tokens": scatter(flat_tokens),
        "targets": scatter(next_tokens),
        "segment_ids": segment_ids,
        "positions": positions,
        "loss_mask": scatter(is_target.astype(np.int64)),
    }
    rows = {k: v.reshape(num_rows, seq_len).astype(np.int32) for k, v in rows.items()}
    rows["num_bytes"] = scatter(next_bytes).reshape(num_rows, seq_len).sum(axis=1).astype(np.int32)
    return rows


def pack_documents(
    docs: Iterable[str],
    tokenizer: Tokenizer,
    seq_len: int,
    *,
    bos_id: int | None = None,
    eos_id: int | None = None,
) -> dict[str, np.ndarray]:
    """Tokenizes ``docs`` and packs them into rows of ``seq_len`` (see module docstring)."""
    return pack_encoded(encode_documents(docs, tokenizer, bos_id=bos_id, eos_id=eos_id), seq_len)


def empty_rows(count: int, seq_len: int) -> dict[str, np.ndarray]:
    """All-padding rows (nothing scored, 0 bytes): fill for a last, partial eval batch."""
    rows = {k: np.zeros((count, seq_len), np.int32) for k in ROW_FIELDS}
    rows["num_bytes"] = np.zeros(count, np.int32)
    return rows
