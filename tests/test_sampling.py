"""Tests for minilae.sampling: the posteriors' standard normal noise (Box-Muller for float32 on NumPy)."""
import math

import numpy as np
import pytest
import scipy.stats

from minilae import backend
from minilae.sampling import box_muller, standard_normal

N = 2_000_001  # odd: the last pair is cut


@pytest.mark.backends("numpy")  # host generators
def test_box_muller_draws_standard_normals():
    """Moments, tail mass and a KS test of 2M float32 draws, and no correlation between the two halves (z1 vs z2).
    Catches: the radius without the factor 2 (variance 1/2), the angle pi u2 (the sine half is never negative,
    mean > 0), one uniform for both radius and angle (the halves correlate), a float32 uniform (no |z| > 5.8)."""
    z = box_muller(np.random.default_rng(3), (N,))
    assert z.dtype == np.float32 and z.shape == (N,)
    z = z.astype(np.float64)
    se = 1 / math.sqrt(N)  # a correct sampler fails each 5-standard-error check with probability ~6e-7
    assert abs(z.mean()) < 5 * se
    assert abs(z.var() - 1) < 5 * math.sqrt(2) * se
    assert abs(scipy.stats.kurtosis(z)) < 5 * math.sqrt(24) * se
    tail = 2 * scipy.stats.norm.sf(3)
    assert abs((np.abs(z) > 3).mean() - tail) < 5 * math.sqrt(tail * (1 - tail)) * se
    half = N // 2
    assert abs(np.corrcoef(z[:half], z[half + 1:])[0, 1]) < 5 / math.sqrt(half)
    assert abs(z[half:].mean()) < 5 * math.sqrt(2) * se  # each half on its own, too
    assert scipy.stats.kstest(z, "norm").pvalue > 1e-4


class _ConstantUniforms:
    """A stand-in generator whose random() gives the largest float64 below 1 (float32 uniforms: 0.25)."""

    def random(self, size, dtype=np.float64, out=None):
        value = np.nextafter(1.0, 0.0) if np.dtype(dtype) == np.float64 else 0.25
        out = np.empty(size, dtype=dtype) if out is None else out
        out[...] = value
        return out


@pytest.mark.backends("numpy")  # host generators
def test_radius_reaches_the_float64_tail():
    """u1 = 1 - 2^-53 gives r = sqrt(2 * 53 log 2) = 8.57 (and phi = pi / 2: z1 = 0, z2 = r), finite; 1 - u1
    taken in float32 would be 0 and give an infinite radius, a float32 uniform could not pass 5.8."""
    z = box_muller(_ConstantUniforms(), (4,))
    np.testing.assert_allclose(z[2:], math.sqrt(2 * 53 * math.log(2)), rtol=1e-6)
    np.testing.assert_allclose(z[:2], 0.0, atol=1e-6)


@pytest.mark.backends("numpy")  # host generators
@pytest.mark.parametrize("shape", [(6,), (7,), (3, 5), (1, 1), (0, 4)])
def test_draws_are_a_function_of_the_generator_state(shape):
    """The same seed gives the same noise, with or without `out`; every shape, odd sizes included."""
    first = standard_normal(np.random.default_rng(11), shape, np.float32)
    assert first.shape == shape and first.dtype == np.float32
    out = np.full(shape, np.nan, dtype=np.float32)
    again = standard_normal(np.random.default_rng(11), shape, np.float32, out=out)
    assert again is out
    np.testing.assert_array_equal(again, first)
    if first.size > 1:
        assert not np.array_equal(first, standard_normal(np.random.default_rng(12), shape, np.float32))


@pytest.mark.backends("numpy")  # host generators
def test_out_must_match():
    with pytest.raises(ValueError, match="out must be"):
        standard_normal(np.random.default_rng(0), (4,), np.float32, out=np.empty(5, np.float32))
    with pytest.raises(ValueError, match="out must be"):
        standard_normal(np.random.default_rng(0), (4,), np.float32, out=np.empty(4, np.float64))


def test_every_backend_draws_the_same_noise(array_backend):
    """float32: Box-Muller on every backend, so the guard (a NumPy Generator behind CuPy's rules) gives NumPy's
    numbers exactly; float64: rng.standard_normal itself (NumPy's float64 sine is not vectorised)."""
    xp = backend.xp()
    host = standard_normal(np.random.default_rng(5), (3, 5), np.float32)
    got = standard_normal(xp.random.default_rng(5), (3, 5), np.float32)
    assert got.dtype == np.float32
    if array_backend != "cupy":  # CuPy's generator has other streams
        np.testing.assert_array_equal(backend.to_numpy(got), host)
    got = standard_normal(xp.random.default_rng(5), (3, 4), np.float64)
    expected = xp.random.default_rng(5).standard_normal((3, 4), dtype=np.float64)
    np.testing.assert_array_equal(backend.to_numpy(got), backend.to_numpy(expected))
    out = xp.empty((3, 4), dtype=np.float64)
    assert standard_normal(xp.random.default_rng(5), (3, 4), np.float64, out=out) is out
    np.testing.assert_array_equal(backend.to_numpy(out), backend.to_numpy(expected))
