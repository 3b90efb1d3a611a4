"""Random tokenizers for hypernetwork training, one per batch (ZeTT's sampling).

From the batch's text (and a queue of recent batches) every substring of at most ``max_len``
bytes inside a pre-token is counted, weighted by how often its pre-token occurs; a substring
scores frequency x length. The normalised scores get Gaussian noise whose sigma is itself drawn
per tokenizer, sigma ~ LogNormal(ln 1e-5, 4), so some tokenizers follow the text's statistics
closely and others are nearly random. The top ``vocab_size`` multi-byte substrings plus all 256
single bytes become an HF ``tokenizers`` Unigram model over the byte-level alphabet (GPT-2's
pre-tokenizer and byte map), so every text encodes losslessly. The base LM's special tokens are
added, for the model's document and chat markers.

Counting is numpy over sliding windows of a (words, bytes) code array; Python loops run only
over substring lengths and over distinct words (to encode them), never over characters.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from jaxtok.transfer.decompose import byte_to_char

_PRE = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Attributes:
      vocab_range: (min, max) multi-byte pieces, the size drawn uniformly per tokenizer.
      max_len: longest piece in bytes (ZeTT: 15 characters).
      max_word: pre-tokens are cut to this many bytes before counting (longer ones are rare
        and would only add long, unusable substrings).
      noise_log_mean, noise_log_std: sigma of the score noise ~ LogNormal(mean, std).
    """

    vocab_range: tuple[int, int] = (4096, 8192)
    max_len: int = 15
    max_word: int = 32
    noise_log_mean: float = float(np.log(1e-5))
    noise_log_std: float = 4.0

    def __post_init__(self):
        lo, hi = self.vocab_range
        if not 1 <= lo <= hi:
            raise ValueError(f"vocab_range must be 1 <= min <= max, got {self.vocab_range}")
        if not 2 <= self.max_len <= self.max_word:
            raise ValueError(f"need 2 <= max_len <= max_word, got {self.max_len}, {self.max_word}")

    @property
    def max_vocab(self) -> int:
        """Upper bound on a sampled tokenizer's size before special tokens (pieces + bytes)."""
        return self.vocab_range[1] + 256


def count_substrings(texts: Sequence[str], max_len: int, max_word: int) -> tuple[list[str], np.ndarray]:
    """(substrings in the byte-level alphabet, their counts) over all pre-tokens of ``texts``,
    lengths 1..max_len, each occurrence of a pre-token counted."""
    words = Counter(w for text in texts for w, _ in _PRE.pre_tokenize_str(text))
    if not words:
        return [], np.zeros(0, np.int64)
    unique = list(words)
    freq = np.fromiter(words.values(), np.int64, len(unique))
    lengths = np.fromiter((min(len(w), max_word) for w in unique), np.int64, len(unique))
    codes = np.zeros((len(unique), max_word), np.uint16)  # byte-level chars are < 324
    flat = np.frombuffer("".join(w[:max_word] for w in unique).encode("utf-32-le"), np.uint32)
    rows = np.repeat(np.arange(len(unique)), lengths)
    cols = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    codes[rows, cols] = flat
    keys, weights = [], []
    for n in range(1, max_len + 1):
        if n > max_word:
            break
        windows = sliding_window_view(codes, n, axis=1)  # (W, max_word - n + 1, n)
        valid = np.arange(windows.shape[1])[None, :] + n <= lengths[:, None]
        grams = np.zeros((int(valid.sum()), max_len), np.uint16)
        grams[:, :n] = windows[valid]
        keys.append(grams)
        weights.append(np.broadcast_to(freq[:, None], valid.shape)[valid])
    keys, weights = np.concatenate(keys), np.concatenate(weights)
    rows_as_bytes = np.ascontiguousarray(keys).view(np.dtype((np.void, 2 * max_len))).ravel()
    uniq, inverse = np.unique(rows_as_bytes, return_inverse=True)
    counts = np.bincount(inverse.ravel(), weights=weights).astype(np.int64)
    as_codes = uniq.view(np.uint16).reshape(-1, max_len)
    strings = ["".join(map(chr, row[row > 0])) for row in as_codes]
    return strings, counts


def sample_tokenizer(texts: Sequence[str], rng: np.random.Generator, config: SamplerConfig = SamplerConfig(),
                     special_tokens: Sequence[str] = ()) -> Tokenizer:
    """One random Unigram tokenizer for ``texts`` (see the module docstring)."""
    strings, counts = count_substrings(texts, config.max_len, config.max_word)
    lengths = np.array([len(s) for s in strings], np.int64)
    scores = counts * lengths
    scores = scores / max(scores.sum(), 1)
    sigma = rng.lognormal(config.noise_log_mean, config.noise_log_std)
    noisy = scores + rng.normal(0.0, sigma, size=scores.shape)
    size = int(rng.integers(config.vocab_range[0], config.vocab_range[1] + 1))
    multi = np.flatnonzero(lengths >= 2)
    chosen = multi[np.argsort(-noisy[multi], kind="stable")[:size]]
    chosen = chosen[noisy[chosen] > 0] if (noisy[chosen] > 0).any() else chosen
    # Unigram scores are log-probabilities; bytes always present, scored by their own counts
    floor = np.log(max(float(noisy[chosen].min()) if len(chosen) else 1e-9, 1e-12)) - 1.0
    vocab = {strings[i]: float(np.log(max(noisy[i], 1e-12))) for i in chosen}
    single = {strings[i]: counts[i] for i in np.flatnonzero(lengths == 1)}
    for char in byte_to_char().values():
        vocab.setdefault(char, floor - (0.0 if char in single else 2.0))
    pieces = [(token, score) for token, score in vocab.items()]
    tok = Tokenizer(models.Unigram(pieces, unk_id=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    if special_tokens:
        tok.add_special_tokens(list(special_tokens))
    return tok


def vocab_json(tok: Tokenizer) -> str:
    """A stable text form of a sampled tokenizer (for hashing and reproducibility checks)."""
    return json.dumps(json.loads(tok.to_str())["model"], sort_keys=True)
