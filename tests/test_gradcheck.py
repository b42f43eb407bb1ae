"""Finite differences: exact on linear maps, second-order accurate, and strict about their input."""
from __future__ import annotations

import numpy as np
import pytest

from minilae.backend import asarray
from minilae.gradcheck import (assert_close, fd_roundoff, numerical_gradient, numerical_hessian,
                               numerical_jacobian, relative_error)


@pytest.mark.parametrize("shape_in, shape_out", [((4,), (3,)), ((2, 3), (5,)), ((2, 1, 2), (2, 2))])
def test_jacobian_of_a_linear_map(shape_in, shape_out, rng):
    """f(x) = A x: central differences are exact up to round-off (no curvature)."""
    n_in, n_out = int(np.prod(shape_in)), int(np.prod(shape_out))
    A = asarray(rng.standard_normal((n_out, n_in)))
    x = asarray(rng.standard_normal(shape_in))
    J = numerical_jacobian(lambda z: (A @ z.reshape(-1)).reshape(shape_out), x)
    assert J.shape == (n_out, n_in)
    assert_close(J, A, 1e-8, "J of A x", atol=10 * fd_roundoff(np.abs(A @ x.reshape(-1)).max()))  # 10x floor


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


def test_assert_close_passes_within_tolerance_and_returns_the_relative_error():
    e = np.array([1.0, -2.0, 4.0])
    assert assert_close(e * (1 + 1e-9), e, 1e-6, "tiny") == pytest.approx(1e-9, rel=1e-6)
    assert assert_close(e, e, 0.0) == 0.0  # rtol = atol = 0: exact equality
    inf = np.array([np.inf, -np.inf, 1.0])
    assert_close(inf, inf.copy(), 0.0, "equal infinities")


def test_assert_close_judges_every_entry_by_its_own_size():
    """Bug caught: a tolerance relative to the whole array's largest entry (the old rule), under
    which 9 of 394 gradient entries 9% wrong passed because they were small."""
    expected = np.concatenate([np.full(385, 100.0), np.full(9, 1e-4)])
    actual = expected.copy()
    actual[-9:] *= 1.09
    assert relative_error(actual, expected) < 1e-6  # the one-number summary does not see them
    with pytest.raises(AssertionError, match=r"whole-model gradient: 9 of 394 entries differ"):
        assert_close(actual, expected, 1e-6, "whole-model gradient")


@pytest.mark.parametrize("actual, expected, rtol, atol, passes", [
    (1.5, 1.0, 0.4, 0.0, False),     # |a - b| <= rtol |b| with b the *expected* value (rtol |a| would pass)
    (1.3, 1.0, 0.4, 0.0, True),
    (1e-7, 0.0, 1e-6, 1e-6, True),   # atol is the floor for entries that should be zero
    (1e-5, 0.0, 1e-6, 1e-6, False),
    (1e-5, 0.0, 1e-6, 0.0, False),   # without atol nothing but 0 is close to 0
    (2.05, 2.0, 0.02, 0.01, True),   # atol and rtol add: 0.05 <= 0.01 + 0.04
    (2.06, 2.0, 0.02, 0.01, False),
])
def test_assert_close_is_the_allclose_rule(actual, expected, rtol, atol, passes):
    """Bugs caught: measuring relative to |actual|, ignoring atol, or taking max instead of the sum."""
    a, e = np.array([actual, 3.0]), np.array([expected, 3.0])
    if passes:
        assert_close(a, e, rtol, "x", atol=atol)
    else:
        with pytest.raises(AssertionError, match=r"x: 1 of 2 entries"):
            assert_close(a, e, rtol, "x", atol=atol)


def test_assert_close_message_names_the_worst_entry():
    """Bug caught: reporting the first failing entry (or the largest absolute difference) as the worst."""
    e = np.array([[100.0, 1.0], [2.0, 1e-3]])
    a = e + np.array([[0.5, 0.0], [0.1, 1e-3]])  # 0.5% of 100, 5% of 2, 100% of 1e-3
    with pytest.raises(AssertionError, match=r"my value: 3 of 4 entries .*rtol=1\.0e-03, atol=0\.0e\+00.* worst at "
                                             r"index \(1, 1\): actual 0\.002, expected 0\.001"):
        assert_close(a, e, 1e-3, "my value")


@pytest.mark.parametrize("actual", [np.array([np.nan, 2.0]), np.array([np.inf, 2.0]), np.array([1.0, -np.inf])])
def test_assert_close_never_passes_nan_or_a_lone_infinity(actual):
    with pytest.raises(AssertionError, match=r"1 of 2 entries.*worst at index \(\d,\)"):
        assert_close(actual, np.array([1.0, 2.0]), 1e-6, atol=1.0)


@pytest.mark.parametrize("args, match", [
    ((np.zeros(3), np.zeros((3, 1)), 1e-6), "shapes differ"),
    ((np.zeros(3), np.zeros(3), -1e-6), "rtol and atol must be >= 0"),
])
def test_assert_close_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        assert_close(*args)
    with pytest.raises(ValueError, match="atol"):
        assert_close(np.zeros(2), np.zeros(2), 1e-6, atol=-1.0)


def test_fd_roundoff_bounds_the_error_of_a_central_difference():
    """The atol helper: machine epsilon |f| / eps. The difference of a large function with a small
    derivative is off by far more than rtol |derivative| (an rtol-only check fails correct code),
    and by no more than fd_roundoff(|f|)."""
    assert fd_roundoff(1.0) == pytest.approx(np.finfo(float).eps / 1e-6, rel=1e-12)
    assert fd_roundoff(3.0, eps=1e-4) == pytest.approx(3 * np.finfo(float).eps / 1e-4, rel=1e-12)
    x = np.array([1e-3])
    g = numerical_gradient(lambda z: np.array([1e4 + z.sum() ** 2]), x)  # exact derivative 2e-3
    err = abs(g[0] - 2e-3)
    assert 1e-6 * 2e-3 < err <= fd_roundoff(1e4)
    assert_close(g, np.array([2e-3]), 1e-6, "d/dz (1e4 + z^2)", atol=fd_roundoff(1e4))
