"""BERT encoder (all-MiniLM-L6-v2): learned absolute positions, post-LN blocks, exact GELU.

Layers are stacked with ``nn.scan`` (parameters gain a leading ``layers`` axis), as in
``llama.py``. Padding is expressed as segment ids for the shared attention entry point: the
attention mask (1 = token, 0 = padding) *is* the segment-id array, and attention is bidirectional.
Sentence embeddings follow sentence-transformers: mean over real tokens, then L2 normalisation.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

from jaxtok.nn import attention as attn
from jaxtok.nn.layers import DenseGeneral, LayerNorm, ModelDtypes, param_with_axes, require_positive
from jaxtok.sharding import constrain


@dataclasses.dataclass(frozen=True)
class BertConfig(ModelDtypes):
    """Shape and numerics of a BERT encoder.

    Attributes:
      vocab_size: rows of the word-embedding matrix.
      d_model: hidden size; n_heads divides it (head_dim = d_model // n_heads).
      n_layers: number of transformer blocks.
      n_heads: attention heads per block.
      d_ff: hidden size of the feed-forward layer.
      max_positions: rows of the learned position table, i.e. the longest input.
      type_vocab_size: rows of the token-type (segment A/B) table.
      layer_norm_eps: epsilon of every LayerNorm, as in the checkpoint.
      dtype: compute dtype name; param_dtype: storage dtype name of parameters.
      attention: implementation behind the attention entry point (``AttentionImpl`` value).
    """

    vocab_size: int = 30522
    d_model: int = 384
    n_layers: int = 6
    n_heads: int = 12
    d_ff: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention: str = "auto"

    def __post_init__(self):
        require_positive(self, "vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_positions",
                         "type_vocab_size")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not a multiple of n_heads={self.n_heads}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        for name in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError:
                raise ValueError(f"{name}={getattr(self, name)!r} is not a dtype name") from None
        try:
            attn.AttentionImpl(self.attention)
        except ValueError:
            valid = [i.value for i in attn.AttentionImpl]
            raise ValueError(f"attention={self.attention!r} is not one of {valid}") from None

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def num_params(self) -> int:
        d, f = self.d_model, self.d_ff
        block = 4 * (d * d + d) + 2 * d * f + f + d + 2 * 2 * d  # attention, FFN, two norms
        embed = (self.vocab_size + self.max_positions + self.type_vocab_size) * d + 2 * d
        return embed + self.n_layers * block


PRESETS: dict[str, BertConfig] = {
    "minilm-l6": BertConfig(),
    "bert-tiny": BertConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=4, d_ff=64,
                            max_positions=64),
}


@struct.dataclass
class BertOutput:
    """last_hidden: (B, T, D). hidden_states: (L + 1, B, T, D), the embedding output then each
    block's output (as HF's ``hidden_states`` tuple), or None unless asked for."""

    last_hidden: jax.Array
    hidden_states: jax.Array | None = None


class BertBlock(nn.Module):
    """Post-LN block: x = LN(x + attn(x)); x = LN(x + ffn(x))."""

    config: BertConfig
    collect: bool = False  # also emit the output as a scan output (for ``hidden_states``)

    @nn.compact
    def __call__(self, x, positions, segment_ids):
        cfg = self.config
        dt, pdt = cfg.compute_dtype, cfg.storage_dtype
        dense = {"dtype": dt, "param_dtype": pdt, "use_bias": True}
        h, k_dim = cfg.n_heads, cfg.head_dim
        qkv_axes = ("embed", "heads", "head_dim")
        q, k, v = (
            DenseGeneral((cfg.d_model, h, k_dim), qkv_axes, "btd,dhk->bthk",
                         bias_axes=("heads", "head_dim"), name=name, **dense)(x)
            for name in ("q", "k", "v"))
        q = constrain(q, ("batch", "length", "heads", "head_dim"))  # (B, T, H, Dh)
        out = attn.dot_product_attention(
            q, k, v, q_positions=positions, k_positions=positions, q_segment_ids=segment_ids,
            k_segment_ids=segment_ids, causal=False, impl=attn.AttentionImpl(cfg.attention))
        out = DenseGeneral((h, k_dim, cfg.d_model), ("heads", "head_dim", "embed"),
                           "bthk,hkd->btd", bias_axes=("embed",), name="o", **dense)(out)
        x = LayerNorm(cfg.layer_norm_eps, dtype=dt, param_dtype=pdt, name="attn_norm")(x + out)
        x = constrain(x, ("batch", "length", "embed"))

        up = DenseGeneral((cfg.d_model, cfg.d_ff), ("embed", "mlp"), "btd,df->btf",
                          bias_axes=("mlp",), name="up", **dense)(x)
        up = constrain(jax.nn.gelu(up, approximate=False), ("batch", "length", "mlp"))
        down = DenseGeneral((cfg.d_ff, cfg.d_model), ("mlp", "embed"), "btf,fd->btd",
                            bias_axes=("embed",), name="down", **dense)(up)
        x = LayerNorm(cfg.layer_norm_eps, dtype=dt, param_dtype=pdt, name="mlp_norm")(x + down)
        x = constrain(x, ("batch", "length", "embed"))
        return x, (x if self.collect else None)


class Bert(nn.Module):
    """Bidirectional encoder over token ids (B, T), right-padded (positions count from 0 at the
    first column, so left padding would shift them).

    ``attention_mask`` (B, T): 1 for tokens, 0 for padding (default: all tokens).
    ``token_type_ids`` (B, T): segment A/B ids (default: 0).
    ``input_embeddings`` (V', D) replaces the word-embedding matrix for this call; tokenizer
    transfer feeds predicted embeddings through here. Hidden states at padding are finite but
    meaningless.
    """

    config: BertConfig

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        input_embeddings: jax.Array | None = None,
        return_hidden: bool = False,
    ) -> BertOutput:
        cfg = self.config
        dt, pdt = cfg.compute_dtype, cfg.storage_dtype
        b, t = tokens.shape
        if t > cfg.max_positions:
            raise ValueError(f"sequence length {t} exceeds max_positions={cfg.max_positions}")
        init = nn.initializers.normal(0.02)
        words = param_with_axes(self, "word_embeddings", init, (cfg.vocab_size, cfg.d_model),
                                ("vocab", "embed"), pdt)
        pos_table = param_with_axes(self, "position_embeddings", init,
                                    (cfg.max_positions, cfg.d_model), ("pos", "embed"), pdt)
        # two rows: never worth sharding, so no logical name on that axis
        type_table = param_with_axes(self, "token_type_embeddings", init,
                                     (cfg.type_vocab_size, cfg.d_model), (None, "embed"), pdt)
        if input_embeddings is not None:
            if input_embeddings.ndim != 2 or input_embeddings.shape[1] != cfg.d_model:
                raise ValueError(f"input_embeddings must be (V', {cfg.d_model}), "
                                 f"got {input_embeddings.shape}")
            words = input_embeddings
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        if token_type_ids is None:
            token_type_ids = jnp.zeros((b, t), jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

        # the three lookups are summed in float32 because the LayerNorm right after works in it
        x = (jnp.take(words, tokens, axis=0).astype(jnp.float32)
             + pos_table[:t].astype(jnp.float32)[None]
             + jnp.take(type_table, token_type_ids, axis=0).astype(jnp.float32))
        x = LayerNorm(cfg.layer_norm_eps, dtype=dt, param_dtype=pdt, name="embed_norm")(x)
        x = constrain(x, ("batch", "length", "embed"))

        segment_ids = attention_mask.astype(jnp.int32)  # 0 = padding, as attention expects
        blocks = nn.scan(
            BertBlock, variable_axes={"params": 0}, split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast), length=cfg.n_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, collect=return_hidden, name="layers")
        embedded = x
        x, per_layer = blocks(x, positions, segment_ids)
        hidden_states = None
        if return_hidden:
            hidden_states = jnp.concatenate([embedded[None], per_layer], axis=0)
        return BertOutput(last_hidden=x, hidden_states=hidden_states)


def mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of ``hidden`` (B, T, D) over positions where ``mask`` (B, T) is nonzero, in float32.

    An all-padding row gives zeros (the count is clamped, as sentence-transformers does).
    """
    weights = mask.astype(jnp.float32)[..., None]  # (B, T, 1)
    total = jnp.sum(hidden.astype(jnp.float32) * weights, axis=1)
    count = jnp.maximum(jnp.sum(weights, axis=1), 1e-9)
    return total / count


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) along the last axis."""
    norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x / jnp.maximum(norm, eps)


def sentence_embedding(
    config: BertConfig,
    params: Any,
    tokens: jax.Array,
    attention_mask: jax.Array | None = None,
    token_type_ids: jax.Array | None = None,
    *,
    input_embeddings: jax.Array | None = None,
) -> jax.Array:
    """Unit-norm sentence vectors (B, D) in float32: encoder, mean pooling, L2 normalisation
    (the all-MiniLM-L6-v2 sentence-transformers pipeline)."""
    if attention_mask is None:
        attention_mask = jnp.ones(tokens.shape, jnp.int32)
    out = Bert(config).apply({"params": params}, tokens, attention_mask, token_type_ids,
                             input_embeddings=input_embeddings)
    return l2_normalize(mean_pool(out.last_hidden, attention_mask))


def init_params(config: BertConfig, rng: jax.Array, seq_len: int = 8) -> Any:
    """Boxed parameters (with logical axis names); ``flax.linen.unbox`` gives plain arrays."""
    return Bert(config).init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]
