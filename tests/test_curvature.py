"""Tests for minilae.curvature: each relation between Hessian, GGN, Fisher and empirical Fisher."""
import numpy as np
import pytest
import scipy.special

from minilae import curvature as cv
from minilae.backend import array_module, asarray, get_default_dtype, set_default_dtype, to_numpy, xp
from minilae.gradcheck import assert_close, relative_error
from minilae.hessian import ggn_blocks, ggn_diagonal
from minilae.layers import Linear, Sequential, Tanh
from minilae.losses import Bernoulli, Categorical, Gaussian, Likelihood
from minilae.models import conv_autoencoder, mlp_autoencoder

SIGMA = 0.7
NAMES = ["gaussian", "bernoulli", "categorical"]
# cv.hessian's error is absolute, ~1e-10 of the matrix's largest entry (its docstring), in every entry:
# the atol of a comparison with it, per unit of that scale (a 10x margin)
FD_HESSIAN_ATOL = 1e-9


@pytest.fixture(autouse=True)
def float64_params():
    old = get_default_dtype()
    set_default_dtype(np.float64)
    yield
    set_default_dtype(old)


def make_likelihood(name):
    return {"gaussian": lambda: Gaussian(sigma=SIGMA), "bernoulli": Bernoulli, "categorical": Categorical}[name]()


def tanh_mlp(d_in, hidden, d_out, rng):
    return Sequential(Linear(d_in, hidden, rng=rng), Tanh(), Linear(hidden, d_out, rng=rng))


def make_case(name, seed=0):
    """(model, likelihood, x, y) at a random initialisation with random targets (non-zero residuals)."""
    rng = np.random.default_rng(seed)
    if name == "gaussian":
        model, x = tanh_mlp(3, 4, 2, rng), rng.standard_normal((5, 3))
        y = rng.standard_normal((5, 2))
    elif name == "bernoulli":  # a tiny autoencoder with image-shaped output (B, 1, 2, 2)
        model = mlp_autoencoder(input_shape=(1, 2, 2), latent_size=1, hidden=(3,), seed=rng)
        x = (rng.random((4, 1, 2, 2)) < 0.5).astype(np.float64)
        y = x
    else:
        model, x = tanh_mlp(3, 4, 3, rng), rng.standard_normal((5, 3))
        y = rng.integers(0, 3, size=5)
    return model, make_likelihood(name), asarray(x), asarray(y)


def as_probabilities(likelihood, y, f):
    """Observed targets in the space the residual lives in (one-hot rows for class labels)."""
    return xp().eye(f.shape[1])[y] if isinstance(likelihood, Categorical) and y.ndim == 1 else y


def targets_between(likelihood, f, y, c):
    """y_c = y* + c (y - y*), y* = E[y | f]: the residual r = E[y|f] - y_c is c times the observed one."""
    y_star = likelihood.mean(f)
    return y_star + c * (as_probabilities(likelihood, y, f) - y_star)


def eig(A):
    A = to_numpy(A)
    return np.linalg.eigvalsh(0.5 * (A + A.T))


# ---------------------------------------------------------------------------------------------
# the finite-difference Hessian itself

@pytest.mark.parametrize("name", ["gaussian", "bernoulli"])
def test_hessian_matches_closed_form_of_one_hidden_unit(name):
    """f = w2 tanh(w1 x + b1) + b2: H = sum_n lambda_n grad f grad f^T + r_n d^2 f, written out by hand."""
    rng = np.random.default_rng(1)
    model = Sequential(Linear(1, 1, rng=rng), Tanh(), Linear(1, 1, rng=rng))
    model.set_params(asarray(rng.standard_normal(4)))
    likelihood = make_likelihood(name)
    x = rng.standard_normal((7, 1))
    y = rng.standard_normal((7, 1)) if name == "gaussian" else (rng.random((7, 1)) < 0.5).astype(float)

    w1, b1, w2, b2 = to_numpy(model.get_params())
    x_ = x[:, 0]
    h = np.tanh(w1 * x_ + b1)
    dh = 1 - h ** 2
    ddh = -2 * h * dh
    f = w2 * h + b2
    if name == "gaussian":
        r, lam = (f - y[:, 0]) / SIGMA ** 2, np.full_like(f, 1 / SIGMA ** 2)
    else:
        p = scipy.special.expit(f)
        r, lam = p - y[:, 0], p * (1 - p)
    grad_f = np.stack([w2 * dh * x_, w2 * dh, h, np.ones_like(h)], axis=1)       # (N, 4)
    hess_f = np.zeros((len(x_), 4, 4))
    hess_f[:, 0, 0] = w2 * ddh * x_ ** 2
    hess_f[:, 0, 1] = hess_f[:, 1, 0] = w2 * ddh * x_
    hess_f[:, 1, 1] = w2 * ddh
    hess_f[:, 0, 2] = hess_f[:, 2, 0] = dh * x_
    hess_f[:, 1, 2] = hess_f[:, 2, 1] = dh
    expected = np.einsum("n,ni,nj->ij", lam, grad_f, grad_f) + np.einsum("n,nij->ij", r, hess_f)

    x, y = asarray(x), asarray(y)
    assert_close(cv.hessian(model, likelihood, x, y), expected, 1e-8, "FD Hessian vs closed form")
    assert_close(cv.ggn(model, likelihood, x, y), np.einsum("n,ni,nj->ij", lam, grad_f, grad_f), 1e-12,
                 "GGN vs closed form")


@pytest.mark.parametrize("name", NAMES)
def test_hessian_is_symmetric_and_leaves_model_unchanged(name):
    model, likelihood, x, y = make_case(name)
    theta = model.get_params()
    H = cv.hessian(model, likelihood, x, y)
    assert H.shape == (model.num_params, model.num_params)
    assert relative_error(H, H.T) < 1e-8
    np.testing.assert_array_equal(to_numpy(model.get_params()), to_numpy(theta))


@pytest.mark.parametrize("name", NAMES)
def test_hessian_has_negative_eigenvalues_at_random_init(name):
    """The loss of a non-linear net is non-convex: H is indefinite, by far more than round-off."""
    model, likelihood, x, y = make_case(name)
    e = eig(cv.hessian(model, likelihood, x, y))
    assert e.min() < -0.1 * np.abs(e).max()


# ---------------------------------------------------------------------------------------------
# PSD-ness and GGN == Fisher

@pytest.mark.parametrize("which", ["ggn", "fisher", "fisher_mc", "empirical_fisher"])
@pytest.mark.parametrize("name", NAMES)
def test_ggn_fisher_and_empirical_fisher_are_psd(name, which):
    model, likelihood, x, y = make_case(name)
    A = cv.curvature_matrices(model, likelihood, x, y, n_samples=20, rng=0)[which]
    assert array_module(A) is xp(), "the matrix left the backend"
    assert relative_error(A, A.T) < 1e-12
    e = eig(A)
    assert e.max() > 0
    assert e.min() > -1e-12 * e.max()


@pytest.mark.parametrize("name", NAMES)
def test_output_fisher_equals_output_hessian(name):
    """E_y[r r^T] (quadrature over y, built from grad only) == H_out (from hess): the exp.-family identity."""
    rng = np.random.default_rng(2)
    likelihood = make_likelihood(name)
    f = asarray(1.5 * rng.standard_normal((4, 5) if name != "bernoulli" else (4, 1, 2, 3)))
    assert_close(cv.output_fisher(likelihood, f), likelihood.hess(f), 1e-12, "E[r r^T] vs H_out")


@pytest.mark.parametrize("name", NAMES)
def test_ggn_equals_closed_form_fisher(name):
    model, likelihood, x, y = make_case(name)
    assert_close(cv.fisher(model, likelihood, x), cv.ggn(model, likelihood, x, y), 1e-12, "F vs GGN")


@pytest.mark.parametrize("name", NAMES)
def test_monte_carlo_fisher_converges_like_one_over_sqrt_samples(name):
    """E||F_S - F||_F^2 = V / S for an average of S i.i.d. terms, so the RMS error (here over 16
    independent estimates) at S and 16 S samples has ratio sqrt(16) = 4."""
    model, likelihood, x, _ = make_case(name)
    F = cv.fisher(model, likelihood, x)
    seeds = np.random.SeedSequence(3).spawn(16)

    def rms_error(S):
        errs = [float(xp().linalg.norm(cv.fisher_mc(model, likelihood, x, S, xp().random.default_rng(s)) - F))
                for s in seeds]
        return np.sqrt(np.mean(np.square(errs)))

    small, large = rms_error(50), rms_error(800)
    assert large < small
    assert 4 / 1.5 < small / large < 4 * 1.5


# ---------------------------------------------------------------------------------------------
# Hessian -> GGN

@pytest.mark.parametrize("name", NAMES)
def test_hessian_equals_ggn_for_model_linear_in_parameters(name):
    """f = W tanh(x) + b is linear in theta (tanh acts on the data only): d^2 f = 0, so H == G."""
    rng = np.random.default_rng(4)
    d_out = 3
    model = Sequential(Tanh(), Linear(4, d_out, rng=rng))
    likelihood = make_likelihood(name)
    x = asarray(rng.standard_normal((6, 4)))
    y = asarray({"gaussian": rng.standard_normal((6, d_out)), "bernoulli": (rng.random((6, d_out)) < 0.5) * 1.0,
                 "categorical": rng.integers(0, d_out, size=6)}[name])
    G = cv.ggn(model, likelihood, x, y)
    assert_close(cv.hessian(model, likelihood, x, y), G, 1e-8, "H vs GGN (linear model)",
                 atol=FD_HESSIAN_ATOL * float(abs(G).max()))
    # the residuals are far from zero, so the agreement is the linearity, not a vanishing residual
    assert abs(likelihood.grad(model.forward(x), y)).max() > 0.1


@pytest.mark.parametrize("name", NAMES)
def test_hessian_equals_ggn_at_zero_residual_and_not_otherwise(name):
    model, likelihood, x, y = make_case(name)
    f = model.forward(x)
    G = cv.ggn(model, likelihood, x)
    assert_close(cv.hessian(model, likelihood, x, likelihood.mean(f)), G, 1e-8, "H vs GGN at y = E[y|f]",
                 atol=FD_HESSIAN_ATOL * float(abs(G).max()))
    assert relative_error(cv.hessian(model, likelihood, x, y), G) > 0.1


@pytest.mark.parametrize("name", NAMES)
def test_hessian_minus_ggn_is_linear_in_the_residual(name):
    """H(y_c) - G = c R: the residual term shrinks linearly to zero with the residuals."""
    model, likelihood, x, y = make_case(name)
    f = model.forward(x)
    G = cv.ggn(model, likelihood, x)
    R_half = (cv.hessian(model, likelihood, x, targets_between(likelihood, f, y, 0.5)) - G) / 0.5
    R_quarter = (cv.hessian(model, likelihood, x, targets_between(likelihood, f, y, 0.25)) - G) / 0.25
    # each R carries the FD Hessian's error divided by its c; two of them differ by at most 1/0.25 + 1/0.5 times it
    atol = (4 + 2) * FD_HESSIAN_ATOL * float(abs(G).max())
    assert_close(R_quarter, R_half, 1e-6, "residual term per unit residual", atol=atol)
    assert_close(R_half, cv.hessian(model, likelihood, x, y) - G, 1e-6, "residual term at c = 1", atol=atol)


# ---------------------------------------------------------------------------------------------
# the empirical Fisher

@pytest.mark.parametrize("name", NAMES)
def test_empirical_fisher_scales_with_squared_residuals_while_fisher_does_not_see_targets(name):
    model, likelihood, x, y = make_case(name)
    f = model.forward(x)
    EF = cv.empirical_fisher(model, likelihood, x, y)
    F = cv.fisher(model, likelihood, x)
    for c in (0.5, 0.1):
        assert_close(cv.empirical_fisher(model, likelihood, x, targets_between(likelihood, f, y, c)),
                     c ** 2 * EF, 1e-12, f"EF at residual scale {c}")
    assert abs(cv.empirical_fisher(model, likelihood, x, likelihood.mean(f))).max() < 1e-12 * abs(F).max()
    assert relative_error(EF, F) > 0.1


@pytest.mark.parametrize("name", NAMES)
def test_empirical_fisher_is_the_sum_of_per_example_gradient_outer_products(name):
    """Backprop per-example gradients agree with the dense J^T r and sum to the loss gradient."""
    model, likelihood, x, y = make_case(name)
    f = model.forward(x)
    J = model.jac_params(x)
    g_dense = xp().einsum("bdp,bd->bp", J, likelihood.grad(f, y).reshape(len(x), -1))
    g = cv.per_example_gradients(model, likelihood, x, y)
    assert_close(g, g_dense, 1e-12, "per-example gradients")
    assert_close(cv.loss_gradient(model, likelihood, x, y), g_dense.sum(axis=0), 1e-12, "loss gradient")
    assert_close(cv.empirical_fisher(model, likelihood, x, y), g_dense.T @ g_dense, 1e-12, "EF")


def linear_regression(seed=5, n=40):
    """Kunstner et al.'s setting: y = w x + b + noise, model Linear(1, 1), Gaussian likelihood."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 1))
    y = 1.5 * x - 0.5 + 0.4 * rng.standard_normal((n, 1))
    return Sequential(Linear(1, 1, rng=rng)), Gaussian(sigma=1.0), x, y  # host arrays


def test_kunstner_linear_regression_fisher_step_reaches_optimum_empirical_fisher_step_does_not():
    model, likelihood, x_host, y_host = linear_regression()
    theta_star = np.linalg.lstsq(np.hstack([x_host, np.ones_like(x_host)]), y_host[:, 0], rcond=None)[0]
    x, y = asarray(x_host), asarray(y_host)
    for theta in np.array([[3.0, 2.0], [-1.0, 1.0], [0.0, -2.0], [2.5, -1.5]]):
        model.set_params(asarray(theta))
        grad = to_numpy(cv.loss_gradient(model, likelihood, x, y))
        F, EF = (to_numpy(m) for m in (cv.fisher(model, likelihood, x), cv.empirical_fisher(model, likelihood, x, y)))
        assert_close(cv.hessian(model, likelihood, x, y), F, 1e-8, "H == F for linear regression")
        # Newton == natural gradient here: one preconditioned step lands on the least-squares solution
        assert_close(theta - np.linalg.solve(F, grad), theta_star, 1e-10, "Fisher step")
        miss = np.linalg.norm(theta - np.linalg.solve(EF, grad) - theta_star)
        assert miss > 0.1 * np.linalg.norm(theta - theta_star)


# ---------------------------------------------------------------------------------------------
# consistency with the Hessian engine (minilae.hessian), which never forms J

def make_engine_case(name):
    if name != "conv":
        return make_case(name)
    rng = np.random.default_rng(6)
    model = conv_autoencoder(input_shape=(1, 4, 4), latent_size=1, channels=(1, 2), hidden=(3,), seed=rng)
    x = asarray((rng.random((3, 1, 4, 4)) < 0.5).astype(np.float64))
    return model, Bernoulli(), x, x


@pytest.mark.parametrize("method", ["exact", "sqrt"])
@pytest.mark.parametrize("name", NAMES + ["conv"])
def test_dense_ggn_diagonal_matches_hessian_engine(name, method):
    model, likelihood, x, y = make_engine_case(name)
    G = cv.ggn(model, likelihood, x, y)
    assert_close(ggn_diagonal(model, likelihood, x, y, method=method), xp().diag(G), 1e-12, f"diag ({method})")


@pytest.mark.parametrize("name", NAMES + ["conv"])
def test_dense_ggn_blocks_match_hessian_engine(name):
    model, likelihood, x, y = make_engine_case(name)
    G = cv.ggn(model, likelihood, x, y)
    slices = [s for s in model.param_slices() if s.stop > s.start]
    blocks = ggn_blocks(model, likelihood, x, y)
    assert len(blocks) == len(slices)
    for i, (block, sl) in enumerate(zip(blocks, slices)):
        assert_close(block, G[sl, sl], 1e-12, f"block of parametric layer {i}")


# ---------------------------------------------------------------------------------------------
# errors

def test_clear_errors():
    model, likelihood, x, y = make_case("gaussian")
    with pytest.raises(ValueError, match="n_samples"):
        cv.fisher_mc(model, likelihood, x, 0)
    with pytest.raises(TypeError, match="output_fisher knows"):
        cv.output_fisher(type("Poisson", (Likelihood,), {})(), x)
    with pytest.raises(TypeError, match="model must be"):
        cv.ggn(lambda z: z, likelihood, x)
    with pytest.raises(ValueError, match="MAX_PARAMS"):
        cv.ggn(Sequential(Linear(100, 60, rng=np.random.default_rng(0))), likelihood, xp().zeros((1, 100)))
    set_default_dtype(np.float32)
    model32 = tanh_mlp(3, 4, 2, np.random.default_rng(0))
    with pytest.raises(TypeError, match="float64"):
        cv.hessian(model32, likelihood, x.astype(np.float32), y.astype(np.float32))
