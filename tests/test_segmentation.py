"""split_words: lossless and stable on arbitrary Unicode (hypothesis), and the stated rule per script."""

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxtok.segmentation import split_words

# text drawn from every code point (surrogates excluded: a str of them cannot be UTF-8 encoded)
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=60)
# and text dense in the cases that matter: marks, ZWJ, regional indicators, spaces, unspaced scripts
TRICKY = st.text(st.sampled_from(list("ab 1_.,\n\t\r\u0301\u0308\u200d\u200b\ufe0f") + [
    "\U0001F468", "\U0001F469", "\U0001F1EF", "\U0001F1F5", "東", "語", "ン", "ー", "ก", "่", "ا", "ل",
    "न", "्", "\u00ad", "\x00"]), max_size=60)


@settings(max_examples=300, deadline=None)
@given(st.one_of(TEXT, TRICKY), st.sampled_from([None, 4, 7, 32]))
def test_lossless_and_capped(text, max_bytes):
    words = split_words(text, max_bytes)
    assert "".join(words) == text
    assert all(words), "no empty word"
    if max_bytes is not None:
        assert all(len(w.encode("utf-8")) <= max_bytes for w in words)


@settings(max_examples=300, deadline=None)
@given(st.one_of(TEXT, TRICKY))
def test_stable(text):
    for word in split_words(text, None):
        assert split_words(word, None) == [word]


@settings(max_examples=200, deadline=None)
@given(st.one_of(TEXT, TRICKY), st.sampled_from([4, 6, 9]))
def test_cap_only_cuts_long_words(text, max_bytes):
    """Words within the cap come out as they are; longer ones are cut into pieces that rejoin to
    them, at cluster boundaries where a cluster fits."""
    capped = iter(split_words(text, max_bytes))
    for word in split_words(text, None):
        if len(word.encode("utf-8")) <= max_bytes:
            assert next(capped) == word
            continue
        pieces, joined = [], ""
        while joined != word:
            pieces.append(next(capped))
            joined += pieces[-1]
        clusters = regex.findall(r"\X", word)
        if all(len(c.encode("utf-8")) <= max_bytes for c in clusters):
            bounds = {sum(len(c) for c in clusters[:i]) for i in range(len(clusters) + 1)}
            cuts = [sum(len(p) for p in pieces[:i]) for i in range(1, len(pieces))]
            assert set(cuts) <= bounds


@pytest.mark.parametrize("text, words", [
    ("the cat sat.", ["the ", "cat ", "sat", "."]),  # whitespace after the word, punctuation apart
    ("  lead\n\ttab", ["  ", "lead\n\t", "tab"]),  # leading whitespace alone; newline+tab attached
    ("a\r\nb", ["a\r\n", "b"]),
    ("def f(x_1):\n    return x", ["def ", "f", "(", "x_1", "):\n    ", "return ", "x"]),
    ("e\u0301te\u0301 nai\u0308ve", ["e\u0301te\u0301 ", "nai\u0308ve"]),  # Latin + combining marks
    ("Ça coûte 3,50 €", ["Ça ", "coûte ", "3", ",", "50 ", "€"]),
    ("hi 👨\u200d👩\u200d👧 🇯🇵🇫🇷!", ["hi ", "👨\u200d👩\u200d👧 ", "🇯🇵", "🇫🇷", "!"]),  # ZWJ, flags whole
    ("👍🏽ok", ["👍🏽", "ok"]),  # skin-tone modifier stays with its emoji
    ("東京に住む", ["東", "京", "に", "住", "む"]),  # CJK: one word per character (the fallback)
    ("カタカナー", ["カ", "タ", "カ", "ナ", "ー"]),
    ("ภาษาไทย", ["ภ", "า", "ษ", "า", "ไ", "ท", "ย"]),  # Thai: one word per grapheme cluster
    ("ที่นี่", ["ที่", "นี่"]),  # Thai tone marks stay on their consonant
    ("مرحبا بالعالم", ["مرحبا ", "بالعالم"]),  # Arabic: spaced, as Latin
    ("नमस्ते दुनिया", ["नमस्ते ", "दुनिया"]),  # Devanagari: virama clusters inside the word
])
def test_examples(text, words):
    assert split_words(text) == words


def test_cap_at_clusters():
    assert split_words("a" * 10, 4) == ["aaaa", "aaaa", "aa"]
    # "é" as e + combining acute is 3 bytes and is never cut in two
    assert split_words("e\u0301" * 3, 4) == ["e\u0301", "e\u0301", "e\u0301"]
    # a cluster longer than the cap by itself is cut between code points
    assert split_words("x" + "\u0301" * 4, 4) == ["x\u0301", "\u0301\u0301", "\u0301"]


def test_bad_input():
    with pytest.raises(ValueError, match="max_bytes must be >= 4"):
        split_words("abc", 3)
    with pytest.raises(TypeError, match="takes a str"):
        split_words(b"abc")
    assert split_words("") == []
