"""The SSD Pallas kernel in interpret mode against its reference (forward, final state and every
gradient), and its Mosaic lowering for a TPU v5e (libtpu, ahead of time, on this CPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _lowering import TRITON_CALL, export_for, tpu_env
from _tolerance import assert_close_at_scale
from test_ssm import fast_jit

from jaxtok.kernels.ssd import SSDBlockSizes, ssd, ssd_reference


def inputs(b=2, t=21, h=4, p=8, g=2, n=16, seed=0):
    """numpy inputs (no eager jax ops to compile): x, dt, A, B, C, h0 and a reset mask."""
    rng = np.random.RandomState(seed)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    reset = rng.uniform(size=(b, t)) < 0.1
    reset[0, min(11, t - 1)] = True  # at least one reset (inside the second chunk when T > 11)
    return (f32(b, t, h, p), np.log1p(np.exp(f32(b, t, h))), -np.exp(f32(h)), f32(b, t, g, n), f32(b, t, g, n),
            f32(b, h, p, n), reset)


def _value_and_grad(fn):
    def loss(args, reset):
        y, last = fn(*args, reset)
        return jnp.sum(y * jnp.cos(y)) + jnp.sum(last * last), (y, last)
    return fast_jit(jax.value_and_grad(loss, has_aux=True))


REFERENCE = _value_and_grad(ssd_reference)  # compiled once for both kernels


@pytest.mark.parametrize("kernel", ["tpu", "gpu"])
def test_kernel_forward_and_gradients_match_reference(kernel):
    # T = 21 over chunks of 8: three grid steps carry the state, the last one padded (5 of 8
    # rows); resets inside chunks; the gradient of every float input (the custom_vjp backward
    # recomputes each chunk from its saved start state)
    *args, reset = inputs()
    # (both kernel bodies run in the Pallas interpreter: the TPU grid over chunks with the state in
    # scratch, the GPU loop over chunks with the state as the carry)
    run = lambda *a: ssd(*a, chunk_size=8, interpret=kernel)  # noqa: E731
    (_, got), g_got = _value_and_grad(run)(args, reset)
    (_, want), g_want = REFERENCE(args, reset)
    assert got[0].shape == (2, 21, 4, 8) and got[1].shape == (2, 4, 8, 16)
    assert_close_at_scale(got, want, rtol=2e-5, err_msg="forward")
    for name, a, b in zip(("x", "dt", "A", "B", "C", "h0"), g_got, g_want):
        assert_close_at_scale(a, b, rtol=5e-5, err_msg=f"d{name}")


def test_block_sizes_checked():
    with pytest.raises(ValueError, match="multiple of 8"):
        SSDBlockSizes(12)
    args = inputs(t=8)
    with pytest.raises(ValueError, match="scalar decay"):
        ssd(args[0], args[1], -np.ones((4, 16), np.float32), *args[3:], interpret=True)
    with pytest.raises(ValueError, match="multiple of 8"):
        ssd(*args, chunk_size=4, interpret=True)


def test_kernel_lowers_for_gpu():
    # jax.export for CUDA on this CPU host: the Triton lowering of forward and gradient runs
    # (Triton IR in the module); not compiled by ptxas, not run (no GPU here)
    b, t, h, p, g, n = 1, 256, 4, 64, 1, 64  # powers of two (Triton), 4 chunks of 64
    shapes = [(b, t, h, p), (b, t, h), (h,), (b, t, g, n), (b, t, g, n), (b, h, p, n)]
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes] + [jax.ShapeDtypeStruct((b, t), jnp.bool_)]

    def loss(*a):
        y, last = ssd(*a, chunk_size=64)
        return jnp.sum(y) + jnp.sum(last)

    for fn in (lambda *a: ssd(*a, chunk_size=64), jax.grad(loss, argnums=tuple(range(6)))):
        text = export_for(fn, args, platform="cuda", triton=True)
        assert TRITON_CALL in text and "tpu_custom_call" not in text


TPU_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtok.train.aot import tpu_devices
from jaxtok.kernels.ssd import ssd
devices = tpu_devices("v5e:2x2")
sharding = NamedSharding(Mesh(np.asarray(devices[:1]), ("x",)), PartitionSpec())
b, t, h, p, g, n = 1, 1024, 8, 64, 1, 128  # Mamba-2 130m-like head and state sizes
shapes = [(b, t, h, p), (b, t, h), (h,), (b, t, g, n), (b, t, g, n), (b, h, p, n)]
args = [jax.ShapeDtypeStruct(s, jnp.float32, sharding=sharding) for s in shapes]
args.append(jax.ShapeDtypeStruct((b, t), jnp.bool_, sharding=sharding))
def loss(*a):
    y, last = ssd(*a, chunk_size=256)
    return jnp.sum(y) + jnp.sum(last)
with jax.default_device(devices[0]):
    fwd = jax.jit(lambda *a: ssd(*a, chunk_size=256)).lower(*args).compile()
    grad = jax.jit(jax.grad(loss, argnums=tuple(range(6)))).lower(*args).compile()
for name, c in (("fwd", fwd), ("grad", grad)):
    assert "tpu_custom_call" in c.as_text(), name
    print(name, "OK", c.memory_analysis().temp_size_in_bytes)
"""


@pytest.mark.slow
def test_kernel_compiles_for_tpu_v5e():
    env = tpu_env()
    if env is None:
        pytest.skip("libtpu not installed (pip install --target DIR libtpu; export JAXTOK_LIBTPU_DIR=DIR)")
    proc = subprocess.run([sys.executable, "-c", TPU_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600, cwd=Path(__file__).parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fwd OK" in proc.stdout and "grad OK" in proc.stdout
