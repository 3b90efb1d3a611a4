"""Word-pooled byte LM ("Learn Your Tokens"): byte encoder per word -> word-level causal LM ->
byte decoder per word, all words of a row decoded in parallel.

Shapes: B rows of W words, each word at most L = ``max_word_bytes`` bytes, p = ``prefix_slots``.

* **Encoder** (bidirectional inside a word): each word is its own sequence ``[CLS_1..CLS_p,
  byte_1..byte_n]`` of p + L slots; slots past the word's bytes are padding (segment id 0), so no
  attention crosses words and padding is never attended. The p CLS outputs represent the word.
* **Word LM** (causal): the W*p CLS vectors of a row, slot ``(j, s)`` at position ``j*p + s``,
  with the row's document segment ids, so no attention crosses documents; padding words have
  segment 0.
* **Decoder** (causal, per word): the p outputs of word j followed by the bytes of word j+1,
  ``[ctx_1..ctx_p, byte_1..byte_L]``; output ``p-1+k`` predicts byte ``k+1`` of the word, and after
  its last byte the end-of-word symbol ``EOW`` (256). Byte logits are (B, W, L+1, 257).

A document starts with the empty word (length 0) as its BOS, so the first real word is predicted
too. ``P(word) = prod_k P(byte_k | ...) * P(EOW | word bytes)``: the EOW term is part of each word's
cost, which makes the word distribution normalised and bits per byte an honest code length.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import struct

from jaxtok.models.llama import KVCache
from jaxtok.nn import attention as attn
from jaxtok.nn.layers import (
    DenseGeneral,
    ModelDtypes,
    RMSNorm,
    check_layer_loop,
    matmul,
    param_with_axes,
    require_positive,
    rotary_embedding,
    run_layers,
    scanned_blocks,
)
from jaxtok.sharding import constrain

EOW = 256  # end-of-word symbol: byte outputs are 0..255 and EOW
BYTE_VOCAB = 257


@dataclasses.dataclass(frozen=True)
class ByteLMConfig(ModelDtypes):
    """Shape of the three stacks.

    Attributes:
      max_word_bytes: L, the longest word in bytes (``split_words`` cuts longer ones).
      prefix_slots: p, CLS slots per word (the paper's 1, its code's 4).
      d_model, n_layers, n_heads, head_dim, d_ff: the word-level LM.
      byte_d_model, encoder_layers, decoder_layers, byte_heads, byte_head_dim, byte_d_ff: the byte
        encoder and decoder (same width).
      max_seq_len: longest row in words (positions of the word LM).
      rope_theta, rms_eps, dtype, param_dtype, attention, remat, layer_loop, scan_unroll: as for
        :class:`jaxtok.models.llama.LlamaConfig`, shared by the three stacks.
    """

    max_word_bytes: int = 32
    prefix_slots: int = 4
    d_model: int = 512
    n_layers: int = 8
    n_heads: int = 8
    head_dim: int = 64
    d_ff: int = 2048
    byte_d_model: int = 256
    encoder_layers: int = 2
    decoder_layers: int = 2
    byte_heads: int = 4
    byte_head_dim: int = 64
    byte_d_ff: int = 1024
    max_seq_len: int = 192
    rope_theta: float = 10_000.0
    rms_eps: float = 1e-5
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention: str = "auto"
    remat: bool | str = False
    layer_loop: str = "scan"
    scan_unroll: int = 1

    def __post_init__(self):
        check_layer_loop(self.layer_loop, self.scan_unroll, self.remat)
        if self.max_word_bytes < 4:
            raise ValueError(f"max_word_bytes must be >= 4 (a UTF-8 code point), got {self.max_word_bytes}")
        require_positive(self, "prefix_slots", "d_model", "n_layers", "n_heads", "head_dim", "d_ff", "byte_d_model",
                         "encoder_layers", "decoder_layers", "byte_heads", "byte_head_dim", "byte_d_ff", "max_seq_len")
        attn.AttentionImpl(self.attention)

    def stack(self, which: str) -> StackConfig:
        """The config of one stack: ``encoder``, ``word`` or ``decoder``."""
        common = dict(rope_theta=self.rope_theta, rms_eps=self.rms_eps, dtype=self.dtype,
                      param_dtype=self.param_dtype, attention=self.attention, remat=self.remat,
                      layer_loop=self.layer_loop, scan_unroll=self.scan_unroll)
        if which == "word":
            return StackConfig(self.d_model, self.n_layers, self.n_heads, self.head_dim, self.d_ff, True, **common)
        layers = self.encoder_layers if which == "encoder" else self.decoder_layers
        return StackConfig(self.byte_d_model, layers, self.byte_heads, self.byte_head_dim, self.byte_d_ff,
                           which == "decoder", **common)

    def num_params(self) -> int:
        def stack(d, n, h, k, f):
            return n * (4 * d * h * k + 3 * d * f + 2 * d) + d

        d, db, p = self.d_model, self.byte_d_model, self.prefix_slots
        byte = stack(db, self.encoder_layers, self.byte_heads, self.byte_head_dim, self.byte_d_ff)
        byte += stack(db, self.decoder_layers, self.byte_heads, self.byte_head_dim, self.byte_d_ff)
        word = stack(d, self.n_layers, self.n_heads, self.head_dim, self.d_ff)
        tables = 2 * 256 * db + BYTE_VOCAB * db + p * db
        return byte + word + tables + 2 * d * db

    def flops_per_word(self, seq_words: int | None = None) -> float:
        """Training FLOPs per word, counted as :func:`jaxtok.train.flops.model_flops_per_token`
        counts a token (3 x forward; forward = 2 x matmul parameters + 4 x layers x heads x
        head_dim x context per slot), over every slot the dense layout computes: p + L byte slots
        in the encoder and decoder (padding included), p slots in the word LM whose context is
        the row's W*p slots (W = ``seq_words``, default ``max_seq_len``), and the byte head
        over L + 1 outputs."""
        p, length = self.prefix_slots, self.max_word_bytes
        words = self.max_seq_len if seq_words is None else seq_words

        def stack(d, n, h, k, f, slots, context):
            return 3 * slots * (2 * n * (4 * d * h * k + 3 * d * f) + 4 * n * h * k * context)

        db, byte = self.byte_d_model, (self.byte_heads, self.byte_head_dim, self.byte_d_ff)
        enc = stack(db, self.encoder_layers, *byte, p + length, p + length)
        dec = stack(db, self.decoder_layers, *byte, p + length, p + length)
        word = stack(self.d_model, self.n_layers, self.n_heads, self.head_dim, self.d_ff, p, p * words)
        heads = 3 * 2 * (BYTE_VOCAB * db * (length + 1) + 2 * p * self.d_model * db)
        return float(enc + dec + word + heads)


@dataclasses.dataclass(frozen=True)
class StackConfig(ModelDtypes):
    """One transformer stack (what :func:`scanned_blocks` / :func:`run_layers` need)."""

    d_model: int
    n_layers: int
    n_heads: int
    head_dim: int
    d_ff: int
    causal: bool
    rope_theta: float = 10_000.0
    rms_eps: float = 1e-5
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention: str = "auto"
    remat: bool | str = False
    layer_loop: str = "scan"
    scan_unroll: int = 1


class Block(nn.Module):
    """Pre-norm attention + SwiGLU block; causal or bidirectional, with an optional KV cache."""

    config: StackConfig

    @nn.compact
    def __call__(self, x, layer_cache, positions, segment_ids, cache_positions, cache_end):
        cfg = self.config
        dt, pdt = cfg.compute_dtype, cfg.storage_dtype
        dense = dict(dtype=dt, param_dtype=pdt)
        h = RMSNorm(cfg.rms_eps, dt, pdt, name="attn_norm")(x)
        qkv_shape, qkv_axes = (cfg.d_model, cfg.n_heads, cfg.head_dim), ("embed", "heads", "head_dim")
        q, k, v = (DenseGeneral(qkv_shape, qkv_axes, "btd,dhk->bthk", name=n, **dense)(h) for n in "qkv")
        q = rotary_embedding(q, positions, cfg.rope_theta)
        k = rotary_embedding(k, positions, cfg.rope_theta)
        if layer_cache is not None:  # word LM decoding: this call's keys go into the cache
            ck, cv = layer_cache
            new_layer_cache = (k.astype(ck.dtype), v.astype(cv.dtype))
            k = jax.lax.dynamic_update_slice_in_dim(ck, new_layer_cache[0], cache_end, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cv, new_layer_cache[1], cache_end, axis=1)
            k_positions, q_seg, k_seg = cache_positions, None, None
        else:
            new_layer_cache = None
            k_positions, q_seg, k_seg = positions, segment_ids, segment_ids
        out = attn.dot_product_attention(
            q, k.astype(dt), v.astype(dt), q_positions=positions, k_positions=k_positions, q_segment_ids=q_seg,
            k_segment_ids=k_seg, causal=cfg.causal, impl=attn.AttentionImpl(cfg.attention))
        out = DenseGeneral((cfg.n_heads, cfg.head_dim, cfg.d_model), ("heads", "head_dim", "embed"),
                           "bthk,hkd->btd", name="o", **dense)(out)
        x = constrain(x + out, ("batch", "length", "embed"))
        h = RMSNorm(cfg.rms_eps, dt, pdt, name="mlp_norm")(x)
        gate = DenseGeneral((cfg.d_model, cfg.d_ff), ("embed", "mlp"), "btd,df->btf", name="gate", **dense)(h)
        up = DenseGeneral((cfg.d_model, cfg.d_ff), ("embed", "mlp"), "btd,df->btf", name="up", **dense)(h)
        hidden = (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(dt)
        down = DenseGeneral((cfg.d_ff, cfg.d_model), ("mlp", "embed"), "btf,fd->btd", name="down", **dense)(hidden)
        return constrain(x + down, ("batch", "length", "embed")), new_layer_cache


class Stack(nn.Module):
    """``n_layers`` blocks and a final norm."""

    config: StackConfig

    def setup(self):
        self.blocks = scanned_blocks(Block, self.config)
        self.norm = RMSNorm(self.config.rms_eps, self.config.compute_dtype, self.config.storage_dtype)

    def __call__(self, x, positions, segment_ids=None, cache: KVCache | None = None):
        cache_positions = layer_caches = end = None
        if cache is not None:
            cache_positions = jax.lax.dynamic_update_slice_in_dim(cache.positions, positions, cache.end, axis=1)
            layer_caches, end = (cache.k, cache.v), cache.end
        x, new = run_layers(self.blocks, Block, self.config, x, layer_caches, positions, segment_ids,
                            cache_positions, end)
        new_cache = None
        if cache is not None:
            k = jax.lax.dynamic_update_slice_in_dim(cache.k, new[0], cache.end, axis=2)
            v = jax.lax.dynamic_update_slice_in_dim(cache.v, new[1], cache.end, axis=2)
            new_cache = KVCache(k=k, v=v, positions=cache_positions, end=cache.end + x.shape[1])
        return self.norm(x), new_cache


@struct.dataclass
class ByteLMOutput:
    logits: jax.Array  # (B, W, L+1, 257) float32: bytes 1..n and EOW of each target word
    context: jax.Array | None = None  # (B, W, p, Db): the decoder's conditioning per word
    cache: KVCache | None = None


def byte_segments(lengths: jax.Array, prefix: int, total: int) -> jax.Array:
    """(..., total) 1 for the p prefix slots and the word's bytes, 0 for padding slots."""
    return (jnp.arange(total) < prefix + lengths[..., None]).astype(jnp.int32)


class ByteLM(nn.Module):
    """The word-pooled byte LM (module docstring). Called on a row of words:

    ``in_bytes`` (B, W, L) int and ``in_lens`` (B, W): the input words (the BOS word has length 0);
    ``tgt_bytes`` / ``tgt_lens``: the word after each (teacher forcing for the decoder);
    ``segment_ids`` (B, W): document pieces, 0 for padding words; ``positions`` (B, W): word index
    in its piece. With ``cache`` (a word-level :class:`KVCache`) the word LM continues it.
    """

    config: ByteLMConfig

    def setup(self):
        cfg = self.config
        db, pdt = cfg.byte_d_model, cfg.storage_dtype
        table = functools.partial(param_with_axes, self, init=nn.initializers.normal(0.02), dtype=pdt)
        self.encoder_bytes = table("encoder_bytes", shape=(256, db), axes=("vocab", "embed"))
        self.cls = table("cls", shape=(cfg.prefix_slots, db), axes=(None, "embed"))
        self.decoder_bytes = table("decoder_bytes", shape=(256, db), axes=("vocab", "embed"))
        self.byte_head = table("byte_head", shape=(BYTE_VOCAB, db), axes=("vocab", "embed"))
        dense = dict(dtype=cfg.compute_dtype, param_dtype=pdt)
        self.word_in = DenseGeneral((db, cfg.d_model), (None, "embed"), "bwpe,ed->bwpd", name="word_in", **dense)
        self.word_out = DenseGeneral((cfg.d_model, db), ("embed", None), "bwpd,de->bwpe", name="word_out", **dense)
        self.encoder = Stack(cfg.stack("encoder"))
        self.word_lm = Stack(cfg.stack("word"))
        self.decoder = Stack(cfg.stack("decoder"))

    def init_cache(self, batch: int, length: int) -> KVCache:
        """An empty word-level cache of ``length`` words."""
        cfg = self.config
        slots = length * cfg.prefix_slots
        shape = (cfg.n_layers, batch, slots, cfg.n_heads, cfg.head_dim)
        return KVCache(k=jnp.zeros(shape, cfg.compute_dtype), v=jnp.zeros(shape, cfg.compute_dtype),
                       positions=jnp.full((batch, slots), -1, jnp.int32), end=jnp.zeros((), jnp.int32))

    def encode(self, in_bytes: jax.Array, in_lens: jax.Array) -> jax.Array:
        """(B, W, L) bytes -> (B, W, p, Db) CLS outputs, each word on its own."""
        cfg = self.config
        b, w, length = in_bytes.shape
        p, dt = cfg.prefix_slots, cfg.compute_dtype
        x = jnp.take(self.encoder_bytes, in_bytes.astype(jnp.int32), axis=0).astype(dt)  # (B, W, L, Db)
        cls = jnp.broadcast_to(self.cls.astype(dt), (b, w, p, cfg.byte_d_model))
        x = jnp.concatenate([cls, x], axis=2).reshape(b * w, p + length, -1)  # (B*W, p+L, Db)
        x = constrain(x, ("batch", "length", "embed"))
        positions = jnp.broadcast_to(jnp.arange(p + length, dtype=jnp.int32), (b * w, p + length))
        segments = byte_segments(in_lens.reshape(-1), p, p + length)
        x, _ = self.encoder(x, positions, segments)
        return x[:, :p].reshape(b, w, p, -1)

    def word_context(self, pooled: jax.Array, segment_ids: jax.Array | None, positions: jax.Array,
                     cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
        """(B, W, p, Db) word vectors -> (B, W, p, Db) decoder context, through the word LM."""
        cfg = self.config
        b, w, p, _ = pooled.shape
        x = self.word_in(pooled).reshape(b, w * p, cfg.d_model)  # (B, W*p, D)
        x = constrain(x, ("batch", "length", "embed"))
        slot_pos = (positions[..., None] * p + jnp.arange(p)).reshape(b, w * p).astype(jnp.int32)
        if cache is None:
            slot_seg = jnp.repeat(segment_ids, p, axis=1)
            x, new_cache = self.word_lm(x, slot_pos, slot_seg)
        else:  # decoding: padding slots of the cache have position -1
            x, new_cache = self.word_lm(x, slot_pos, cache=cache)
        return self.word_out(x.reshape(b, w, p, cfg.d_model)), new_cache

    def decode(self, context: jax.Array, tgt_bytes: jax.Array, tgt_lens: jax.Array) -> jax.Array:
        """(B, W, p, Db) context + (B, W, L) next-word bytes -> (B, W, L+1, 257) float32 logits."""
        cfg = self.config
        b, w, length = tgt_bytes.shape
        p, dt = cfg.prefix_slots, cfg.compute_dtype
        x = jnp.take(self.decoder_bytes, tgt_bytes.astype(jnp.int32), axis=0).astype(dt)
        x = jnp.concatenate([context.astype(dt), x], axis=2).reshape(b * w, p + length, -1)
        x = constrain(x, ("batch", "length", "embed"))
        positions = jnp.broadcast_to(jnp.arange(p + length, dtype=jnp.int32), (b * w, p + length))
        segments = byte_segments(tgt_lens.reshape(-1), p, p + length)
        x, _ = self.decoder(x, positions, segments)
        x = x[:, p - 1:]  # outputs that predict byte 1..L and EOW
        logits = matmul("bte,ve->btv", x, self.byte_head, dt).astype(jnp.float32)
        return logits.reshape(b, w, length + 1, BYTE_VOCAB)

    def __call__(self, in_bytes, in_lens, tgt_bytes, tgt_lens, *, segment_ids=None, positions=None,
                 cache: KVCache | None = None) -> ByteLMOutput:
        b, w, _ = in_bytes.shape
        if positions is None:
            start = 0 if cache is None else cache.end // self.config.prefix_slots
            positions = jnp.broadcast_to(start + jnp.arange(w, dtype=jnp.int32), (b, w))
        if segment_ids is None:
            segment_ids = jnp.ones((b, w), jnp.int32)
        pooled = self.encode(in_bytes, in_lens)
        context, new_cache = self.word_context(pooled, segment_ids, positions, cache)
        logits = self.decode(context, tgt_bytes, tgt_lens)
        return ByteLMOutput(logits=logits, context=context, cache=new_cache)

    def evaluate_bpb(self, params: Any, text: str, *, window: int = 1024, batch_size: int = 4) -> Any:
        """Bits per byte of ``text`` in rows of ``window`` words (``jaxtok eval-bpb`` dispatches
        here): :func:`jaxtok.next_word.evaluate_bpb_words`."""
        from jaxtok.next_word import evaluate_bpb_words

        return evaluate_bpb_words(self, params, text, seq_words=window, batch_size=batch_size)

    # -- generation (jaxtok.decode.generate.generate dispatches here) ---------------------------

    def generate_ids(self, params: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                     sampling: Any = None, rng: jax.Array | None = None) -> list[list[int]]:
        """Continuations of byte prompts (lists of 0..255), ``max_new_tokens`` bytes each at most:
        the word LM keeps a KV cache; each new word's bytes are decoded one by one until EOW."""
        return generate_bytes(self, params, prompts, max_new_bytes=max_new_tokens, sampling=sampling, rng=rng)


def word_targets(tgt_bytes: jax.Array, tgt_lens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(targets (B, W, L+1): the bytes then EOW, mask (B, W, L+1): 1 on the n+1 scored symbols)."""
    length = tgt_bytes.shape[-1]
    k = jnp.arange(length + 1)
    padded = jnp.pad(tgt_bytes.astype(jnp.int32), [(0, 0)] * (tgt_bytes.ndim - 1) + [(0, 1)])
    targets = jnp.where(k == tgt_lens[..., None], EOW, padded)
    mask = (k <= tgt_lens[..., None]).astype(jnp.float32)
    return targets, mask


def word_nll(module: ByteLM, params: Any, batch: Any) -> tuple[jax.Array, jax.Array]:
    """(nats (B, W, L+1) of every scored symbol, its mask) for a batch of
    :mod:`jaxtok.data.words`: each target word's bytes and its EOW."""
    from jaxtok.objectives import token_nll

    out = module.apply({"params": params}, batch["in_bytes"], batch["in_lens"], batch["tgt_bytes"],
                       batch["tgt_lens"], segment_ids=batch["segment_ids"], positions=batch["positions"])
    targets, mask = word_targets(batch["tgt_bytes"], batch["tgt_lens"])
    mask = mask * (batch["loss_mask"][..., None] > 0)
    return token_nll(out.logits, targets), mask


def objective(module: ByteLM):
    """``(params, batch, rng) -> (loss, metrics)``: cross-entropy per scored symbol (bytes and
    EOW); ``nats`` and ``bytes`` give bits per byte over every byte of the text."""

    def loss_fn(params, batch, rng):
        del rng
        nll, mask = word_nll(module, params, batch)
        nats = jnp.sum(jnp.where(mask > 0, nll, 0.0))
        symbols = jnp.sum(mask)
        metrics = {"nats": nats, "bytes": jnp.sum(batch["num_bytes"]).astype(jnp.float32),
                   "tokens": jnp.sum(batch["loss_mask"] > 0).astype(jnp.float32), "weight": symbols}
        return nats / jnp.maximum(symbols, 1.0), metrics

    return loss_fn


def init_fn(module: ByteLM, words: int = 2):
    """``rng -> boxed params`` of ``module``."""
    shape = (1, words, module.config.max_word_bytes)

    def init(rng):
        zeros, lens = jnp.zeros(shape, jnp.int32), jnp.zeros(shape[:2], jnp.int32)
        return module.init(rng, zeros, lens, zeros, lens)["params"]

    return init


def init_params(config: ByteLMConfig, rng: jax.Array, words: int = 2) -> Any:
    """Boxed parameters (with logical axis names)."""
    model = ByteLM(config)
    shape = (1, words, config.max_word_bytes)
    zeros = jnp.zeros(shape, jnp.int32)
    lens = jnp.zeros(shape[:2], jnp.int32)
    return jax.jit(lambda key: model.init(key, zeros, lens, zeros, lens)["params"])(rng)


PRESETS: dict[str, ByteLMConfig] = {
    # the public code's shape: word LM 8 x 512, byte stacks 2 + 2 layers, 4 CLS slots, 192 words
    "byte-lm-paper": ByteLMConfig(),
    "byte-lm-tiny": ByteLMConfig(max_word_bytes=16, prefix_slots=2, d_model=64, n_layers=2, n_heads=4,
                                 head_dim=16, d_ff=128, byte_d_model=32, encoder_layers=1, decoder_layers=1,
                                 byte_heads=2, byte_head_dim=16, byte_d_ff=64, max_seq_len=256),
}


def as_numpy_bytes(words: Sequence[bytes], length: int) -> tuple[np.ndarray, np.ndarray]:
    """(len(words), length) uint8 bytes and (len(words),) lengths of byte strings."""
    out = np.zeros((len(words), length), np.uint8)
    lens = np.zeros(len(words), np.int32)
    for i, word in enumerate(words):
        if len(word) > length:
            raise ValueError(f"word of {len(word)} bytes is longer than max_word_bytes={length}: {word!r}")
        out[i, :len(word)] = np.frombuffer(word, np.uint8)
        lens[i] = len(word)
    return out, lens


# ---------------------------------------------------------------------------------------------
# Cached generation


def prompt_words(prompt: Sequence[int], max_word_bytes: int) -> list[bytes]:
    """The prompt's words (``split_words`` of its UTF-8 text) after the empty BOS word; the last
    prompt word is taken as complete, the model continues with the next word."""
    from jaxtok.segmentation import split_words

    try:
        text = bytes(prompt).decode("utf-8")
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"a byte LM prompt must be UTF-8 text as bytes 0..255: {exc}") from None
    return [b""] + [w.encode("utf-8") for w in split_words(text, max_word_bytes)]


def _left_padded_words(prompts: Sequence[Sequence[int]], length: int):
    rows = [prompt_words(p, length) for p in prompts]
    width = max(len(r) for r in rows)
    in_bytes = np.zeros((len(rows), width, length), np.int32)
    in_lens = np.zeros((len(rows), width), np.int32)
    positions = np.full((len(rows), width), -1, np.int32)
    for i, words in enumerate(rows):
        data, lens = as_numpy_bytes(words, length)
        in_bytes[i, width - len(words):], in_lens[i, width - len(words):] = data, lens
        positions[i, width - len(words):] = np.arange(len(words))
    return in_bytes, in_lens, positions


def _decode_word(model: ByteLM, params, context, rng, sampling):
    """One word per row from (B, p, Db) context: bytes chosen one by one until EOW (never EOW
    first: a word has a byte; only EOW after L bytes). Returns (bytes (B, L), lengths (B,))."""
    from jaxtok.decode.generate import sample_token

    b = context.shape[0]
    length = model.config.max_word_bytes
    symbols = jnp.arange(BYTE_VOCAB)

    def step(k, carry):
        buf, n, done, rng = carry
        logits = model.apply({"params": params}, context[:, None], buf[:, None], jnp.full((b, 1), k, jnp.int32),
                             method=ByteLM.decode)[:, 0, k]  # (B, 257)
        banned = ((k == 0) & (symbols == EOW)) | ((k == length) & (symbols != EOW))
        logits = jnp.where(banned, -jnp.inf, logits)
        rng, sub = jax.random.split(rng)
        token = sample_token(logits, sub, sampling)
        write = ~done & (token != EOW)
        slot = jnp.minimum(k, length - 1)
        buf = buf.at[:, slot].set(jnp.where(write, token, buf[:, slot]))
        return buf, jnp.where(write, k + 1, n), done | (token == EOW), rng

    def cond(carry):
        k, (_, _, done, _) = carry
        return (k <= length) & ~jnp.all(done)

    init = (jnp.zeros((b, length), jnp.int32), jnp.zeros(b, jnp.int32), jnp.zeros(b, bool), rng)
    _, (buf, n, _, _) = jax.lax.while_loop(cond, lambda c: (c[0] + 1, step(c[0], c[1])), (jnp.int32(0), init))
    return buf, n


def _generate(model: ByteLM, params, in_bytes, in_lens, positions, rng, *, max_new_bytes: int, sampling):
    b, width, length = in_bytes.shape
    max_words = max_new_bytes  # every word has at least one byte
    cache = model.init_cache(b, width + max_words)
    apply = functools.partial(model.apply, {"params": params})
    pooled = apply(in_bytes, in_lens, method=ByteLM.encode)
    context, cache = apply(pooled, None, positions, cache, method=ByteLM.word_context)
    next_pos = positions[:, -1] + 1
    out = jnp.zeros((b, max_new_bytes + length), jnp.int32)

    def cond(state):
        i, _, _, _, count, _ = state
        return (i < max_words) & jnp.any(count < max_new_bytes)

    def body(state):
        i, cache, context, out, count, rng = state
        rng, sub = jax.random.split(rng)
        word, n = _decode_word(model, params, context, sub, sampling)
        out = jax.vmap(lambda row, w, c: jax.lax.dynamic_update_slice(row, w, (c,)))(
            out, word, jnp.minimum(count, max_new_bytes))
        pooled = apply(word[:, None], n[:, None], method=ByteLM.encode)
        context, cache = apply(pooled, None, (next_pos + i)[:, None], cache, method=ByteLM.word_context)
        return i + 1, cache, context[:, 0], out, count + n, rng

    state = (jnp.int32(0), cache, context[:, -1], out, jnp.zeros(b, jnp.int32), rng)
    _, _, _, out, count, _ = jax.lax.while_loop(cond, body, state)
    return out[:, :max_new_bytes], jnp.minimum(count, max_new_bytes)


_generate_jit = jax.jit(_generate, static_argnames=("model", "max_new_bytes", "sampling"))


def generate_bytes(model: ByteLM, params: Any, prompts: Sequence[Sequence[int]], *, max_new_bytes: int,
                   sampling: Any = None, rng: jax.Array | None = None) -> list[list[int]]:
    """Continuations (lists of byte values, ``max_new_bytes`` at most) of byte prompts."""
    from jaxtok.decode.generate import SamplingConfig

    if max_new_bytes < 1:
        raise ValueError(f"max_new_bytes must be >= 1, got {max_new_bytes}")
    if not prompts:
        raise ValueError("no prompts")
    sampling = SamplingConfig() if sampling is None else sampling
    rng = jax.random.key(0) if rng is None else rng
    in_bytes, in_lens, positions = _left_padded_words(prompts, model.config.max_word_bytes)
    out, count = _generate_jit(model, params, jnp.asarray(in_bytes), jnp.asarray(in_lens), jnp.asarray(positions),
                               rng, max_new_bytes=max_new_bytes, sampling=sampling)
    out, count = np.asarray(out), np.asarray(count)
    return [out[i, :count[i]].tolist() for i in range(len(prompts))]


def generate_uncached(model: ByteLM, params: Any, prompt: Sequence[int], num_words: int) -> list[bytes]:
    """Greedy next words by re-running the whole model on the growing row (no cache): the
    definition :func:`generate_bytes` is tested against. The row has room for every new word
    from the start (words not yet written are padding, segment 0), so it compiles once."""
    length = model.config.max_word_bytes
    words = prompt_words(prompt, length)
    width = len(words) + num_words

    @jax.jit  # params as an argument: closed over, they would be constants XLA folds for ages
    def context_of(params, data, lens, segments):
        pooled = model.apply({"params": params}, data, lens, method=ByteLM.encode)
        positions = jnp.arange(width)[None]
        return model.apply({"params": params}, pooled, segments, positions, method=ByteLM.word_context)[0]

    @jax.jit
    def byte_logits(params, context, buf, k):
        return model.apply({"params": params}, context[None, None], buf[None, None], k[None, None],
                           method=ByteLM.decode)[0, 0, k]

    new = []
    for _ in range(num_words):
        data, lens = as_numpy_bytes(words + [b""] * (width - len(words)), length)
        segments = (np.arange(width) < len(words)).astype(np.int32)[None]
        context = context_of(params, jnp.asarray(data)[None], jnp.asarray(lens)[None], jnp.asarray(segments))
        context = context[0, len(words) - 1]  # (p, Db): after the last word so far
        word = b""
        for k in range(length + 1):
            buf, _ = as_numpy_bytes([word], length)
            logits = np.array(byte_logits(params, context, jnp.asarray(buf[0]), jnp.int32(k)))
            if k == 0:
                logits[EOW] = -np.inf
            symbol = EOW if k == length else int(np.argmax(logits))
            if symbol == EOW:
                break
            word += bytes([symbol])
        new.append(word)
        words.append(word)
    return new


def train_task(module: ByteLM, config: Any) -> Any:
    """The family's ``TrainTask`` for ``jaxtok pretrain`` (``config``, the experiment, unused)."""
    from jaxtok.train.trainer import TrainTask

    del config
    return TrainTask(init_fn=init_fn(module), objective=objective(module))


def flops_per_word(model_config: ByteLMConfig, config: Any) -> float:
    """Training FLOPs per word (the family's unit of ``tokens_per_step``) at the run's row length."""
    return model_config.flops_per_word(config.data.seq_words)
