"""Documents -> words (``split_words``) -> packed rows of words -> batches of bytes, for the
word-pooled byte LM (:mod:`jaxtok.models.byte_lm`).

Words are interned (id 0 is the empty word, each document's BOS) and the id sequences are packed
by the same code as tokens (:func:`jaxtok.data.packing.pack_encoded`: rows of ``seq_len`` words,
segment ids per document piece, positions restarting per piece, targets from the document). A
batch then looks its words' bytes up in the word table, so a batch holds bytes, never word ids:

=============  ============  =================================================================
key            shape         meaning
=============  ============  =================================================================
in_bytes       [B, W, L]     bytes of each input word (0 past its length; BOS: none)
in_lens        [B, W]        its length in bytes
tgt_bytes      [B, W, L]     bytes of the word it predicts (the next word of the document)
tgt_lens       [B, W]        that word's length
segment_ids    [B, W]        1, 2 ... per document piece in the row; 0 on padding words
positions      [B, W]        word index in the piece
loss_mask      [B, W]        1 where the target is a real word of the same document
num_bytes      [B]           UTF-8 bytes of the scored target words
=============  ============  =================================================================

Every word of a document is a target exactly once (BOS in front), and words rejoin to the text,
so ``num_bytes`` sums to the UTF-8 size of the corpus: bits per byte counts every byte once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import grain
import numpy as np

from jaxtok.data import packing
from jaxtok.data.pipeline import DataConfig, SourceKind, eval_batches, load_documents, train_dataset
from jaxtok.segmentation import split_words

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class WordDataConfig:
    """Documents (the fields of :class:`jaxtok.data.DataConfig`) and rows of words.

    Attributes:
      source, paths, text_field, split_on_blank_lines, tfds_name, tfds_data_dir, train_split,
        eval_split, validation_fraction, max_documents: where documents come from, as in
        :class:`jaxtok.data.DataConfig`.
      seq_words: words per row (the word LM's context).
      global_batch, seed, num_epochs, prefetch: batching, as in ``DataConfig``.
    """

    source: SourceKind = SourceKind.STDLIB
    paths: tuple[str, ...] = ()
    text_field: str = "text"
    split_on_blank_lines: bool = False
    tfds_name: str = ""
    tfds_data_dir: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    validation_fraction: float = 0.05
    max_documents: int | None = None
    seq_words: int = 192
    global_batch: int = 8
    seed: int = 0
    num_epochs: int | None = None
    prefetch: int = 2

    def __post_init__(self):
        self.documents()  # DataConfig's checks (source, paths, fractions)
        if self.seq_words < 1:
            raise ValueError(f"seq_words must be >= 1, got {self.seq_words}")

    def documents(self) -> DataConfig:
        """The document source as a ``DataConfig`` (for :func:`jaxtok.data.load_documents`)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(DataConfig)
                  if hasattr(self, f.name) and f.name != "seq_len"}
        return DataConfig(**fields, seq_len=self.seq_words)


@dataclasses.dataclass
class WordTable:
    """Interned words: id -> bytes (``bytes`` [V, L] uint8, ``lens`` [V]) and corpus counts.
    Id 0 is the empty word (BOS)."""

    max_bytes: int
    ids: dict[bytes, int] = dataclasses.field(default_factory=lambda: {b"": 0})
    words: list[bytes] = dataclasses.field(default_factory=lambda: [b""])
    counts: list[int] = dataclasses.field(default_factory=lambda: [0])

    def encode(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids, byte lengths) of ``[BOS] + split_words(text)``, counting each word."""
        ids = [0]
        for word in split_words(text, self.max_bytes):
            raw = word.encode("utf-8")
            index = self.ids.get(raw)
            if index is None:
                index = self.ids[raw] = len(self.words)
                self.words.append(raw)
                self.counts.append(0)
            self.counts[index] += 1
            ids.append(index)
        ids = np.asarray(ids, np.int64)
        return ids, np.asarray([len(self.words[i]) for i in ids], np.int64)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        data = np.zeros((len(self.words), self.max_bytes), np.uint8)
        for i, word in enumerate(self.words):
            data[i, :len(word)] = np.frombuffer(word, np.uint8)
        return data, np.asarray([len(w) for w in self.words], np.int32)


def pack_word_documents(docs: Iterable[str], seq_words: int, max_bytes: int,
                        table: WordTable | None = None) -> tuple[Batch, WordTable]:
    """Rows of word ids (``tokens``/``targets`` are word ids here) and the word table."""
    table = WordTable(max_bytes) if table is None else table
    encoded = [table.encode(doc) for doc in docs if doc]
    return packing.pack_encoded(encoded, seq_words), table


def expand(rows: Batch, word_bytes: np.ndarray, word_lens: np.ndarray) -> Batch:
    """Rows of word ids -> the byte batch of the module docstring."""
    return {
        "in_bytes": word_bytes[rows["tokens"]].astype(np.int32),
        "in_lens": word_lens[rows["tokens"]],
        "tgt_bytes": word_bytes[rows["targets"]].astype(np.int32),
        "tgt_lens": np.where(rows["loss_mask"] > 0, word_lens[rows["targets"]], 0).astype(np.int32),
        "segment_ids": rows["segment_ids"],
        "positions": rows["positions"],
        "loss_mask": rows["loss_mask"],
        "num_bytes": rows["num_bytes"],
    }


def _max_bytes(config: Any) -> int:
    return config.model_config(vocab_size=None).max_word_bytes


def _split_rows(config: Any, split: str) -> tuple[Batch, WordTable]:
    data = config.data
    docs = load_documents(data.documents(), split)
    return pack_word_documents(docs, data.seq_words, _max_bytes(config))


def train_iterator(config: Any, tokenizer: Any = None) -> grain.DatasetIterator:
    """This host's training batches of an experiment whose ``data`` is a :class:`WordDataConfig`
    (with ``get_state()``/``set_state()``, as the token pipeline)."""
    del tokenizer
    rows, table = _split_rows(config, "train")
    word_bytes, word_lens = table.arrays()
    data = config.data
    dataset = train_dataset(rows, global_batch=data.global_batch, seed=data.seed, num_epochs=data.num_epochs)
    dataset = dataset.map(lambda batch: expand(batch, word_bytes, word_lens))
    options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=data.prefetch)
    return iter(dataset.to_iter_dataset(options))


def evaluation_batches(config: Any, tokenizer: Any = None) -> list[Batch]:
    """This host's evaluation batches over the whole validation split."""
    del tokenizer
    rows, table = _split_rows(config, "validation")
    word_bytes, word_lens = table.arrays()
    return [expand(b, word_bytes, word_lens) for b in eval_batches(rows, global_batch=config.data.global_batch)]


def words_per_step(config: Any) -> int:
    return config.data.global_batch * config.data.seq_words


# ---------------------------------------------------------------------------------------------
# Bytes as a tokenizer


BYTE_BOS = "<|endoftext|>"  # id 256: the document separator of byte-level Llama runs


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-in character for each byte (the ByteLevel pre-tokenizer's alphabet)."""
    direct = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in direct:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def byte_tokenizer():
    """An HF tokenizer whose ids are the UTF-8 bytes of the text (0..255) plus ``<|endoftext|>``
    (256): the byte-level baseline's tokenizer, and how byte families read and write text."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {symbol: b for b, symbol in enumerate(_byte_symbols())}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(BYTE_BOS, special=True, normalized=False)])
    return tokenizer


def byte_text_tokenizer():
    """:func:`byte_tokenizer` as the ``TextTokenizer`` of a byte family's loaded run (no special
    ids: the word-pooled LM marks documents with its empty word, not a token)."""
    from jaxtok.tokenization import TextTokenizer

    return TextTokenizer(hf=byte_tokenizer())
