"""TokenFormer decoder: every linear projection is a Pattention over parameter tokens.

Per block (pre-norm, non-parametric LayerNorm):
  x += proj(attention(rope(query(LN(x))), rope(key(LN(x))), value(LN(x))))
  x += ffn(LN(x))
where query/key/value/proj are Pattentions d -> d with ``qkv_tokens`` / ``proj_tokens`` tokens
and the FFN is ONE Pattention d -> d with ``ffn_tokens`` tokens (no biases anywhere). Token-token
attention stays softmax attention with rotary on the first ``rotary_pct`` of each head's dims.
The final norm is a LayerNorm with scale and bias (``final_norm_scale``, as the reference's
``final_norm: layernorm``); embeddings are tied.

The model is a drop-in alternative to :class:`jaxtok.models.llama.Llama`: same ``__call__``
signature, same :class:`LMOutput` and :class:`KVCache` (the config exposes ``n_kv_heads`` and
``head_dim`` so ``KVCache.create`` works unchanged). Growth (appending parameter tokens) lives in
:mod:`jaxtok.models.growth`; it relies on τ being fixed per layer type, which the config holds
as ``*_tau_tokens`` (τ is computed from that count, not from the current one).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxtok.models.llama import KVCache, LMOutput, lm_logits, prepare_inputs
from jaxtok.nn import attention as attn
from jaxtok.nn.layers import (
    LayerNorm,
    ModelDtypes,
    check_layer_loop,
    require_positive,
    rotary_embedding,
    run_layers,
    scanned_blocks,
)
from jaxtok.nn.pattention import NORMALIZATIONS, Pattention, default_tau
from jaxtok.sharding import constrain

__all__ = [
    "PATTENTION_GROUPS",
    "PRESETS",
    "KVCache",
    "LMOutput",
    "TokenFormer",
    "TokenFormerConfig",
    "init_params",
]

# Which token count each Pattention of a block uses (read by growth to extend the right ones).
PATTENTION_GROUPS: dict[str, str] = {
    "query": "qkv", "key": "qkv", "value": "qkv", "proj": "proj", "ffn": "ffn",
}


@dataclasses.dataclass(frozen=True)
class TokenFormerConfig(ModelDtypes):
    """Shape and numerics of a TokenFormer decoder.

    Attributes:
      vocab_size, d_model, n_layers, n_heads: the shape (head_dim = d_model / n_heads).
      qkv_tokens: parameter tokens of each of the query/key/value Pattentions.
      proj_tokens: parameter tokens of the attention output Pattention.
      ffn_tokens: parameter tokens of the FFN Pattention.
      qkv_tau_tokens, proj_tau_tokens, ffn_tau_tokens: token count τ is computed from
        (``default_tau``); None = the current count. Growth pins them to the pre-growth counts.
      normalization: Θ of every Pattention (``l2_norm_gelu``, ``gelu_l2_norm``, ``softmax``).
      pattention_eps: floor of the L2 norm over parameter tokens.
      rotary_pct: fraction of each head's dims that rotate (reference: 0.25).
      rope_theta: rotary base.
      norm_eps: LayerNorm epsilon.
      final_norm_scale: the final LayerNorm has scale and bias (block norms never do).
      max_seq_len: longest sequence the model is meant for (informational, as in Llama).
      tie_embeddings: output projection is the transposed input embedding.
      init_std: std of embeddings and key tokens; value tokens use ``value_init_std``.
      dtype: compute dtype; param_dtype: storage dtype of parameters.
      attention: implementation behind the attention entry point.
      remat: rematerialisation in the backward pass: ``none`` (or False), ``full`` (or True),
        ``dots_saveable`` (matmul outputs kept), as in ``LlamaConfig``.
      layer_loop: ``scan`` or ``unrolled`` (same parameter layout), as in ``LlamaConfig``.
      scan_unroll: layers per ``scan`` iteration.
    """

    vocab_size: int = 49152
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    qkv_tokens: int = 768
    proj_tokens: int = 768
    ffn_tokens: int = 3072
    qkv_tau_tokens: int | None = None
    proj_tau_tokens: int | None = None
    ffn_tau_tokens: int | None = None
    normalization: str = "l2_norm_gelu"
    pattention_eps: float = 1e-6
    rotary_pct: float = 0.25
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    final_norm_scale: bool = True
    max_seq_len: int = 2048
    tie_embeddings: bool = True
    init_std: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention: str = "auto"
    remat: bool | str = False
    layer_loop: str = "scan"
    scan_unroll: int = 1

    def __post_init__(self):
        check_layer_loop(self.layer_loop, self.scan_unroll, self.remat)
        require_positive(self, "vocab_size", "d_model", "n_layers", "n_heads", "qkv_tokens", "proj_tokens",
                         "ffn_tokens")
        for name in ("qkv_tau_tokens", "proj_tau_tokens", "ffn_tau_tokens"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive or None, got {value}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not a multiple of n_heads={self.n_heads}")
        if not 0.0 < self.rotary_pct <= 1.0:
            raise ValueError(f"rotary_pct must be in (0, 1], got {self.rotary_pct}")
        if self.rotary_dims % 2 or self.rotary_dims == 0:
            raise ValueError(f"rotary dims {self.rotary_dims} (head_dim x rotary_pct) must be even "
                             "and positive")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"unknown normalization {self.normalization!r}; valid: {NORMALIZATIONS}")
        attn.AttentionImpl(self.attention)  # fails early on an unknown name

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_kv_heads(self) -> int:
        # multi-head attention; named as in LlamaConfig so KVCache.create applies
        return self.n_heads

    @property
    def rotary_dims(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    @property
    def value_init_std(self) -> float:
        # the reference's "wang_init" for value tokens: 2 / (n_layers * sqrt(d_model))
        return 2.0 / (self.n_layers * math.sqrt(self.d_model))

    def tokens(self, group: str) -> int:
        """Parameter tokens of a Pattention group: ``qkv``, ``proj`` or ``ffn``."""
        return {"qkv": self.qkv_tokens, "proj": self.proj_tokens, "ffn": self.ffn_tokens}[group]

    def tau_tokens(self, group: str) -> int:
        """Token count τ of ``group`` is computed from (fixed across growth)."""
        pinned = {"qkv": self.qkv_tau_tokens, "proj": self.proj_tau_tokens,
                  "ffn": self.ffn_tau_tokens}[group]
        return self.tokens(group) if pinned is None else pinned

    def tau(self, group: str) -> float:
        return default_tau(self.tau_tokens(group), self.normalization)

    def num_params(self) -> int:
        """Parameter count: embeddings, key+value tokens of every Pattention, final norm."""
        d = self.d_model
        block = (3 * self.qkv_tokens + self.proj_tokens + self.ffn_tokens) * 2 * d
        final = 2 * d if self.final_norm_scale else 0
        out = 0 if self.tie_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.n_layers * block + final + out

    def matmul_params(self) -> int:
        """Parameters each token is multiplied by (every Pattention's key and value tokens and the
        output layer): ``N_matmul`` of :func:`jaxtok.train.flops.model_flops_per_token`."""
        block = (3 * self.qkv_tokens + self.proj_tokens + self.ffn_tokens) * 2 * self.d_model
        return self.n_layers * block + self.vocab_size * self.d_model


PRESETS: dict[str, TokenFormerConfig] = {
    # Haiyang-W/TokenFormer configs/tokenformer/150M_train_pile.yml (vocab configurable)
    "tokenformer-150m": TokenFormerConfig(),
    "tokenformer-tiny": TokenFormerConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4,
                                          qkv_tokens=32, proj_tokens=32, ffn_tokens=128,
                                          max_seq_len=512),
}


class Block(nn.Module):
    """One pre-norm TokenFormer layer (see the module docstring)."""

    config: TokenFormerConfig

    def _pattention(self, group: str, name: str) -> Pattention:
        cfg = self.config
        return Pattention(cfg.d_model, cfg.d_model, cfg.tokens(group), cfg.normalization,
                          cfg.tau(group), cfg.pattention_eps, cfg.init_std, cfg.value_init_std,
                          cfg.compute_dtype, cfg.storage_dtype, name=name)

    @nn.compact
    def __call__(self, x, layer_cache, positions, segment_ids, cache_positions, cache_end):
        cfg = self.config
        dt = cfg.compute_dtype
        b, t, _ = x.shape
        heads = (b, t, cfg.n_heads, cfg.head_dim)
        h = LayerNorm(cfg.norm_eps, use_scale=False, dtype=dt, name="attn_norm")(x)
        q = self._pattention("qkv", "query")(h).reshape(heads)  # (B, T, H, D)
        k = self._pattention("qkv", "key")(h).reshape(heads)  # (B, T, H, D)
        v = self._pattention("qkv", "value")(h).reshape(heads)  # (B, T, H, D)
        q = rotary_embedding(q, positions, cfg.rope_theta, cfg.rotary_dims)
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        k = rotary_embedding(k, positions, cfg.rope_theta, cfg.rotary_dims)
        if layer_cache is not None:
            ck, cv = layer_cache
            k = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), cache_end, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), cache_end, axis=1)
            new_layer_cache = (k, v)
            k_positions, k_segments = cache_positions, None
        else:
            new_layer_cache = None
            k_positions, k_segments = positions, segment_ids
        out = attn.dot_product_attention(
            q, k.astype(dt), v.astype(dt), q_positions=positions, k_positions=k_positions,
            q_segment_ids=segment_ids if k_segments is not None else None, k_segment_ids=k_segments,
            causal=True, impl=attn.AttentionImpl(cfg.attention))
        out = self._pattention("proj", "proj")(out.reshape(b, t, cfg.d_model))  # (B, T, d)
        x = constrain(x + out, ("batch", "length", "embed"))

        h = LayerNorm(cfg.norm_eps, use_scale=False, dtype=dt, name="ffn_norm")(x)
        x = constrain(x + self._pattention("ffn", "ffn")(h), ("batch", "length", "embed"))
        return x, new_layer_cache


class TokenFormer(nn.Module):
    """Decoder-only TokenFormer LM, called exactly like :class:`jaxtok.models.llama.Llama`.

    ``__call__`` takes token ids (B, T) or, instead, input vectors ``embeds`` (B, T, D).
    ``input_embeddings`` / ``output_embeddings`` (V', D) replace the model's own matrices for
    this call. Positions default to 0..T-1 (continuing from ``cache.end``); ``segment_ids``
    (0 = padding) keep packed documents apart.

    Attributes:
      config: the model's shape and numerics.
    """

    config: TokenFormerConfig

    def setup(self):
        cfg = self.config
        table_init = nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                                  ("vocab", "embed"))
        self.embedding = self.param("embedding", table_init, (cfg.vocab_size, cfg.d_model),
                                    cfg.storage_dtype)
        self.blocks = scanned_blocks(Block, cfg)
        self.final_norm = LayerNorm(cfg.norm_eps, use_scale=cfg.final_norm_scale,
                                    dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype)
        if not cfg.tie_embeddings:
            self.lm_head = self.param("lm_head", table_init, (cfg.vocab_size, cfg.d_model),
                                      cfg.storage_dtype)

    def __call__(
        self,
        tokens: jax.Array | None = None,
        *,
        embeds: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: KVCache | None = None,
        input_embeddings: jax.Array | None = None,
        output_embeddings: jax.Array | None = None,
        return_hidden: bool = False,
        compute_logits: bool = True,
        last_logits_only: bool = False,
    ) -> LMOutput:
        """``last_logits_only``: logits (B, 1, V) of the last position only (as in Llama)."""
        cfg = self.config
        dt = cfg.compute_dtype
        x, positions, cache_positions, layer_caches = prepare_inputs(
            self.embedding if input_embeddings is None else input_embeddings, tokens, embeds, positions,
            cache, dt)
        t = x.shape[1]
        end = None if cache is None else cache.end
        x, new_layer_caches = run_layers(self.blocks, Block, cfg, x, layer_caches, positions,
                                         segment_ids, cache_positions, end)
        x = self.final_norm(x)
        new_cache = None
        if cache is not None:
            k, v = new_layer_caches
            new_cache = KVCache(k=k, v=v, positions=cache_positions, end=cache.end + t)
        logits = lm_logits(self, x, output_embeddings, last_logits_only) if compute_logits else None
        return LMOutput(logits=logits, hidden=x if return_hidden else None, cache=new_cache)


def init_params(config: TokenFormerConfig, rng: jax.Array, seq_len: int = 8) -> Any:
    """Boxed parameters (with logical axis names); ``flax.linen.unbox`` gives plain arrays."""
    return TokenFormer(config).init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]
