"""Bits per byte of a causal LM + tokenizer on a text, with a sliding window for long texts.

The text is tokenized once; the tokenizer's document-start token (if any) is put in front so the
first text token is scored too. Windows of ``window`` tokens advance by ``stride``; each token is
scored exactly once, in the first window that holds it after the overlap, so every prediction
sees at least ``window - stride`` tokens of context (except at the start).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxtok.objectives import bits_per_byte, masked_sum, token_nll
from jaxtok.tokenization import TextTokenizer


@dataclasses.dataclass(frozen=True)
class BPBResult:
    bpb: float
    nats: float
    tokens: int  # scored tokens
    bytes: int  # UTF-8 bytes of the scored text

    def result_line(self) -> str:
        return f"RESULT bpb={self.bpb:.6f} tokens={self.tokens} bytes={self.bytes}"


def sliding_windows(num_ids: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, score_from) for windows over ``num_ids`` ids: inputs are ids[start:end-1],
    targets ids[start+1:end]; targets with index >= score_from are scored."""
    if not 0 < stride <= window:
        raise ValueError(f"need 0 < stride <= window, got stride={stride}, window={window}")
    spans, scored_until, start = [], 1, 0
    while scored_until < num_ids:
        end = min(start + window + 1, num_ids)
        spans.append((start, end, scored_until))
        scored_until = end
        start = max(end - 1 - (window - stride), 0) if end < num_ids else end
    return spans


def make_nll_fn(apply_fn: Callable[..., Any]) -> Callable:
    """Jitted (params, inputs, targets, mask, positions) -> summed nats; ``apply_fn(params,
    tokens, positions)`` returns logits."""

    @jax.jit
    def summed_nll(params, inputs, targets, mask, positions):
        logits = apply_fn(params, inputs, positions)
        return masked_sum(token_nll(logits, targets), mask)

    return summed_nll


def evaluate_bpb(apply_fn: Callable[..., Any], params: Any, tokenizer: TextTokenizer, text: str,
                 window: int = 1024, stride: int | None = None, batch_size: int = 4,
                 progress: bool = True, nll_fn: Callable | None = None) -> BPBResult:
    """Bits per byte of ``text``. ``apply_fn(params, tokens (B,T), positions (B,T)) -> logits``;
    or ``nll_fn`` (the summed-nats function :func:`make_nll_fn` would build) scores each window
    another way (TokenSelect's chunked prefill: ``jaxtok.decode.tokenselect.make_nll_fn``)."""
    if not text:
        raise ValueError("cannot evaluate bits per byte on empty text")
    stride = window // 2 if stride is None else stride
    encoding = tokenizer.hf.encode(text, add_special_tokens=False)
    ids = encoding.ids
    num_bytes = len(text.encode("utf-8"))
    if tokenizer.doc_start_id is not None:
        ids = [tokenizer.doc_start_id] + ids
    elif ids:  # the first token has no context: its text is not evaluated
        num_bytes -= len(text[:encoding.offsets[0][1]].encode("utf-8"))
    if len(ids) < 2:
        raise ValueError("text too short: no token to score")
    ids = np.asarray(ids, np.int32)
    spans = sliding_windows(len(ids), window, stride)
    nll_fn = make_nll_fn(apply_fn) if nll_fn is None else nll_fn
    total, scored = 0.0, 0
    batches = [spans[i:i + batch_size] for i in range(0, len(spans), batch_size)]
    for batch in tqdm(batches, desc="bits/byte", disable=not progress, unit="batch"):
        inputs = np.zeros((batch_size, window), np.int32)
        targets = np.zeros((batch_size, window), np.int32)
        mask = np.zeros((batch_size, window), np.float32)
        positions = np.full((batch_size, window), -1, np.int32)
        for row, (start, end, score_from) in enumerate(batch):
            n = end - 1 - start
            inputs[row, :n] = ids[start:end - 1]
            targets[row, :n] = ids[start + 1:end]
            positions[row, :n] = np.arange(n)
            mask[row, score_from - 1 - start:n] = 1.0
            scored += end - score_from
        total += float(nll_fn(params, jnp.asarray(inputs), jnp.asarray(targets), jnp.asarray(mask),
                              jnp.asarray(positions)))
    return BPBResult(bpb=bits_per_byte(total, num_bytes), nats=total, tokens=scored, bytes=num_bytes)
