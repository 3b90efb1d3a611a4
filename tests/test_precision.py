"""Mixed precision: ``matmul`` is the plain einsum in float32 (bit for bit, values and gradients),
16-bit in both directions in bf16 (forward and both backward products take bf16 operands with
float32 accumulation), and a bf16 tiny model's loss and gradients stay close to float32's.

Tolerances (bf16 has an 8-bit mantissa, relative rounding 2^-8 = 3.9e-3):
* ``mixed_einsum`` against the same products written out on bf16-rounded operands in float32:
  equal up to float32 summation order (rtol 1e-5).
* tiny Llama / TokenFormer, bf16 compute with float32 master weights against float32: loss
  within 1e-2 relative, each parameter's gradient within 5e-2 relative (L2 norm of the
  difference over the L2 norm of the float32 gradient); measured ~1e-4 and ~1e-2.
"""

import dataclasses

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxtok.models import llama, tokenformer
from jaxtok.nn.attention import attention_mask, attention_reference
from jaxtok.nn.layers import _transpose_specs, matmul, mixed_einsum

SPECS = [  # (spec, x shape, w shape): every product the models compute
    ("btd,dhk->bthk", (2, 5, 8), (8, 3, 4)),
    ("bthk,hkd->btd", (2, 5, 3, 4), (3, 4, 8)),
    ("btd,df->btf", (2, 5, 8), (8, 6)),
    ("btd,vd->btv", (2, 5, 8), (11, 8)),
    ("bkqd,bskd->bkqs", (2, 3, 6, 4), (2, 7, 3, 4)),
    ("bkqs,bskd->bkqd", (2, 3, 6, 7), (2, 7, 3, 4)),
    ("abd,nd->abn", (2, 5, 8), (9, 8)),
]


def _inputs(xs, ws, seed=0):
    kx, kw, kg = jax.random.split(jax.random.key(seed), 3)
    return jax.random.normal(kx, xs), jax.random.normal(kw, ws), kg


def _rel(a, b):
    return float(jnp.linalg.norm((a - b).astype(jnp.float32)) / jnp.linalg.norm(b.astype(jnp.float32)))


@pytest.mark.parametrize("spec,xs,ws", SPECS)
def test_float32_matmul_is_the_plain_einsum_bit_for_bit(spec, xs, ws):
    x, w, kg = _inputs(xs, ws)

    def ours(x, w):
        return matmul(spec, x, w, jnp.float32)

    def plain(x, w):  # what matmul computed before the custom VJP
        return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32).astype(jnp.float32)

    for fn in (lambda f: f, jax.jit):
        out, vjp = jax.vjp(fn(ours), x, w)
        ref, vjp_ref = jax.vjp(fn(plain), x, w)
        g = jax.random.normal(kg, out.shape)
        np.testing.assert_array_equal(out, ref)
        for a, b in zip(vjp(g), vjp_ref(g)):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("spec,xs,ws", SPECS)
@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float32])
def test_bf16_matmul_gradients_are_bf16_products_with_f32_accumulation(spec, xs, ws, out_dtype):
    x, w, kg = _inputs(xs, ws)
    bf = jnp.bfloat16
    out, vjp = jax.vjp(lambda x, w: matmul(spec, x, w, bf, out_dtype), x, w)
    g = jax.random.normal(kg, out.shape).astype(out_dtype)
    dx, dw = vjp(g)
    assert out.dtype == out_dtype and dx.dtype == x.dtype and dw.dtype == w.dtype

    def r(a):  # rounded to bf16, computed in float32
        return a.astype(bf).astype(jnp.float32)

    dx_spec, dw_spec = _transpose_specs(spec)
    hi = jax.lax.Precision.HIGHEST
    np.testing.assert_allclose(out.astype(jnp.float32),
                               jnp.einsum(spec, r(x), r(w), precision=hi).astype(out_dtype).astype(jnp.float32),
                               rtol=1e-2 if out_dtype == bf else 1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, jnp.einsum(dx_spec, r(g), r(w), precision=hi), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, jnp.einsum(dw_spec, r(x), r(g), precision=hi), rtol=1e-5, atol=1e-5)
    # ... and it is what float32 autodiff of the einsum on the bf16-rounded operands gives
    ref_dx, ref_dw = jax.vjp(lambda a, b: jnp.einsum(spec, a, b, precision=hi), r(x), r(w))[1](r(g))
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, ref_dw, rtol=1e-5, atol=1e-5)


def _dot_operand_dtypes(fn, *args):
    """Operand dtypes of every dot_general in the (nested) jaxpr of ``fn``."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def test_bf16_backward_has_no_float32_products():
    x, w, _ = _inputs((2, 5, 8), (8, 6))

    def loss(x, w, dtype):
        return jnp.sum(matmul("btd,df->btf", x, w, dtype).astype(jnp.float32) ** 2)

    bf16 = _dot_operand_dtypes(jax.grad(lambda x, w: loss(x, w, jnp.bfloat16), (0, 1)), x, w)
    assert len(bf16) == 3 and set(bf16) == {("bfloat16", "bfloat16")}
    f32 = _dot_operand_dtypes(jax.grad(lambda x, w: loss(x, w, jnp.float32), (0, 1)), x, w)
    assert len(f32) == 3 and set(f32) == {("float32", "float32")}


def test_bf16_attention_backward_stays_bf16():
    kq, kk, kv = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(kq, (1, 6, 4, 8), jnp.bfloat16)
    k = jax.random.normal(kk, (1, 6, 2, 8), jnp.bfloat16)
    v = jax.random.normal(kv, (1, 6, 2, 8), jnp.bfloat16)
    pos = jnp.arange(6)[None]
    mask = attention_mask(pos, pos, None, None, True)

    def loss(q, k, v):
        return jnp.sum(attention_reference(q, k, v, mask, 8 ** -0.5).astype(jnp.float32) ** 2)

    dots = _dot_operand_dtypes(jax.grad(loss, (0, 1, 2)), q, k, v)
    assert len(dots) == 6 and set(dots) == {("bfloat16", "bfloat16")}


def test_mixed_einsum_rejects_what_it_cannot_transpose():
    assert _transpose_specs("...d,nd->...n") is None
    assert _transpose_specs("bij,jk->bk") is None  # i summed within x alone
    assert _transpose_specs("bij,jk->bik") == ("bik,jk->bij", "bij,bik->jk")
    assert _transpose_specs("bii,ik->bk") is None
    # matmul falls back to the plain product (autodiff as before) for such specs
    x, w, _ = _inputs((2, 3, 4), (4, 5))
    np.testing.assert_allclose(matmul("...d,de->...e", x, w, jnp.bfloat16).astype(jnp.float32),
                               mixed_einsum("btd,de->bte", x, w, jnp.bfloat16).astype(jnp.float32))


def _loss_and_grads(module_cls, config, params, tokens):
    def loss(p):
        logits = module_cls(config).apply({"params": p}, tokens[:, :-1]).logits
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("family", ["llama", "tokenformer"])
def test_bf16_loss_and_gradients_match_float32(family):
    mod = {"llama": llama, "tokenformer": tokenformer}[family]
    cls = {"llama": llama.Llama, "tokenformer": tokenformer.TokenFormer}[family]
    config = mod.PRESETS[f"{family}-tiny"]
    params = nn.unbox(mod.init_params(config, jax.random.key(0)))
    tokens = jax.random.randint(jax.random.key(1), (2, 33), 0, config.vocab_size)
    loss32, grads32 = _loss_and_grads(cls, config, params, tokens)
    loss16, grads16 = _loss_and_grads(cls, dataclasses.replace(config, dtype="bfloat16"), params, tokens)
    assert abs(float(loss16) - float(loss32)) <= 1e-2 * abs(float(loss32))
    for path, g32 in jax.tree_util.tree_leaves_with_path(grads32):
        g16 = _get(grads16, path)
        assert g16.dtype == jnp.float32  # float32 master weights get float32 gradients
        assert _rel(g16, g32) < 5e-2, jax.tree_util.keystr(path)


def _get(tree, path):
    for entry in path:
        tree = tree[entry.key]
    return tree
