"""Tests for minilae.losses: derivatives vs finite differences, constants vs scipy, sampling vs moments."""
import numpy as np
import pytest
import scipy.linalg
import scipy.special
import scipy.stats

from minilae.backend import asarray, to_numpy, xp
from minilae.gradcheck import assert_close, fd_roundoff, numerical_gradient, numerical_hessian
from minilae.losses import Bernoulli, Categorical, Gaussian, HeteroscedasticGaussian, get_likelihood

SIGMA = 0.7

# (likelihood name, output shape (B, *out), kind of target)
CASES = [
    ("gaussian", (4, 3), "real"),
    ("gaussian", (2, 1, 3, 3), "real"),
    ("bernoulli", (4, 3), "binary"),
    ("bernoulli", (4, 3), "fractional"),
    ("bernoulli", (2, 1, 3, 3), "binary"),
    ("categorical", (5, 4), "labels"),
    ("categorical", (5, 4), "one_hot"),
    ("categorical", (5, 4), "soft"),
]
CASE_IDS = [f"{n}-{'x'.join(map(str, s))}-{t}" for n, s, t in CASES]


def make_likelihood(name):
    return Gaussian(sigma=SIGMA) if name == "gaussian" else get_likelihood(name)


def make_target(name, shape, target, rng, f):
    if target == "real":
        return rng.standard_normal(shape)
    if target == "binary":
        return (rng.random(shape) < 0.5).astype(np.float64)
    if target == "fractional":
        return rng.random(shape)
    labels = rng.integers(0, shape[1], size=shape[0])
    if target == "labels":
        return labels
    if target == "one_hot":
        return np.eye(shape[1])[labels]
    return scipy.special.softmax(rng.standard_normal(shape), axis=1)


def make_case(case, seed=0):
    name, shape, target = case
    rng = np.random.default_rng(seed)
    f = 1.5 * rng.standard_normal(shape)
    return make_likelihood(name), asarray(f), asarray(make_target(name, shape, target, rng, f))


def one_hot_if_labels(y, n_classes):
    return np.eye(n_classes)[y] if y.ndim == 1 else y


# ---------------------------------------------------------------------------------------------
# derivatives

@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_grad_matches_finite_differences(case):
    lik, f, y = make_case(case)
    numerical = numerical_gradient(lambda z: lik.nll(z, y).sum(), f)
    assert lik.grad(f, y).shape == f.shape
    assert_close(lik.grad(f, y), numerical, 1e-6, "grad")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_hess_matches_finite_differences_of_grad(case):
    lik, f, y = make_case(case)
    batch, d = f.shape[0], f[0].size
    hess = lik.hess(f, y)
    assert hess.shape == (batch, d, d)
    # samples are independent, so the full Hessian over the batch is block-diagonal
    numerical = numerical_hessian(lambda z: lik.grad(z, y), f)
    assert_close(scipy.linalg.block_diag(*to_numpy(hess)), numerical, 1e-6, "hess")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_hess_does_not_depend_on_y(case):
    lik, f, y = make_case(case, seed=1)
    _, _, other_y = make_case(case, seed=2)  # a different target for the same f
    numerical = numerical_hessian(lambda z: lik.grad(z, other_y), f)
    assert_close(scipy.linalg.block_diag(*to_numpy(lik.hess(f))), numerical, 1e-6, "hess(f) vs FD with another y")
    np.testing.assert_array_equal(to_numpy(lik.hess(f, y)), to_numpy(lik.hess(f, other_y)))
    np.testing.assert_array_equal(to_numpy(lik.hess_diag(f, y)), to_numpy(lik.hess_diag(f)))
    np.testing.assert_array_equal(to_numpy(lik.hess_sqrt(f, y)), to_numpy(lik.hess_sqrt(f)))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_hess_diag_is_diagonal_of_hess(case):
    lik, f, y = make_case(case)
    diag = lik.hess_diag(f, y)
    assert diag.shape == f.shape
    expected = np.diagonal(lik.hess(f, y), axis1=1, axis2=2).reshape(f.shape)
    assert_close(diag, expected, 1e-14, "hess_diag")
    # the one value the engine's approx walk starts from, where diag(H) holds only one (the Gaussian's 1 / sigma^2)
    value = lik.hess_diag_value(f, y)
    constant = bool((diag == diag.reshape(-1)[0]).all())
    assert (value is None) == (not constant or type(lik).__name__ != "Gaussian"), value
    if value is not None:
        np.testing.assert_array_equal(to_numpy(diag), np.full(f.shape, value, dtype=f.dtype))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_hess_sqrt_factorises_hess(case):
    lik, f, y = make_case(case)
    S = lik.hess_sqrt(f, y)
    assert S.ndim == 3 and S.shape[:2] == (f.shape[0], f[0].size)
    assert_close(S @ S.transpose(0, 2, 1), lik.hess(f, y), 1e-13, "S S^T")


@pytest.mark.parametrize("name", ["bernoulli", "categorical"])
def test_extreme_logits_stay_finite_and_exact(name):
    lik = get_likelihood(name)
    f = asarray(np.array([[800.0, -800.0], [0.0, 1000.0]]))
    y = asarray(np.array([[0.0, 1.0], [1.0, 0.0]]) if name == "bernoulli" else np.array([1, 1]))
    nll, grad, hess = (to_numpy(a) for a in (lik.nll(f, y), lik.grad(f, y), lik.hess(f, y)))
    assert np.all(np.isfinite(nll)) and np.all(np.isfinite(grad)) and np.all(np.isfinite(hess))
    if name == "bernoulli":
        # -log(1 - sigma(800)) = 800 (y=0), -log sigma(-800) = 800 (y=1); sample 2: log 2 + 1000
        np.testing.assert_allclose(nll, [1600.0, 1000.0 + np.log(2.0)], rtol=1e-15)
        np.testing.assert_allclose(grad, [[1.0, -1.0], [-0.5, 1.0]], rtol=1e-15)
    else:
        # log-sum-exp(800, -800) - (-800) = 1600; label 1 is the winning class at 1000
        np.testing.assert_allclose(nll, [1600.0, 0.0], atol=1e-12)
    assert np.all(lik.hess_diag(f) >= 0)


# ---------------------------------------------------------------------------------------------
# nll constants against scipy

@pytest.mark.parametrize("shape", [(4, 3), (2, 1, 3, 3)])
@pytest.mark.parametrize("sigma", [0.3, 1.0, 2.5])
def test_gaussian_nll_matches_scipy(shape, sigma):
    rng = np.random.default_rng(3)
    f, y = rng.standard_normal(shape), rng.standard_normal(shape)
    expected = -scipy.stats.norm.logpdf(y, loc=f, scale=sigma).reshape(shape[0], -1).sum(axis=1)
    assert_close(Gaussian(sigma).nll(asarray(f), asarray(y)), expected, 1e-13, "Gaussian nll")


@pytest.mark.parametrize("shape", [(4, 3), (2, 1, 3, 3)])
def test_bernoulli_nll_matches_scipy(shape):
    rng = np.random.default_rng(4)
    f = 3 * rng.standard_normal(shape)
    y = (rng.random(shape) < 0.5).astype(np.float64)
    expected = -scipy.stats.bernoulli.logpmf(y, scipy.special.expit(f)).reshape(shape[0], -1).sum(axis=1)
    assert_close(Bernoulli().nll(asarray(f), asarray(y)), expected, 1e-12, "Bernoulli nll")
    # fractional targets: binary cross-entropy
    y = rng.random(shape)
    p = scipy.special.expit(f)
    bce = -(y * np.log(p) + (1 - y) * np.log1p(-p)).reshape(shape[0], -1).sum(axis=1)
    assert_close(Bernoulli().nll(asarray(f), asarray(y)), bce, 1e-12, "Bernoulli BCE")


@pytest.mark.parametrize("target", ["labels", "one_hot", "soft"])
def test_categorical_nll_matches_scipy(target):
    rng = np.random.default_rng(5)
    f = 2 * rng.standard_normal((5, 4))
    y = make_target("categorical", (5, 4), target, rng, f)
    if target == "soft":
        expected = -(y * scipy.special.log_softmax(f, axis=1)).sum(axis=1)
    else:
        expected = -scipy.stats.multinomial.logpmf(one_hot_if_labels(y, 4), n=1, p=scipy.special.softmax(f, axis=1))
    assert_close(Categorical().nll(asarray(f), asarray(y)), expected, 1e-12, "Categorical nll")


@pytest.mark.parametrize("name", ["gaussian", "bernoulli", "categorical"])
def test_mean_matches_scipy(name):
    rng = np.random.default_rng(6)
    f = rng.standard_normal((5, 4))
    expected = {"gaussian": f, "bernoulli": scipy.special.expit(f),
                "categorical": scipy.special.softmax(f, axis=1)}[name]
    assert_close(make_likelihood(name).mean(asarray(f)), expected, 1e-14, "mean")


# ---------------------------------------------------------------------------------------------
# sampling

N_SAMPLES = 20000
SAMPLE_CASES = [("gaussian", (1, 2, 3)), ("bernoulli", (1, 2, 3)), ("categorical", (1, 4))]


def draw(name, out_shape, seed=7):
    """N_SAMPLES draws for one f, returned as (N, d) arrays of y (one-hot for Categorical) and f."""
    lik = make_likelihood(name)
    f0 = asarray(np.random.default_rng(8).standard_normal(out_shape))
    f = xp().repeat(f0, N_SAMPLES, axis=0)
    y = lik.sample(f, xp().random.default_rng(seed))
    return lik, f0, f, y


@pytest.mark.parametrize("name,out_shape", SAMPLE_CASES)
def test_sample_mean_within_five_standard_errors(name, out_shape):
    lik, f0, f, y = draw(name, out_shape)
    if name == "categorical":
        assert y.shape == (N_SAMPLES,) and y.dtype.kind == "i"
        assert y.min() >= 0 and y.max() < out_shape[1]
        y = xp().eye(out_shape[1])[y]
    else:
        assert y.shape == f.shape and y.dtype == f.dtype
    if name == "bernoulli":
        assert set(np.unique(to_numpy(y))) <= {0.0, 1.0}
    mean = lik.mean(f0).reshape(-1)
    # Var[y_i | f] = diag(H) for Bernoulli/Categorical and sigma^2 for the Gaussian
    var = SIGMA**2 * np.ones_like(mean) if name == "gaussian" else lik.hess_diag(f0).reshape(-1)
    standard_error = np.sqrt(var / N_SAMPLES)
    deviation = np.abs(y.reshape(N_SAMPLES, -1).mean(axis=0) - mean)
    assert np.all(deviation <= 5 * standard_error), (deviation / standard_error).max()


@pytest.mark.parametrize("name,out_shape", SAMPLE_CASES)
def test_monte_carlo_fisher_matches_hess(name, out_shape):
    """E_{y ~ p(y|f)}[g g^T] with g = grad(f, y) equals the Hessian (Fisher = GGN for these likelihoods)."""
    lik, f0, f, y = draw(name, out_shape, seed=9)
    g = lik.grad(f, y).reshape(N_SAMPLES, -1)
    outer = g[:, :, None] * g[:, None, :]
    standard_error = outer.std(axis=0) / np.sqrt(N_SAMPLES)
    deviation = np.abs(outer.mean(axis=0) - lik.hess(f0)[0])
    assert np.all(deviation <= 5 * standard_error + 1e-12), (deviation / (standard_error + 1e-300)).max()


@pytest.mark.parametrize("name", ["gaussian", "bernoulli", "categorical"])
def test_sample_is_reproducible_with_seed(name):
    lik = make_likelihood(name)
    f = asarray(np.random.default_rng(10).standard_normal((6, 4)))
    a, b, c = (to_numpy(lik.sample(f, xp().random.default_rng(seed))) for seed in (11, 11, 12))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


# ---------------------------------------------------------------------------------------------
# dtype

@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_float32_in_float32_out(case):
    lik, f, y = make_case(case)
    f32 = f.astype(np.float32)
    for out in (lik.nll(f32, y), lik.grad(f32, y), lik.hess(f32, y), lik.hess_diag(f32), lik.hess_sqrt(f32)):
        assert out.dtype == np.float32
    assert_close(lik.grad(f32, y), lik.grad(f, y), 1e-5, "float32 grad")


# ---------------------------------------------------------------------------------------------
# bad input

@pytest.mark.parametrize("name", ["gaussian", "bernoulli"])
def test_shape_mismatch_and_non_finite_raise(name):
    lik = make_likelihood(name)
    f = np.zeros((4, 3))
    with pytest.raises(ValueError, match="same shape"):
        lik.nll(f, np.zeros((4, 2)))
    with pytest.raises(ValueError, match="same shape"):
        lik.grad(f, np.zeros(12))
    bad_f = f.copy()
    bad_f[1, 2] = np.nan
    with pytest.raises(ValueError, match="f contains 1 non-finite"):
        lik.nll(bad_f, f)
    with pytest.raises(ValueError, match="f contains 1 non-finite"):
        lik.hess(bad_f)
    bad_y = f.copy()
    bad_y[0, 0] = np.inf
    with pytest.raises(ValueError, match="y contains 1 non-finite"):
        lik.grad(f, bad_y)
    with pytest.raises(TypeError, match="floating"):
        lik.nll(np.zeros((4, 3), dtype=int), f)


def test_bernoulli_target_outside_unit_interval_raises():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Bernoulli().nll(np.zeros((2, 2)), np.array([[0.0, 1.0], [1.5, 0.0]]))


@pytest.mark.parametrize("labels", [[0, 1, 4], [-1, 0, 1]])
def test_categorical_label_out_of_range_raises(labels):
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\]"):
        Categorical().nll(np.zeros((3, 4)), np.array(labels))


def test_categorical_bad_targets_raise():
    lik, f = Categorical(), np.zeros((3, 4))
    with pytest.raises(ValueError, match="rows summing to 1"):
        lik.nll(f, np.full((3, 4), 0.3))
    with pytest.raises(ValueError, match="rows summing to 1"):
        lik.nll(f, np.array([[1.5, -0.5, 0, 0]] * 3))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        lik.nll(f, np.zeros((3, 5)))
    with pytest.raises(ValueError, match="integers"):
        lik.nll(f, np.array([0.0, 1.5, 2.0]))
    with pytest.raises(ValueError, match=r"\(B, C\)"):
        lik.hess(np.zeros((2, 3, 4)))
    # integral float labels are accepted and equal int labels
    np.testing.assert_array_equal(lik.nll(f, np.array([0.0, 1.0, 3.0])), lik.nll(f, np.array([0, 1, 3])))


@pytest.mark.parametrize("sigma", [0.0, -1.0, np.nan, np.inf])
def test_gaussian_sigma_must_be_positive(sigma):
    with pytest.raises(ValueError, match="sigma"):
        Gaussian(sigma)


def test_get_likelihood_factory():
    lik = get_likelihood("MSE", sigma=2.0)
    assert isinstance(lik, Gaussian) and lik.sigma == 2.0
    assert isinstance(get_likelihood("gaussian"), Gaussian)
    assert isinstance(get_likelihood("bernoulli"), Bernoulli)
    assert isinstance(get_likelihood("Categorical"), Categorical)
    with pytest.raises(ValueError, match="bernoulli, categorical, gaussian, heteroscedastic, mse"):
        get_likelihood("poisson")
    assert isinstance(get_likelihood("heteroscedastic"), HeteroscedasticGaussian)


# ---------------------------------------------------------------------------------------------
# the heteroscedastic Gaussian: f = (mu, s = log sigma^2) stacked along axis 1, so its own cases

# target shape y (B, *out); f has twice the channels (axis 1)
HET_SHAPES = [(4, 3), (2, 1, 3, 3), (2, 2, 2, 3)]
HET_IDS = ["x".join(map(str, s)) for s in HET_SHAPES]


def het_case(y_shape, seed=0):
    """(lik, f, y) with mu ~ N(0, 1), s ~ U(-1.5, 1.5) and y ~ N(0, 1.5^2), so the residuals r = y - mu vary."""
    rng = np.random.default_rng(seed)
    f_shape = (y_shape[0], 2 * y_shape[1]) + tuple(y_shape[2:])
    f = rng.standard_normal(f_shape)
    f[:, y_shape[1]:] = rng.uniform(-1.5, 1.5, size=y_shape)
    return HeteroscedasticGaussian(), asarray(f), asarray(1.5 * rng.standard_normal(y_shape))


@pytest.mark.parametrize("shape", HET_SHAPES, ids=HET_IDS)
def test_heteroscedastic_nll_matches_scipy(shape):
    """Catches a wrong constant or a sigma/sigma^2 mix-up: l = -sum log N(y | mu, e^s) from scipy."""
    lik, f, y = het_case(shape)
    c = shape[1]
    mu, s = to_numpy(f)[:, :c], to_numpy(f)[:, c:]
    expected = -scipy.stats.norm.logpdf(to_numpy(y), loc=mu, scale=np.exp(0.5 * s)).reshape(shape[0], -1).sum(axis=1)
    assert_close(lik.nll(f, y), expected, 1e-13, "heteroscedastic nll")
    assert_close(lik.mean(f), mu, 0, "mean = mu")
    assert_close(lik.variance(f), np.exp(s), 1e-15, "variance = e^s")


@pytest.mark.parametrize("shape", HET_SHAPES, ids=HET_IDS)
def test_heteroscedastic_grad_matches_finite_differences(shape):
    """Catches a wrong sign or factor in dl/dmu = -r e^-s or dl/ds = (1 - r^2 e^-s) / 2, or the halves swapped."""
    lik, f, y = het_case(shape)
    total = lik.nll(f, y).sum()
    numerical = numerical_gradient(lambda z: lik.nll(z, y).sum(), f)
    assert lik.grad(f, y).shape == f.shape
    # entries near 0 are limited by the round-off of differencing the total nll: 10x that floor as atol
    assert_close(lik.grad(f, y), numerical, 1e-7, "heteroscedastic grad", atol=10 * fd_roundoff(abs(float(total))))


@pytest.mark.parametrize("shape", HET_SHAPES, ids=HET_IDS)
def test_heteroscedastic_hess_is_the_true_hessian(shape):
    """Catches a wrong cross term r e^-s, a wrong r^2 e^-s / 2, or the (mu_i, s_i) pairing misplaced in C order."""
    lik, f, y = het_case(shape)
    H = lik.hess(f, y)
    assert H.shape == (f.shape[0], f[0].size, f[0].size)
    numerical = numerical_hessian(lambda z: lik.grad(z, y), f)
    atol = 10 * fd_roundoff(float(xp().abs(lik.grad(f, y)).max()))  # zeros off the 2 x 2 blocks: round-off only
    assert_close(scipy.linalg.block_diag(*to_numpy(H)), numerical, 1e-7, "true Hessian", atol=atol)
    # it really depends on y and is indefinite (why hess_diag / hess_sqrt hand out the Fisher instead)
    assert np.linalg.eigvalsh(to_numpy(H)).min() < 0
    assert not np.allclose(to_numpy(lik.hess(f, y + 1.0)), to_numpy(H))
    with pytest.raises(ValueError, match="depends on y"):
        lik.hess(f)


@pytest.mark.parametrize("shape", HET_SHAPES, ids=HET_IDS)
def test_heteroscedastic_fisher_is_expected_hessian(shape):
    """Catches a Fisher that is not E_y[H]: E over y ~ N(mu, e^s) of the true Hessian, exactly by Gauss-Hermite.

    H is quadratic in r, so a 3-point Gauss-Hermite rule per output (exact up to degree 5) gives E_y[H] exactly;
    the outputs are independent, so each output's expectation only needs its own r.
    """
    lik, f, _ = het_case(shape)
    c = shape[1]
    mu, s = f[:, :c], f[:, c:]
    nodes, weights = np.polynomial.hermite_e.hermegauss(3)
    weights = weights / weights.sum()
    expected = sum(w * lik.hess(f, mu + float(t) * xp().exp(0.5 * s)) for t, w in zip(nodes, weights))
    F = lik.fisher(f)
    # the cross terms r e^-s cancel between the nodes +-sqrt 3 only up to round-off: atol 1e-15
    assert_close(F, expected, 1e-13, "Fisher = E_y[H]", atol=1e-15)
    assert_close(lik.hess_diag(f), np.diagonal(to_numpy(F), axis1=1, axis2=2).reshape(f.shape), 1e-15,
                 "hess_diag = diag(Fisher)")
    assert_close(lik.hess_diag(f, lik.sample(f, xp().random.default_rng(0))), lik.hess_diag(f), 0,
                 "the Fisher does not depend on y")


@pytest.mark.parametrize("shape", HET_SHAPES, ids=HET_IDS)
def test_heteroscedastic_fisher_factor_is_psd_square_root(shape):
    """Catches a factor S that does not square to the Fisher (e.g. e^{-s} in place of e^{-s/2}, or a lost 1/sqrt 2)."""
    lik, f, y = het_case(shape)
    S = lik.hess_sqrt(f, y)
    assert S.shape == (f.shape[0], f[0].size, f[0].size)
    F = S @ S.transpose(0, 2, 1)
    assert_close(F, lik.fisher(f), 1e-14, "S S^T = Fisher")
    assert np.linalg.eigvalsh(to_numpy(F)).min() > 0


def test_heteroscedastic_monte_carlo_fisher_matches_fisher():
    """Catches sample() drawing from another distribution than nll's: E_y[g g^T] over its draws is the Fisher."""
    lik, f0, _ = het_case((1, 2, 3), seed=3)
    f = xp().repeat(f0, N_SAMPLES, axis=0)
    g = lik.grad(f, lik.sample(f, xp().random.default_rng(9))).reshape(N_SAMPLES, -1)
    mc = to_numpy(g.T @ g) / N_SAMPLES
    F = to_numpy(lik.fisher(f0))[0]
    # each entry of g g^T has variance <= ~3 (fourth moments of N(0, 1) terms): 5 standard errors of a mean over N
    np.testing.assert_allclose(mc, F, atol=5 * np.sqrt(3.0 / N_SAMPLES))


def test_heteroscedastic_sample_moments():
    """Catches e^s used as the standard deviation (or e^{s/2} as the variance): mean mu and variance e^s."""
    lik, f0, _ = het_case((1, 1, 2, 2), seed=4)
    f = xp().repeat(f0, N_SAMPLES, axis=0)
    y = to_numpy(lik.sample(f, xp().random.default_rng(10)))
    assert y.shape == (N_SAMPLES, 1, 2, 2)
    var = to_numpy(lik.variance(f0))[0]
    np.testing.assert_allclose(y.mean(axis=0), to_numpy(lik.mean(f0))[0], atol=5 * np.sqrt(var.max() / N_SAMPLES))
    # the sample variance of N normals has standard deviation var sqrt(2 / N)
    np.testing.assert_allclose(y.var(axis=0), var, atol=5 * var.max() * np.sqrt(2.0 / N_SAMPLES))


def test_heteroscedastic_extreme_log_variance_is_finite_or_refused():
    """Catches r^2 e^{-s} computed as a product that overflows, and out-of-range s silently giving inf."""
    lik = HeteroscedasticGaussian()
    f = asarray(np.array([[0.0, -700.0], [0.0, 700.0]]))
    y = asarray(np.array([[1e-300], [1e150]]))
    nll = to_numpy(lik.nll(f, y))
    # sample 1: r^2 e^{-s} = 1e-600 e^{700} = e^{700 - 1381.6}; sample 2: 1e300 e^{-700}
    expected = 0.5 * (np.array([-700.0, 700.0]) + np.exp([2 * np.log(1e-300) + 700, 2 * np.log(1e150) - 700])
                      + np.log(2 * np.pi))
    np.testing.assert_allclose(nll, expected, rtol=1e-12)
    assert np.all(np.isfinite(to_numpy(lik.grad(f, y))))
    with pytest.raises(ValueError, match="overflows"):
        lik.nll(asarray(np.array([[0.0, -800.0]])), asarray(np.array([[0.0]])))


def test_heteroscedastic_bad_shapes_raise():
    """Catches f without the doubled channels, or y of f's full shape, being accepted."""
    lik = HeteroscedasticGaussian()
    with pytest.raises(ValueError, match="even number of channels"):
        lik.nll(asarray(np.zeros((2, 3))), asarray(np.zeros((2, 1))))
    with pytest.raises(ValueError, match="mean half"):
        lik.grad(asarray(np.zeros((2, 4))), asarray(np.zeros((2, 4))))
    with pytest.raises(ValueError, match="mean half"):
        lik.hess(asarray(np.zeros((2, 2, 3, 3))), asarray(np.zeros((2, 1, 3, 2))))
    with pytest.raises(ValueError, match="at least 2"):
        lik.mean(asarray(np.zeros(4)))
    with pytest.raises(ValueError, match="f contains 1 non-finite"):
        lik.variance(asarray(np.array([[0.0, np.nan]])))


@pytest.mark.parametrize("method", ["approx", "sqrt", "exact", "mixed", "blocks"])
def test_heteroscedastic_ggn_of_the_hessian_engine_is_the_fisher_ggn(method, rng):
    """Every engine method gives this likelihood's PSD GGN sum_b J_b^T F_b J_b with the Fisher F (for 'approx'
    exact here: two Linear layers, M diagonal at the output), not the true Hessian's J^T H J. Catches
    hess_diag / hess_sqrt / output_curvature handing the engine the indefinite true Hessian (the dense paths
    read output_curvature; negative GGN entries would make a Laplace precision invalid)."""
    from minilae.hessian import ggn_diagonal  # noqa: PLC0415
    from minilae.layers import Linear, Sequential, Tanh  # noqa: PLC0415
    model = Sequential(Linear(3, 5, rng=rng), Tanh(), Linear(5, 4, rng=rng))
    x, y = asarray(rng.standard_normal((6, 3))), asarray(3 * rng.standard_normal((6, 2)))
    lik = HeteroscedasticGaussian()
    f = model(x)
    J = model.jac_params(x)
    fisher_ggn = xp().einsum("bdp,bde,bep->p", J, lik.fisher(f), J)
    true_ggn = xp().einsum("bdp,bde,bep->p", J, lik.hess(f, y), J)
    assert float(xp().abs(fisher_ggn - true_ggn).max()) > 0.1  # the two really differ at these targets
    if method == "blocks":
        from minilae.hessian import ggn_blocks  # noqa: PLC0415
        G = xp().concatenate([xp().diagonal(b) for b in ggn_blocks(model, lik, x, y)])
    else:  # mixed with threshold 4: the full M at the 4-dimensional output
        G = ggn_diagonal(model, lik, x, y, method=method, threshold=4 if method == "mixed" else None)
    assert_close(G, fisher_ggn, 1e-12, f"ggn_diagonal(method={method!r}) vs J^T F J")
    assert float(G.min()) >= 0
