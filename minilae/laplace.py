"""The diagonal Laplace posterior over the flat parameter vector, and its marginal likelihood.

A Laplace approximation replaces the posterior p(theta | D) by a Gaussian centred at a mode:

    q(theta) = N(theta | theta*, Lambda^-1),   Lambda = G + lambda I,

where ``G`` is (the diagonal of) the generalised Gauss-Newton matrix of the negative
log-likelihood summed over the training set (the data term, from :mod:`minilae.hessian`) and
``lambda`` the precision of the isotropic prior p(theta) = N(0, lambda^-1 I). Everything is a
flat vector of length P aligned with ``model.get_params()``: the mean is that vector and the
precision a vector of the same length, so sampling, densities and the evidence are element-wise.

Why the precision is always positive: ``G`` is the diagonal of a sum of matrices J^T H J with
H positive semi-definite, hence ``G >= 0`` entry by entry, and ``lambda > 0``, so
``Lambda >= lambda > 0`` and every variance ``1 / Lambda`` lies in ``(0, 1 / lambda]``.
The constructor checks both facts instead of trusting them.

The promise holds in the working dtype (that of ``mean`` and ``ggn``, e.g. float32), not only in
exact arithmetic: ``lambda`` is stored rounded to the nearest value of that dtype, so it is exactly
representable there, and rounding is monotone, hence fl(G + lambda) >= lambda and
fl(1 / fl(G + lambda)) <= fl(1 / lambda) entry by entry. (A float64 lambda added to a float32 GGN
would be rounded anyway - possibly down, below itself.) A lambda the dtype cannot hold (it would
round to 0 or overflow to inf) is refused.

The prior precision is chosen by maximising the Laplace estimate of the evidence (the "marginal
likelihood", MacKay 1992) over ``log lambda``; see :func:`log_marginal_likelihood`. That estimate
assumes the mean is the mode of the log-posterior under the prior, which is why both trainers
(:class:`minilae.training.MAPTrainer` for post-hoc, :class:`minilae.online.OnlineLaplace`) add the
prior's gradient (lambda / N) theta to the batch-mean loss.
"""
from __future__ import annotations

import math

from .backend import array_module
from .sampling import standard_normal
from .validation import all_finite, positive, positive_int

__all__ = ["DiagonalLaplace", "log_marginal_likelihood", "log_marginal_likelihood_grad",
           "optimize_prior_precision", "in_dtype", "check_rng", "sample_diagonal"]

def check_mean(mean):
    """mean: the flat parameter vector, a 1-D floating array (TypeError otherwise)."""
    if not (hasattr(mean, "ndim") and mean.ndim == 1 and mean.dtype.kind == "f"):
        raise TypeError("mean must be the flat parameter vector, a 1-D floating array; got "
                        f"{getattr(mean, 'dtype', type(mean).__name__)} of shape {getattr(mean, 'shape', None)}")


def _check_mean_and_ggn(mean, ggn):
    """mean: 1-D finite float vector; ggn: same shape, finite, >= 0."""
    check_mean(mean)
    if getattr(ggn, "shape", None) != mean.shape:
        raise ValueError(f"ggn must have the mean's shape {mean.shape}, got {getattr(ggn, 'shape', None)}")
    if array_module(mean) is not array_module(ggn):
        raise TypeError("mean and ggn live on different backends; move one with minilae.backend.asarray")
    xp = array_module(mean)
    for name, a in (("mean", mean), ("ggn", ggn)):
        if all_finite(a):
            continue
        bad = ~xp.isfinite(a)
        if bool(bad.any()):
            raise ValueError(f"{name} has {int(bad.sum())} non-finite entries (nan/inf)")
    if ggn.dtype != mean.dtype:
        raise TypeError(f"ggn must have the mean's dtype {mean.dtype} (the posterior's working dtype), got {ggn.dtype}")
    negative = ggn < 0
    if bool(negative.any()):
        raise ValueError(f"ggn must be >= 0 (the diagonal of a positive semi-definite GGN); "
                         f"{int(negative.sum())} entries are negative (min {float(ggn.min()):.3e})")


def check_rng(rng):
    """Refuse (TypeError) anything that is not a random Generator, naming what to pass."""
    if not callable(getattr(rng, "standard_normal", None)):
        raise TypeError(f"rng must be a random Generator of the parameters' backend, e.g. "
                        f"minilae.backend.xp().random.default_rng(seed); got {type(rng).__name__}")


def in_dtype(value, like, name="prior_precision"):
    """A positive float rounded to the nearest value of the dtype of array like (returned as a Python float).

    Refused (ValueError) when the rounding gives 0 or inf.
    """
    value, dtype = positive(value, name), like.dtype
    rounded = float(dtype.type(value)) if value <= float(array_module(like).finfo(dtype).max) else math.inf
    if not (0 < rounded < math.inf):
        raise ValueError(f"{name}={value:.6g} is outside the range of {dtype} (it would round to {rounded}); "
                         "use float64 parameters or a prior precision within the dtype's range")
    return rounded


class GaussianPosterior:
    """What every Laplace posterior q(theta) = N(mean, Lambda^-1), Lambda = GGN + lambda I, shares: the mean
    and the prior precision lambda (the structure of the GGN is the subclass's)."""

    @property
    def prior_precision(self) -> float:
        """lambda, held rounded to the working dtype so that Lambda >= lambda holds in that dtype."""
        return self._prior_precision

    @prior_precision.setter
    def prior_precision(self, value):
        self._prior_precision = in_dtype(value, self.mean)

    @property
    def num_params(self) -> int:
        """P, the length of the flat parameter vector."""
        return int(self.mean.shape[0])


def sample_diagonal(mean, ggn, prior_precision, n_samples, rng, out=None):
    """theta_k = mean + eps_k / sqrt(ggn + lambda), eps_k ~ N(0, I), shape (n_samples, P), with no checks of the
    arguments: DiagonalLaplace.sample checks them, the online trainer's step has (its mean and H passed theirs at
    the end of the step before: two P-long passes saved)."""
    eps = standard_normal(rng, (n_samples, mean.shape[0]), mean.dtype, out)
    # in place, with one temporary: P-long passes dominate an online step of a large model
    root = ggn + prior_precision
    eps /= array_module(root).sqrt(root, out=root)
    eps += mean
    return eps


class DiagonalLaplace(GaussianPosterior):
    """q(theta) = N(theta | mean, diag(precision)^-1) with precision = ggn + prior_precision."""

    def __init__(self, mean, ggn, prior_precision=1.0):
        _check_mean_and_ggn(mean, ggn)
        self.mean = mean
        self.ggn = ggn
        self.prior_precision = prior_precision

    def __repr__(self):
        return f"DiagonalLaplace(P={self.num_params}, prior_precision={self.prior_precision:.4g})"

    @property
    def precision(self):
        """Lambda = G + lambda (element-wise), every entry >= lambda > 0."""
        return self.ggn + self.prior_precision

    @property
    def variance(self):
        """sigma^2 = 1 / Lambda, every entry in (0, 1 / lambda]."""
        return 1.0 / self.precision

    @property
    def std(self):
        """sigma = Lambda^(-1/2)."""
        return array_module(self.mean).sqrt(self.variance)

    def sample(self, n_samples, rng, out=None):
        """theta_k = mean + eps_k / sqrt(Lambda), eps_k ~ N(0, I): shape (n_samples, P).

        ``rng`` is a Generator of the backend the mean lives on (numpy.random.default_rng(...) or
        its CuPy counterpart), so the noise is drawn where the parameters are (:mod:`minilae.sampling`);
        ``out``, an (n_samples, P) array of the mean's dtype, receives the samples (a trainer reuses one).
        """
        check_rng(rng)
        return sample_diagonal(self.mean, self.ggn, self.prior_precision, positive_int(n_samples, "n_samples"), rng,
                               out)

    def log_density(self, theta):
        """log q(theta) = -1/2 sum Lambda (theta - mean)^2 + 1/2 sum log Lambda - P/2 log 2 pi.

        theta of shape (P,) gives a float, (n, P) gives an array (n,).
        """
        xp = array_module(self.mean)
        if getattr(theta, "shape", (None,))[-1:] != (self.num_params,) or theta.ndim not in (1, 2):
            raise ValueError(f"theta must have shape ({self.num_params},) or (n, {self.num_params}), "
                             f"got {getattr(theta, 'shape', None)}")
        precision = self.precision
        quad = (precision * (theta - self.mean) ** 2).sum(axis=-1)
        log_norm = 0.5 * float(xp.log(precision).sum()) - 0.5 * self.num_params * math.log(2 * math.pi)
        out = -0.5 * quad + log_norm
        return float(out) if theta.ndim == 1 else out

    def log_marginal_likelihood(self, log_likelihood=0.0, prior_precision=None):
        """Laplace evidence log p(D | lambda) at this mean and GGN (see log_marginal_likelihood)."""
        lam = self.prior_precision if prior_precision is None else positive(prior_precision, "prior_precision")
        return log_marginal_likelihood(math.log(lam), self.mean, self.ggn, log_likelihood)

    def optimize_prior_precision(self, **kwargs):
        """Set lambda to the maximiser of the Laplace evidence (optimize_prior_precision); return it."""
        self.prior_precision = optimize_prior_precision(self.mean, self.ggn, init=self.prior_precision, **kwargs)
        return self.prior_precision


# ----------------------------------------------------------------------------------------------
# The Laplace evidence as a function of s = log lambda.
#
#   log p(D | lambda) ~= log p(D | theta*) + log p(theta* | lambda) + P/2 log 2 pi - 1/2 log det Lambda
#                     = log p(D | theta*) - lambda/2 ||theta*||^2 + P/2 log lambda - 1/2 sum_i log(G_i + lambda)
#
# (the two P/2 log 2 pi of the prior's normaliser and of the Gaussian integral cancel).
# Written in s = log lambda it is concave:
#   d/ds   = -lambda/2 ||theta*||^2 + P/2 - 1/2 sum_i lambda / (G_i + lambda)
#   d2/ds2 = -lambda/2 ||theta*||^2 - 1/2 sum_i lambda G_i / (G_i + lambda)^2  < 0,
# so Newton's method in s finds the unique maximiser (it exists when ||theta*|| > 0 and some G_i > 0:
# d/ds is > 0 as lambda -> 0 and -> -inf as lambda -> inf).

def _evidence_terms(log_prior_precision, mean, ggn):
    try:
        lam = math.exp(float(log_prior_precision))
    except OverflowError:  # exp of more than ~709: report it like every other out-of-range lambda
        lam = math.inf
    if not (math.isfinite(lam) and lam > 0):
        raise ValueError(f"log_prior_precision={log_prior_precision} gives a prior precision exp(s) outside the "
                         "float range (0, inf)")
    sq_norm = float((mean.astype(array_module(mean).float64) ** 2).sum())
    return lam, sq_norm


def log_marginal_likelihood(log_prior_precision, mean, ggn, log_likelihood=0.0):
    """log p(D | lambda) = log p(D | theta*) - lambda/2 ||theta*||^2 + P/2 log lambda - 1/2 sum log(G + lambda)."""
    _check_mean_and_ggn(mean, ggn)
    xp = array_module(mean)
    lam, sq_norm = _evidence_terms(log_prior_precision, mean, ggn)
    log_det = float(xp.log(ggn.astype(xp.float64) + lam).sum())
    P = mean.shape[0]
    return float(log_likelihood) - 0.5 * lam * sq_norm + 0.5 * P * math.log(lam) - 0.5 * log_det


def log_marginal_likelihood_grad(log_prior_precision, mean, ggn):
    """d log p(D | lambda) / d log lambda = -lambda/2 ||theta*||^2 + P/2 - 1/2 sum lambda / (G + lambda)."""
    _check_mean_and_ggn(mean, ggn)
    xp = array_module(mean)
    lam, sq_norm = _evidence_terms(log_prior_precision, mean, ggn)
    shrink = float((lam / (ggn.astype(xp.float64) + lam)).sum())
    return -0.5 * lam * sq_norm + 0.5 * mean.shape[0] - 0.5 * shrink


def _log_marginal_likelihood_curvature(lam, sq_norm, g):
    """d^2 log p(D | lambda) / d (log lambda)^2 = -lambda/2 ||theta*||^2 - 1/2 sum lambda G / (G + lambda)^2."""
    return -0.5 * lam * sq_norm - 0.5 * float((lam * g / (g + lam) ** 2).sum())


def optimize_prior_precision(mean, ggn, init=1.0, tol=1e-8, max_iter=100, bounds=(1e-8, 1e8)):
    """lambda* = argmax_lambda log p(D | lambda), by safeguarded Newton steps on s = log lambda.

    The objective is concave in s (see the derivation above), so a Newton step, halved until the
    objective does not decrease, converges to the unique maximiser; ``bounds`` clip lambda for the
    degenerate cases (theta* = 0 or G = 0) where the maximiser sits at 0 or infinity.
    """
    _check_mean_and_ggn(mean, ggn)
    xp = array_module(mean)
    low, high = (math.log(b) for b in bounds)
    s = min(max(math.log(positive(init, "prior_precision")), low), high)
    g = ggn.astype(xp.float64)
    for _ in range(int(max_iter)):
        lam, sq_norm = _evidence_terms(s, mean, ggn)
        grad = log_marginal_likelihood_grad(s, mean, ggn)
        curv = _log_marginal_likelihood_curvature(lam, sq_norm, g)
        step = -grad / curv if curv < 0 else math.copysign(1.0, grad)
        f_old = log_marginal_likelihood(s, mean, ggn)
        while True:
            s_new = min(max(s + step, low), high)
            if log_marginal_likelihood(s_new, mean, ggn) >= f_old or abs(step) < 1e-12:
                break
            step *= 0.5
        converged = abs(s_new - s) < tol
        s = s_new
        if converged:
            break
    return math.exp(s)
