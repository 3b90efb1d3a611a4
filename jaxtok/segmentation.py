"""Word boundaries for word-pooled byte models: ``split_words(text)``, lossless and Unicode-aware.

The rule, on extended grapheme clusters (Unicode UAX #29, the ``regex`` module's ``\\X``), each
classed by its first code point:

* **word** clusters (letters, combining marks, digits, ``_`` and other connector punctuation)
  outside the scripts written without spaces: a run of them is one word (``naïve``, ``x_1``,
  ``2024``; a letter with its combining marks is one cluster, so it is never cut);
* **punctuation and symbol** clusters (``P*``, ``S*``) other than emoji: a run of them is one word
  (``):``, ``+=``, ``...``);
* **emoji** (a cluster starting with an ``Extended_Pictographic`` code point or a regional
  indicator): each cluster is one word, so a ZWJ sequence (👨‍👩‍👧) or a flag (🇯🇵) stays whole;
* **unspaced scripts** (Han, Hiragana, Katakana, Bopomofo, Thai, Lao, Khmer, Myanmar, Tibetan,
  Yi, by script extension): each cluster is one word. This is the documented fallback for
  dictionary word breaking (ICU): it needs no dictionary, gives the same words on every machine
  (a trained model's inputs must not depend on whether PyICU is installed) and never splits a
  character; the price is one "word" per character in Chinese/Japanese and per cluster in Thai.
* anything else (controls, format characters, unassigned, private use): one word per cluster.

**Whitespace** (clusters starting with a ``White_Space`` code point, so ``\\r\\n`` and newlines
included) attaches to the end of the word before it: ``"the cat\\n"`` -> ``["the ", "cat\\n"]``.
Whitespace at the very start of the text, with no word before it, is a word of its own.

**Length cap**: a word longer than ``max_bytes`` UTF-8 bytes is cut greedily at grapheme-cluster
boundaries into pieces of at most ``max_bytes`` bytes; a single cluster longer than that (a
base with dozens of combining marks) is cut between code points. So ``max_bytes >= 4``.

Every piece is non-empty and ``"".join(split_words(t)) == t`` for every string. Each word, split
again on its own, is that word alone (except the pieces the length cap made); this holds because
every rule looks only inside the word and at its left edge.
"""

from __future__ import annotations

import functools

import regex

DEFAULT_MAX_BYTES = 32
_MIN_MAX_BYTES = 4  # the longest UTF-8 code point

_UNSPACED_SCRIPTS = ("Han", "Hiragana", "Katakana", "Bopomofo", "Thai", "Lao", "Khmer", "Myanmar",
                     "Tibetan", "Yi")
_UNSPACED = "".join(rf"\p{{scx={s}}}" for s in _UNSPACED_SCRIPTS)
_EMOJI = r"\p{Extended_Pictographic}\p{Regional_Indicator}"
_SPACE = r"(?=\p{White_Space})\X"
# a cluster of each class, told by its first code point (lookahead) and then taken whole (\X)
_WORD = rf"(?![{_UNSPACED}])(?=[\p{{L}}\p{{M}}\p{{N}}\p{{Pc}}])\X"
_PUNCT = rf"(?![{_UNSPACED}{_EMOJI}\p{{Pc}}])(?=[\p{{P}}\p{{S}}])\X"
_WORDS = regex.compile(rf"(?:{_SPACE})+|(?:(?:{_WORD})+|(?:{_PUNCT})+|\X)(?:{_SPACE})*", regex.V1)
_CLUSTER = regex.compile(r"\X")


def _check_max_bytes(max_bytes: int) -> None:
    if max_bytes < _MIN_MAX_BYTES:
        raise ValueError(f"max_bytes must be >= {_MIN_MAX_BYTES} (a code point takes up to 4 UTF-8 bytes), "
                         f"got {max_bytes}")


def _cut(word: str, max_bytes: int) -> list[str]:
    """``word`` in pieces of at most ``max_bytes`` bytes, cut at cluster boundaries (and between
    code points inside a cluster that is longer than that by itself)."""
    pieces, current, size = [], "", 0
    for cluster in _CLUSTER.findall(word):
        units = [cluster] if len(cluster.encode("utf-8")) <= max_bytes else list(cluster)
        for unit in units:
            n = len(unit.encode("utf-8"))
            if size + n > max_bytes and current:
                pieces.append(current)
                current, size = "", 0
            current, size = current + unit, size + n
    pieces.append(current)
    return pieces


def split_words(text: str, max_bytes: int | None = DEFAULT_MAX_BYTES) -> list[str]:
    """``text`` as a list of words (the rule is in the module docstring); ``max_bytes=None``
    applies no length cap."""
    if not isinstance(text, str):
        raise TypeError(f"split_words takes a str, got {type(text).__name__}")
    words = _WORDS.findall(text)
    if max_bytes is None:
        return words
    _check_max_bytes(max_bytes)
    out = []
    for word in words:
        # len(word) chars take at least len(word) bytes: most words skip the encode
        if len(word) * 4 <= max_bytes or len(word.encode("utf-8")) <= max_bytes:
            out.append(word)
        else:
            out.extend(_cut(word, max_bytes))
    return out


@functools.lru_cache(maxsize=1 << 16)
def _cached_split(text: str, max_bytes: int | None) -> tuple[str, ...]:
    return tuple(split_words(text, max_bytes))


def split_words_cached(text: str, max_bytes: int | None = DEFAULT_MAX_BYTES) -> tuple[str, ...]:
    """:func:`split_words` memoised (metrics split many short strings repeatedly)."""
    return _cached_split(text, max_bytes)
