"""Pattention: token-parameter attention, the projection layer of TokenFormer.

Input tokens are the queries; the layer's parameters are ``num_tokens`` learnable key/value
pairs. With X (..., d_in), keys K_P (n, d_in) and values V_P (n, d_out):

    A = X · K_Pᵀ                      (..., n)  scores against every parameter token
    out = Θ(A) · V_P                  (..., d_out)

Θ normalises over the parameter-token axis n (``normalization``; τ = ``tau``):

* ``l2_norm_gelu`` (default of the reference configs): Θ(A) = GeLU(A / ‖A‖₂ · τ), τ = √n.
* ``gelu_l2_norm``: Θ(A) = GeLU(A) / ‖GeLU(A)‖₂ · τ, τ = √n.
* ``softmax``: Θ(A) = softmax(A) · τ = exp(A) / ‖exp(A)‖₁ · τ, τ = n (the reference's
  exp-then-L1 form, which keeps the mean weight at 1 as the L2 forms do).

‖·‖₂ is taken over n and floored at ``eps`` so an all-zero score row (zero input) gives a finite
output and finite gradients. Because τ is a plain number, a model that grows (appends parameter
tokens) can keep τ at its old value: zero new keys then give A = 0 for the new tokens, which
neither changes ‖A‖₂ nor, through GeLU(0) = 0, lets the new values in, so the function is
unchanged (``l2_norm_gelu``; ``gelu_l2_norm`` likewise, since GeLU(0) = 0).

The parameter-token axis carries the logical name ``param_tokens`` on parameters and on the
score activations, so tensor parallelism splits the n tokens: each shard scores and mixes its own
tokens and only the (..., 1) norm and the (..., d_out) output are reduced across shards.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxtok.nn.layers import matmul, param_with_axes
from jaxtok.sharding import constrain

Dtype = Any

NORMALIZATIONS = ("l2_norm_gelu", "gelu_l2_norm", "softmax")


def default_tau(num_tokens: int, normalization: str = "l2_norm_gelu") -> float:
    """The reference's τ for ``num_tokens`` parameter tokens: √n for the L2 forms, n for softmax."""
    _check_normalization(normalization)
    return float(num_tokens) if normalization == "softmax" else math.sqrt(num_tokens)


def _check_normalization(normalization: str) -> None:
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; valid: {NORMALIZATIONS}")


def _l2_normalize(a: jax.Array, eps: float) -> jax.Array:
    # rsqrt of a floored sum of squares: finite value and gradient for an all-zero row
    sum_sq = jnp.sum(a * a, axis=-1, keepdims=True)
    return a * jax.lax.rsqrt(jnp.maximum(sum_sq, eps * eps))


def normalize_scores(scores: jax.Array, normalization: str, tau: float, eps: float) -> jax.Array:
    """Θ(A) over the last axis (the parameter tokens), computed in float32."""
    _check_normalization(normalization)
    a = scores.astype(jnp.float32)
    if normalization == "l2_norm_gelu":
        # exact (erf) GeLU, as torch's F.gelu default in the reference
        return jax.nn.gelu(_l2_normalize(a, eps) * tau, approximate=False)
    if normalization == "gelu_l2_norm":
        return _l2_normalize(jax.nn.gelu(a, approximate=False), eps) * tau
    return jax.nn.softmax(a, axis=-1) * tau


def pattention(
    x: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    normalization: str = "l2_norm_gelu",
    tau: float | None = None,
    eps: float = 1e-6,
    *,
    dtype: Dtype | None = None,
    x_axes: Sequence[str | None] | None = None,
    out_axes: Sequence[str | None] | None = None,
) -> jax.Array:
    """Θ(X·K_Pᵀ)·V_P for x (..., d_in), keys (n, d_in), values (n, d_out) -> (..., d_out).

    ``tau=None`` takes ``default_tau(n, normalization)``. Matmuls take ``dtype`` inputs (default:
    x's dtype) and accumulate in float32; Θ runs in float32. ``x_axes`` are the logical names of
    x's axes: when given, the scores are constrained to (*x_axes[:-1], "param_tokens").
    ``out_axes``, when given, constrain the output (logical names of its axes).
    """
    dtype = x.dtype if dtype is None else dtype
    n = keys.shape[0]
    if keys.shape[0] != values.shape[0]:
        raise ValueError(f"{keys.shape[0]} key tokens but {values.shape[0]} value tokens")
    tau = default_tau(n, normalization) if tau is None else tau
    lead = "abcfghijklmopqrstuvwxyz"[:x.ndim - 1]  # x's leading axes, spelled out (no ellipsis)
    scores = matmul(f"{lead}d,nd->{lead}n", x, keys, dtype, jnp.float32)  # (..., n)
    if x_axes is not None:
        scores = constrain(scores, (*tuple(x_axes)[:-1], "param_tokens"))
    weights = normalize_scores(scores, normalization, tau, eps).astype(dtype)
    out = matmul(f"{lead}n,ne->{lead}e", weights, values, dtype, jnp.float32)  # (..., d_out)
    if out_axes is not None:
        # Pins the reduction over the sharded tokens to a known layout. Without it, XLA (jax
        # 0.10.2, CPU, GSPMD and Shardy alike) miscompiles values sharded (tensor, fsdp) whose
        # output is later constrained to (batch over (data, fsdp), features over tensor), as the
        # heads of q/k/v are: wrong numbers, not just slow ones.
        out = constrain(out, out_axes)
    return out.astype(dtype)


class Pattention(nn.Module):
    """Token-parameter attention replacing a d_in -> d_out linear projection.

    Attributes:
      in_dim: input width d_in (width of the key tokens).
      out_dim: output width d_out (width of the value tokens).
      num_tokens: number n of key/value parameter tokens.
      normalization: one of ``NORMALIZATIONS`` (formulas in the module docstring).
      tau: scale after normalisation; None = ``default_tau(num_tokens, normalization)``. Pass a
        fixed value to keep a grown layer's function unchanged.
      eps: floor of the L2 norm over the parameter tokens (zero input stays finite).
      key_init_std, value_init_std: std of the normal initialisers of the key/value tokens.
      dtype: compute dtype; param_dtype: storage dtype.
    """

    in_dim: int
    out_dim: int
    num_tokens: int
    normalization: str = "l2_norm_gelu"
    tau: float | None = None
    eps: float = 1e-6
    key_init_std: float = 0.02
    value_init_std: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x (..., in_dim) -> (..., out_dim); x of rank 3 is taken as (batch, length, embed)."""
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"input width {x.shape[-1]} != in_dim {self.in_dim}")
        keys = param_with_axes(self, "key_tokens", nn.initializers.normal(self.key_init_std),
                               (self.num_tokens, self.in_dim), ("param_tokens", "embed"),
                               self.param_dtype)
        values = param_with_axes(self, "value_tokens", nn.initializers.normal(self.value_init_std),
                                 (self.num_tokens, self.out_dim), ("param_tokens", "embed"),
                                 self.param_dtype)
        # only a (batch, length, embed) input has known names; other ranks stay unconstrained
        x_axes = ("batch", "length", "embed") if x.ndim == 3 else None
        return pattention(x, keys, values, self.normalization, self.tau, self.eps,
                          dtype=self.dtype, x_axes=x_axes, out_axes=x_axes)
