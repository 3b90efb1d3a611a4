"""SSD (Mamba-2 state-space scan) as a Pallas kernel: chunked forward, backward recomputed from
chunk states.

The grid walks (batch, head, chunk) with the chunk axis sequential: the state (head_dim x d_state)
stays in a VMEM scratch buffer from one chunk to the next, so nothing of size T x state is ever
written. Per chunk of Q steps, with ``cs`` the running sum of the log decays ``dt · A``::

    y     = ((C Bᵀ) ⊙ exp(segsum)) (dt·x)  +  exp(cs) ⊙ (C hᵀ)         intra-chunk + carried state
    h_new = exp(cs_Q) h + (dt·x)ᵀ (B ⊙ exp(cs_Q - cs))

Both are matmuls (the MXU's work); the cumulative sum is a masked reduction (no cumsum op in
Mosaic). Resets (packed documents) enter as segment ids: positions of different segments do not
see each other. The kernel also writes each chunk's start state; the backward pass (``custom_vjp``)
starts from those: a reverse scan over chunk boundaries carries the state's cotangent, then every
chunk is differentiated on its own, all chunks at once, by recomputing its forward in jnp
(``_chunk_forward``) from its saved start state — as axlearn's TPU kernels do.

On GPU (Triton lowering, chosen per platform by ``lax.platform_dependent``) grid steps run in
parallel, so the grid is (batch, head) and each program loops over its chunks with the state as
the loop carry; the chunk math (``_chunk_math``) and the backward are the same code.

Layout (DESIGN.md): block sizes, kernels, ``pallas_call`` wrappers, public ``ssd``
(``custom_vjp``), ``ssd_reference`` (the sequential recurrence) at the bottom.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

__all__ = ["SSDBlockSizes", "ssd", "ssd_reference"]


@dataclasses.dataclass(frozen=True)
class SSDBlockSizes:
    """chunk: time steps per grid step (a multiple of 8; 128/256 fill TPU lanes)."""

    chunk: int = 256

    def __post_init__(self):
        if self.chunk < 8 or self.chunk % 8:
            raise ValueError(f"chunk must be a positive multiple of 8, got {self.chunk}")


# ---------------------------------------------------------------------------------------------
# Kernel body (refs of one (batch, head, chunk) block)


def _chunk_math(xdt, la_col, la_row, bm, cm, seg_col, seg_row, conn, end, passes, h):
    """One chunk on values (shared by the TPU and GPU kernels): y (Q, P) and the state at the
    chunk's end from h (P, N), the state at its start. ``passes`` (1, 1): no reset inside."""
    q = xdt.shape[0]
    row = jax.lax.broadcasted_iota(jnp.int32, (q, q), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (q, q), 1)
    causal = row >= col
    cs_col = jnp.sum(jnp.where(causal, la_row, 0.0), axis=1, keepdims=True)  # (Q, 1) inclusive cumsum
    total = jnp.sum(la_col, axis=0, keepdims=True)  # (1, 1) = cs at the chunk's last step
    cs_row = jnp.sum(jnp.where(row <= col, la_col, 0.0), axis=0, keepdims=True)  # (1, Q)
    same = causal & (seg_col == seg_row)
    within = jnp.exp(jnp.where(same, cs_col - cs_row, -jnp.inf))  # masked before exp: no overflow

    nt = (((1,), (1,)), ((), ()))  # contract the last dims: A Bᵀ
    scores = jax.lax.dot_general(cm, bm, nt, preferred_element_type=jnp.float32) * within
    y = jnp.dot(scores, xdt, preferred_element_type=jnp.float32)
    carried = jax.lax.dot_general(cm, h, nt, preferred_element_type=jnp.float32)  # (Q, P)
    y = y + jnp.exp(cs_col) * conn * carried

    weights = bm * (jnp.exp(total - cs_col) * end)  # (Q, N)
    tn = (((0,), (0,)), ((), ()))  # contract the first dims: Aᵀ B
    local = jax.lax.dot_general(xdt, weights, tn, preferred_element_type=jnp.float32)  # (P, N)
    return y, jnp.exp(total) * passes * h + local


def _ssd_kernel(xdt_ref, la_col_ref, la_row_ref, b_ref, c_ref, seg_col_ref, seg_row_ref, conn_ref,
                end_ref, h0_ref, y_ref, starts_ref, last_ref, h_scr):
    """TPU: one (batch, head, chunk) block; the state lives in VMEM across the chunk axis."""
    chunk = pl.program_id(2)

    @pl.when(chunk == 0)
    def _():
        h_scr[...] = h0_ref[...]

    q = xdt_ref.shape[0]
    h = h_scr[...]  # (P, N) state at the chunk start
    y, h_new = _chunk_math(xdt_ref[...], la_col_ref[...], la_row_ref[...], b_ref[...], c_ref[...],
                           seg_col_ref[...], seg_row_ref[...], conn_ref[...], end_ref[...],
                           conn_ref[q - 1:q, :], h)
    y_ref[...] = y
    starts_ref[...] = h
    h_scr[...] = h_new

    @pl.when(chunk == pl.num_programs(2) - 1)
    def _():
        last_ref[...] = h_new


def _ssd_kernel_gpu(xdt_ref, la_col_ref, la_row_ref, b_ref, c_ref, seg_col_ref, seg_row_ref, conn_ref,
                    end_ref, h0_ref, y_ref, starts_ref, last_ref, *, chunk):
    """GPU (Triton): one (batch, head) program walks its chunks in a loop; the state is the
    loop carry (GPU grid steps run in parallel, so no scratch can carry it between them)."""
    p = xdt_ref.shape[1]

    def body(ci, h):
        rows = pl.ds(ci * chunk, chunk)
        y, h_new = _chunk_math(xdt_ref[rows, :], la_col_ref[rows, :], la_row_ref[:, rows], b_ref[rows, :],
                               c_ref[rows, :], seg_col_ref[rows, :], seg_row_ref[:, rows], conn_ref[rows, :],
                               end_ref[rows, :], conn_ref[pl.ds(ci * chunk + chunk - 1, 1), :], h)
        y_ref[rows, :] = y
        starts_ref[pl.ds(ci * p, p), :] = h
        return h_new

    last_ref[...] = jax.lax.fori_loop(0, xdt_ref.shape[0] // chunk, body, h0_ref[...])


# ---------------------------------------------------------------------------------------------
# pallas_call wrapper


def _prepare(x, dt, A, B, C, reset, chunk):
    """Kernel-layout inputs: time padded to whole chunks (dt = 0: the state passes unchanged),
    head-major, dt folded into x and into the log decay, segment masks as float columns/rows."""
    b, t, h, _ = x.shape
    pad = -t % chunk

    def padt(a, mode="constant"):
        return jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2), mode=mode)

    xdt = jnp.moveaxis(padt(x * dt[..., None]), 2, 1)  # (b, h, T, P)
    la = jnp.moveaxis(padt(dt * A), 2, 1)  # (b, h, T)
    bm, cm = (jnp.moveaxis(padt(m), 2, 1) for m in (B, C))  # (b, g, T, N)
    seg = padt(jnp.cumsum(reset.astype(jnp.int32), axis=1), mode="edge")  # (b, T)
    tp = t + pad
    chunks = seg.reshape(b, -1, chunk)
    before = jnp.concatenate([jnp.zeros_like(chunks[:, :1, 0]), chunks[:, :-1, -1]], axis=1)
    conn = (chunks == before[:, :, None]).reshape(b, 1, tp, 1).astype(jnp.float32)
    end = (chunks == chunks[:, :, -1:]).reshape(b, 1, tp, 1).astype(jnp.float32)
    segf = seg.astype(jnp.float32)
    return (xdt, la[..., None], la[:, :, None, :], bm, cm, segf.reshape(b, 1, tp, 1),
            segf.reshape(b, 1, 1, tp), conn, end)


def _ssd_call(x, dt, A, B, C, h0, reset, chunk, interpret):
    """Runs the kernel: (y (b, t, h, p), chunk start states (b, h, c, p, n), final state).
    Compiled, each platform gets its own kernel; ``interpret`` is False, "tpu" or "gpu" (which
    kernel body the interpreter runs, on any backend)."""
    t = x.shape[1]
    args = (*_prepare(x, dt, A, B, C, reset, chunk), h0)
    r = x.shape[2] // B.shape[2]
    if interpret == "gpu":
        y, starts, last = _gpu_call(args, r, chunk, interpret=True)
    elif interpret:
        y, starts, last = _tpu_call(args, r, chunk, interpret=True)
    else:
        y, starts, last = jax.lax.platform_dependent(
            *args, tpu=lambda *a: _tpu_call(a, r, chunk), cuda=lambda *a: _gpu_call(a, r, chunk))
    return jnp.moveaxis(y, 1, 2)[:, :t], starts, last


def _out_shapes(args, chunk):
    b, h, tp, p = args[0].shape
    n = args[3].shape[-1]
    return b, h, tp, p, n, tp // chunk


def _tpu_call(args, r, chunk, interpret=False):
    b, h, tp, p, n, nc = _out_shapes(args, chunk)
    g = args[3].shape[1]
    head = lambda bi, hi, ci: (bi, hi, ci, 0)  # noqa: E731
    group = lambda bi, hi, ci: (bi, hi // r, ci, 0)  # noqa: E731
    per_row = lambda bi, hi, ci: (bi, 0, ci, 0)  # noqa: E731
    in_specs = [
        pl.BlockSpec((None, None, chunk, p), head),
        pl.BlockSpec((None, None, chunk, 1), head),
        pl.BlockSpec((None, None, 1, chunk), lambda bi, hi, ci: (bi, hi, 0, ci)),
        pl.BlockSpec((None, None, chunk, n), group),
        pl.BlockSpec((None, None, chunk, n), group),
        pl.BlockSpec((None, None, chunk, 1), per_row),
        pl.BlockSpec((None, None, 1, chunk), lambda bi, hi, ci: (bi, 0, 0, ci)),
        pl.BlockSpec((None, None, chunk, 1), per_row),
        pl.BlockSpec((None, None, chunk, 1), per_row),
        pl.BlockSpec((None, None, p, n), lambda bi, hi, ci: (bi, hi, 0, 0)),
    ]
    out_specs = [
        pl.BlockSpec((None, None, chunk, p), head),
        pl.BlockSpec((None, None, None, p, n), lambda bi, hi, ci: (bi, hi, ci, 0, 0)),
        pl.BlockSpec((None, None, p, n), lambda bi, hi, ci: (bi, hi, 0, 0)),
    ]
    out_shape = [jax.ShapeDtypeStruct((b, h, tp, p), jnp.float32),
                 jax.ShapeDtypeStruct((b, h, nc, p, n), jnp.float32),
                 jax.ShapeDtypeStruct((b, h, p, n), jnp.float32)]
    return pl.pallas_call(
        _ssd_kernel, grid=(b, h, nc), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((p, n), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=_cost(b, h, g, tp, p, n, chunk), interpret=interpret,
    )(*args)


def _gpu_call(args, r, chunk, interpret=False):
    from jax.experimental.pallas import triton as pltriton

    b, h, tp, p, n, nc = _out_shapes(args, chunk)
    g = args[3].shape[1]
    head = lambda bi, hi: (bi, hi, 0, 0)  # noqa: E731
    group = lambda bi, hi: (bi, hi // r, 0, 0)  # noqa: E731
    per_row = lambda bi, hi: (bi, 0, 0, 0)  # noqa: E731
    col, row = (None, None, tp, 1), (None, None, 1, tp)
    in_specs = [pl.BlockSpec((None, None, tp, p), head), pl.BlockSpec(col, head), pl.BlockSpec(row, head),
                pl.BlockSpec((None, None, tp, n), group), pl.BlockSpec((None, None, tp, n), group),
                pl.BlockSpec(col, per_row), pl.BlockSpec(row, per_row), pl.BlockSpec(col, per_row),
                pl.BlockSpec(col, per_row), pl.BlockSpec((None, None, p, n), head)]
    out_specs = [pl.BlockSpec((None, None, tp, p), head), pl.BlockSpec((None, None, nc * p, n), head),
                 pl.BlockSpec((None, None, p, n), head)]
    out_shape = [jax.ShapeDtypeStruct((b, h, tp, p), jnp.float32),
                 jax.ShapeDtypeStruct((b, h, nc * p, n), jnp.float32),
                 jax.ShapeDtypeStruct((b, h, p, n), jnp.float32)]
    y, starts, last = pl.pallas_call(
        functools.partial(_ssd_kernel_gpu, chunk=chunk), grid=(b, h), in_specs=in_specs,
        out_specs=out_specs, out_shape=out_shape, compiler_params=pltriton.CompilerParams(num_warps=4),
        cost_estimate=_cost(b, h, g, tp, p, n, chunk), interpret=interpret,
    )(*args)
    return y, starts.reshape(b, h, nc, p, n), last


def _cost(b, h, g, tp, p, n, chunk):
    nc = tp // chunk
    return pl.CostEstimate(flops=b * h * nc * (2 * chunk * chunk * (n + p) + 4 * chunk * p * n),
                           transcendentals=b * h * nc * chunk * chunk,
                           bytes_accessed=4 * (2 * b * h * tp * p + 2 * b * g * tp * n))


# ---------------------------------------------------------------------------------------------
# Public function


def ssd(x, dt, A, B, C, initial_state=None, reset=None, *, chunk_size: int = 256,
        interpret: bool | str = False):
    """The SSD scan (no D term): ``y`` (batch, T, H, P) and the final state (batch, H, P, N).

    x (batch, T, H, P), dt (batch, T, H) positive, A (H,) negative, B/C (batch, T, G, N),
    initial_state (batch, H, P, N), reset (batch, T) bool; all float32. Differentiable in every
    float input (``custom_vjp``). Compiled: Mosaic on TPU, Triton on GPU (chunk, head_dim and
    d_state powers of two there). ``interpret``: True (or "tpu") runs the TPU kernel in the Pallas
    interpreter, "gpu" the GPU kernel.
    """
    if interpret not in (False, True, "tpu", "gpu"):
        raise ValueError(f"interpret must be False, True, 'tpu' or 'gpu', got {interpret!r}")
    b, t, h, p = x.shape
    n = B.shape[-1]
    SSDBlockSizes(chunk_size)
    if A.shape != (h,):
        raise ValueError(f"the SSD kernel needs a scalar decay per head, A of shape {(h,)}; got {A.shape}")
    h0 = jnp.zeros((b, h, p, n), jnp.float32) if initial_state is None else initial_state
    reset = jnp.zeros((b, t), bool) if reset is None else reset
    return _ssd_vjp(chunk_size, interpret, x, dt, A, B, C, h0, reset)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _ssd_vjp(chunk, interpret, x, dt, A, B, C, h0, reset):
    y, _, last = _ssd_call(x, dt, A, B, C, h0, reset, chunk, interpret)
    return y, last


def _fwd(chunk, interpret, x, dt, A, B, C, h0, reset):
    y, starts, last = _ssd_call(x, dt, A, B, C, h0, reset, chunk, interpret)
    return (y, last), (x, dt, A, B, C, reset, starts)


def _chunk_forward(x, dt, A, B, C, seg, before, h):
    """One chunk in jnp (the kernel's math, time-major): x (Q, H, P), dt (Q, H), B/C (Q, G, N),
    seg (Q,), ``before`` the segment id ahead of the chunk, h (H, P, N) its start state.
    Returns (y (Q, H, P), state at the chunk's end)."""
    q, hh = dt.shape
    r = hh // B.shape[1]
    Bh, Ch = jnp.repeat(B, r, axis=1), jnp.repeat(C, r, axis=1)  # (Q, H, N)
    cs = jnp.cumsum(dt * A, axis=0)  # (Q, H)
    same = jnp.tril(jnp.ones((q, q), bool)) & (seg[:, None] == seg[None, :])
    within = jnp.exp(jnp.where(same[..., None], cs[:, None] - cs[None, :], -jnp.inf))  # (i, j, H)
    xdt = x * dt[..., None]
    scores = jnp.einsum("ihn,jhn->ijh", Ch, Bh) * within
    conn = (seg == before).astype(jnp.float32)
    y = jnp.einsum("ijh,jhp->ihp", scores, xdt)
    y = y + jnp.einsum("ihn,hpn->ihp", Ch, h) * (jnp.exp(cs) * conn[:, None])[..., None]
    weights = jnp.exp(cs[-1] - cs) * (seg == seg[-1]).astype(jnp.float32)[:, None]  # (Q, H)
    h_end = jnp.exp(cs[-1])[:, None, None] * conn[-1] * h + jnp.einsum("jhp,jhn,jh->hpn", xdt, Bh, weights)
    return y, h_end


def _bwd(chunk, interpret, res, cotangents):
    x, dt, A, B, C, reset, starts = res
    dy, dlast = cotangents
    b, t, h, p = x.shape
    pad = -t % chunk

    def padt(a, mode="constant"):
        return jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2), mode=mode)

    seg = padt(jnp.cumsum(reset.astype(jnp.int32), axis=1), mode="edge")
    split = lambda a: a.reshape(b, -1, chunk, *a.shape[2:])  # noqa: E731  (b, c, Q, ...)
    xs, dts, Bs, Cs, dys = (split(padt(a)) for a in (x, dt, B, C, dy))
    segs = split(seg)
    before = jnp.concatenate([jnp.zeros_like(segs[:, :1, 0]), segs[:, :-1, -1]], axis=1)
    starts = jnp.moveaxis(starts, 2, 1)  # (b, c, h, p, n)
    chunk_fn = jax.vmap(jax.vmap(_chunk_forward, in_axes=(0, 0, None, 0, 0, 0, 0, 0)),
                        in_axes=(0, 0, None, 0, 0, 0, 0, 0))
    # cotangent of each chunk's end state: reverse scan over chunks. The end state depends on the
    # start state linearly through the chunk decay only: d start = decay * d end + (dy-part).
    _, vjp_start = jax.vjp(lambda s: chunk_fn(xs, dts, A, Bs, Cs, segs, before, s), starts)
    zero_end = jnp.zeros_like(starts)
    (from_y,) = vjp_start((dys, zero_end))  # d start from this chunk's own y
    cs_total = jnp.sum(dts * A, axis=2)  # (b, c, h)
    passes = (segs[:, :, -1] == before).astype(jnp.float32)
    decay = jnp.exp(cs_total) * passes[..., None]

    def back(d_end, inp):
        dec, own = inp
        d_start = dec[..., None, None] * d_end + own
        return d_start, d_end  # emit the cotangent of this chunk's end state

    tm = lambda a: jnp.moveaxis(a, 1, 0)  # noqa: E731
    d_h0, d_ends = jax.lax.scan(back, dlast, (tm(decay), tm(from_y)), reverse=True)
    d_ends = jnp.moveaxis(d_ends, 0, 1)
    _, vjp_all = jax.vjp(lambda *a: chunk_fn(*a, segs, before, starts), xs, dts, A, Bs, Cs)
    dx, ddt, dA, dB, dC = vjp_all((dys, d_ends))
    unsplit = lambda a: a.reshape(b, -1, *a.shape[3:])[:, :t]  # noqa: E731
    return (unsplit(dx), unsplit(ddt), dA, unsplit(dB), unsplit(dC), d_h0, None)


_ssd_vjp.defvjp(_fwd, _bwd)


# ---------------------------------------------------------------------------------------------
# Reference


def ssd_reference(x, dt, A, B, C, initial_state=None, reset=None):
    """The recurrence step by step (``lax.scan``), same arguments and results as :func:`ssd`."""
    b, t, h, p = x.shape
    g, n = B.shape[2:]
    r = h // g
    h0 = jnp.zeros((b, h, p, n), jnp.float32) if initial_state is None else initial_state
    reset = jnp.zeros((b, t), bool) if reset is None else reset

    def step(state, inp):
        x_t, dt_t, b_t, c_t, r_t = inp
        decay = jnp.where(r_t[:, None], 0.0, jnp.exp(dt_t * A))  # (b, h)
        b_h, c_h = jnp.repeat(b_t, r, axis=1), jnp.repeat(c_t, r, axis=1)  # (b, h, n)
        state = decay[..., None, None] * state + (dt_t[..., None] * x_t)[..., None] * b_h[:, :, None]
        return state, jnp.einsum("bhpn,bhn->bhp", state, c_h)

    tm = lambda a: jnp.moveaxis(a, 1, 0)  # noqa: E731
    last, ys = jax.lax.scan(step, h0, (tm(x), tm(dt), tm(B), tm(C), tm(reset)))
    return jnp.moveaxis(ys, 0, 1), last
