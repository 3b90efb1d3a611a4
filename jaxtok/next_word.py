"""Next-word metrics on one definition for every kind of LM (word-pooled byte, subword, byte-level).

**Next-word accuracy.** For every word ``w_i`` of a text (``split_words``, the same length cap for
every model), the model gets the text before it (at most ``context_bytes`` UTF-8 bytes, cut at a
word boundary, the same text for every model) and continues it greedily until its continuation
has at least ``len(w_i) + 4`` bytes (or the model stops). The prediction is right iff the
continuation starts with exactly the bytes of ``w_i`` *and* ``w_i`` ends there: ``split_words``
of ``w_i`` + the rest of the continuation starts with ``w_i`` itself (so ``"cat"`` is wrong when
the model wrote ``"cats"``, and ``"cat "`` is wrong when it wrote ``"cat  "``). The 4 extra bytes
are one whole code point after the word, which is what the boundary depends on. Subword tokens
straddle word boundaries; this definition does not care how the continuation is cut into
tokens, words or bytes, only which bytes it holds. Every word of the text is scored (no sampling).

**Frequency buckets**: by the word's count in the training corpus (``counts``): unseen, 1-9,
10-99, 100-999, 1000+ ("rare words" = the first two).

A model enters through a :class:`Continuer`: a batch of context strings and byte budgets in,
greedy continuations (bytes) out. :class:`TokenLMContinuer` serves any jaxtok decoder LM with a
tokenizer (a subword Llama, a byte-level Llama); :class:`ByteLMContinuer` the word-pooled byte LM.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from jaxtok.segmentation import DEFAULT_MAX_BYTES, split_words

BOUNDARY_BYTES = 4  # a whole code point after the word decides where it ends
BUCKETS: tuple[tuple[str, int, int | None], ...] = (
    ("unseen", 0, 0), ("1-9", 1, 9), ("10-99", 10, 99), ("100-999", 100, 999), ("1000+", 1000, None))


class Continuer(Protocol):
    def __call__(self, contexts: Sequence[str], min_bytes: int) -> list[bytes]:
        """Greedy continuations of ``contexts``, each of ``min_bytes`` bytes or more (fewer
        only where the model ended the document)."""


def word_is_right(target: str, continuation: bytes, max_bytes: int | None = DEFAULT_MAX_BYTES) -> bool:
    """The definition of a right next word (module docstring)."""
    want = target.encode("utf-8")
    if continuation[:len(want)] != want:
        return False
    rest = continuation[len(want):].decode("utf-8", errors="ignore")
    return split_words(target + rest, max_bytes)[0] == target


def bucket_of(count: int) -> str:
    for name, low, high in BUCKETS:
        if count >= low and (high is None or count <= high):
            return name
    raise ValueError(f"negative count {count}")


@dataclasses.dataclass(frozen=True)
class NextWordResult:
    """Right predictions / words scored, overall and per frequency bucket (name -> (right, total))."""

    right: int
    total: int
    buckets: Mapping[str, tuple[int, int]]

    @property
    def accuracy(self) -> float:
        return self.right / max(self.total, 1)

    def bucket_accuracy(self, name: str) -> float | None:
        right, total = self.buckets.get(name, (0, 0))
        return right / total if total else None

    @property
    def rare_accuracy(self) -> float | None:
        """Accuracy on words seen fewer than 10 times in training (unseen included)."""
        right = sum(self.buckets.get(n, (0, 0))[0] for n in ("unseen", "1-9"))
        total = sum(self.buckets.get(n, (0, 0))[1] for n in ("unseen", "1-9"))
        return right / total if total else None


def contexts_and_targets(text: str, context_bytes: int, max_bytes: int | None = DEFAULT_MAX_BYTES
                         ) -> list[tuple[str, str]]:
    """(context, next word) for every word of ``text``: the context is the longest run of whole
    words before it that fits in ``context_bytes`` bytes (empty for the first word)."""
    words = split_words(text, max_bytes)
    sizes = np.cumsum([0] + [len(w.encode("utf-8")) for w in words])
    out, start = [], 0
    for i, word in enumerate(words):
        while sizes[i] - sizes[start] > context_bytes:
            start += 1
        out.append(("".join(words[start:i]), word))
    return out


def next_word_accuracy(continuer: Continuer, text: str, *, context_bytes: int,
                       counts: Mapping[str, int] | None = None, max_bytes: int | None = DEFAULT_MAX_BYTES,
                       batch_size: int = 32, limit: int | None = None,
                       on_batch: Callable[[int, int], None] | None = None) -> NextWordResult:
    """Next-word accuracy of ``continuer`` on every word of ``text`` (the first ``limit`` words
    when given); ``counts``: training-corpus counts per word for the buckets."""
    pairs = contexts_and_targets(text, context_bytes, max_bytes)[:limit]
    if not pairs:
        raise ValueError("no word to score: the text is empty")
    # batches of similar targets: the byte budget (a compiled shape) is the batch's longest
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][1].encode("utf-8")))
    verdicts = np.zeros(len(pairs), bool)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        need = max(len(pairs[i][1].encode("utf-8")) for i in chunk) + BOUNDARY_BYTES
        need = -(-need // 4) * 4  # a few budgets only: each one compiles
        continuations = continuer([pairs[i][0] for i in chunk], need)
        for i, cont in zip(chunk, continuations):
            verdicts[i] = word_is_right(pairs[i][1], cont, max_bytes)
        if on_batch is not None:
            on_batch(start + len(chunk), len(pairs))
    buckets: dict[str, list[int]] = {}
    for (_, word), right in zip(pairs, verdicts):
        entry = buckets.setdefault(bucket_of((counts or {}).get(word, 0)), [0, 0])
        entry[0] += int(right)
        entry[1] += 1
    return NextWordResult(right=int(verdicts.sum()), total=len(pairs),
                          buckets={k: (v[0], v[1]) for k, v in buckets.items()})


# ---------------------------------------------------------------------------------------------
# Models


@dataclasses.dataclass(frozen=True)
class TokenLMContinuer:
    """A decoder LM with a tokenizer (``jaxtok.decode.generate``, greedy, KV cache). The context
    is tokenized on its own behind the tokenizer's document-start token, as in ``eval-bpb``; the
    model decodes ``min_bytes`` tokens (every token holds at least one byte, so that is enough).

    ``heal_whitespace``: words end with their whitespace, but a GPT-2 style BPE puts spaces at the
    start of its tokens, so a context ending in a space ends in a token the model hardly saw there
    (``"Ġ"`` alone, where training text had ``"Ġsat"``). With healing, trailing whitespace is cut
    from the prompt and the continuation must produce it first: the same bytes are predicted,
    from a prompt cut where the tokenizer cuts (a continuation that does not start with the
    whitespace is returned as it is, so it fails). Set for subword models; byte models need none.

    ``heal_tokens`` (token healing, byte-level BPEs): the same for any cut, not only whitespace. A
    context cut inside a piece the tokenizer would have merged (a Japanese character in the
    middle of a multi-character piece, ``"ca"`` of ``"cat"``) ends in a token the model rarely saw
    there. The prompt's last token is dropped, the first new token must start with its bytes
    (``generate``'s ``first_allowed``), and the continuation must give those bytes back first.
    With both, a context that whitespace healing cut is left as it is (GPT-2 style pre-tokens
    start at whitespace, so that cut is already one the tokenizer makes).
    """

    model: Any
    params: Any
    tokenizer: Any  # jaxtok.tokenization.TextTokenizer
    heal_whitespace: bool = False
    heal_tokens: bool = False

    def __call__(self, contexts: Sequence[str], min_bytes: int) -> list[bytes]:
        from jaxtok.decode.generate import generate

        tok = self.tokenizer
        cut = [c.rstrip() if self.heal_whitespace else c for c in contexts]
        owed = [c[len(k):].encode("utf-8") for c, k in zip(contexts, cut)]  # bytes to produce first
        start = [] if tok.doc_start_id is None else [tok.doc_start_id]
        prompts = [start + tok.encode(c) for c in cut]
        if any(not p for p in prompts):
            raise ValueError("an empty context needs a tokenizer with a document-start token")
        allowed, surfaces = None, None
        if self.heal_tokens:
            surfaces = _surfaces(tok.hf)
            allowed = np.ones((len(prompts), self.model.config.vocab_size), bool)
            for i, prompt in enumerate(prompts):
                # a context cut at its trailing whitespace, or ending in a special token, already
                # ends where the tokenizer cuts
                if len(prompt) > len(start) and not owed[i] and surfaces.lengths[prompt[-1]] >= 0:
                    dropped = surfaces.bytes[prompt[-1]]
                    prompts[i], owed[i] = prompt[:-1], dropped + owed[i]
                    allowed[i] = surfaces.starting_with(dropped, allowed.shape[1])
        eos = tok.eos_id if tok.eos_id is not None else -1
        ids = generate(self.model, self.params, prompts, max_new_tokens=min_bytes + max(map(len, owed)), eos_id=eos,
                       pad_id=0 if tok.pad_id is None else tok.pad_id, first_allowed=allowed)
        out = []
        for row, debt in zip(ids, owed):
            if eos in row:  # the document ended: the continuation stops there
                row = row[:row.index(eos)]
            # surfaces, not decoded text, when healing: a healed token may be part of a character
            text = (surfaces.join(row) if surfaces is not None
                    else tok.decode(row, skip_special_tokens=True).encode("utf-8"))
            out.append(text[len(debt):] if text.startswith(debt) else b"\0" + text)
        return out


@dataclasses.dataclass(frozen=True)
class _Surfaces:
    """The bytes of every token of a byte-level vocabulary, as a padded matrix for prefix tests."""

    bytes: tuple[bytes, ...]
    matrix: np.ndarray  # (V, longest) uint8
    lengths: np.ndarray  # (V,); -1 for special tokens (never allowed, never joined)

    def starting_with(self, prefix: bytes, width: int) -> np.ndarray:
        """(width,) bools: the ids whose bytes start with ``prefix`` (ids past the vocabulary: no)."""
        n = len(prefix)
        ok = (self.lengths >= n) & (self.matrix[:, :n] == np.frombuffer(prefix, np.uint8)).all(axis=1)
        return np.pad(ok, (0, width - len(ok)))[:width]

    def join(self, ids: Sequence[int]) -> bytes:
        return b"".join(self.bytes[i] for i in ids if i < len(self.bytes) and self.lengths[i] >= 0)


@functools.lru_cache(maxsize=4)
def _surfaces(hf) -> _Surfaces:
    from jaxtok.transfer.decompose import vocabulary

    vocab = vocabulary(hf)
    if vocab.kind != "byte_level":
        raise ValueError(f"token healing needs a byte-level tokenizer (its tokens are bytes); this one is {vocab.kind}")
    longest = max(map(len, vocab.surfaces))
    matrix = np.zeros((vocab.size, longest), np.uint8)
    for i, surface in enumerate(vocab.surfaces):
        matrix[i, :len(surface)] = np.frombuffer(surface, np.uint8)
    lengths = np.where(vocab.special, -1, [len(x) for x in vocab.surfaces])
    return _Surfaces(tuple(vocab.surfaces), matrix, lengths)


@dataclasses.dataclass(frozen=True)
class ByteLMContinuer:
    """The word-pooled byte LM (:func:`jaxtok.models.byte_lm.generate_bytes`: word-level KV
    cache, each word's bytes decoded until its EOW)."""

    model: Any
    params: Any

    def __call__(self, contexts: Sequence[str], min_bytes: int) -> list[bytes]:
        from jaxtok.models.byte_lm import generate_bytes

        prompts = [list(c.encode("utf-8")) for c in contexts]
        return [bytes(row) for row in generate_bytes(self.model, self.params, prompts, max_new_bytes=min_bytes)]


# ---------------------------------------------------------------------------------------------
# Bits per byte of the word-pooled LM on a text (the conventions of ``jaxtok eval-bpb``)


def evaluate_bpb_words(model: Any, params: Any, text: str, *, seq_words: int, batch_size: int = 8) -> Any:
    """Bits per byte of ``text`` as one document: the empty BOS word in front (so the first word
    is scored, as ``eval-bpb`` puts the document-start token in front), rows of ``seq_words``
    words without overlap, every word's bytes and its EOW scored, divided by the UTF-8 bytes of
    ``text`` (each byte once). Returns :class:`jaxtok.evaluate.BPBResult` (``tokens``: words)."""
    import jax
    import jax.numpy as jnp

    from jaxtok.data.pipeline import eval_batches
    from jaxtok.data.words import expand, pack_word_documents
    from jaxtok.evaluate import BPBResult
    from jaxtok.models.byte_lm import word_nll
    from jaxtok.objectives import bits_per_byte

    if not text:
        raise ValueError("cannot evaluate bits per byte on empty text")
    rows, table = pack_word_documents([text], seq_words, model.config.max_word_bytes)
    word_bytes, word_lens = table.arrays()

    @jax.jit
    def summed(params, batch):
        nll, mask = word_nll(model, params, batch)
        return jnp.sum(jnp.where(mask > 0, nll, 0.0))

    total, scored, num_bytes = 0.0, 0, 0
    for batch in eval_batches(rows, global_batch=batch_size):
        batch = expand(batch, word_bytes, word_lens)
        total += float(summed(params, {k: jnp.asarray(v) for k, v in batch.items()}))
        scored += int(batch["loss_mask"].sum())
        num_bytes += int(batch["num_bytes"].sum())
    if num_bytes != len(text.encode("utf-8")):  # the packing's promise, checked where it is used
        raise AssertionError(f"scored {num_bytes} bytes of a {len(text.encode('utf-8'))}-byte text")
    return BPBResult(bpb=bits_per_byte(total, num_bytes), nats=total, tokens=scored, bytes=num_bytes)
