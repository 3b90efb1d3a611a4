"""Small layers shared by the model families, with logical axis names on every parameter.

Matmuls take ``dtype`` inputs and accumulate in float32 (``preferred_element_type``): bf16
inputs with f32 accumulation are both the TPU/GPU idiom and ~4x faster than f32 on AMX CPUs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

Dtype = Any
Initializer = Any


def param_with_axes(module: nn.Module, name: str, init: Initializer, shape: Sequence[int],
                    axes: Sequence[str | None], dtype: Dtype = jnp.float32) -> jax.Array:
    """Declares a parameter whose logical axes are recorded for the sharding rules."""
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


def matmul(spec: str, x: jax.Array, w: jax.Array, dtype: Dtype) -> jax.Array:
    """``einsum(spec, x, w)`` in ``dtype`` with float32 accumulation, result in ``dtype``.

    A 16-bit product whose ``x`` is a single row (one-token decoding) is computed on two copies
    of that row: XLA:CPU turns a bf16 matrix-vector product into an f32 one by converting the
    whole weight matrix on every call (~10x slower for SmolLM2's output layer), while two rows
    keep the bf16 kernel. The extra row is negligible next to the weights it multiplies.
    """
    x, w = x.astype(dtype), w.astype(dtype)
    low_precision = jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize < 4
    row_axis = _single_row_axis(spec, x) if low_precision else None
    if row_axis is None:
        return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32).astype(dtype)
    lhs_axis, out_axis = row_axis
    out = jnp.einsum(spec, jnp.concatenate([x, x], axis=lhs_axis), w, preferred_element_type=jnp.float32)
    return jax.lax.slice_in_dim(out, 0, 1, axis=out_axis).astype(dtype)


def _single_row_axis(spec: str, x: jax.Array) -> tuple[int, int] | None:
    """(axis in ``x``, axis in the output) of an ``x``-only axis when all ``x``-only axes have
    size 1 (``x`` is one row against ``w``); None otherwise."""
    if "..." in spec or "->" not in spec:
        return None
    inputs, out = spec.replace(" ", "").split("->")
    lhs, rhs = inputs.split(",")
    own = [a for a in lhs if a not in rhs and a in out]
    if not own or any(x.shape[lhs.index(a)] != 1 for a in own):
        return None
    return lhs.index(own[-1]), out.index(own[-1])


class DenseGeneral(nn.Module):
    """A projection written as one einsum over named axes.

    Attributes:
      shape: kernel shape.
      axes: logical axis names of the kernel.
      spec: einsum spec ``input,kernel->output``.
      use_bias: adds a bias over the output dims (named by ``bias_axes``).
      dtype: compute dtype; param_dtype: storage dtype.
    """

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    spec: str
    use_bias: bool = False
    bias_axes: tuple[str | None, ...] = ()
    init_std: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = param_with_axes(self, "kernel", nn.initializers.normal(self.init_std), self.shape,
                                 self.axes, self.param_dtype)
        y = matmul(self.spec, x, kernel, self.dtype)
        if self.use_bias:
            bias_shape = self.shape[-len(self.bias_axes):]
            bias = param_with_axes(self, "bias", nn.initializers.zeros, bias_shape, self.bias_axes,
                                   self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32 (Llama)."""

    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = param_with_axes(self, "scale", nn.initializers.ones, (x.shape[-1],), ("norm",),
                                self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * scale.astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm computed in float32; ``use_scale=False`` gives the non-parametric form."""

    eps: float = 1e-12
    use_scale: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        if self.use_scale:
            d = x.shape[-1]
            scale = param_with_axes(self, "scale", nn.initializers.ones, (d,), ("norm",),
                                    self.param_dtype)
            bias = param_with_axes(self, "bias", nn.initializers.zeros, (d,), ("norm",),
                                   self.param_dtype)
            y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


def rotary_embedding(x: jax.Array, positions: jax.Array, theta: float,
                     rotary_dims: int | None = None) -> jax.Array:
    """Rotary position embedding in the half-split layout (HF Llama's ``rotate_half``).

    x: (B, T, H, D); positions: (B, T). Only the first ``rotary_dims`` dims rotate.
    """
    d = x.shape[-1] if rotary_dims is None else rotary_dims
    half = d // 2
    freqs = 1.0 / (theta ** (jnp.arange(0, half, dtype=jnp.float32) * 2.0 / d))
    angles = positions.astype(jnp.float32)[..., None] * freqs  # (B, T, half)
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2, rest = x32[..., :half], x32[..., half:d], x32[..., d:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    return rotated.astype(x.dtype)
