"""Finite differences: exact on linear maps, second-order accurate, and strict about their input."""
from __future__ import annotations

import numpy as np
import pytest

from minilae.backend import asarray
from minilae.gradcheck import (assert_close, numerical_gradient, numerical_hessian, numerical_jacobian,
                               relative_error)


@pytest.mark.parametrize("shape_in, shape_out", [((4,), (3,)), ((2, 3), (5,)), ((2, 1, 2), (2, 2))])
def test_jacobian_of_a_linear_map(shape_in, shape_out, rng):
    """f(x) = A x: central differences are exact up to round-off (no curvature)."""
    n_in, n_out = int(np.prod(shape_in)), int(np.prod(shape_out))
    A = asarray(rng.standard_normal((n_out, n_in)))
    x = asarray(rng.standard_normal(shape_in))
    J = numerical_jacobian(lambda z: (A @ z.reshape(-1)).reshape(shape_out), x)
    assert J.shape == (n_out, n_in)
    assert_close(J, A, 1e-8, "J of A x")


def test_jacobian_of_an_elementwise_map(rng):
    x = asarray(rng.standard_normal((2, 3)))
    J = numerical_jacobian(np.sin, x)
    assert_close(J, np.diag(np.cos(x).ravel()), 1e-8, "J of sin")


def test_input_is_not_modified_and_views_are_safe(rng):
    """f may return a view of x (a reshape); the columns must still be the identity."""
    x = asarray(rng.standard_normal((3, 2)))
    x0 = x.copy()
    J = numerical_jacobian(lambda z: z.reshape(-1), x)
    assert (x == x0).all()
    assert_close(J, np.eye(6), 1e-8, "J of a view")
    # perturbations go to a copy: a function that also reads the caller's x still sees it unchanged
    J = numerical_jacobian(lambda z: z - x, x)
    assert_close(J, np.eye(6), 1e-8, "J of z - x0")


def test_gradient_and_hessian_of_a_quadratic(rng):
    """f = x^T A x / 2 + c^T x: grad = (A + A^T) x / 2 + c, Hessian = (A + A^T) / 2."""
    A, c, x = (asarray(a) for a in (rng.standard_normal((4, 4)), rng.standard_normal(4), rng.standard_normal(4)))
    S = (A + A.T) / 2
    g = numerical_gradient(lambda z: z @ A @ z / 2 + c @ z, x)
    assert g.shape == x.shape
    assert_close(g, S @ x + c, 1e-8, "gradient")
    H = numerical_hessian(lambda z: S @ z + c, x)
    assert_close(H, S, 1e-8, "Hessian")


def test_central_differences_are_second_order():
    """The truncation error of (f(x+e) - f(x-e)) / 2e is e^2 f'''(x) / 6 + O(e^4): shrinking eps
    tenfold shrinks it a hundredfold (a one-sided difference would give only tenfold)."""
    x = np.array([0.3])
    errors = [abs(numerical_gradient(lambda z: np.exp(z).sum(), x, eps)[0] - np.exp(0.3))
              for eps in (1e-2, 1e-3)]
    ratio = errors[1] / errors[0]
    assert 0.008 < ratio < 0.012
    assert_close(errors[0], 1e-4 * np.exp(0.3) / 6, 1e-2, "leading error term")


@pytest.mark.parametrize("x, error", [
    (np.zeros(3, dtype=np.float32), TypeError),
    (np.zeros(3, dtype=np.int64), TypeError),
    ([0.0, 1.0], TypeError),
])
def test_finite_differences_need_float64_arrays(x, error):
    with pytest.raises(error, match="float64"):
        numerical_jacobian(lambda z: z, x)


def test_relative_error_definition():
    """max |a - e| / max |e|, one number for the whole array."""
    e = np.array([[1.0, -4.0], [2.0, 0.5]])
    a = e.copy()
    a[1, 1] += 0.02
    assert relative_error(a, e) == pytest.approx(0.02 / 4.0, rel=1e-12)
    assert relative_error(e, e) == 0.0
    assert relative_error(np.zeros(3), np.zeros(3)) == 0.0
    assert relative_error(np.ones(2), np.zeros(2)) > 1e200  # nonzero vs zero is never "close"
    with pytest.raises(ValueError, match="shapes differ"):
        relative_error(np.zeros(3), np.zeros((3, 1)))


def test_assert_close():
    e = np.array([1.0, 2.0])
    assert assert_close(e * (1 + 1e-9), e, 1e-6, "tiny") <= 1e-6
    with pytest.raises(AssertionError, match=r"my value: relative error 5\.000e-01 exceeds 1\.0e-06"):
        assert_close(e + 1.0, e, 1e-6, "my value")
    with pytest.raises(AssertionError, match="nan"):
        assert_close(np.array([np.nan, 2.0]), e, 1e-6)
