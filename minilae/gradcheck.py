"""Finite-difference checks: the ground truth every analytic derivative in minilae is tested against.

All helpers use central differences, `(f(x + eps e_i) - f(x - eps e_i)) / (2 eps)`, whose
truncation error is O(eps^2). In float64 with eps = 1e-6 that leaves a relative error of about
1e-9 to 1e-7 (round-off ~ 1e-16 / eps dominates), so a correct derivative agrees to ~1e-6.
Perturbations are applied one coordinate at a time: this is a checking tool for small sizes,
not a training code path.
"""
from __future__ import annotations

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


def relative_error(actual, expected):
    """max |actual - expected| / max(max |expected|, 1e-300): one number for 'how far off'."""
    a = to_numpy(actual).astype(float)
    e = to_numpy(expected).astype(float)
    if a.shape != e.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {e.shape}")
    scale = max(float(abs(e).max(initial=0.0)), 1e-300)
    return float(abs(a - e).max(initial=0.0)) / scale


def assert_close(actual, expected, rtol, what="value"):
    """Raise AssertionError unless relative_error(actual, expected) <= rtol."""
    err = relative_error(actual, expected)
    if not err <= rtol:
        raise AssertionError(f"{what}: relative error {err:.3e} exceeds {rtol:.1e}")
    return err
