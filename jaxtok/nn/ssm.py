"""The selective state-space scan (Mamba-1 and Mamba-2), one entry point with several paths.

One recurrence covers both models. Per batch row, head ``h`` and head channel ``p``::

    h_t = exp(dt_t · A) ⊙ h_{t-1} + dt_t · x_t ⊗ B_t          (state: heads x head_dim x d_state)
    y_t = h_t · C_t  (+ D · x_t)

* Mamba-2 (SSD): ``A`` is one scalar per head, ``(H,)``; ``B``/``C`` are shared by groups of
  heads, ``(batch, T, G, N)`` with ``H % G == 0``.
* Mamba-1 (selective scan): every channel is its own head of width 1 and every state dimension
  decays on its own: ``x`` ``(batch, T, D, 1)``, ``A`` ``(D, N)``, one group of ``B``/``C``.

``reset`` (batch, T) restarts the state before step t (a packed document starts there): the
decay into t is zero. ``dt`` must already be positive (softplus applied by the caller). The scan
runs in float32 whatever the input dtype; ``y`` comes back in ``x``'s dtype, the final state in
float32.

Paths (:class:`ScanImpl`), all returning ``(y, final_state)`` and tested against SEQUENTIAL:

* ``SEQUENTIAL``: ``lax.scan`` over time, the definition above.
* ``ASSOCIATIVE``: ``lax.associative_scan`` over (decay, input) pairs; materialises every
  state, and is slow on CPU (jax issue #14190); kept as the textbook parallel form.
* ``CHUNKED``: scalar ``A``: the SSD matmul form (Mamba-2 paper, section 6): inside a chunk
  masked matmuls with segment sums of the log decays, between chunks a short scan over chunk
  states. Per-channel ``A``: a two-level scan (the chunks run side by side from zero states,
  a scan over chunk boundaries, then each chunk again from its true start state).
* ``PALLAS``: :mod:`jaxtok.kernels.ssd` (scalar ``A`` only), interpret mode on CPU.
* ``AUTO``: one step (decoding) or per-state ``A`` (Mamba-1) -> SEQUENTIAL (measured faster on
  CPU); scalar ``A`` -> CHUNKED (PALLAS on TPU).
"""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp

__all__ = ["ScanImpl", "ssm_scan", "resolve_impl", "reset_from_segments"]

DEFAULT_CHUNK = 256


class ScanImpl(enum.StrEnum):
    AUTO = "auto"
    SEQUENTIAL = "sequential"
    ASSOCIATIVE = "associative"
    CHUNKED = "chunked"
    PALLAS = "pallas"


def reset_from_segments(segment_ids: jax.Array) -> jax.Array:
    """(batch, T) bool: True where a new segment starts (never at t = 0, whose state is the
    caller's initial one)."""
    change = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.concatenate([jnp.zeros_like(change[:, :1]), change], axis=1)


def resolve_impl(impl: ScanImpl | str, length: int, scalar_decay: bool) -> ScanImpl:
    impl = ScanImpl(impl)
    if impl is not ScanImpl.AUTO:
        return impl
    if length == 1:
        return ScanImpl.SEQUENTIAL
    if not scalar_decay:
        # Mamba-1: the two-level chunked scan was not faster than lax.scan on CPU
        # (benchmarks/ssm_scan.py: x0.6-0.9 forward at L = 1024/4096), so the definition runs
        return ScanImpl.SEQUENTIAL
    if jax.default_backend() == "tpu":
        return ScanImpl.PALLAS
    return ScanImpl.CHUNKED


def ssm_scan(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, *,
             D: jax.Array | None = None, initial_state: jax.Array | None = None,
             reset: jax.Array | None = None, impl: ScanImpl | str = ScanImpl.AUTO,
             chunk_size: int = DEFAULT_CHUNK) -> tuple[jax.Array, jax.Array]:
    """The scan of the module docstring.

    Args:
      x: (batch, T, H, P) inputs. dt: (batch, T, H) positive step sizes.
      A: (H,) scalar decay per head (Mamba-2) or (H, N) per state dimension (Mamba-1); negative.
      B, C: (batch, T, G, N); head h reads group h // (H / G).
      D: (H,) skip connection, or None.
      initial_state: (batch, H, P, N), default zeros.
      reset: (batch, T) bool, state zeroed before these steps (see :func:`reset_from_segments`).
      impl: the path; chunk_size: chunk length of CHUNKED and PALLAS (any T works: the tail
        chunk is padded with dt = 0, which leaves the state unchanged).

    Returns:
      y (batch, T, H, P) in x's dtype, final state (batch, H, P, N) float32.
    """
    b, t, h, p = _check(x, dt, A, B, C, D, initial_state, reset, chunk_size)
    g, n = B.shape[2], B.shape[3]
    r = h // g
    scalar = A.ndim == 1
    impl = resolve_impl(impl, t, scalar)
    f32 = jnp.float32
    # grouped layout: head h = (group h // r, member h % r)
    xg = x.astype(f32).reshape(b, t, g, r, p)
    dtg = dt.astype(f32).reshape(b, t, g, r)
    Ag = A.astype(f32).reshape(g, r, 1 if scalar else n)
    Bf, Cf = B.astype(f32), C.astype(f32)
    h0 = (jnp.zeros((b, g, r, p, n), f32) if initial_state is None
          else initial_state.astype(f32).reshape(b, g, r, p, n))
    rs = jnp.zeros((b, t), bool) if reset is None else reset.astype(bool)

    if impl is ScanImpl.SEQUENTIAL:
        y, last = _sequential(xg, dtg, Ag, Bf, Cf, h0, rs)
    elif impl is ScanImpl.ASSOCIATIVE:
        y, last = _associative(xg, dtg, Ag, Bf, Cf, h0, rs)
    elif impl is ScanImpl.CHUNKED:
        chunk = _fit_chunk(chunk_size, t)
        run = _ssd_chunked if scalar else _two_level
        y, last = run(xg, dtg, Ag, Bf, Cf, h0, rs, chunk)
    else:  # PALLAS
        if not scalar:
            raise ValueError("the PALLAS scan implements the Mamba-2 form (A of shape (H,)); "
                             "use CHUNKED for a per-state A of shape (H, N)")
        from jaxtok.kernels.ssd import ssd

        y, last = ssd(x.astype(f32), dt.astype(f32), A.astype(f32), Bf, Cf, h0.reshape(b, h, p, n),
                      rs, chunk_size=_fit_chunk(chunk_size, t),
                      interpret=jax.default_backend() == "cpu")
        y = y.reshape(b, t, g, r, p)
        last = last.reshape(b, g, r, p, n)
    if D is not None:
        y = y + xg * D.astype(f32).reshape(g, r)[..., None]
    return y.reshape(b, t, h, p).astype(x.dtype), last.reshape(b, h, p, n)


def _fit_chunk(chunk_size: int, t: int) -> int:
    # a sequence shorter than a chunk is one chunk of its own length (rounded up to 8 rows)
    return min(chunk_size, -(-t // 8) * 8)


def _check(x, dt, A, B, C, D, initial_state, reset, chunk_size):
    if x.ndim != 4:
        raise ValueError(f"x must be (batch, T, heads, head_dim), got shape {x.shape}")
    b, t, h, p = x.shape
    if dt.shape != (b, t, h):
        raise ValueError(f"dt must be (batch, T, heads) = {(b, t, h)}, got {dt.shape}")
    if B.ndim != 4 or B.shape[:2] != (b, t) or C.shape != B.shape:
        raise ValueError(f"B and C must be (batch, T, groups, d_state) with batch, T = {(b, t)}; "
                         f"got B {B.shape}, C {C.shape}")
    g, n = B.shape[2:]
    if h % g:
        raise ValueError(f"heads ({h}) must be a multiple of the B/C groups ({g})")
    if A.shape not in ((h,), (h, n)):
        raise ValueError(f"A must be (heads,) = {(h,)} or (heads, d_state) = {(h, n)}, got {A.shape}")
    if D is not None and D.shape != (h,):
        raise ValueError(f"D must be (heads,) = {(h,)}, got {D.shape}")
    if initial_state is not None and initial_state.shape != (b, h, p, n):
        raise ValueError(f"initial_state must be {(b, h, p, n)}, got {initial_state.shape}")
    if reset is not None and reset.shape != (b, t):
        raise ValueError(f"reset must be (batch, T) = {(b, t)}, got {reset.shape}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return b, t, h, p


# ---------------------------------------------------------------------------------------------
# SEQUENTIAL: the definition


def _step(h, x_t, dt_t, A, B_t, C_t, reset_t):
    """One step on grouped arrays with any leading batch dims: h (..., g, r, p, n),
    x_t (..., g, r, p), dt_t (..., g, r), A (g, r, 1|n), B_t/C_t (..., g, n), reset_t (...)."""
    decay = jnp.exp(dt_t[..., None] * A)  # (..., g, r, 1|n)
    decay = jnp.where(reset_t[..., None, None, None], 0.0, decay)
    h = decay[..., None, :] * h + (dt_t[..., None] * x_t)[..., None] * B_t[..., :, None, None, :]
    return h, jnp.einsum("...grpn,...gn->...grp", h, C_t)


def _time_major(*arrays):
    return tuple(jnp.moveaxis(a, 1, 0) for a in arrays)


def _sequential(x, dt, A, B, C, h0, reset):
    def body(h, inp):
        return _step(h, *inp[:2], A, *inp[2:])

    last, ys = jax.lax.scan(body, h0, _time_major(x, dt, B, C, reset))
    return jnp.moveaxis(ys, 0, 1), last


# ---------------------------------------------------------------------------------------------
# ASSOCIATIVE


def _associative(x, dt, A, B, C, h0, reset):
    decay = jnp.exp(dt[..., None] * A)  # (b, t, g, r, 1|n)
    decay = jnp.where(reset[:, :, None, None, None], 0.0, decay)
    inputs = (dt[..., None] * x)[..., None] * B[:, :, :, None, None, :]  # (b, t, g, r, p, n)
    inputs = inputs.at[:, 0].add(decay[:, 0, ..., None, :] * h0)  # the initial state enters at t = 0

    def combine(left, right):
        a_l, b_l = left
        a_r, b_r = right
        return a_l * a_r, a_r[..., None, :] * b_l + b_r

    _, states = jax.lax.associative_scan(combine, (decay, inputs), axis=1)
    return jnp.einsum("btgrpn,btgn->btgrp", states, C), states[:, -1]


# ---------------------------------------------------------------------------------------------
# CHUNKED


def _pad_chunks(chunk, x, dt, B, C, reset):
    """Pads T to a multiple of ``chunk`` (dt = 0 there: decay 1 and no input, so the state passes
    through the padding unchanged) and reshapes every array to (b, chunks, chunk, ...)."""
    t = x.shape[1]
    pad = -t % chunk

    def split(a):
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        return a.reshape(a.shape[0], -1, chunk, *a.shape[2:])

    return pad, tuple(split(a) for a in (x, dt, B, C, reset))


def _ssd_chunked(x, dt, A, B, C, h0, reset, chunk):
    """SSD for a scalar decay per head. Segment ids (cumulative resets) mark which positions
    still see each other: decay from s to t is exp(cs_t - cs_s) within one segment, else 0."""
    b, t = x.shape[:2]
    seg = jnp.cumsum(reset.astype(jnp.int32), axis=1)  # 0 = the initial state's segment
    pad, (x, dt, B, C, seg) = _pad_chunks(chunk, x, dt, B, C, seg)
    if pad:  # padded steps continue the last segment (no spurious reset)
        seg = seg.reshape(b, -1).at[:, t:].set(seg.reshape(b, -1)[:, t - 1:t]).reshape(seg.shape)
    log_decay = dt * A[..., 0]  # (b, c, q, g, r)
    cs = jnp.cumsum(log_decay, axis=2)
    seg_before = jnp.concatenate([jnp.zeros_like(seg[:, :1, 0]), seg[:, :-1, -1]], axis=1)  # (b, c)
    q = x.shape[2]
    causal = jnp.tril(jnp.ones((q, q), bool))
    same = causal & (seg[:, :, :, None] == seg[:, :, None, :])  # (b, c, i, j)
    cs_h = jnp.moveaxis(cs, 2, -1)  # (b, c, g, r, q)
    diff = cs_h[..., :, None] - cs_h[..., None, :]  # (b, c, g, r, i, j)
    # mask before exp: the masked entries (j > i) would overflow
    within = jnp.exp(jnp.where(same[:, :, None, None], diff, -jnp.inf))
    xdt = x * dt[..., None]  # (b, c, q, g, r, p)
    scores = jnp.einsum("bcign,bcjgn->bcgij", C, B)[:, :, :, None] * within  # (b, c, g, r, i, j)
    y_diag = jnp.einsum("bcgrij,bcjgrp->bcigrp", scores, xdt)

    # each chunk's contribution to the state at its end (from a zero start)
    to_end = jnp.exp(cs[:, :, -1:] - cs) * (seg == seg[:, :, -1:])[..., None, None]  # (b, c, q, g, r)
    chunk_states = jnp.einsum("bcjgn,bcjgr,bcjgrp->bcgrpn", B, to_end, xdt)
    passes = (seg[:, :, -1] == seg_before).astype(jnp.float32)  # no reset inside the chunk
    chunk_decay = jnp.exp(cs[:, :, -1]) * passes[:, :, None, None]  # (b, c, g, r)

    def across(state, inp):
        decay, local = inp
        return decay[..., None, None] * state + local, state  # emit the state at the chunk start

    last, starts = jax.lax.scan(across, h0, _time_major(chunk_decay, chunk_states))
    starts = jnp.moveaxis(starts, 0, 1)  # (b, c, g, r, p, n)
    from_start = jnp.exp(cs) * (seg == seg_before[:, :, None])[..., None, None]  # (b, c, q, g, r)
    y_off = jnp.einsum("bcign,bcgrpn->bcigrp", C, starts) * from_start[..., None]
    y = (y_diag + y_off).reshape(b, -1, *x.shape[3:])[:, :t]
    return y, last


def _two_level(x, dt, A, B, C, h0, reset, chunk):
    """Per-state decay (Mamba-1): no matmul form, so chunks scan side by side (the sequential
    loop is ``chunk`` steps long over a batch of all chunks), twice: first from zero states to
    get each chunk's end state, then, after a short scan over chunk boundaries, from each chunk's
    true start state to produce y."""
    b, t = x.shape[:2]
    _, (x, dt, B, C, reset) = _pad_chunks(chunk, x, dt, B, C, reset)
    g, r, p, n = *x.shape[3:5], x.shape[5], B.shape[-1]
    xs = tuple(jnp.moveaxis(a, 2, 0) for a in (x, dt, B, C, reset))  # (q, b, c, ...)

    def local(h, inp):
        return _step(h, *inp[:2], A, *inp[2:])[0], None

    zero = jnp.zeros((b, x.shape[1], g, r, p, n), jnp.float32)
    ends, _ = jax.lax.scan(local, zero, xs)  # (b, c, g, r, p, n)
    total = jnp.exp(jnp.sum(dt, axis=2)[..., None] * A)  # (b, c, g, r, 1|n)
    total = total * (~jnp.any(reset, axis=2))[..., None, None, None]

    def across(state, inp):
        decay, end = inp
        return decay[..., None, :] * state + end, state

    last, starts = jax.lax.scan(across, h0, _time_major(total, ends))
    starts = jnp.moveaxis(starts, 0, 1)

    def readout(h, inp):
        return _step(h, *inp[:2], A, *inp[2:])

    _, ys = jax.lax.scan(readout, starts, xs)  # (q, b, c, g, r, p)
    y = jnp.moveaxis(ys, 0, 2).reshape(b, -1, g, r, p)[:, :t]
    return y, last
