"""Small layers shared by the model families, with logical axis names on every parameter.

Matmuls take ``dtype`` inputs and accumulate in float32 (``preferred_element_type``): bf16
inputs with f32 accumulation are both the TPU/GPU idiom and ~4x faster than f32 on AMX CPUs
(~1.8x on AVX-512 BF16 ones). :func:`matmul` keeps that true in the backward pass too.

The layer loop (:func:`run_layers`) is shared by the decoder families: parameters always carry a
leading ``layers`` axis, and the loop over them is ``scan``, ``scan`` unrolled ``k`` layers per
iteration, or a Python loop (``unrolled``), with a remat policy per config.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

Dtype = Any
Initializer = Any


def param_with_axes(module: nn.Module, name: str, init: Initializer, shape: Sequence[int],
                    axes: Sequence[str | None], dtype: Dtype = jnp.float32) -> jax.Array:
    """Declares a parameter whose logical axes are recorded for the sharding rules."""
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


MATMUL_NAME = "jaxtok_matmul"  # ``checkpoint_name`` of every matmul output (remat "dots_saveable")


def matmul(spec: str, x: jax.Array, w: jax.Array, dtype: Dtype, out_dtype: Dtype | None = None) -> jax.Array:
    """``einsum(spec, x, w)`` with ``dtype`` operands and float32 accumulation, result in
    ``out_dtype`` (default ``dtype``); differentiable, and 16-bit both ways.

    In float32 this is the plain ``jnp.einsum(..., preferred_element_type=float32)``, bit for bit.
    In a 16-bit ``dtype`` it is :func:`mixed_einsum`: the forward product and both backward
    products (``dx = g·wᵀ``, ``dw = xᵀ·g``) take ``dtype`` operands with float32 accumulation. Plain
    autodiff would not: the cotangent of a float32-accumulated product is float32, and the
    transposed products then promote the saved 16-bit operands to float32 (twice the backward cost
    on CPU, TPU and GPU alike). Gradients come back in the dtype of each input (float32 master
    weights get float32 gradients straight from the float32 accumulator).

    A 16-bit product whose ``x`` is a single row (one-token decoding) is computed on two copies
    of that row: XLA:CPU turns a bf16 matrix-vector product into an f32 one by converting the
    whole weight matrix on every call (~10x slower for SmolLM2's output layer), while two rows
    keep the bf16 kernel. The extra row is negligible next to the weights it multiplies.

    The output is tagged ``checkpoint_name(MATMUL_NAME)`` (an identity) for the remat policies.
    """
    dtype = jnp.dtype(dtype)
    out_dtype = dtype if out_dtype is None else jnp.dtype(out_dtype)
    if _is_low_precision(dtype) and _transpose_specs(spec) is not None:
        out = mixed_einsum(spec, x, w, dtype, out_dtype)
    else:
        out = _forward_product(spec, x.astype(dtype), w.astype(dtype), dtype).astype(out_dtype)
    return checkpoint_name(out, MATMUL_NAME)


def mixed_einsum(spec: str, x: jax.Array, w: jax.Array, dtype: Dtype, out_dtype: Dtype | None = None) -> jax.Array:
    """``einsum(spec, x, w)`` whose forward and both backward products take ``dtype`` operands
    with float32 accumulation (a ``custom_vjp``); result in ``out_dtype`` (default ``dtype``).
    ``spec`` is ``lhs,rhs->out`` without ellipsis, each input axis in the other input or the output."""
    dtype = jnp.dtype(dtype)
    out_dtype = dtype if out_dtype is None else jnp.dtype(out_dtype)
    return _mixed_einsum_fn(spec.replace(" ", ""), dtype, out_dtype, jnp.dtype(x.dtype),
                            jnp.dtype(w.dtype))(x, w)


def _is_low_precision(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize < 4


@functools.cache
def _transpose_specs(spec: str) -> tuple[str, str] | None:
    """(spec of dx = g·w, spec of dw = x·g) for ``lhs,rhs->out``; None where a plain pair of
    einsums cannot express them (ellipsis, repeated axes, an axis summed within one input)."""
    spec = spec.replace(" ", "")
    if "..." in spec or "->" not in spec or spec.count(",") != 1:
        return None
    inputs, out = spec.split("->")
    lhs, rhs = inputs.split(",")
    for term in (lhs, rhs, out):
        if len(set(term)) != len(term):
            return None
    if any(a not in rhs + out for a in lhs) or any(a not in lhs + out for a in rhs):
        return None
    return f"{out},{rhs}->{lhs}", f"{lhs},{out}->{rhs}"


def _forward_product(spec: str, x: jax.Array, w: jax.Array, dtype) -> jax.Array:
    """The float32-accumulated product of operands already in ``dtype`` (with the single-row
    trick of :func:`matmul` for 16-bit dtypes)."""
    row_axis = _single_row_axis(spec, x) if _is_low_precision(dtype) else None
    if row_axis is None:
        return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)
    lhs_axis, out_axis = row_axis
    out = jnp.einsum(spec, jnp.concatenate([x, x], axis=lhs_axis), w, preferred_element_type=jnp.float32)
    return jax.lax.slice_in_dim(out, 0, 1, axis=out_axis)


@functools.cache
def _mixed_einsum_fn(spec: str, dtype, out_dtype, x_dtype, w_dtype):
    dx_spec, dw_spec = _transpose_specs(spec)

    @jax.custom_vjp
    def product(x, w):
        return _forward_product(spec, x.astype(dtype), w.astype(dtype), dtype).astype(out_dtype)

    def fwd(x, w):
        xc, wc = x.astype(dtype), w.astype(dtype)  # residuals in the compute dtype
        return _forward_product(spec, xc, wc, dtype).astype(out_dtype), (xc, wc)

    def bwd(res, g):
        xc, wc = res
        g = g.astype(dtype)
        # gradients in each input's dtype: float32 master weights get the float32 accumulator
        dx = jnp.einsum(dx_spec, g, wc, preferred_element_type=jnp.float32).astype(x_dtype)
        dw = jnp.einsum(dw_spec, xc, g, preferred_element_type=jnp.float32).astype(w_dtype)
        return dx, dw

    product.defvjp(fwd, bwd)
    return product


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


# ---------------------------------------------------------------------------------------------
# The layer loop shared by the decoder families

LAYER_LOOPS = ("scan", "unrolled")
REMAT_POLICIES = ("none", "full", "dots_saveable")


def remat_policy_name(remat: bool | str) -> str:
    """A config's ``remat`` (``True``/``False`` as before, or a name) as one of ``REMAT_POLICIES``:
    ``none`` saves every activation, ``full`` recomputes each block in the backward pass from its
    input, ``dots_saveable`` saves only the outputs of the matmuls (``MATMUL_NAME``) and recomputes
    the cheap elementwise work around them."""
    if remat is True or remat is False:
        return "full" if remat else "none"
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat {remat!r}; valid: {REMAT_POLICIES} (or true/false)")
    return remat


class ModelDtypes:
    """Mixin of the model configs: their ``dtype``/``param_dtype`` names as jnp dtypes."""

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def storage_dtype(self):
        return jnp.dtype(self.param_dtype)


def require_positive(config: Any, *names: str) -> None:
    """Fails early, naming the field, on a size field of ``config`` that is not a positive int."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_layer_loop(layer_loop: str, scan_unroll: int, remat: bool | str) -> None:
    """Fails early on a config's unknown loop, unroll or remat setting."""
    if layer_loop not in LAYER_LOOPS:
        raise ValueError(f"unknown layer_loop {layer_loop!r}; valid: {LAYER_LOOPS}")
    if scan_unroll < 1:
        raise ValueError(f"scan_unroll must be >= 1, got {scan_unroll}")
    remat_policy_name(remat)


def _checkpoint_policy(name: str):
    # None = jax.checkpoint's default: save nothing but the block's inputs
    return jax.checkpoint_policies.save_only_these_names(MATMUL_NAME) if name == "dots_saveable" else None


def scanned_blocks(block: type[nn.Module], config: Any, *, name: str = "blocks") -> nn.Module:
    """``config.n_layers`` copies of ``block(config)`` under ``nn.scan``: parameters gain a
    leading ``layers`` axis, whatever loop then runs them (:func:`run_layers`). The block is
    called ``block(x, layer_cache, *broadcast)`` and returns ``(x, new_layer_cache)``, with
    ``layer_cache`` scanned over (or None) and four broadcast arguments."""
    policy = remat_policy_name(config.remat)
    if policy != "none":
        block = nn.remat(block, policy=_checkpoint_policy(policy))
    return nn.scan(
        block, variable_axes={"params": 0}, split_rngs={"params": True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
        length=config.n_layers, unroll=config.scan_unroll if config.layer_loop == "scan" else 1,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(config, name=name)


def run_layers(scanned: nn.Module, block: type[nn.Module], config: Any, x: jax.Array,
               layer_caches: Any, *broadcast: Any) -> tuple[jax.Array, Any]:
    """Runs the blocks of ``scanned`` (from :func:`scanned_blocks`) over ``x`` as
    ``config.layer_loop`` says; returns ``(x, new_layer_caches)`` stacked on a leading axis.

    * ``scan``: ``nn.scan`` (``config.scan_unroll`` layers per iteration): compiles once for
      all layers, but every iteration copies its layer's weights out of the stack (XLA:CPU
      materialises the dynamic slice) and stacks the saved activations for the backward pass.
    * ``unrolled``: a Python loop over the same stacked parameters, indexed per layer with static
      indices: no stacking of saved activations, compile time growing with the layer count. A
      static slice is still a copy on XLA:CPU; a loop that reuses the weights many times (the
      decode steps) splits them once with :func:`split_layers` and reads them without copies.

    Initialisation always goes through ``nn.scan``, so both loops share one parameter layout.
    """
    if config.layer_loop == "scan" or scanned.is_initializing():
        return scanned(x, layer_caches, *broadcast)
    stacked = nn.unbox(scanned.variables["params"])
    if PER_LAYER in stacked:  # split_layers: one buffer per layer already
        per_layer = stacked[PER_LAYER]
    else:
        per_layer = [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(config.n_layers)]
    module = block(config, parent=None)

    def layer(params, x, layer_cache):
        return module.apply({"params": params}, x, layer_cache, *broadcast)

    policy = remat_policy_name(config.remat)
    if policy != "none":
        layer = jax.checkpoint(layer, policy=_checkpoint_policy(policy))
    new_caches = []
    for i in range(config.n_layers):
        layer_cache = None if layer_caches is None else jax.tree.map(lambda a, i=i: a[i], layer_caches)
        x, new_cache = layer(per_layer[i], x, layer_cache)
        new_caches.append(new_cache)
    if new_caches[0] is None:
        return x, None
    return x, jax.tree.map(lambda *a: jnp.stack(a), *new_caches)


PER_LAYER = "per_layer"


def split_layers(params: Any, key: str = "blocks", n_layers: int | None = None) -> Any:
    """``params`` with the stacked block parameters ``params[key]`` split into one buffer per
    layer (``{PER_LAYER: (layer 0, layer 1, ...)}``), which the ``unrolled`` loop reads as they are.

    Slicing a layer out of the stack copies it on XLA:CPU each time; inside a decoding loop that is
    every step (about half of a float32 SmolLM2 step). Splitting once, outside the loop, pays the
    copy once per call instead. The stored layout stays the stacked one.
    """
    stacked = params[key]
    n = jax.tree.leaves(stacked)[0].shape[0] if n_layers is None else n_layers
    per_layer = tuple(jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(n))
    return {**params, key: {PER_LAYER: per_layer}}
