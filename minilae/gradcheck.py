"""Finite-difference checks: the ground truth every analytic derivative in minilae is tested against.

All helpers use central differences, `(f(x + eps e_i) - f(x - eps e_i)) / (2 eps)`, whose
truncation error is O(eps^2). In float64 with eps = 1e-6 the round-off dominates: an absolute
error of about 1e-16 |f| / eps = 1e-10 |f| (:func:`fd_roundoff`), the same for every entry. So a
correct derivative agrees to rtol ~1e-6 on entries well above that floor, and :func:`assert_close`,
which judges every entry against its own size, takes an atol of a few times that floor.
Perturbations are applied one coordinate at a time: this is a checking tool for small sizes,
not a training code path.
"""
from __future__ import annotations

import numpy as np  # host-side comparison of test results (after to_numpy)

from .backend import array_module, to_numpy


def _require_float64(x, name):
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        raise TypeError(f"{name} must be a float64 array, got {type(x).__name__}")
    if x.dtype.kind != "f" or x.dtype.itemsize < 8:
        raise TypeError(f"{name} must be float64 for finite differences (got {x.dtype}); "
                        "float32 round-off swamps the O(eps^2) accuracy")


def numerical_jacobian(f, x, eps=1e-6):
    """J[i, j] = (f(x + eps e_j) - f(x - eps e_j))_i / (2 eps), shape (f(x).size, x.size)."""
    xp = array_module(x)
    _require_float64(x, "x")
    x = x.copy()
    flat = x.reshape(-1)
    columns = []
    for j in range(flat.size):
        old = flat[j].copy()
        flat[j] = old + eps
        # copies: f may return a view of x (a reshape), which the next perturbation would change
        f_plus = xp.array(f(x), dtype=xp.float64).reshape(-1)
        flat[j] = old - eps
        f_minus = xp.array(f(x), dtype=xp.float64).reshape(-1)
        flat[j] = old
        columns.append((f_plus - f_minus) / (2 * eps))
    return xp.stack(columns, axis=1)


def numerical_gradient(f, x, eps=1e-6):
    """g = d f / d x for scalar f, same shape as x, by central differences."""
    return numerical_jacobian(lambda z: f(z), x, eps)[0].reshape(x.shape)


def numerical_hessian(grad, x, eps=1e-6):
    """H[i, j] = d grad_i / d x_j from an analytic gradient, shape (x.size, x.size)."""
    return numerical_jacobian(grad, x, eps)


def fd_roundoff(f_scale, eps=1e-6):
    """machine epsilon * |f| / eps: the absolute round-off of a central difference of a function of size |f|.

    It does not shrink with the derivative, so an elementwise comparison against finite
    differences needs an atol of about this size (times a safety factor) for entries near zero.
    """
    return float(np.finfo(np.float64).eps) * float(f_scale) / eps


def relative_error(actual, expected):
    """max |actual - expected| / max(max |expected|, 1e-300): one number for 'how far off'.

    Equal entries (infinities included) differ by 0; the scale is taken over the finite entries.
    """
    a = to_numpy(actual).astype(float)
    e = to_numpy(expected).astype(float)
    if a.shape != e.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {e.shape}")
    scale = max(float(abs(e[np.isfinite(e)]).max(initial=0.0)), 1e-300)
    with np.errstate(invalid="ignore"):  # equal infinities differ by 0, not by inf - inf = nan
        diff = np.where(a == e, 0.0, abs(a - e))
    return float(diff.max(initial=0.0)) / scale


def assert_close(actual, expected, rtol, what="value", atol=0.0):
    """Raise AssertionError unless |actual - expected| <= atol + rtol |expected| entry by entry.

    The rule of numpy.testing.assert_allclose: every entry is judged against its own size, so a few
    badly wrong small entries cannot hide behind one large entry. atol is the floor for entries
    that should be zero; state it (scale of the quantity times a small factor) where it matters.
    NaN never passes. The message names how many entries fail and the worst one (index, values).
    Returns relative_error(actual, expected), the one-number summary, for reporting.
    """
    a = to_numpy(actual).astype(float)
    e = to_numpy(expected).astype(float)
    if a.shape != e.shape:
        raise ValueError(f"{what}: shapes differ: {a.shape} vs {e.shape}")
    if rtol < 0 or atol < 0:
        raise ValueError(f"{what}: rtol and atol must be >= 0, got rtol={rtol}, atol={atol}")
    with np.errstate(invalid="ignore"):  # inf - inf, 0 * inf: settled by the exact-equality test below
        diff = np.abs(a - e)
        allowed = atol + rtol * np.abs(e)
    ok = (a == e) | (diff <= allowed)  # a == e: equal infinities pass; NaN compares False everywhere
    if not ok.all():
        # worst entry: the largest excess over its allowance (NaN and zero-allowance misses first)
        with np.errstate(divide="ignore", invalid="ignore"):
            score = np.where(ok, 0.0, np.nan_to_num(diff / allowed, nan=np.inf, posinf=np.inf))
        i = np.unravel_index(int(np.argmax(score)), a.shape) if a.ndim else ()
        raise AssertionError(
            f"{what}: {int((~ok).sum())} of {a.size} entries differ by more than atol + rtol |expected| "
            f"(rtol={rtol:.1e}, atol={atol:.1e}); worst at index {tuple(int(k) for k in i)}: "
            f"actual {float(a[i])!r}, expected {float(e[i])!r}, |difference| {diff[i]:.3e} > allowed {allowed[i]:.3e}")
    return relative_error(a, e)
