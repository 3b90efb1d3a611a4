"""Llama-family decoder (SmolLM2): RMSNorm, RoPE, grouped-query attention, SwiGLU.

Layer parameters are stacked (a leading ``layers`` axis, created by ``nn.scan``); the loop over
them is ``config.layer_loop`` (``scan``: a 30-layer model compiles as fast as a 1-layer one;
``unrolled``: a Python loop), see :func:`jaxtok.nn.layers.run_layers`. The KV cache is an
explicit pytree passed in and returned, never hidden module state.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

from jaxtok.decode import tokenselect
from jaxtok.nn import attention as attn
from jaxtok.nn.layers import (
    DenseGeneral,
    ModelDtypes,
    RMSNorm,
    check_layer_loop,
    matmul,
    require_positive,
    rotary_embedding,
    run_layers,
    scanned_blocks,
)
from jaxtok.sharding import constrain


@dataclasses.dataclass(frozen=True)
class LlamaConfig(ModelDtypes):
    """Shape and numerics of a Llama-family decoder.

    Attributes:
      vocab_size, d_model, n_layers, n_heads, n_kv_heads, head_dim, d_ff: the shape.
      rope_theta, rms_eps: as in the checkpoint.
      tie_embeddings: output projection is the transposed input embedding.
      dtype: compute dtype; param_dtype: storage dtype of parameters.
      attention: implementation behind the attention entry point.
      remat: rematerialisation in the backward pass: ``none`` (or False), ``full`` (or True:
        each block recomputed from its input), ``dots_saveable`` (matmul outputs kept).
      layer_loop: ``scan`` (one compiled block for all layers) or ``unrolled`` (a Python loop over
        the same stacked parameters; longer compile; with ``split_layers`` parameters, as
        ``generate`` passes its decode steps, no per-layer weight copies).
      scan_unroll: layers per ``scan`` iteration (``lax.scan``'s ``unroll``).
    """

    vocab_size: int = 49152
    d_model: int = 576
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3
    head_dim: int = 64
    d_ff: int = 1536
    rope_theta: float = 100_000.0
    rms_eps: float = 1e-5
    max_seq_len: int = 8192
    tie_embeddings: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention: str = "auto"
    remat: bool | str = False
    layer_loop: str = "scan"
    scan_unroll: int = 1

    def __post_init__(self):
        check_layer_loop(self.layer_loop, self.scan_unroll, self.remat)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        require_positive(self, "vocab_size", "d_model", "n_layers", "n_heads", "head_dim", "d_ff")
        attn.AttentionImpl(self.attention)  # fails early on an unknown name

    def num_params(self) -> int:
        d, f = self.d_model, self.d_ff
        attn_p = d * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        block = attn_p + 3 * d * f + 2 * d
        out = 0 if self.tie_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.n_layers * block + d + out

    def matmul_params(self) -> int:
        """Parameters each token is multiplied by (every projection and the output layer, tied or
        not): ``N_matmul`` of :func:`jaxtok.train.flops.model_flops_per_token`."""
        d = self.d_model
        attn_p = d * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        return self.n_layers * (attn_p + 3 * d * self.d_ff) + self.vocab_size * d


PRESETS: dict[str, LlamaConfig] = {
    "smollm2-135m": LlamaConfig(),
    "llama-1b": LlamaConfig(vocab_size=49152, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                            head_dim=64, d_ff=8192, rope_theta=500_000.0),
    "llama-tiny": LlamaConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                              head_dim=16, d_ff=128, max_seq_len=512),
}


@struct.dataclass
class KVCache:
    """Keys/values of every layer, written at ``end`` and advanced by each call.

    k, v: (L, B, S, K, D); positions: (B, S) with -1 for slots not yet written (or padding).
    selection: TokenSelect's selection cache (:class:`jaxtok.decode.tokenselect.SelectionState`)
    when decoding with one, else None.
    """

    k: jax.Array
    v: jax.Array
    positions: jax.Array
    end: jax.Array
    selection: Any = None

    @classmethod
    def create(cls, config: LlamaConfig, batch: int, length: int, dtype=None) -> KVCache:
        dtype = config.compute_dtype if dtype is None else dtype
        shape = (config.n_layers, batch, length, config.n_kv_heads, config.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   positions=jnp.full((batch, length), -1, jnp.int32), end=jnp.zeros((), jnp.int32))


def lm_logits(module: nn.Module, x: jax.Array, output_embeddings: jax.Array | None,
              last_only: bool) -> jax.Array:
    """Float32 logits (B, T or 1, V) of a decoder ``module`` (with ``embedding`` and, untied,
    ``lm_head``) from its final hidden states ``x``; ``output_embeddings`` replaces the matrix."""
    cfg = module.config
    if output_embeddings is not None:
        table = output_embeddings
    else:
        table = module.embedding if cfg.tie_embeddings else module.lm_head
    last = x[:, -1:] if last_only else x
    logits = matmul("btd,vd->btv", last, table, cfg.compute_dtype).astype(jnp.float32)
    return constrain(logits, ("batch", "length", "vocab"))


@struct.dataclass
class LMOutput:
    logits: jax.Array
    hidden: jax.Array | None = None
    cache: KVCache | None = None


def prepare_inputs(table, tokens, embeds, positions, cache, dtype):
    """Shared start of every decoder call: input vectors (looked up in ``table`` or given as
    ``embeds``), default positions (continuing after the cache), and the cache's key positions
    with this call's written in. Returns (x, positions, cache_positions, layer_caches)."""
    if embeds is None:
        if tokens is None:
            raise ValueError("pass tokens or embeds")
        x = jnp.take(table, tokens, axis=0).astype(dtype)
    else:
        x = embeds.astype(dtype)
    b, t = x.shape[:2]
    x = constrain(x, ("batch", "length", "embed"))
    if positions is None:
        start = 0 if cache is None else cache.end
        positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
    if cache is None:
        return x, positions, None, None
    cache_positions = jax.lax.dynamic_update_slice_in_dim(
        cache.positions, positions.astype(jnp.int32), cache.end, axis=1)
    return x, positions, cache_positions, (cache.k, cache.v)


class Block(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, layer_cache, positions, masking, cache_positions, cache_end):
        # masking = (segment_ids, visibility): one broadcast slot of the layer scan for both
        segment_ids, visibility = masking
        cfg = self.config
        dt, pdt = cfg.compute_dtype, cfg.storage_dtype
        h = RMSNorm(cfg.rms_eps, dt, pdt, name="attn_norm")(x)
        dense = dict(dtype=dt, param_dtype=pdt)
        q = DenseGeneral((cfg.d_model, cfg.n_heads, cfg.head_dim), ("embed", "heads", "head_dim"),
                         "btd,dhk->bthk", name="q", **dense)(h)
        k = DenseGeneral((cfg.d_model, cfg.n_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"),
                         "btd,dhk->bthk", name="k", **dense)(h)
        v = DenseGeneral((cfg.d_model, cfg.n_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"),
                         "btd,dhk->bthk", name="v", **dense)(h)
        q = constrain(rotary_embedding(q, positions, cfg.rope_theta), ("batch", "length", "heads", "head_dim"))
        k = rotary_embedding(k, positions, cfg.rope_theta)
        select = visibility if isinstance(visibility, tokenselect.Request) else None
        if layer_cache is not None:
            ck, cv = layer_cache[:2]
            # Only this call's entries leave the block; the caller writes them into the stacked
            # cache in place (stacking whole per-layer caches would copy the cache every step).
            new_layer_cache = (k.astype(ck.dtype), v.astype(cv.dtype))  # (B, T, K, D) each
            k = jax.lax.dynamic_update_slice_in_dim(ck, new_layer_cache[0], cache_end, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cv, new_layer_cache[1], cache_end, axis=1)
            k_positions, k_segments = cache_positions, None
        else:
            new_layer_cache = None
            k_positions, k_segments = positions, segment_ids
        if select is not None:  # TokenSelect: this layer selects its keys (tokenselect.attend)
            dense_flag, state = layer_cache[2]
            out, state = tokenselect.attend(q, k.astype(dt), v.astype(dt), positions, k_positions, cache_end,
                                            select.config, attn.AttentionImpl(cfg.attention), state, dense_flag)
            new_layer_cache = new_layer_cache + (state,)
        else:
            out = attn.dot_product_attention(
                q, k.astype(dt), v.astype(dt), q_positions=positions, k_positions=k_positions,
                q_segment_ids=segment_ids if k_segments is not None else None, k_segment_ids=k_segments,
                causal=True, impl=attn.AttentionImpl(cfg.attention), visibility=visibility)
        out = DenseGeneral((cfg.n_heads, cfg.head_dim, cfg.d_model), ("heads", "head_dim", "embed"),
                           "bthk,hkd->btd", name="o", **dense)(out)
        x = constrain(x + out, ("batch", "length", "embed"))

        h = RMSNorm(cfg.rms_eps, dt, pdt, name="mlp_norm")(x)
        gate = DenseGeneral((cfg.d_model, cfg.d_ff), ("embed", "mlp"), "btd,df->btf", name="gate", **dense)(h)
        up = DenseGeneral((cfg.d_model, cfg.d_ff), ("embed", "mlp"), "btd,df->btf", name="up", **dense)(h)
        # in float32, like the norms: the same values XLA's bf16 normalization would give, and a
        # vectorized loop on CPU where bf16 math is emulated (4x slower in prefill)
        hidden = (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(dt)
        hidden = constrain(hidden, ("batch", "length", "mlp"))
        down = DenseGeneral((cfg.d_ff, cfg.d_model), ("mlp", "embed"), "btf,fd->btd", name="down", **dense)(hidden)
        x = constrain(x + down, ("batch", "length", "embed"))
        return x, new_layer_cache


class Llama(nn.Module):
    """Decoder-only LM.

    ``__call__`` takes token ids (B, T) or, instead, input vectors ``embeds`` (B, T, D).
    ``input_embeddings`` / ``output_embeddings`` (V', D) replace the model's own matrices for
    this call: tokenizer transfer feeds predicted embeddings through here.
    Positions default to 0..T-1; ``segment_ids`` (0 = padding) keep packed documents apart.
    ``visibility`` (:class:`jaxtok.nn.attention.Visibility`) goes to every layer's attention: a
    draft tree verified against the cache (speculative decoding) or selected key slots.
    ``sparse`` (:class:`jaxtok.decode.tokenselect.TokenSelectConfig`) makes every layer select its
    keys with TokenSelect (needs ``cache``: decoding, or one chunk of
    :func:`jaxtok.decode.tokenselect.chunked_prefill`); the cache's ``selection`` state, when set,
    is the selection cache of one-token steps.
    """

    config: LlamaConfig

    def setup(self):
        cfg = self.config
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
            (cfg.vocab_size, cfg.d_model), cfg.storage_dtype)
        self.blocks = scanned_blocks(Block, cfg)
        self.final_norm = RMSNorm(cfg.rms_eps, cfg.compute_dtype, cfg.storage_dtype)
        if not cfg.tie_embeddings:
            self.lm_head = self.param(
                "lm_head", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
                (cfg.vocab_size, cfg.d_model), cfg.storage_dtype)

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
        visibility: attn.Visibility | None = None,
        sparse: tokenselect.TokenSelectConfig | None = None,
    ) -> LMOutput:
        """``last_logits_only`` returns logits (B, 1, V) of the last position only, all that
        generation needs after a prefill (the output layer is ~20% of a 512-token prefill)."""
        cfg = self.config
        dt = cfg.compute_dtype
        x, positions, cache_positions, layer_caches = prepare_inputs(
            self.embedding if input_embeddings is None else input_embeddings, tokens, embeds, positions,
            cache, dt)
        t = x.shape[1]
        end = None if cache is None else cache.end
        use_state = False
        if sparse is not None:
            if visibility is not None or segment_ids is not None:
                raise ValueError("sparse attention selects its own visibility: pass no visibility or segment_ids")
            if cache is None:
                raise ValueError("TokenSelect attends over a KV cache: pass cache (decode, or chunked_prefill)")
            visibility = tokenselect.Request(sparse)
            use_state = cache.selection is not None and t == 1  # the selection cache serves decode steps
            state = cache.selection if use_state else None
            layer_caches = layer_caches + ((tokenselect.dense_flags(sparse, cfg.n_layers),
                                            None if state is None else (state.query, state.top, state.hits,
                                                                        state.steps)),)
        x, new_layer_caches = run_layers(self.blocks, Block, cfg, x, layer_caches, positions,
                                         (segment_ids, visibility), cache_positions, end)
        x = self.final_norm(x)
        new_cache = None
        if cache is not None:
            new_k, new_v = new_layer_caches[:2]  # (L, B, T, K, D)
            k = jax.lax.dynamic_update_slice_in_dim(cache.k, new_k, cache.end, axis=2)
            v = jax.lax.dynamic_update_slice_in_dim(cache.v, new_v, cache.end, axis=2)
            selection = cache.selection
            if use_state:
                selection = tokenselect.SelectionState(*new_layer_caches[2])
            new_cache = KVCache(k=k, v=v, positions=cache_positions, end=cache.end + t, selection=selection)
        logits = lm_logits(self, x, output_embeddings, last_logits_only) if compute_logits else None
        return LMOutput(logits=logits, hidden=x if return_hidden else None, cache=new_cache)


def init_params(config: LlamaConfig, rng: jax.Array, seq_len: int = 8) -> Any:
    """Boxed parameters (with logical axis names); ``flax.linen.unbox`` gives plain arrays."""
    # jitted: eager init of a scanned model dispatches op by op and is several times slower
    model = Llama(config)
    return jax.jit(lambda key: model.init(key, jnp.zeros((1, seq_len), jnp.int32))["params"])(rng)
