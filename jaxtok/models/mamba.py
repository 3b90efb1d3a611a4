"""Mamba language models: Mamba-1 (selective scan) and Mamba-2 (SSD) blocks, one LM class.

Per block (pre-norm, as transformers' ``MambaBlock``/``Mamba2Block``): ``x += mixer(RMSNorm(x))``.

* Mamba-1 mixer: in_proj to (x, z) of width ``d_inner = expand · d_model``; depthwise causal
  conv1d (``d_conv`` taps) + SiLU on x; x_proj to (Δ rank, B, C); Δ = softplus(dt_proj(Δ));
  A = -exp(A_log) of shape (d_inner, d_state); the scan; y · SiLU(z); out_proj.
* Mamba-2 mixer: in_proj to z, x (heads x head_dim), B, C (groups x d_state) and Δ (one per head);
  the conv over (x, B, C); Δ = softplus(Δ + dt_bias); one scalar A per head; the SSD scan;
  RMSNorm(y · SiLU(z)) per group of heads; out_proj.

The scan goes through :func:`jaxtok.nn.ssm.ssm_scan` (``config.scan`` picks the path). Packed
documents (``segment_ids``) restart the state and the conv window at every document start, and
padding (segment 0 or position -1) leaves both untouched, so a left-padded prompt gives the same
logits as the unpadded one. ``bidirectional=True`` adds a second mixer per block that reads the
sequence reversed and sums the two (non-causal use: TokenUnify's volumes); it has no cache.

Decoding carries a :class:`MambaCache` (the last ``d_conv - 1`` conv inputs and the scan state of
every layer): fixed size, whatever the context length. ``Mamba`` is called like
:class:`jaxtok.models.llama.Llama` and returns the same :class:`LMOutput`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

from jaxtok.models.llama import LMOutput, lm_logits
from jaxtok.nn.layers import (
    ModelDtypes,
    RMSNorm,
    check_layer_loop,
    matmul,
    param_with_axes,
    require_positive,
    run_layers,
    scanned_blocks,
)
from jaxtok.nn.ssm import ScanImpl, reset_from_segments, ssm_scan
from jaxtok.sharding import constrain

__all__ = ["PRESETS", "Mamba", "MambaCache", "MambaConfig", "LMOutput", "init_params"]


@dataclasses.dataclass(frozen=True)
class MambaConfig(ModelDtypes):
    """Shape and numerics of a Mamba LM.

    Attributes:
      version: 1 (selective scan, per-state A) or 2 (SSD, scalar A per head).
      vocab_size, d_model, n_layers: the shape; d_inner = expand · d_model.
      d_state: state size N per channel (Mamba-1: 16; Mamba-2: 64-128).
      d_conv: taps of the depthwise causal conv.
      dt_rank: Mamba-1 Δ projection rank (None: ceil(d_model / 16)).
      head_dim, n_groups: Mamba-2 head width P and B/C groups (heads = d_inner / head_dim).
      chunk_size: chunk length of the CHUNKED/PALLAS scans.
      scan: the path behind :func:`jaxtok.nn.ssm.ssm_scan` (``auto``, ``sequential``, ...).
      conv_bias, proj_bias: biases of the conv and of in_proj/out_proj.
      dt_min, dt_max, dt_floor: range of the initial Δ (log-uniform).
      norm_eps: epsilon of every RMSNorm.
      bidirectional: a second, reversed mixer per block (no cache, not causal).
      tie_embeddings: output projection is the transposed input embedding.
      max_seq_len: longest sequence meant (informational: the state has no length limit).
      dtype / param_dtype, remat, layer_loop, scan_unroll: as in ``LlamaConfig``.
    """

    version: int = 1
    vocab_size: int = 50280
    d_model: int = 768
    n_layers: int = 24
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None
    head_dim: int = 64
    n_groups: int = 1
    chunk_size: int = 256
    scan: str = "auto"
    conv_bias: bool = True
    proj_bias: bool = False
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_floor: float = 1e-4
    norm_eps: float = 1e-5
    bidirectional: bool = False
    tie_embeddings: bool = True
    max_seq_len: int = 2048
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool | str = False
    layer_loop: str = "scan"
    scan_unroll: int = 1

    def __post_init__(self):
        check_layer_loop(self.layer_loop, self.scan_unroll, self.remat)
        if self.version not in (1, 2):
            raise ValueError(f"version must be 1 (Mamba) or 2 (Mamba-2), got {self.version}")
        require_positive(self, "vocab_size", "d_model", "n_layers", "d_state", "d_conv", "expand", "head_dim",
                         "n_groups", "chunk_size")
        if self.version == 2 and self.d_inner % self.head_dim:
            raise ValueError(f"d_inner={self.d_inner} is not a multiple of head_dim={self.head_dim}")
        if self.version == 2 and self.n_ssm_heads % self.n_groups:
            raise ValueError(f"{self.n_ssm_heads} heads are not a multiple of n_groups={self.n_groups}")
        ScanImpl(self.scan)  # fails early on an unknown name

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def rank(self) -> int:
        return math.ceil(self.d_model / 16) if self.dt_rank is None else self.dt_rank

    @property
    def n_ssm_heads(self) -> int:
        return self.d_inner // self.head_dim if self.version == 2 else self.d_inner

    @property
    def conv_channels(self) -> int:
        return self.d_inner + (2 * self.n_groups * self.d_state if self.version == 2 else 0)

    # token-token attention: none (read by train.flops' Llama term)
    n_heads = 0

    def _layer_matmul_params(self) -> int:
        d, di, n = self.d_model, self.d_inner, self.d_state
        conv = self.d_conv * self.conv_channels
        if self.version == 1:
            return d * 2 * di + conv + di * (self.rank + 2 * n) + self.rank * di + di * d
        return d * (2 * di + 2 * self.n_groups * n + self.n_ssm_heads) + conv + di * d

    def matmul_params(self) -> int:
        """Parameters each token is multiplied by (projections, conv taps, output layer)."""
        return self.n_layers * self._layer_matmul_params() * (2 if self.bidirectional else 1) \
            + self.vocab_size * self.d_model

    def num_params(self) -> int:
        di, n = self.d_inner, self.d_state
        per_layer = self._layer_matmul_params() + (self.conv_channels if self.conv_bias else 0)
        if self.version == 1:
            per_layer += di + di * n + di  # dt bias, A_log, D
        else:
            per_layer += 3 * self.n_ssm_heads + di  # dt bias, A_log, D, gated norm
        mixers = 2 if self.bidirectional else 1
        out = 0 if self.tie_embeddings else self.vocab_size * self.d_model
        return (self.vocab_size * self.d_model + self.n_layers * (mixers * per_layer + self.d_model)
                + self.d_model + out)

    def mixer_flops_per_token(self, seq_len: int) -> float:
        """The recurrence per token and layer, counted like the attention products: the input
        outer product dt·x ⊗ B, the decay multiply-add and the readout C·h, 2 · d_inner · N
        each (exp, softplus, gating and the SSD's extra intra-chunk work are not counted)."""
        del seq_len  # linear in length: no context term
        return 6.0 * self.n_layers * self.d_inner * self.d_state * (2 if self.bidirectional else 1)


PRESETS: dict[str, MambaConfig] = {
    # state-spaces/mamba-130m and mamba2-130m shapes (GPT-NeoX vocab padded to 50280 / 50288)
    "mamba-130m": MambaConfig(version=1, vocab_size=50280, d_model=768, n_layers=24, d_state=16),
    "mamba2-130m": MambaConfig(version=2, vocab_size=50288, d_model=768, n_layers=24, d_state=128,
                               head_dim=64, n_groups=1),
    "mamba-tiny": MambaConfig(version=1, vocab_size=256, d_model=64, n_layers=2, d_state=16,
                              chunk_size=64, max_seq_len=512),
    "mamba2-tiny": MambaConfig(version=2, vocab_size=256, d_model=64, n_layers=2, d_state=16,
                               head_dim=16, chunk_size=64, max_seq_len=512),
}


@struct.dataclass
class MambaCache:
    """Recurrent state of every layer: conv (L, B, d_conv - 1, conv channels) holds the last raw
    conv inputs, ssm (L, B, heads, head_dim, d_state) the scan state (float32); ``end`` counts
    the tokens seen."""

    conv: jax.Array
    ssm: jax.Array
    end: jax.Array

    @classmethod
    def create(cls, config: MambaConfig, batch: int, dtype=None) -> MambaCache:
        if config.bidirectional:
            raise ValueError("a bidirectional Mamba has no recurrent cache (it reads the whole sequence)")
        dtype = config.compute_dtype if dtype is None else dtype
        heads = config.n_ssm_heads
        width = config.head_dim if config.version == 2 else 1
        return cls(conv=jnp.zeros((config.n_layers, batch, config.d_conv - 1, config.conv_channels), dtype),
                   ssm=jnp.zeros((config.n_layers, batch, heads, width, config.d_state), jnp.float32),
                   end=jnp.zeros((), jnp.int32))

    def grow(self, extra: int) -> MambaCache:
        """Room for ``extra`` more tokens: nothing to add, the state has a fixed size."""
        del extra
        return self


# ---------------------------------------------------------------------------------------------
# Pieces


def causal_conv(u, kernel, bias, valid, seg, state):
    """Depthwise causal conv. u (B, T, C) raw inputs, kernel (K, C); ``valid`` (B, T) zeroes
    padding; ``seg`` (B, T) segment numbers (0 = the cached prefix's), taps never cross into an
    earlier segment; ``state`` (B, K-1, C) the previous inputs or None. Returns (out, new state)."""
    k = kernel.shape[0]
    b, t, c = u.shape
    u = u * valid[..., None].astype(u.dtype)
    prev = jnp.zeros((b, k - 1, c), u.dtype) if state is None else state.astype(u.dtype)
    full = jnp.concatenate([prev, u], axis=1)  # (B, K-1+T, C)
    seg_full = jnp.concatenate([jnp.zeros((b, k - 1), seg.dtype), seg], axis=1)
    out = jnp.zeros((b, t, c), jnp.float32)
    for tap in range(k):  # tap k reads the input d_conv-1-k steps back
        same = (seg_full[:, tap:tap + t] == seg)[..., None]
        out = out + jnp.where(same, full[:, tap:tap + t].astype(jnp.float32), 0.0) * kernel[tap].astype(jnp.float32)
    if bias is not None:
        out = out + bias.astype(jnp.float32)
    return out, full[:, t:]


def _conv_init(key, shape, dtype=jnp.float32):
    bound = 1.0 / math.sqrt(shape[0])  # PyTorch's default for a depthwise conv (fan_in = taps)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def _symmetric_uniform(bound):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def _dt_bias_init(config: MambaConfig):
    def init(key, shape, dtype=jnp.float32):
        lo, hi = math.log(config.dt_min), math.log(config.dt_max)
        dt = jnp.maximum(jnp.exp(jax.random.uniform(key, shape) * (hi - lo) + lo), config.dt_floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)  # softplus⁻¹(dt)
    return init


def _a_log_init(shape, dtype=jnp.float32):
    # Mamba-1: A = -(1..N) for every channel; Mamba-2: A = -(1..H), as transformers initialises
    def init(key, shape_=shape, dtype_=dtype):
        del key
        return jnp.broadcast_to(jnp.log(jnp.arange(1, shape_[-1] + 1, dtype=jnp.float32)), shape_).astype(dtype_)
    return init


class Mixer(nn.Module):
    """The sequence mixer of one block (Mamba-1 or Mamba-2 as the config says)."""

    config: MambaConfig

    def _param(self, name, shape, axes, init=None):
        init = nn.initializers.normal(0.02) if init is None else init
        return param_with_axes(self, name, init, shape, axes, self.config.storage_dtype)

    def _conv_params(self, channels, axes):
        cfg = self.config
        kernel = self._param("conv_kernel", (cfg.d_conv, *channels), ("conv", *axes), _conv_init)
        bias = self._param("conv_bias", channels, axes, nn.initializers.zeros) if cfg.conv_bias else None
        return kernel, bias

    def _scan(self, x, dt, a, bm, cm, **kw):
        if self.is_initializing():
            # no parameter depends on the scan's values, and XLA keeps the dead scan inside the
            # layer loop: skipping it cuts mamba2-tiny's init compile from ~13 s to ~2 s
            b, t, h, p = x.shape
            return jnp.zeros_like(x), jnp.zeros((b, h, p, bm.shape[-1]), jnp.float32)
        return ssm_scan(x, dt, a, bm, cm, impl=self.config.scan, chunk_size=self.config.chunk_size, **kw)

    @nn.compact
    def __call__(self, h, layer_cache, valid, seg, reset):
        cfg = self.config
        dt_c = cfg.compute_dtype
        conv_state, ssm_state = (None, None) if layer_cache is None else layer_cache
        f32 = jnp.float32
        b, t, _ = h.shape
        if cfg.version == 1:
            di, n = cfg.d_inner, cfg.d_state
            w_in = self._param("in_proj", (cfg.d_model, 2, di), ("embed", None, "inner"))
            xz = matmul("btd,dki->btki", h, w_in, dt_c)  # (B, T, 2, d_inner)
            x, z = xz[:, :, 0], xz[:, :, 1]
            kernel, bias = self._conv_params((di,), ("inner",))
            x, new_conv = causal_conv(x, kernel, bias, valid, seg, conv_state)
            x = jax.nn.silu(x) * valid[..., None]
            x = constrain(x.astype(dt_c), ("batch", "length", "inner"))
            proj = matmul("bti,ir->btr", x, self._param("x_proj", (di, cfg.rank + 2 * n), ("inner", None)), dt_c, f32)
            dt_low, bm, cm = jnp.split(proj, [cfg.rank, cfg.rank + n], axis=-1)
            dt = matmul("btr,ri->bti", dt_low,
                        self._param("dt_proj", (cfg.rank, di), (None, "inner"), _symmetric_uniform(cfg.rank ** -0.5)),
                        f32)
            dt = jax.nn.softplus(dt + self._param("dt_bias", (di,), ("inner",), _dt_bias_init(cfg)).astype(f32))
            a = -jnp.exp(self._param("A_log", (di, n), ("inner", "state"), _a_log_init((di, n))).astype(f32))
            d_skip = self._param("D", (di,), ("inner",), nn.initializers.ones)
            y, new_ssm = self._scan(x[..., None], dt * valid[..., None], a, bm[:, :, None], cm[:, :, None],
                                    D=d_skip, initial_state=ssm_state, reset=reset)
            y = y[..., 0].astype(f32) * jax.nn.silu(z.astype(f32))
            out = matmul("bti,id->btd", y.astype(dt_c),
                         self._param("out_proj", (di, cfg.d_model), ("inner", "embed")), dt_c)
            return out, (new_conv, new_ssm)

        hh, p, g, n = cfg.n_ssm_heads, cfg.head_dim, cfg.n_groups, cfg.d_state
        z = matmul("btd,dhp->bthp", h, self._param("in_z", (cfg.d_model, hh, p), ("embed", "heads", "head_dim")), dt_c)
        x = matmul("btd,dhp->bthp", h, self._param("in_x", (cfg.d_model, hh, p), ("embed", "heads", "head_dim")), dt_c)
        bc = matmul("btd,dkgn->btkgn", h,
                    self._param("in_bc", (cfg.d_model, 2, g, n), ("embed", None, "groups", "state")), dt_c)
        dt = matmul("btd,dh->bth", h, self._param("in_dt", (cfg.d_model, hh), ("embed", "heads")), dt_c, f32)
        kernel_x, bias_x = self._conv_params((hh, p), ("heads", "head_dim"))
        kernel_bc = self._param("conv_kernel_bc", (cfg.d_conv, 2, g, n), ("conv", None, "groups", "state"), _conv_init)
        bias_bc = (self._param("conv_bias_bc", (2, g, n), (None, "groups", "state"), nn.initializers.zeros)
                   if cfg.conv_bias else None)
        # one conv over (x, B, C), as transformers' conv1d over xBC (depthwise: a concat is exact)
        u = jnp.concatenate([x.reshape(b, t, hh * p), bc.reshape(b, t, 2 * g * n)], axis=-1)
        kernel = jnp.concatenate([kernel_x.reshape(cfg.d_conv, -1), kernel_bc.reshape(cfg.d_conv, -1)], axis=-1)
        bias = None if bias_x is None else jnp.concatenate([bias_x.reshape(-1), bias_bc.reshape(-1)])
        u, new_conv = causal_conv(u, kernel, bias, valid, seg, conv_state)
        u = jax.nn.silu(u) * valid[..., None]
        x = constrain(u[..., :hh * p].reshape(b, t, hh, p).astype(dt_c), ("batch", "length", "heads", "head_dim"))
        bm, cm = (u[..., hh * p:].reshape(b, t, 2, g, n)[:, :, i] for i in (0, 1))
        dt = jax.nn.softplus(dt + self._param("dt_bias", (hh,), ("heads",), _dt_bias_init(cfg)).astype(f32))
        a = -jnp.exp(self._param("A_log", (hh,), ("heads",), _a_log_init((hh,))).astype(f32))
        d_skip = self._param("D", (hh,), ("heads",), nn.initializers.ones)
        y, new_ssm = self._scan(x, dt * valid[..., None], a, bm, cm, D=d_skip, initial_state=ssm_state,
                                reset=reset)
        # gated RMSNorm per group of heads (transformers' MambaRMSNormGated, norm after the gate)
        y = y.astype(f32) * jax.nn.silu(z.astype(f32))  # (B, T, H, P)
        grouped = y.reshape(b, t, g, (hh // g) * p)
        grouped = grouped * jax.lax.rsqrt(jnp.mean(grouped * grouped, axis=-1, keepdims=True) + cfg.norm_eps)
        scale = self._param("norm", (hh, p), ("heads", "head_dim"), nn.initializers.ones)
        y = (grouped.reshape(b, t, hh, p) * scale.astype(f32)).astype(dt_c)
        out = matmul("bthp,hpd->btd", y, self._param("out_proj", (hh, p, cfg.d_model), ("heads", "head_dim", "embed")),
                     dt_c)
        return out, (new_conv, new_ssm)


class Block(nn.Module):
    """Pre-norm residual block; a bidirectional block adds a mixer over the reversed sequence."""

    config: MambaConfig

    @nn.compact
    def __call__(self, x, layer_cache, valid, seg, reset, _unused):
        cfg = self.config
        h = RMSNorm(cfg.norm_eps, cfg.compute_dtype, cfg.storage_dtype, name="norm")(x)
        out, new_cache = Mixer(cfg, name="mixer")(h, layer_cache, valid, seg, reset)
        if cfg.bidirectional:
            flip = lambda a: None if a is None else jnp.flip(a, axis=1)  # noqa: E731
            # reversed, a segment's start is where the next one ends: resets from the flipped ids
            seg_r = flip(seg)
            reset_r = reset_from_segments(seg_r) if reset is not None else None
            back, _ = Mixer(cfg, name="mixer_reverse")(flip(h), None, flip(valid), seg_r, reset_r)
            out = out + flip(back)
        x = constrain(x + out.astype(x.dtype), ("batch", "length", "embed"))
        return x, None if layer_cache is None else new_cache


class Mamba(nn.Module):
    """Mamba LM, called like :class:`jaxtok.models.llama.Llama` (tokens or ``embeds``,
    ``positions`` only mark padding (< 0), ``segment_ids`` restart the state, ``cache`` a
    :class:`MambaCache`). Returns :class:`LMOutput`.

    Attributes:
      config: the model's shape and numerics.
    """

    config: MambaConfig

    def setup(self):
        cfg = self.config
        table_init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed"))
        self.embedding = self.param("embedding", table_init, (cfg.vocab_size, cfg.d_model), cfg.storage_dtype)
        self.blocks = scanned_blocks(Block, cfg)
        self.final_norm = RMSNorm(cfg.norm_eps, cfg.compute_dtype, cfg.storage_dtype)
        if not cfg.tie_embeddings:
            self.lm_head = self.param("lm_head", table_init, (cfg.vocab_size, cfg.d_model), cfg.storage_dtype)

    def init_cache(self, batch: int, length: int | None = None) -> MambaCache:
        """The empty cache ``generate`` starts from (``length`` is ignored: fixed size)."""
        del length
        return MambaCache.create(self.config, batch)

    def __call__(self, tokens=None, *, embeds=None, positions=None, segment_ids=None,
                 cache: MambaCache | None = None, input_embeddings=None, output_embeddings=None,
                 return_hidden: bool = False, compute_logits: bool = True,
                 last_logits_only: bool = False) -> LMOutput:
        cfg = self.config
        dt = cfg.compute_dtype
        if embeds is None:
            if tokens is None:
                raise ValueError("pass tokens or embeds")
            table = self.embedding if input_embeddings is None else input_embeddings
            x = jnp.take(table, tokens, axis=0).astype(dt)
        else:
            x = embeds.astype(dt)
        b, t = x.shape[:2]
        x = constrain(x, ("batch", "length", "embed"))
        valid = jnp.ones((b, t), bool)
        if positions is not None:
            valid &= positions >= 0
        if segment_ids is not None:
            valid &= segment_ids != 0
            reset = reset_from_segments(segment_ids)
            seg = jnp.cumsum(reset.astype(jnp.int32), axis=1)
        else:
            reset, seg = None, jnp.zeros((b, t), jnp.int32)
        if cache is not None and cfg.bidirectional:
            raise ValueError("a bidirectional Mamba cannot decode with a cache")
        layer_caches = None if cache is None else (cache.conv, cache.ssm)
        x, new_layer_caches = run_layers(self.blocks, Block, cfg, x, layer_caches, valid, seg, reset, None)
        x = self.final_norm(x)
        new_cache = None
        if cache is not None:
            conv, ssm = new_layer_caches
            new_cache = MambaCache(conv=conv.astype(cache.conv.dtype), ssm=ssm, end=cache.end + t)
        logits = lm_logits(self, x, output_embeddings, last_logits_only) if compute_logits else None
        return LMOutput(logits=logits, hidden=x if return_hidden else None, cache=new_cache)


def init_params(config: MambaConfig, rng: jax.Array, seq_len: int = 8) -> Any:
    """Boxed parameters (with logical axis names); ``flax.linen.unbox`` gives plain arrays."""
    model = Mamba(config)
    return jax.jit(lambda key: model.init(key, jnp.zeros((1, seq_len), jnp.int32))["params"])(rng)
