"""Every token of a new tokenizer as base-tokenizer pieces, plus the exact overlap between them.

Tokens are compared by their *surface*: the bytes they stand for in running text, with a leading
space marking the start of a word. Each tokenizer kind writes that differently:

* byte-level BPE (GPT-2, SmolLM2): every byte is one printable character (``Ġ`` is the space);
  a token may be a fragment of a multi-byte character, so surfaces are bytes, never decoded text;
* WordPiece (BERT): a word-initial piece ``abc`` is `` abc``, a continuation ``##abc`` is ``abc``;
* Metaspace / SentencePiece (Unigram, Llama-2 BPE): ``▁`` is the space, ``<0xAB>`` one byte.

The decomposition of a new token is the base tokenizer's tokenization of its surface. For a
byte-level base that runs the base BPE model on the surface's bytes directly (no pre-tokenizer),
so a token that splits a UTF-8 character still decomposes into the base's byte tokens. Special
tokens are mapped by role (bos/eos/pad/unk/mask) and by identical content (chat-template tokens).
The result is padded arrays, (V_new, P) ids + mask, that methods consume with jnp.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence

import numpy as np
from tokenizers import Tokenizer

from jaxtok.tokenization import TextTokenizer


class TransferError(ValueError):
    """A tokenizer transfer cannot be done as asked (the message says why)."""


# Names special tokens go by in common tokenizers, per role (for a role the base knows by id).
ROLE_NAMES = {
    "bos": ("<s>", "<|begin_of_text|>", "<bos>", "[CLS]", "<|im_start|>"),
    "eos": ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "[SEP]", "<|im_end|>"),
    "pad": ("<pad>", "[PAD]", "<|pad|>", "<|endoftext|>"),
    "unk": ("<unk>", "[UNK]", "<|unk|>"),
    "mask": ("<mask>", "[MASK]"),
}


@functools.cache
def byte_to_char() -> dict[int, str]:
    """GPT-2's reversible map from the 256 bytes to printable characters (the ByteLevel alphabet):
    printable Latin-1 bytes map to themselves, the other 68 to U+0100 onwards, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


@functools.cache
def char_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_char().items()}


def _components(node: dict | None) -> list[dict]:
    """A pre-tokenizer/decoder JSON node and, for a Sequence, its members."""
    if not node:
        return []
    members = node.get("pretokenizers") or node.get("decoders") or []
    return [node, *[m for member in members for m in _components(member)]]


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """What a tokenizer's tokens stand for.

    Attributes:
      kind: ``byte_level``, ``wordpiece``, ``metaspace`` or ``plain`` (how surfaces are written).
      surfaces: per id, the bytes of the token in running text (leading space = word start).
      special: per id, whether it is an added special token (compared by content, not surface).
      contents: per id, the token string as the tokenizer stores it.
      unk: the unknown token's content, if the model has one.
    """

    kind: str
    surfaces: tuple[bytes, ...]
    special: np.ndarray
    contents: tuple[str, ...]
    unk: str | None

    @property
    def size(self) -> int:
        return len(self.surfaces)

    def ids_by_surface(self) -> dict[bytes, int]:
        """Surface -> lowest non-special id with it."""
        table: dict[bytes, int] = {}
        for i, (surface, is_special) in enumerate(zip(self.surfaces, self.special)):
            if not is_special and surface not in table:
                table[surface] = i
        return table

    def ids_by_content(self) -> dict[str, int]:
        return {c: i for i, c in reversed(list(enumerate(self.contents)))}


def vocabulary(hf: Tokenizer) -> Vocabulary:
    """The surfaces of every id of ``hf`` (see the module docstring)."""
    spec = json.loads(hf.to_str())
    model = spec["model"]
    parts = [c.get("type") for c in _components(spec.get("pre_tokenizer")) + _components(spec.get("decoder"))]
    if "ByteLevel" in parts:
        kind = "byte_level"
    elif model["type"] == "WordPiece":
        kind = "wordpiece"
    elif "Metaspace" in parts or model["type"] == "Unigram":
        kind = "metaspace"
    else:
        kind = "plain"
    size = hf.get_vocab_size(with_added_tokens=True)
    contents = [hf.id_to_token(i) or "" for i in range(size)]
    added = {i: t for i, t in hf.get_added_tokens_decoder().items()}
    special = np.zeros(size, bool)
    for i, tok in added.items():
        special[i] = tok.special
    prefix = model.get("continuing_subword_prefix") or "##"
    to_byte = char_to_byte()
    surfaces = []
    for i, token in enumerate(contents):
        if i in added:
            surfaces.append(token.encode("utf-8"))
        elif kind == "byte_level":
            # a token of a byte-level vocabulary outside the alphabet (rare) is kept as UTF-8
            surfaces.append(bytes(to_byte[c] for c in token) if all(c in to_byte for c in token)
                            else token.encode("utf-8"))
        elif kind == "wordpiece":
            surfaces.append(token[len(prefix):].encode("utf-8") if token.startswith(prefix)
                            else b" " + token.encode("utf-8"))
        elif kind == "metaspace":
            if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                surfaces.append(bytes([int(token[3:5], 16)]))  # SentencePiece byte fallback
            else:
                surfaces.append(token.replace("▁", " ").encode("utf-8"))
        else:
            surfaces.append(token.encode("utf-8"))
    unk = model.get("unk_token")
    if unk is None and model["type"] == "Unigram" and model.get("unk_id") is not None:
        unk = contents[model["unk_id"]]
    return Vocabulary(kind=kind, surfaces=tuple(surfaces), special=special, contents=tuple(contents), unk=unk)


@dataclasses.dataclass(frozen=True)
class Decomposition:
    """The new vocabulary in terms of the base one (numpy arrays; methods move them to device).

    Attributes:
      pieces: (V_new, P) base ids of each new token's pieces, 0 where ``mask`` is False.
      mask: (V_new, P) which entries of ``pieces`` are real.
      overlap: (V_new,) the base id with exactly the same surface, else -1 (specials excluded).
      special: (V_new,) the base id a special token maps to by role or content, else -1.
      new: the new tokenizer's ``Vocabulary``; base: the base tokenizer's.
    """

    pieces: np.ndarray
    mask: np.ndarray
    overlap: np.ndarray
    special: np.ndarray
    new: Vocabulary
    base: Vocabulary

    @property
    def num_new(self) -> int:
        return self.pieces.shape[0]

    @property
    def copied(self) -> np.ndarray:
        """(V_new,) base id copied for the token (special mapping first, then exact overlap)."""
        return np.where(self.special >= 0, self.special, self.overlap)

    def summary(self) -> dict[str, int]:
        return {"new_vocab": int(self.num_new), "base_vocab": int(self.base.size),
                "overlap": int((self.overlap >= 0).sum()), "special_mapped": int((self.special >= 0).sum()),
                "max_pieces": int(self.pieces.shape[1]),
                "no_pieces": int((~self.mask.any(axis=1) & (self.copied < 0)).sum())}


def _base_segmenter(base: Tokenizer, kind: str) -> Tokenizer:
    """A copy of ``base`` that tokenizes one surface as a single word: for byte-level BPE the
    normalizer and pre-tokenizer are removed, so the BPE model sees the mapped bytes as they are."""
    copy = Tokenizer.from_str(base.to_str())
    copy.no_padding()
    copy.no_truncation()
    if kind == "byte_level":
        copy.normalizer = None
        copy.pre_tokenizer = None
    return copy


_BASE_SIDE: dict[tuple[str, int], tuple[Tokenizer, object]] = {}


def _once_per_tokenizer(what: str, hf: Tokenizer, make):
    """``make(hf)``, kept while ``hf`` is the same object: hypernetwork training decomposes a new
    vocabulary every step against one base tokenizer (its vocabulary and segmenter take ~0.6 s
    for SmolLM2)."""
    hit = _BASE_SIDE.get((what, id(hf)))
    if hit is None or hit[0] is not hf:
        if len(_BASE_SIDE) >= 8:
            _BASE_SIDE.clear()
        hit = _BASE_SIDE[(what, id(hf))] = (hf, make(hf))
    return hit[1]


def _segment(surfaces: Sequence[bytes], base_hf: Tokenizer, base_vocab: Vocabulary) -> list[list[int]]:
    """Base ids of each surface, one batch call."""
    segmenter = _once_per_tokenizer(f"segmenter-{base_vocab.kind}", base_hf,
                                    lambda hf: _base_segmenter(hf, base_vocab.kind))
    if base_vocab.kind == "byte_level":
        to_char = byte_to_char()
        texts = ["".join(to_char[b] for b in s) for s in surfaces]
        return [e.ids for e in segmenter.encode_batch(texts, add_special_tokens=False)]
    # other kinds take text: a fragment of a UTF-8 character cannot be spelled, so it becomes
    # U+FFFD (the base tokenizer then gives its unknown token, as it would in running text)
    texts = [s.decode("utf-8", errors="replace") for s in surfaces]
    ids = [e.ids for e in segmenter.encode_batch(texts, add_special_tokens=False)]
    # a continuation (no leading space) should start with the base's continuation piece:
    # tokenizers mark word starts themselves (WordPiece drops "##", Metaspace prepends "▁")
    by_surface = base_vocab.ids_by_surface()
    for row, surface in zip(ids, surfaces):
        if row and not surface.startswith(b" "):
            first = base_vocab.surfaces[row[0]]
            if first.startswith(b" ") and first[1:] in by_surface:
                row[0] = by_surface[first[1:]]
    return ids


def _role_ids(tok: TextTokenizer, vocab: Vocabulary) -> dict[str, int]:
    roles = {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id}
    if vocab.unk is not None:
        roles["unk"] = vocab.ids_by_content().get(vocab.unk)
    return {r: i for r, i in roles.items() if i is not None}


def chat_template_tokens(tok: TextTokenizer, vocab: Vocabulary) -> list[str]:
    """Special tokens of ``tok`` that its chat template writes literally."""
    if not tok.chat_template:
        return []
    return [c for c, s in zip(vocab.contents, vocab.special) if s and c and c in tok.chat_template]


def map_specials(base: TextTokenizer, base_vocab: Vocabulary, new_vocab: Vocabulary,
                 require_chat_tokens: bool = True) -> tuple[np.ndarray, dict[str, int]]:
    """(V_new,) base id per new special token, and the new tokenizer's id per role.

    Identical content wins; otherwise a role the base has by id is looked up among the new
    tokenizer's specials by the usual names of that role (``ROLE_NAMES``)."""
    mapping = np.full(new_vocab.size, -1, np.int32)
    base_by_content = {c: i for i, (c, s) in enumerate(zip(base_vocab.contents, base_vocab.special)) if s}
    new_specials = {c: i for i, (c, s) in enumerate(zip(new_vocab.contents, new_vocab.special)) if s}
    for content, i in new_specials.items():
        if content in base_by_content:
            mapping[i] = base_by_content[content]
    new_roles = {}
    for role, base_id in _role_ids(base, base_vocab).items():
        content = base_vocab.contents[base_id]
        candidates = [content, *ROLE_NAMES.get(role, ())]
        found = next((new_specials[c] for c in candidates if c in new_specials), None)
        if found is None and role == "unk" and new_vocab.unk in new_specials:
            found = new_specials[new_vocab.unk]
        if found is not None:
            new_roles[role] = found
            if mapping[found] < 0:
                mapping[found] = base_id
    if require_chat_tokens:
        missing = [c for c in chat_template_tokens(base, base_vocab) if c not in new_specials]
        if missing:
            raise TransferError(
                f"the new tokenizer lacks {missing}, which the base model's chat template needs; "
                "train it with `jaxtok train-tokenizer --base MODEL` (keeps the base's special tokens) "
                "or transfer without the chat template (--no-chat-template)")
    return mapping, new_roles


def decompose(base: TextTokenizer, new: Tokenizer, *, max_pieces: int | None = None,
              require_chat_tokens: bool = True) -> Decomposition:
    """Decomposes every token of ``new`` into pieces of ``base`` (see the module docstring).

    ``max_pieces`` truncates longer decompositions (None: the longest one sets the width).
    Raises ``TransferError`` when the vocabularies share no token at all (then no method has
    anything to anchor on: almost always the wrong file) or when a chat-template token is missing.
    """
    base_vocab, new_vocab = _once_per_tokenizer("vocabulary", base.hf, vocabulary), vocabulary(new)
    special, _ = map_specials(base, base_vocab, new_vocab, require_chat_tokens)
    by_surface = base_vocab.ids_by_surface()
    overlap = np.array([-1 if s else by_surface.get(surface, -1)
                        for surface, s in zip(new_vocab.surfaces, new_vocab.special)], np.int32)
    if not (overlap >= 0).any():
        raise TransferError("the new tokenizer shares no token with the base tokenizer (not even single "
                            "bytes or characters); is it a tokenizer for the same kind of text?")
    # specials have no pieces: they are copied by role or, unmapped, get the method's fallback
    rows = _segment([b"" if s else surface for surface, s in zip(new_vocab.surfaces, new_vocab.special)],
                    base.hf, base_vocab)
    width = max(1, max((len(r) for r in rows), default=1))
    if max_pieces is not None:
        width = min(width, max_pieces)
    pieces = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, row in enumerate(rows):  # numpy bookkeeping only; no embedding is touched here
        row = row[:width]
        pieces[i, :len(row)] = row
        mask[i, :len(row)] = True
    return Decomposition(pieces=pieces, mask=mask, overlap=overlap, special=special, new=new_vocab,
                         base=base_vocab)
