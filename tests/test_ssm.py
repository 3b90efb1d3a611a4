"""The scan entry point: every path equals SEQUENTIAL (forward, final state and the gradient of
every float input, with resets and an initial state), a hand-computed case pins SEQUENTIAL itself,
a reset equals a fresh sequence, bad input is named.

Test time is compile time here (the shapes are tiny), so: inputs are numpy (no eager jax ops to
compile), each path is compiled once for forward and gradient together, and :func:`fast_jit`
skips XLA's backend optimisation (a Mamba-2 init compiles in 2 s instead of 13 s under load).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerance import assert_close_at_scale

from jaxtok.nn.ssm import ScanImpl, ssm_scan

RTOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def fast_jit(fn):
    """``jax.jit(fn)`` compiled with XLA's backend optimisations off (one executable per argument
    shapes and dtypes). For tests only: tiny shapes, where compiling is all the time there is."""
    jitted, compiled = jax.jit(fn), {}

    def call(*args):
        leaves, tree = jax.tree.flatten(args)
        key = (tree, tuple((np.shape(a), getattr(a, "dtype", None) or np.asarray(a).dtype,
                            _named(getattr(a, "sharding", None))) for a in leaves))
        if key not in compiled:
            compiled[key] = jitted.lower(*args).compile(compiler_options=FAST_COMPILE)
        return compiled[key](*args)

    return call


def _named(sharding):
    # a mesh placement needs its own executable; numpy and single-device arrays share one
    return sharding if isinstance(sharding, jax.sharding.NamedSharding) else None


def make_inputs(seed, b, t, h, p, g, n, scalar, reset_rate=0.1):
    """Float inputs (x, dt, A, B, C, D, initial_state) as a dict, and the reset mask."""
    rng = np.random.RandomState(seed)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    arrays = dict(x=f32(b, t, h, p), dt=np.log1p(np.exp(f32(b, t, h))),
                  A=-np.exp(0.5 * (f32(h) if scalar else f32(h, n))), B=f32(b, t, g, n), C=f32(b, t, g, n),
                  D=f32(h), initial_state=f32(b, h, p, n))
    return arrays, rng.uniform(size=(b, t)) < reset_rate


# Mamba-2 shape (scalar A, 2 groups of heads) and Mamba-1 shape (per-state A, width-1 heads)
SHAPES = {"ssd": (4, 3, 2, 5, True), "selective": (6, 1, 1, 5, False)}
# T = 37 over chunks of 16: odd, three chunks, the last one padded; resets fall inside chunks
T, CHUNK = 37, 16
PATHS = [("ssd", "chunked"), ("ssd", "associative"), ("ssd", "pallas"), ("selective", "chunked"),
         ("selective", "associative")]


@functools.cache  # one compiled function per path, shared by the tests below
def _value_and_grad(impl):
    def loss(a, reset):
        y, last = ssm_scan(**a, reset=reset, impl=impl, chunk_size=CHUNK)
        return jnp.sum(jnp.sin(y)) + jnp.sum(last * last), (y, last)

    return fast_jit(jax.value_and_grad(loss, has_aux=True))


@pytest.fixture(scope="module")
def sequential():
    """Inputs and SEQUENTIAL's (loss, (y, final state)), gradients per shape kind."""
    out = {}
    for kind, (h, p, g, n, scalar) in SHAPES.items():
        arrays, reset = make_inputs(len(kind), 2, T, h, p, g, n, scalar)
        out[kind] = arrays, reset, _value_and_grad("sequential")(arrays, reset)
    return out


@pytest.mark.parametrize("kind,impl", PATHS, ids=[f"{k}-{i}" for k, i in PATHS])
def test_path_equals_sequential_forward_and_gradients(sequential, kind, impl):
    arrays, reset, ((_, want), want_grad) = sequential[kind]
    assert reset.any(), "no reset inside the sequence: the test would not exercise them"
    (_, got), got_grad = _value_and_grad(impl)(arrays, reset)
    assert got[0].shape == want[0].shape and got[0].dtype == want[0].dtype
    assert_close_at_scale(got, want, rtol=RTOL[jnp.float32], err_msg=f"{kind}/{impl} (y, final state)")
    assert_close_at_scale(got_grad, want_grad, rtol=1e-4, err_msg=f"{kind}/{impl} gradient")


@pytest.mark.parametrize("kind,t", [("ssd", 13), ("selective", 1)])
def test_chunked_shorter_than_a_chunk(kind, t):
    # one chunk of its own (rounded-up) length; T = 1 is a decoding step
    h, p, g, n, scalar = SHAPES[kind]
    arrays, reset = make_inputs(t, 2, t, h, p, g, n, scalar, reset_rate=0.3)
    want = fast_jit(lambda a, r: ssm_scan(**a, reset=r, impl="sequential"))(arrays, reset)
    got = fast_jit(lambda a, r: ssm_scan(**a, reset=r, impl="chunked", chunk_size=CHUNK))(arrays, reset)
    assert_close_at_scale(got, want, rtol=RTOL[jnp.float32], err_msg=f"{kind}/T={t}")


def test_sequential_by_hand():
    # one head, width 1, state 1: h1 = dt1 x1 B1; h2 = exp(dt2 A) h1 + dt2 x2 B2; y = C h + D x
    x, dt, A, B, C, D = [1.5, -2.0], [0.5, 0.25], -0.8, [2.0, 1.0], [0.3, -1.2], 0.7
    h1 = dt[0] * x[0] * B[0]
    h2 = math.exp(dt[1] * A) * h1 + dt[1] * x[1] * B[1]
    want_y = [C[0] * h1 + D * x[0], C[1] * h2 + D * x[1]]
    shape = lambda v, s: np.asarray(v, np.float32).reshape(s)  # noqa: E731
    y, last = fast_jit(lambda *a: ssm_scan(*a[:5], D=a[5], impl="sequential"))(
        shape(x, (1, 2, 1, 1)), shape(dt, (1, 2, 1)), shape([A], (1,)), shape(B, (1, 2, 1, 1)),
        shape(C, (1, 2, 1, 1)), shape([D], (1,)))
    np.testing.assert_allclose(np.asarray(y).ravel(), want_y, rtol=1e-6)
    np.testing.assert_allclose(float(last.ravel()[0]), h2, rtol=1e-6)


def test_reset_equals_a_fresh_sequence():
    # row 0: document a (9 steps, from a non-zero initial state) then, after a reset, document b.
    # row 1: 9 steps with dt = 0 from a zero state (decay 1, no input: the state stays 0, y = 0),
    # then b with no reset. b must come out the same in both rows, final state included.
    arrays, _ = make_inputs(7, 2, 20, 4, 3, 2, 5, True)
    for name in ("x", "dt", "B", "C"):
        arrays[name][1, 9:] = arrays[name][0, 9:]
    arrays["dt"][1, :9] = 0.0
    arrays["initial_state"][1] = 0.0
    reset = np.zeros((2, 20), bool)
    reset[0, 9] = True
    y, last = fast_jit(lambda a, r: ssm_scan(**a, reset=r, impl="sequential"))(arrays, reset)
    assert_close_at_scale((y[0, 9:], last[0]), (y[1, 9:], last[1]), rtol=2e-5)
    assert float(jnp.max(jnp.abs(y[1, :9] - arrays["D"][:, None] * arrays["x"][1, :9]))) == 0.0


def test_bf16_inputs_keep_dtype_and_track_float32(sequential):
    arrays, reset, _ = sequential["ssd"]
    low = {**arrays, "x": arrays["x"].astype(jnp.bfloat16)}
    got, last = fast_jit(lambda a, r: ssm_scan(**a, reset=r, impl="chunked", chunk_size=CHUNK))(low, reset)
    assert got.dtype == jnp.bfloat16 and last.dtype == jnp.float32
    # the same rounded x in float32 through the already-compiled SEQUENTIAL
    rounded = {**arrays, "x": np.asarray(low["x"].astype(jnp.float32))}
    (_, (want, want_last)), _ = _value_and_grad("sequential")(rounded, reset)
    assert_close_at_scale((got.astype(jnp.float32), last), (want, want_last), rtol=RTOL[jnp.bfloat16])


def test_bad_input_is_named():
    arrays, _ = make_inputs(0, 1, 8, 4, 3, 2, 5, True)
    base = {k: arrays[k] for k in ("x", "dt", "A", "B", "C")}
    with pytest.raises(ValueError, match="dt must be"):
        ssm_scan(**{**base, "dt": base["dt"][:, :4]})
    with pytest.raises(ValueError, match="multiple of the B/C groups"):
        ssm_scan(**{**base, "B": np.ones((1, 8, 3, 5)), "C": np.ones((1, 8, 3, 5))})
    with pytest.raises(ValueError, match="A must be"):
        ssm_scan(**{**base, "A": np.ones((4, 2))})
    with pytest.raises(ValueError, match="PALLAS"):
        ssm_scan(**{**base, "A": -np.ones((4, 5))}, impl="pallas")
    with pytest.raises(ValueError, match="initial_state must be"):
        ssm_scan(**base, initial_state=arrays["initial_state"][:, :2])
    with pytest.raises(ValueError):
        ssm_scan(**base, impl="fast")
    # every named path except SEQUENTIAL (the reference) and AUTO (one of them) is held to it above
    assert {ScanImpl(impl) for _, impl in PATHS} == set(ScanImpl) - {ScanImpl.SEQUENTIAL, ScanImpl.AUTO}
