"""Dense curvature matrices of a small network: Hessian, GGN, Fisher and empirical Fisher.

For a model f(x; theta) with P parameters, a likelihood p(y | f) and a batch (x_n, y_n), write
l_n = -log p(y_n | f_n), the loss L(theta) = sum_n l_n, J_n = d f_n / d theta (d x P), the output
residual r_n = d l_n / d f_n (d,) and the output Hessian H_out(f_n) = d^2 l_n / d f_n^2 (d x d).
Then, all summed over the batch as in `minilae.hessian`:

  Hessian           H  = sum_n J_n^T H_out(f_n) J_n  +  sum_n sum_k r_nk d^2 f_nk / d theta^2
  GGN               G  = sum_n J_n^T H_out(f_n) J_n                  (H without the residual term)
  Fisher            F  = sum_n E_{y ~ p(y | f_n)}[g_n(y) g_n(y)^T],  g_n(y) = J_n^T r_n(y)
                       = sum_n J_n^T E_y[r r^T] J_n
  empirical Fisher  EF = sum_n g_n(y_n) g_n(y_n)^T                   (at the observed targets)

How they relate:
  * F = G. For an exponential family with natural parameter f, -log p(y | f) = A(f) - y.f + c(y),
    so r = grad A(f) - y = E[y] - y and E_y[r r^T] = Cov[y | f] = d^2 A / df^2 = H_out. The Fisher
    averages over the model's own y, so it never sees the data's targets.
  * H = G wherever the residual term vanishes: where every r_n = 0 (the net reproduces the targets
    exactly) or where f is linear in theta (d^2 f / d theta^2 = 0). Elsewhere H can be indefinite,
    while G and F are always PSD: "the expected Hessian is PSD" is about an expectation under the
    *model*, and the loss is non-convex under the *data*.
  * EF is neither: it uses the observed r_n r_n^T, which scales with the squared residuals
    (Kunstner, Balles & Hennig, 2019, "Limitations of the empirical Fisher approximation").

Dense P x P matrices are for checks and teaching (P up to a few thousand); training-size models
use the diagonal / block approximations of `minilae.hessian`.
"""
from __future__ import annotations

import math
import numbers

from .backend import array_module
from .gradcheck import numerical_hessian
from .layers import Layer
from .losses import Bernoulli, Categorical, Gaussian, get_likelihood

__all__ = ["MAX_PARAMS", "curvature_matrices", "empirical_fisher", "fisher", "fisher_mc", "ggn", "hessian", "loss",
           "loss_gradient", "output_fisher", "per_example_gradients"]

MAX_PARAMS = 5000
"""Largest P the dense routines accept (a P x P float64 matrix of 5000^2 entries is 200 MB)."""


# ----------------------------------------------------------------------------------------------
# validation and shared pieces

def _check(model, likelihood):
    """Validate the model and resolve a likelihood given by name; return the likelihood."""
    if not isinstance(model, Layer):
        raise TypeError(f"model must be a minilae Layer/Sequential, got {type(model).__name__}")
    if model.num_params > MAX_PARAMS:
        raise ValueError(f"dense curvature needs a P x P matrix; the model has P = {model.num_params} > "
                         f"MAX_PARAMS = {MAX_PARAMS}. Use minilae.hessian (diagonal / block GGN) for "
                         "large models, or raise minilae.curvature.MAX_PARAMS deliberately")
    return get_likelihood(likelihood)


def _output_and_jacobian(model, x):
    """f = model(x) (B, *out) and the dense J = df/dtheta, (B, d, P)."""
    f = model.forward(x)
    return f, model.jac_params(x)


def _sandwich(J, M):
    """sum_n J_n^T M_n J_n for J (B, d, P), M (B, d, d): one (P, B d) @ (B d, P) product."""
    B, d, P = J.shape
    MJ = M @ J
    return J.reshape(B * d, P).T @ MJ.reshape(B * d, P)


def _repeat(f, times):
    """f (B, *out) -> (times * B, *out), the batch repeated `times` times (outer axis = repeat)."""
    xp = array_module(f)
    return xp.broadcast_to(f, (times,) + f.shape).reshape((times * f.shape[0],) + f.shape[1:])


# ----------------------------------------------------------------------------------------------
# loss and gradients

def loss(model, likelihood, x, y):
    """L(theta) = sum_n -log p(y_n | f(x_n; theta)), a float."""
    likelihood = _check(model, likelihood)
    return float(likelihood.nll(model.forward(x), y).sum())


def loss_gradient(model, likelihood, x, y):
    """grad L = sum_n J_n^T r_n, by backprop (model.vjp_params), shape (P,)."""
    likelihood = _check(model, likelihood)
    f = model.forward(x)
    return model.vjp_params(likelihood.grad(f, y))


def per_example_gradients(model, likelihood, x, y):
    """g_n = J_n^T r_n for each example, by backprop, shape (B, P)."""
    likelihood = _check(model, likelihood)
    f = model.forward(x)
    return model.vjp_params(likelihood.grad(f, y), per_sample=True)


# ----------------------------------------------------------------------------------------------
# the four matrices

def hessian(model, likelihood, x, y, eps=1e-6):
    """H[i, j] = d (grad L)_i / d theta_j by central differences of the analytic gradient, (P, P).

    Column j is (grad L(theta + eps e_j) - grad L(theta - eps e_j)) / (2 eps): its error is the
    truncation eps^2 / 6 * d^3 L / d theta_j^2 d theta_i plus round-off ~ 1e-16 |grad L| / eps, so in
    float64 with eps = 1e-6 the result agrees with the exact Hessian to ~1e-10 relative (measured
    against closed forms in the tests, which require 1e-8). It includes the residual term the GGN drops. The matrix is
    returned as computed, not symmetrised, so its symmetry is itself a check of the gradient.
    Needs float64 parameters and a smooth network (no ReLU/max-pool kinks within eps).
    """
    likelihood = _check(model, likelihood)
    theta0 = model.get_params()
    if theta0.dtype.kind != "f" or theta0.dtype.itemsize < 8:
        raise TypeError(f"hessian needs float64 parameters (got {theta0.dtype}); build the model after "
                        "minilae.backend.set_default_dtype(numpy.float64)")

    def gradient_at(theta):
        model.set_params(theta)
        return loss_gradient(model, likelihood, x, y)

    try:
        return numerical_hessian(gradient_at, theta0, eps)
    finally:
        model.set_params(theta0)  # leave the model exactly as we found it


def output_fisher(likelihood, f):
    """F_out(f_n) = E_{y ~ p(y | f_n)}[r r^T], r = dl/df(f_n, y), by exact quadrature over y: (B, d, d).

    Built only from `likelihood.grad` and the distribution of y, never from `likelihood.hess`, so that
    F_out == H_out is a checked fact rather than a definition:
      * Gaussian N(f, sigma^2 I): r is affine in y, so r r^T is quadratic and the 2d sigma points
        y = f +- sqrt(d) sigma e_k with weights 1 / (2d) (same mean and covariance as y) are exact;
      * Bernoulli: elements are independent with y_i in {0, 1}, so E[r r^T] = m m^T + diag(E[r^2] - m^2)
        with m = E[r], both from the two outcomes of each element;
      * Categorical: a sum over the C classes, sum_c pi_c r_c r_c^T.
    """
    likelihood = get_likelihood(likelihood)
    xp = array_module(f)
    B = f.shape[0]
    d = int(math.prod(f.shape[1:]))
    if isinstance(likelihood, Gaussian):
        offsets = math.sqrt(d) * likelihood.sigma * xp.eye(d, dtype=f.dtype)
        points = f.reshape(B, 1, d) + xp.concatenate([offsets, -offsets])[None]      # (B, 2d, d)
        f_rep = xp.repeat(f.reshape(B, 1, d), 2 * d, axis=1).reshape((B * 2 * d,) + f.shape[1:])
        r = likelihood.grad(f_rep, points.reshape(f_rep.shape)).reshape(B, 2 * d, d)
        return xp.einsum("bkd,bke->bde", r, r) / (2 * d)
    if isinstance(likelihood, Bernoulli):
        p = likelihood.mean(f).reshape(B, d)
        r1 = likelihood.grad(f, xp.ones_like(f)).reshape(B, d)
        r0 = likelihood.grad(f, xp.zeros_like(f)).reshape(B, d)
        mean = p * r1 + (1 - p) * r0
        second = p * r1 ** 2 + (1 - p) * r0 ** 2
        F = mean[:, :, None] * mean[:, None, :]
        idx = xp.arange(d)
        F[:, idx, idx] = second
        return F
    if isinstance(likelihood, Categorical):
        pi = likelihood.mean(f)                                                       # (B, C)
        C = f.shape[1]
        f_rep = xp.repeat(f[:, None, :], C, axis=1).reshape(B * C, C)
        labels = xp.tile(xp.arange(C), B)
        r = likelihood.grad(f_rep, labels).reshape(B, C, C)                          # r[b, class, :]
        return xp.einsum("bc,bcd,bce->bde", pi, r, r)
    raise TypeError(f"output_fisher knows Gaussian, Bernoulli and Categorical, not {likelihood!r}")


def ggn(model, likelihood, x, y=None):
    """G = sum_n J_n^T H_out(f_n) J_n with the dense Jacobian, (P, P)."""
    likelihood = _check(model, likelihood)
    f, J = _output_and_jacobian(model, x)
    return _sandwich(J, likelihood.hess(f, y))


def fisher(model, likelihood, x):
    """F = sum_n J_n^T E_{y ~ p(y | f_n)}[r r^T] J_n, the expectation in closed form, (P, P)."""
    likelihood = _check(model, likelihood)
    f, J = _output_and_jacobian(model, x)
    return _sandwich(J, output_fisher(likelihood, f))


def fisher_mc(model, likelihood, x, n_samples, rng=None):
    """F_S = (1/S) sum_s sum_n g_ns g_ns^T, g_ns = J_n^T r(f_n, y_s), y_s ~ p(y | f_n): (P, P).

    All S targets for all B inputs are drawn at once and the per-sample gradients are one einsum
    with the dense J (memory S B P). `rng` is a backend Generator or a seed for one.
    """
    likelihood = _check(model, likelihood)
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
    if rng is None or isinstance(rng, numbers.Integral):
        rng = array_module(x).random.default_rng(rng)
    xp = array_module(x)
    f, J = _output_and_jacobian(model, x)
    B, d, P = J.shape
    f_rep = _repeat(f, n_samples)                                   # (S B, *out), sample-major
    r = likelihood.grad(f_rep, likelihood.sample(f_rep, rng)).reshape(n_samples, B, d)
    g = xp.einsum("bdp,sbd->sbp", J, r).reshape(n_samples * B, P)
    return g.T @ g / n_samples


def empirical_fisher(model, likelihood, x, y):
    """EF = sum_n g_n g_n^T with g_n = J_n^T r(f_n, y_n) at the observed targets, (P, P)."""
    g = per_example_gradients(model, likelihood, x, y)
    return g.T @ g


def curvature_matrices(model, likelihood, x, y, n_samples=None, rng=None, eps=1e-6):
    """All four (five with n_samples) dense matrices at the model's current parameters, as a dict."""
    out = {"hessian": hessian(model, likelihood, x, y, eps),
           "ggn": ggn(model, likelihood, x, y),
           "fisher": fisher(model, likelihood, x),
           "empirical_fisher": empirical_fisher(model, likelihood, x, y)}
    if n_samples is not None:
        out["fisher_mc"] = fisher_mc(model, likelihood, x, n_samples, rng)
    return out
