"""One comparison for "the same float32 computation, reduced in another order": a mesh run
against the single-device run, micro-batches against one batch, jaxtok against transformers.

Why not an element-wise relative tolerance: reordering a float32 sum of n terms (another mesh
splits it into per-device partial sums; another library another loop) moves the result by up to
~n ulps of the *largest terms*, not of the result. An element that is small because its terms
cancel keeps that absolute error, so ``rtol * |x|`` fails on it (seen: 1 element of 16,384 off by
1.34e-5 against 1e-5 + 1e-4 * |x|). So the tolerance here is one number per tensor:
``rtol * S``, with S the magnitude of the whole tensor (max |want| unless the caller knows a
better scale, e.g. the size of an optimizer update), and rtol from :func:`reduction_rtol`.
"""

from __future__ import annotations

import jax
import numpy as np

EPS_F32 = float(np.finfo(np.float32).eps)  # 1.19e-7: one ulp at 1.0


def reduction_rtol(terms: int) -> float:
    """Tolerance relative to the tensor's scale for results built from float32 sums of up to
    ``terms`` terms (pass the product when reductions are chained, e.g. d_ff x layers).

    (terms - 1) * eps is the worst-case bound for a float32 sum computed in any order, relative
    to the sum of |terms|; typical errors grow like sqrt(terms) * eps, so the linear bound also
    absorbs the propagation through a few chained layers. Measured on the tiny models here:
    2-5 ulps of the scale, against 128-512 allowed.
    """
    return EPS_F32 * terms


def assert_close_at_scale(got, want, *, rtol: float, scale: float | None = None, err_msg: str = "") -> None:
    """Every leaf of the pytree ``got`` equals the one of ``want`` within ``rtol * S``, element-wise.

    S is ``scale`` when given, otherwise max |want| over the leaf (one scale per tensor). A leaf
    of ``want`` that is all zeros must be matched exactly.
    """
    got_leaves, got_def = jax.tree_util.tree_flatten_with_path(got)
    want_leaves, want_def = jax.tree_util.tree_flatten_with_path(want)
    assert got_def == want_def, f"{err_msg}: tree structures differ:\n{got_def}\n{want_def}"
    for (path, a), (_, b) in zip(got_leaves, want_leaves):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        where = f"{err_msg} {jax.tree_util.keystr(path)}".strip()
        assert a.shape == b.shape, f"{where}: shape {a.shape} != {b.shape}"
        if scale is not None:
            magnitude = float(scale)
        else:
            magnitude = float(np.max(np.abs(b))) if b.size else 0.0
        atol = rtol * magnitude
        diff = np.nan_to_num(np.abs(a - b), nan=np.inf)  # a NaN on either side fails
        worst = float(np.max(diff)) if diff.size else 0.0
        if worst > atol:
            index = np.unravel_index(int(np.argmax(diff)), a.shape)
            raise AssertionError(
                f"{where}: max |got - want| = {worst:.3g} at {tuple(int(i) for i in index)} "
                f"(got {a[index]:.7g}, want {b[index]:.7g}) exceeds rtol {rtol:.3g} x scale "
                f"{magnitude:.3g} = {atol:.3g} ({worst / max(EPS_F32 * magnitude, 1e-300):.1f} ulps of the scale)")
