"""Autoregressive generation with a KV cache: greedy, temperature, top-k and top-p sampling.

Prompts are left-padded (padding gets position -1, so no query ever attends to it). The whole
prefill + decode loop is one jitted function (a ``lax.while_loop`` that stops when every row has
produced EOS), so decoding a token costs one fused step with no Python dispatch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtok.decode import tokenselect
from jaxtok.models.llama import KVCache
from jaxtok.nn.layers import split_layers


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 is greedy; top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"invalid sampling settings {self}")


def sample_token(logits: jax.Array, rng: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """(B, V) float32 logits -> (B,) int32 token ids."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k > 0:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        cutoff_index = jnp.sum(cumulative < sampling.top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, multiple: int = 16):
    """Token and position arrays for left-padded prompts; length rounded up to ``multiple`` so
    prompts of similar length share one compiled program."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    length = -(-max(len(p) for p in prompts) // multiple) * multiple
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    positions = np.full((len(prompts), length), -1, np.int32)
    for row, p in enumerate(prompts):
        tokens[row, length - len(p):] = p
        positions[row, length - len(p):] = np.arange(len(p))
    return tokens, positions


def _new_cache(model, batch: int, length: int):
    """The family's empty cache: ``model.init_cache(batch, length)`` where the family defines one
    (Mamba: a fixed-size recurrent state), else a :class:`KVCache` of ``length`` slots."""
    make = getattr(model, "init_cache", None)
    return make(batch, length) if make is not None else KVCache.create(model.config, batch, length)


def _grow(cache: Any, extra: int) -> Any:
    """``cache`` with room for ``extra`` more tokens (a cache other than KVCache grows itself)."""
    if not isinstance(cache, KVCache):
        return cache.grow(extra)
    pad = [(0, 0)] * cache.k.ndim
    pad[2] = (0, extra)  # (L, B, S, K, D)
    return cache.replace(k=jnp.pad(cache.k, pad), v=jnp.pad(cache.v, pad),
                         positions=jnp.pad(cache.positions, ((0, 0), (0, extra)), constant_values=-1))


def _prefill(model, params, tokens, positions, cache, sparse):
    """The prompt's pass: one call, or TokenSelect's chunked prefill. Returns (cache, last logits)."""
    if sparse is None:
        out = model.apply({"params": params}, tokens, positions=positions, cache=cache, last_logits_only=True)
        return out.cache, out.logits[:, -1]
    chunk = min(sparse.chunk, tokens.shape[1])  # a prompt shorter than a chunk is one chunk
    return tokenselect.chunked_prefill(model, params, tokens, positions, dataclasses.replace(sparse, chunk=chunk),
                                       cache=cache)


def _generate(model, decode_model, params, tokens, positions, rng, first_allowed=None, *, max_new_tokens: int,
              sampling: SamplingConfig, eos_id: int, pad_id: int, sparse=None):
    batch, prompt_len = tokens.shape
    # The prompt attends to a cache of its own length (not to the empty slots of the new tokens),
    # which then grows by max_new_tokens empty slots (position -1) for decoding.
    cache = _new_cache(model, batch, prompt_len)
    if sparse is not None and not isinstance(cache, KVCache):
        raise ValueError(f"sparse attention needs a KV cache; {type(model).__name__} keeps {type(cache).__name__}")
    cache, last_logits = _prefill(model, params, tokens, positions, cache, sparse)
    cache = _grow(cache, max_new_tokens)
    if sparse is not None and sparse.cache_threshold is not None:
        c = model.config
        cache = cache.replace(selection=tokenselect.SelectionState.create(
            sparse, c.n_layers, batch, c.n_heads, c.n_kv_heads, c.head_dim))
    next_pos = positions[:, -1] + 1
    rng, step_rng = jax.random.split(rng)
    if first_allowed is not None:
        last_logits = jnp.where(first_allowed, last_logits, jnp.finfo(last_logits.dtype).min)
    first = sample_token(last_logits, step_rng, sampling)
    generated = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)

    def cond(state):
        step, _, _, done, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, cache, last, done, generated, rng = state
        pos = (next_pos + step - 1)[:, None]
        kw = {} if sparse is None else {"sparse": sparse}
        out = decode_model.apply({"params": decode_params}, last[:, None], positions=pos, cache=cache, **kw)
        rng, step_rng = jax.random.split(rng)
        token = sample_token(out.logits[:, -1], step_rng, sampling)
        token = jnp.where(done, pad_id, token)
        generated = jax.lax.dynamic_update_slice_in_dim(generated, token[:, None], step, axis=1)
        return step + 1, out.cache, token, done | (token == eos_id), generated, rng

    decode_params = params
    if max_new_tokens > 1 and getattr(decode_model.config, "layer_loop", "scan") == "unrolled":
        decode_params = split_layers(params)  # once per call, not per step (see split_layers)

    state = (jnp.int32(1), cache, first, first == eos_id, generated, rng)
    _, _, _, _, generated, _ = jax.lax.while_loop(cond, body, state)
    return generated


# Layer loop per use, picked by measurement (benchmarks/smollm2_forward.py --compare-loops; None =
# the config's): unrolled decoding reads per-layer weights split once per call, so no step copies a
# layer's weights out of the stack (SmolLM2 on CPU: as fast as scan on a quiet machine, 1.4-1.8x
# faster under load, ~6 s more compile); prefill stays scan (unrolled was slower there).
PREFILL_LAYER_LOOP: str | None = None
DECODE_LAYER_LOOP: str | None = "unrolled"

_STATIC = ("model", "decode_model", "max_new_tokens", "sampling", "eos_id", "pad_id", "sparse")
_generate_jit = jax.jit(_generate, static_argnames=_STATIC)
# XLA:CPU's float-normalization pass gives bf16 ops that lack a bf16 kernel float32 operands,
# dynamic-slice among them: the slice that takes each layer's weights (and cache) in the layer scan.
# The whole stacked bf16 weights are then converted to float32, hoisted out of the loops, and every
# decoding step reads float32 weights and converts them back: bf16 decoded slower than float32.
# Without the pass, slices stay bf16 (decoding ~1.7x faster, logits as close to float32's). It is
# only safe when every matrix product accumulates in float32 (``matmul``, the reference
# attention): a bf16-output product then has no CPU kernel and compiling fails.
_generate_jit_cpu = jax.jit(_generate, static_argnames=_STATIC,
                            compiler_options={"xla_disable_hlo_passes": "float-normalization-bf16"})


def _skip_float_normalization(model, params) -> bool:
    """On CPU, for 16-bit compute, unless attention is jax.nn's (its bf16-output products have no
    CPU kernel without the pass: compiling fails)."""
    leaf = jax.tree.leaves(params)[0]
    devices = leaf.devices() if isinstance(leaf, jax.Array) else ()
    platform = next(iter(devices)).platform if devices else jax.default_backend()
    config = model.config
    low_precision = jnp.finfo(config.compute_dtype).bits < 32
    return platform == "cpu" and low_precision and getattr(config, "attention", None) != "xla"


def with_layer_loop(model: Any, layer_loop: str | None) -> Any:
    """``model`` with its config's ``layer_loop`` replaced (same parameters: every loop reads the
    one stacked layout); ``model`` itself when ``layer_loop`` is None or the config has no loop."""
    config = model.config
    if layer_loop is None or not hasattr(config, "layer_loop") or config.layer_loop == layer_loop:
        return model
    return type(model)(dataclasses.replace(config, layer_loop=layer_loop))


def generate(model: Any, params: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             eos_id: int, pad_id: int | None = None, sampling: SamplingConfig = SamplingConfig(),
             rng: jax.Array | None = None, prefill_loop: str | None = PREFILL_LAYER_LOOP,
             decode_loop: str | None = DECODE_LAYER_LOOP,
             sparse: tokenselect.TokenSelectConfig | None = None,
             first_allowed: np.ndarray | None = None) -> list[list[int]]:
    """Continuations of ``prompts`` (lists of ids); each stops after its EOS (kept) or at
    ``max_new_tokens``.

    ``first_allowed``: (len(prompts), vocab) bools, the ids each row's first new token may take
    (token healing: the prompt without its last token, continued by a token that starts with
    that token's bytes); None allows every id.

    ``prefill_loop`` / ``decode_loop``: the layer loop (``scan``, ``unrolled``) of the prompt's
    pass and of the one-token steps; None keeps the model config's ``layer_loop``.
    ``sparse``: TokenSelect (chunked prefill of the prompt, then selection at every step).
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    own = getattr(model, "generate_ids", None)
    if own is not None:  # a family that decodes its own way (the byte LM: words of bytes, ids = bytes)
        if sparse is not None or first_allowed is not None:
            raise ValueError(f"{type(model).__name__} has no sparse decoding or first-token constraint")
        return own(params, prompts, max_new_tokens=max_new_tokens, sampling=sampling, rng=rng)
    pad_id = eos_id if pad_id is None else pad_id
    longest = max((len(p) for p in prompts), default=0)
    # chunked prefill: prompts longer than a chunk are padded to whole chunks
    multiple = sparse.chunk if sparse is not None and longest > sparse.chunk else 16
    tokens, positions = left_pad(prompts, pad_id, multiple)
    # positions, not padded slots, are what the model was trained on (padding has position -1)
    if longest + max_new_tokens > model.config.max_seq_len:
        raise ValueError(f"prompt ({longest} tokens) + {max_new_tokens} new tokens exceeds "
                         f"the model's context of {model.config.max_seq_len}")
    if first_allowed is not None:
        first_allowed = np.asarray(first_allowed, bool)
        want = (len(prompts), model.config.vocab_size)
        if first_allowed.shape != want:
            raise ValueError(f"first_allowed has shape {first_allowed.shape}, expected (prompts, vocab) = {want}")
        if not first_allowed.any(axis=1).all():
            raise ValueError("first_allowed leaves a row no token to start with")
        first_allowed = jnp.asarray(first_allowed)
    rng = jax.random.key(0) if rng is None else rng
    run = _generate_jit_cpu if _skip_float_normalization(model, params) else _generate_jit
    # one new token runs no decode step: no need to compile an unrolled one
    models = (with_layer_loop(model, prefill_loop),
              with_layer_loop(model, decode_loop if max_new_tokens > 1 else prefill_loop))
    out = np.asarray(run(*models, params, jnp.asarray(tokens), jnp.asarray(positions), rng, first_allowed,
                         max_new_tokens=max_new_tokens, sampling=sampling, eos_id=eos_id, pad_id=pad_id,
                         sparse=sparse))
    results = []
    for row in out:
        ids = row.tolist()
        if eos_id in ids:
            ids = ids[:ids.index(eos_id) + 1]
        results.append(ids)
    return results
