"""Tests for minilae/validation.py: the shared argument and finiteness checks."""
import numpy as np
import pytest

from minilae.backend import asarray
from minilae.validation import all_finite


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_all_finite_sees_one_bad_entry(bad, dtype):
    """Catches a fast path that trusts something other than the sum (e.g. the first or the largest entry)."""
    a = np.linspace(-1.0, 1.0, 1001).astype(dtype)
    assert all_finite(asarray(a))
    a[500] = bad
    assert not all_finite(asarray(a))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the overflow is the case under test
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_all_finite_when_the_sum_of_finite_entries_overflows(dtype):
    """Catches reading a non-finite sum as a non-finite entry: entries near the dtype's max overflow the sum."""
    big = np.finfo(dtype).max / 2
    a = np.full(8, big, dtype=dtype)
    assert not np.isfinite(a.sum())
    assert all_finite(asarray(a))
