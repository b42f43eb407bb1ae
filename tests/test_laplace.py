"""Tests for minilae.laplace: the diagonal Laplace posterior and its marginal likelihood."""
import math

import numpy as np
import pytest
import scipy.optimize
import scipy.stats

from minilae import backend
from minilae.gradcheck import assert_close, numerical_gradient
from minilae.laplace import (DiagonalLaplace, log_marginal_likelihood, log_marginal_likelihood_grad,
                             optimize_prior_precision)



def make_posterior(rng, P=40, prior_precision=2.0):
    """A posterior with a spread of GGN magnitudes, including unconstrained (G = 0) parameters."""
    mean = rng.standard_normal(P)
    ggn = rng.gamma(0.5, 50.0, size=P)
    ggn[:5] = 0.0
    return DiagonalLaplace(backend.asarray(mean), backend.asarray(ggn), prior_precision)


@pytest.mark.parametrize("dtype", ["float64", "float32"])  # float32 noise on NumPy: minilae.sampling's Box-Muller
@pytest.mark.parametrize("prior_precision", [0.5, 3.0])
def test_samples_have_the_posterior_mean_and_variance(prior_precision, dtype, rng):
    xp = backend.xp()
    post = make_posterior(rng, prior_precision=prior_precision)
    post = DiagonalLaplace(post.mean.astype(dtype), post.ggn.astype(dtype), prior_precision)
    n = 40000
    samples = post.sample(n, xp.random.default_rng(7))
    assert samples.dtype == dtype
    samples = backend.to_numpy(samples).astype(np.float64)
    mean, var = backend.to_numpy(post.mean), 1.0 / (backend.to_numpy(post.ggn).astype(np.float64) + prior_precision)
    assert samples.shape == (n, post.num_params)
    # 5 standard errors per coordinate: a correct sampler fails this with probability ~ P * 6e-7
    z_mean = (samples.mean(axis=0) - mean) / np.sqrt(var / n)
    assert np.abs(z_mean).max() < 5
    z_var = (samples.var(axis=0) / var - 1) / math.sqrt(2 / n)
    assert np.abs(z_var).max() < 5
    # unconstrained parameters keep exactly the prior variance (to the rounding of the dtype)
    np.testing.assert_allclose(backend.to_numpy(post.variance)[:5], 1 / prior_precision, rtol=np.finfo(dtype).eps)


def test_precision_is_ggn_plus_prior_and_bounded(rng):
    post = make_posterior(rng, prior_precision=0.7)
    h = backend.to_numpy
    np.testing.assert_array_equal(h(post.precision), h(post.ggn + 0.7))
    assert (post.precision >= 0.7).all()
    assert (post.variance > 0).all() and (post.variance <= 1 / 0.7).all()
    np.testing.assert_allclose(h(post.std ** 2), h(post.variance), rtol=1e-14)


def test_log_density_matches_scipy(rng):
    post = make_posterior(rng)
    thetas = post.mean + backend.asarray(rng.standard_normal((3, post.num_params)))
    h = backend.to_numpy
    expected = scipy.stats.norm(h(post.mean), h(post.std)).logpdf(h(thetas)).sum(axis=1)
    np.testing.assert_allclose(h(post.log_density(thetas)), expected, rtol=1e-12)
    assert post.log_density(thetas[0]) == pytest.approx(expected[0], rel=1e-12)


@pytest.mark.parametrize("log_prior_precision", [-3.0, 0.0, 2.5])
@pytest.mark.parametrize("seed", [0, 1])
def test_marginal_likelihood_gradient_matches_finite_differences(log_prior_precision, seed):
    post = make_posterior(np.random.default_rng(seed))

    def evidence(s):
        return np.array([log_marginal_likelihood(s[0], post.mean, post.ggn, log_likelihood=-12.0)])

    numeric = numerical_gradient(lambda s: evidence(s)[0:1], np.array([log_prior_precision]))
    analytic = np.array([log_marginal_likelihood_grad(log_prior_precision, post.mean, post.ggn)])
    assert_close(analytic, numeric, 1e-6, "d log p(D | lambda) / d log lambda")


def test_marginal_likelihood_is_exact_for_linear_gaussian_regression(rng):
    """y = X theta + N(0, 1): with orthogonal columns the GGN X^T X is diagonal and Laplace is exact."""
    n, P, lam = 30, 5, 0.8
    Q, _ = np.linalg.qr(rng.standard_normal((n, P)))
    X = Q * rng.uniform(0.5, 3.0, size=P)  # orthogonal columns of different norms
    y = X @ rng.standard_normal(P) + rng.standard_normal(n)
    ggn = (X ** 2).sum(axis=0)  # diag(X^T X), exactly the full GGN here
    theta_map = X.T @ y / (ggn + lam)  # MAP under the prior N(0, 1/lam)
    log_lik = scipy.stats.norm(X @ theta_map, 1.0).logpdf(y).sum()
    exact = scipy.stats.multivariate_normal(np.zeros(n), np.eye(n) + X @ X.T / lam).logpdf(y)
    laplace = log_marginal_likelihood(math.log(lam), theta_map, ggn, log_lik)
    assert laplace == pytest.approx(exact, rel=1e-12)


def test_optimised_prior_precision_maximises_the_evidence(rng):
    post = make_posterior(rng)
    lam = post.optimize_prior_precision()
    assert post.prior_precision == lam
    assert abs(log_marginal_likelihood_grad(math.log(lam), post.mean, post.ggn)) < 1e-6 * post.num_params
    reference = scipy.optimize.minimize_scalar(lambda s: -log_marginal_likelihood(s, post.mean, post.ggn),
                                               bounds=(-10, 10), method="bounded", options={"xatol": 1e-10})
    assert math.log(lam) == pytest.approx(reference.x, abs=1e-6)


@pytest.mark.parametrize("init", [1e-6, 1.0, 1e6])
def test_optimiser_converges_from_any_start(init, rng):
    post = make_posterior(rng)
    expected = optimize_prior_precision(post.mean, post.ggn, init=1.0)
    assert optimize_prior_precision(post.mean, post.ggn, init=init) == pytest.approx(expected, rel=1e-8)


def test_zero_mean_optimum_hits_the_upper_bound():
    """theta* = 0: the evidence grows without bound in lambda, so the optimiser stops at its bound."""
    lam = optimize_prior_precision(np.zeros(4), np.ones(4), bounds=(1e-3, 1e3))
    assert lam == pytest.approx(1e3)


@pytest.mark.parametrize("mean, ggn, prior, error, match", [
    (np.zeros(3), -np.ones(3), 1.0, ValueError, "negative"),
    (np.zeros(3), np.ones(4), 1.0, ValueError, "shape"),
    (np.zeros((3, 1)), np.ones((3, 1)), 1.0, TypeError, "1-D"),
    (np.zeros(3), np.array([1.0, np.nan, 1.0]), 1.0, ValueError, "non-finite"),
    (np.zeros(3), np.ones(3), 0.0, ValueError, "prior_precision"),
    (np.zeros(3), np.ones(3), "big", TypeError, "prior_precision"),
    (np.zeros(3, dtype=int), np.ones(3), 1.0, TypeError, "floating"),
])
def test_bad_inputs_raise_clear_errors(mean, ggn, prior, error, match):
    with pytest.raises(error, match=match):
        DiagonalLaplace(mean, ggn, prior)


def test_sample_and_log_density_validate_arguments(rng):
    post = make_posterior(rng)
    with pytest.raises(ValueError, match="n_samples"):
        post.sample(0, np.random.default_rng(0))
    for bad_rng in (None, 3):  # catches an AttributeError ('NoneType' ... 'standard_normal') instead
        with pytest.raises(TypeError, match="rng must be a random Generator.*default_rng"):
            post.sample(2, bad_rng)
    with pytest.raises(ValueError, match="theta must have shape"):
        post.log_density(np.zeros(post.num_params + 1))


# ----------------------------------------------------------------------------------------------
# the promise Lambda >= lambda, sigma^2 <= 1 / lambda in the working dtype (issue 8, item 1)

def adversarial_ggn(lam, dtype):
    """G = 0, entries far below half an ulp of lambda (they round away), one ulp, and ordinary values."""
    ulp = float(np.spacing(dtype(lam)))
    return np.array([0.0, 1e-30, 1e-8 * lam, 0.49 * ulp, 0.51 * ulp, ulp, 1.5 * ulp, 0.3, 2.0 * lam, 1e4],
                    dtype=dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("lam", [91.58175273734612, 0.1, 1 / 3, 7.3e-3, 1e7 + 0.3])
def test_precision_is_at_least_the_prior_precision_in_the_working_dtype(dtype, lam):
    """Catches Lambda = ggn + lambda computed with a float64 lambda rounded (down) into float32, which put
    the precision below the reported prior precision (91.58174896 < 91.58175274 in the post-hoc CLI run)."""
    ggn = adversarial_ggn(lam, dtype)
    post = DiagonalLaplace(np.zeros(ggn.size, dtype=dtype), ggn, lam)
    lam_stored = post.prior_precision
    assert lam_stored == float(dtype(lam))  # lambda rounded to the nearest value of the dtype
    assert post.precision.dtype == dtype and post.variance.dtype == dtype
    precision, variance = post.precision.astype(np.float64), post.variance.astype(np.float64)
    assert (precision >= lam_stored).all(), precision - lam_stored
    assert precision.min() == lam_stored  # G = 0 and the entries that round away give lambda exactly
    assert (variance <= float(dtype(1) / dtype(lam_stored))).all()  # 1 / lambda in the same dtype
    assert (variance > 0).all()
    # the evidence and the optimiser work with the same stored lambda
    assert post.log_marginal_likelihood() == log_marginal_likelihood(math.log(lam_stored), post.mean, post.ggn)


def test_optimised_prior_precision_is_stored_in_the_working_dtype(rng):
    """Catches optimize_prior_precision writing a float64 lambda back that float32 precisions fall below."""
    post = make_posterior(rng)
    post32 = DiagonalLaplace(post.mean.astype(np.float32), post.ggn.astype(np.float32), 1.0)
    lam = post32.optimize_prior_precision()
    assert lam == post32.prior_precision == float(np.float32(lam))
    assert (post32.precision.astype(np.float64) >= lam).all()
    expected = optimize_prior_precision(post32.mean, post32.ggn)
    assert lam == pytest.approx(expected, rel=1e-7)  # within float32 rounding of the float64 maximiser


@pytest.mark.parametrize("lam, match", [(1e39, "outside the range of float32.*inf"),
                                        (1e-46, "outside the range of float32.*0.0")])
def test_prior_precision_the_dtype_cannot_hold_is_refused(lam, match):
    """Catches a float32 posterior whose lambda overflows to inf (variance 0) or underflows to 0 (variance inf)."""
    with pytest.raises(ValueError, match=match):
        DiagonalLaplace(np.zeros(3, np.float32), np.zeros(3, np.float32), lam)


def test_ggn_of_another_dtype_is_refused():
    """Catches a float64 mean with a float32 GGN, whose precision would live in a third, unstated dtype."""
    with pytest.raises(TypeError, match="ggn must have the mean's dtype float64"):
        DiagonalLaplace(np.zeros(3), np.zeros(3, np.float32))


@pytest.mark.parametrize("log_prior_precision", [710.0, 1e4, -800.0, math.inf, math.nan])
def test_evidence_at_an_unrepresentable_prior_precision_is_a_clear_error(log_prior_precision, rng):
    """Catches math.exp raising a bare OverflowError for log lambda > ~709; the other values pin the same
    one-line message for lambda = 0, inf and nan."""
    post = make_posterior(rng)
    for f in (lambda s: log_marginal_likelihood(s, post.mean, post.ggn),
              lambda s: log_marginal_likelihood_grad(s, post.mean, post.ggn)):
        with pytest.raises(ValueError, match="log_prior_precision=.*outside the float range"):
            f(log_prior_precision)
