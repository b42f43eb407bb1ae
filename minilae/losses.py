"""Likelihoods p(y | f): the decoder's (or classifier's) output f parameterises a distribution over y.

Each likelihood gives, per sample b of a batch, everything the Laplace machinery needs:

* ``nll(f, y)``       l_b = -log p(y_b | f_b), summed over output dims, normalising constants included
* ``grad(f, y)``      d l_b / d f_b
* ``hess(f, y)``      H_b = d^2 l_b / d f_b^2, dense (d, d) with d = prod(out), f_b flattened in C order
* ``hess_diag(f, y)`` diag(H_b), shaped like f
* ``hess_sqrt(f, y)`` a factor S_b with H_b = S_b S_b^T (turns the GGN J^T H J into (J^T S)(J^T S)^T)
* ``output_curvature(f, y)`` the dense H_out the GGN engine backpropagates: ``hess`` here, the Fisher below
* ``sample(f, rng)``  y ~ p(y | f), for Monte Carlo Fisher estimates
* ``mean(f)``         E[y | f], the reconstruction shown to a user

Why the Hessians never depend on y: for Gaussian, Bernoulli and Categorical f is the natural parameter of an
exponential family, -log p(y | f) = A(f) - y . f - log h(y), so y enters only linearly and the
second derivative leaves H = d^2 A / d f^2 = Cov[y | f]. (For the Gaussian with fixed sigma the
natural parameter is f / sigma^2, a constant rescaling, and H = I / sigma^2.)
The ``y`` argument of the Hessian methods is therefore optional and only validated when given.

The exception is :class:`HeteroscedasticGaussian` (the AE with learned variance): its outputs
(mu, s = log sigma^2) are not natural parameters (those are mu / sigma^2 and -1 / (2 sigma^2)), so
its true Hessian depends on y and is indefinite. There ``hess`` is that true Hessian (y required),
while ``hess_diag`` / ``hess_sqrt`` / ``output_curvature`` give the Fisher E_y[H], the PSD curvature
the GGN engine needs (:func:`minilae.curvature.ggn` keeps the textbook J^T hess J, indefinite here).

Outputs follow the array backend of ``f`` (NumPy or CuPy), found with :func:`array_module`.
"""
from __future__ import annotations

import math

from .backend import array_module

__all__ = ["Likelihood", "Gaussian", "HeteroscedasticGaussian", "Bernoulli", "Categorical", "get_likelihood",
           "LIKELIHOODS"]


# ----------------------------------------------------------------------------------------------
# numerically stable elementwise helpers (all exact identities; the forms avoid exp overflow)

def _softplus(f):
    """softplus(f) = log(1 + e^f) = max(f, 0) + log1p(e^{-|f|})."""
    xp = array_module(f)
    return xp.maximum(f, 0) + xp.log1p(xp.exp(-xp.abs(f)))


def _sigmoid(f):
    """sigma(f) = 1 / (1 + e^{-f}), written with s = e^{-|f|} <= 1 so nothing overflows."""
    xp = array_module(f)
    s = xp.exp(-xp.abs(f))
    return xp.where(f >= 0, 1 / (1 + s), s / (1 + s))


def _sigmoid_var(f):
    """p (1 - p) with p = sigma(f), as s / (1 + s)^2, s = e^{-|f|} (no cancellation in 1 - p)."""
    xp = array_module(f)
    s = xp.exp(-xp.abs(f))
    return s / (1 + s) ** 2


def _logsumexp(f):
    """log sum_c e^{f_c} over the last axis, shifted by the max: m + log sum e^{f - m}."""
    xp = array_module(f)
    m = f.max(axis=-1, keepdims=True)
    return (m + xp.log(xp.exp(f - m).sum(axis=-1, keepdims=True)))[..., 0]


def _softmax(f):
    """pi_c = e^{f_c} / sum_k e^{f_k} over the last axis (max-shifted)."""
    xp = array_module(f)
    e = xp.exp(f - f.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _diag_embed(v):
    """(B, d) -> (B, d, d) with v on each diagonal."""
    xp = array_module(v)
    batch, d = v.shape
    out = xp.zeros((batch, d, d), dtype=v.dtype)
    idx = xp.arange(d)
    out[:, idx, idx] = v
    return out


# ----------------------------------------------------------------------------------------------
# input validation shared by all likelihoods

def _check_f(f, min_ndim=1):
    """Validate the network output f: a finite floating array of shape (B, *out)."""
    xp = array_module(f)
    if not hasattr(f, "dtype") or not hasattr(f, "shape"):
        raise TypeError(f"f must be a NumPy/CuPy array of shape (B, *out), got {type(f).__name__}")
    if f.dtype.kind != "f":
        raise TypeError(f"f must be a floating array (network outputs), got dtype {f.dtype}")
    if f.ndim < min_ndim:
        raise ValueError(f"f must have shape (B, *out) with at least {min_ndim} dim(s), got shape {f.shape}")
    if not bool(xp.isfinite(f).all()):
        raise ValueError(f"f contains {int((~xp.isfinite(f)).sum())} non-finite value(s) (nan/inf)")
    return xp


def _check_same_backend(f, y):
    if array_module(f) is not array_module(y):
        raise TypeError("f and y live on different backends (NumPy vs CuPy); move one explicitly with "
                        "minilae.backend.asarray / to_numpy")


def _check_y_like_f(f, y):
    """Validate a target y with exactly f's shape; return it as f's dtype."""
    _check_same_backend(f, y)
    xp = array_module(f)
    y = xp.asarray(y)
    if y.shape != f.shape:
        raise ValueError(f"y must have the same shape as f {f.shape}, got {y.shape}")
    if y.dtype.kind not in "biuf":
        raise TypeError(f"y must be a real-valued array, got dtype {y.dtype}")
    y = y.astype(f.dtype, copy=False)
    if not bool(xp.isfinite(y).all()):
        raise ValueError(f"y contains {int((~xp.isfinite(y)).sum())} non-finite value(s) (nan/inf)")
    return y


def _flat(a):
    """(B, *out) -> (B, d)."""
    return a.reshape(a.shape[0], -1)


class Likelihood:
    """Common interface; the subclasses below implement the per-sample maths."""

    name = "likelihood"
    diagonal_hessian = False  # True where H_b is diagonal for every f (hess_diag then holds all of it)

    def nll(self, f, y):
        """l_b = -log p(y_b | f_b), shape (B,)."""
        raise NotImplementedError

    def grad(self, f, y):
        """d l_b / d f_b, shape of f."""
        raise NotImplementedError

    def hess(self, f, y=None):
        """H_b = d^2 l_b / d f_b^2, shape (B, d, d)."""
        raise NotImplementedError

    def hess_diag(self, f, y=None):
        """diag(H_b), shape of f."""
        raise NotImplementedError

    def hess_diag_value(self, f, y=None):
        """The one value c of diag(H_b) when it is the same for every image and output (then the engine's
        diagonal walk starts from a constant, `ConstantDiag`), else None."""
        return None

    def hess_sqrt(self, f, y=None):
        """S_b with H_b = S_b S_b^T, shape (B, d, k)."""
        raise NotImplementedError

    def output_curvature(self, f, y=None):
        """H_out of the engine's GGN J^T H_out J, (B, d, d): the Hessian, PSD for natural parameters."""
        return self.hess(f, y)

    def sample(self, f, rng):
        """y ~ p(y | f) drawn with a backend Generator rng."""
        raise NotImplementedError

    def mean(self, f):
        """E[y | f]."""
        raise NotImplementedError

    def variance(self, f):
        """Var[y | f] elementwise, shaped like ``mean(f)``."""
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}()"


# ----------------------------------------------------------------------------------------------

class Gaussian(Likelihood):
    """y ~ N(f, sigma^2 I) with fixed sigma: the mean-squared-error likelihood."""

    name = "gaussian"
    diagonal_hessian = True

    def __init__(self, sigma=1.0):
        try:
            sigma = float(sigma)
        except (TypeError, ValueError) as err:
            raise TypeError(f"sigma must be a positive number, got {sigma!r}") from err
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be a finite number > 0, got {sigma}")
        self.sigma = sigma

    def __repr__(self):
        return f"Gaussian(sigma={self.sigma})"

    def _check(self, f, y):
        _check_f(f)
        return _check_y_like_f(f, y)

    def nll(self, f, y):
        """l = ||y - f||^2 / (2 sigma^2) + (d / 2) log(2 pi sigma^2), per sample."""
        y = self._check(f, y)
        d = _flat(f).shape[1]
        sq = (_flat(y - f) ** 2).sum(axis=1)
        return 0.5 * sq / self.sigma**2 + 0.5 * d * math.log(2 * math.pi * self.sigma**2)

    def grad(self, f, y):
        """dl/df = (f - y) / sigma^2."""
        y = self._check(f, y)
        return (f - y) / self.sigma**2

    def hess(self, f, y=None):
        """H = I / sigma^2."""
        xp = self._check_hess(f, y)
        batch, d = _flat(f).shape
        eye = xp.eye(d, dtype=f.dtype) / self.sigma**2
        return xp.broadcast_to(eye, (batch, d, d)).copy()

    def hess_diag(self, f, y=None):
        """diag(H) = 1 / sigma^2 everywhere."""
        xp = self._check_hess(f, y)
        return xp.full(f.shape, 1 / self.sigma**2, dtype=f.dtype)

    def hess_diag_value(self, f, y=None):
        """1 / sigma^2: diag(H) holds that one value for every image and output."""
        self._check_hess(f, y)
        return 1 / self.sigma**2

    def hess_sqrt(self, f, y=None):
        """S = I / sigma, so S S^T = I / sigma^2."""
        xp = self._check_hess(f, y)
        batch, d = _flat(f).shape
        eye = xp.eye(d, dtype=f.dtype) / self.sigma
        return xp.broadcast_to(eye, (batch, d, d)).copy()

    def sample(self, f, rng):
        """y = f + sigma * eps, eps ~ N(0, I)."""
        _check_f(f)
        eps = rng.standard_normal(f.shape)
        return (f + self.sigma * eps).astype(f.dtype, copy=False)

    def mean(self, f):
        """E[y | f] = f."""
        _check_f(f)
        return f.copy()

    def _check_hess(self, f, y):
        if y is not None:
            self._check(f, y)
        return _check_f(f)


class Bernoulli(Likelihood):
    """y_i ~ Bernoulli(sigma(f_i)) independently per output element; f are logits.

    For fractional y in [0, 1] (grey-level pixels) ``nll`` is the usual binary cross-entropy, which
    is a true -log p(y | f) only for y in {0, 1}.
    """

    name = "bernoulli"
    diagonal_hessian = True

    def _check(self, f, y):
        _check_f(f)
        y = _check_y_like_f(f, y)
        bad = (y < 0) | (y > 1)
        if bool(bad.any()):
            raise ValueError(f"Bernoulli targets y must lie in [0, 1]; {int(bad.sum())} value(s) outside "
                             f"(min {float(y.min())}, max {float(y.max())})")
        return y

    def nll(self, f, y):
        """l = sum_i softplus(f_i) - y_i f_i  (= -y log p - (1 - y) log(1 - p), p = sigma(f))."""
        y = self._check(f, y)
        return _flat(_softplus(f) - y * f).sum(axis=1)

    def grad(self, f, y):
        """dl/df = sigma(f) - y."""
        y = self._check(f, y)
        return _sigmoid(f) - y

    def hess(self, f, y=None):
        """H = diag(p (1 - p)), p = sigma(f): independent of y."""
        return _diag_embed(_flat(self.hess_diag(f, y)))

    def hess_diag(self, f, y=None):
        """diag(H)_i = p_i (1 - p_i)."""
        if y is not None:
            self._check(f, y)
        _check_f(f)
        return _sigmoid_var(f)

    def hess_sqrt(self, f, y=None):
        """S = diag(sqrt(p (1 - p)))."""
        xp = array_module(f)
        return _diag_embed(_flat(xp.sqrt(self.hess_diag(f, y))))

    def sample(self, f, rng):
        """y_i = [u_i < sigma(f_i)], u_i ~ U[0, 1)."""
        _check_f(f)
        u = rng.random(f.shape)
        return (u < _sigmoid(f)).astype(f.dtype)

    def mean(self, f):
        """E[y | f] = sigma(f)."""
        _check_f(f)
        return _sigmoid(f)


class Categorical(Likelihood):
    """y ~ Categorical(softmax(f)); f are logits (B, C), y int labels (B,) or probabilities (B, C)."""

    name = "categorical"

    def _check(self, f, y):
        """Return y as probabilities (B, C) in f's dtype (int labels become one-hot)."""
        xp = _check_f(f, min_ndim=2)
        if f.ndim != 2:
            raise ValueError(f"Categorical logits f must have shape (B, C), got {f.shape}")
        _check_same_backend(f, y)
        y = xp.asarray(y)
        batch, n_classes = f.shape
        if y.shape == (batch,):
            return self._one_hot(y, n_classes, f.dtype)
        if y.shape != (batch, n_classes):
            raise ValueError(f"Categorical y must be int labels of shape ({batch},) or probabilities of "
                             f"shape {f.shape}, got {y.shape}")
        y = _check_y_like_f(f, y)
        tol = math.sqrt(float(xp.finfo(f.dtype).eps))
        if bool((y < 0).any()) or bool((xp.abs(y.sum(axis=1) - 1) > tol).any()):
            raise ValueError("Categorical probability targets y must be >= 0 with rows summing to 1 "
                             f"(tolerance {tol:.1e})")
        return y

    @staticmethod
    def _one_hot(labels, n_classes, dtype):
        xp = array_module(labels)
        if labels.dtype.kind == "f":
            if not bool(xp.isfinite(labels).all()) or bool((labels != xp.round(labels)).any()):
                raise ValueError("Categorical labels must be integers (got non-integral or non-finite floats)")
        elif labels.dtype.kind not in "iu":
            raise TypeError(f"Categorical labels must be integers, got dtype {labels.dtype}")
        if bool(((labels < 0) | (labels >= n_classes)).any()):
            raise ValueError(f"Categorical labels must lie in [0, {n_classes - 1}], got range "
                             f"[{labels.min()}, {labels.max()}]")
        return (labels.astype(xp.int64)[:, None] == xp.arange(n_classes)[None, :]).astype(dtype)

    def nll(self, f, y):
        """l = logsumexp(f) - sum_c y_c f_c  (= -sum_c y_c log softmax(f)_c, rows of y sum to 1)."""
        y = self._check(f, y)
        return _logsumexp(f) - (y * f).sum(axis=1)

    def grad(self, f, y):
        """dl/df = pi - y, pi = softmax(f)."""
        y = self._check(f, y)
        return _softmax(f) - y

    def hess(self, f, y=None):
        """H = diag(pi) - pi pi^T: independent of y."""
        pi = self._pi(f, y)
        return _diag_embed(pi) - pi[:, :, None] * pi[:, None, :]

    def hess_diag(self, f, y=None):
        """diag(H)_c = pi_c (1 - pi_c)."""
        pi = self._pi(f, y)
        return pi * (1 - pi)

    def hess_sqrt(self, f, y=None):
        """S = diag(sqrt(pi)) - pi sqrt(pi)^T; S S^T = diag(pi) - pi pi^T because sum_c pi_c = 1."""
        xp = array_module(f)
        pi = self._pi(f, y)
        root = xp.sqrt(pi)
        return _diag_embed(root) - pi[:, :, None] * root[:, None, :]

    def sample(self, f, rng):
        """Integer labels (B,) by inverse CDF: k = #{c : cumsum(pi)_c < u}, u ~ U[0, 1)."""
        xp = _check_f(f, min_ndim=2)
        if f.ndim != 2:
            raise ValueError(f"Categorical logits f must have shape (B, C), got {f.shape}")
        cdf = xp.cumsum(_softmax(f), axis=1)
        u = rng.random((f.shape[0], 1))
        k = (cdf < u).sum(axis=1)
        # the last cdf entry can round to just below 1
        return xp.minimum(k, f.shape[1] - 1).astype(xp.int64)

    def mean(self, f):
        """E[one_hot(y) | f] = softmax(f)."""
        _check_f(f, min_ndim=2)
        return _softmax(f)

    def _pi(self, f, y):
        if y is not None:
            self._check(f, y)
        _check_f(f, min_ndim=2)
        if f.ndim != 2:
            raise ValueError(f"Categorical logits f must have shape (B, C), got {f.shape}")
        return _softmax(f)


class HeteroscedasticGaussian(Likelihood):
    """y_i ~ N(mu_i, e^{s_i}) independently: the decoder predicts a mean and a log-variance per output.

    Layout: f has twice y's channels along axis 1, mu = f[:, :C] and s = f[:, C:] = log sigma^2 (images
    y (B, C, H, W), f (B, 2C, H, W); flat y (B, d), f (B, 2d)). With r = y - mu, per sample

        l = 1/2 sum_i [ s_i + r_i^2 e^{-s_i} + log 2 pi ].

    Curvature, over f flattened in C order (all mu entries, then all s entries):
      * ``hess(f, y)`` is the TRUE Hessian d^2 l / d f^2: per output the 2 x 2 block
        [[e^{-s}, r e^{-s}], [r e^{-s}, r^2 e^{-s} / 2]] coupling mu_i and s_i. It depends on y, so y is
        required, and it is indefinite (determinant e^{-2s} r^2 (1/2 - 1) < 0 where r != 0);
      * ``fisher(f)``, ``hess_diag(f, y)`` and ``hess_sqrt(f, y)`` give the Fisher
        F = E_{y ~ p(y | f)}[H] = diag(e^{-s}, 1/2) (E[r] = 0, E[r^2] = e^s), which is PSD and is what the
        Laplace machinery treats as H_out in the GGN J^T H_out J. So, unlike the other likelihoods,
        ``hess_diag`` is not diag(``hess``) here, and ``output_curvature`` (what the engine's dense paths,
        'exact', 'blocks' and a full 'mixed', backpropagate) is the Fisher, not ``hess``: every engine
        method gets the same PSD GGN.

    Nothing is clamped: a log-variance with e^{+-s} outside the dtype's range is refused (ValueError).
    """

    name = "heteroscedastic"

    def _split(self, f):
        """(mu, s) = (f[:, :C], f[:, C:]) after validating f, with e^{+-s} representable in f's dtype."""
        xp = _check_f(f, min_ndim=2)
        if f.shape[1] % 2:
            raise ValueError(f"HeteroscedasticGaussian needs f with an even number of channels along axis 1 "
                             f"(mean and log-variance), got shape {f.shape}")
        c = f.shape[1] // 2
        mu, s = f[:, :c], f[:, c:]
        limit = math.log(float(xp.finfo(f.dtype).max)) - 1
        if bool((xp.abs(s) > limit).any()):
            raise ValueError(f"log-variance s = f[:, {c}:] has entries with |s| > {limit:.1f}, where e^(+-s) "
                             f"overflows {f.dtype} (range [{float(s.min()):.4g}, {float(s.max()):.4g}])")
        return mu, s

    def _check(self, f, y):
        """(mu, s, y) with y shaped like mu."""
        mu, s = self._split(f)
        _check_same_backend(f, y)
        y = array_module(f).asarray(y)
        if y.shape != mu.shape:
            raise ValueError(f"y must have the shape of the mean half of f, {mu.shape} (f {f.shape} holds mean "
                             f"and log-variance along axis 1), got {y.shape}")
        return mu, s, _check_y_like_f(mu, y)

    def nll(self, f, y):
        """l = 1/2 sum_i [s_i + (y_i - mu_i)^2 e^{-s_i} + log 2 pi], per sample."""
        mu, s, y = self._check(f, y)
        z = (y - mu) * array_module(f).exp(-0.5 * s)  # r e^{-s/2}: squaring it cannot overflow where r^2 would
        return 0.5 * _flat(s + z ** 2).sum(axis=1) + 0.5 * _flat(mu).shape[1] * math.log(2 * math.pi)

    def grad(self, f, y):
        """dl/dmu = -r e^{-s}, dl/ds = (1 - r^2 e^{-s}) / 2, r = y - mu; stacked like f."""
        mu, s, y = self._check(f, y)
        xp = array_module(f)
        w = xp.exp(-0.5 * s)
        z = (y - mu) * w
        return xp.concatenate([-z * w, 0.5 * (1 - z ** 2)], axis=1)

    def hess(self, f, y=None):
        """The true Hessian, (B, D, D): per output [[e^{-s}, r e^{-s}], [r e^{-s}, r^2 e^{-s} / 2]] (needs y)."""
        if y is None:
            raise ValueError("HeteroscedasticGaussian.hess is the true Hessian, which depends on y (mu and "
                             "log sigma^2 are not natural parameters): pass y, or use fisher(f) for E_y[H]")
        mu, s, y = self._check(f, y)
        xp = array_module(f)
        w = xp.exp(-0.5 * s)
        z = (y - mu) * w
        a, b, c = _flat(w * w), _flat(z * w), _flat(0.5 * z ** 2)
        n = a.shape[1]
        H = _diag_embed(xp.concatenate([a, c], axis=1))
        idx = xp.arange(n)
        H[:, idx, n + idx] = b
        H[:, n + idx, idx] = b
        return H

    def fisher(self, f):
        """F = E_{y ~ p(y | f)}[H] = diag(e^{-s}, 1/2), dense (B, D, D)."""
        return _diag_embed(_flat(self.hess_diag(f)))

    def output_curvature(self, f, y=None):
        """The Fisher F (PSD), not the indefinite true Hessian: the H_out of the engine's GGN."""
        if y is not None:
            self._check(f, y)  # y's shape is still validated, though F does not depend on y
        return self.fisher(f)

    def hess_diag(self, f, y=None):
        """The Fisher's diagonal (e^{-s}, 1/2), shaped like f: the PSD H_out of the GGN (not diag of ``hess``)."""
        mu, s = self._check(f, y)[:2] if y is not None else self._split(f)
        xp = array_module(f)
        return xp.concatenate([xp.exp(-s), xp.full(s.shape, 0.5, dtype=f.dtype)], axis=1)

    def hess_sqrt(self, f, y=None):
        """S = diag(e^{-s/2}, 1/sqrt 2) with S S^T = the Fisher (not the true Hessian, which is indefinite)."""
        mu, s = self._check(f, y)[:2] if y is not None else self._split(f)
        xp = array_module(f)
        root = xp.concatenate([xp.exp(-0.5 * s), xp.full(s.shape, math.sqrt(0.5), dtype=f.dtype)], axis=1)
        return _diag_embed(_flat(root))

    def sample(self, f, rng):
        """y = mu + e^{s/2} eps, eps ~ N(0, I), shaped like mu."""
        mu, s = self._split(f)
        eps = rng.standard_normal(mu.shape)
        return (mu + array_module(f).exp(0.5 * s) * eps).astype(f.dtype, copy=False)

    def mean(self, f):
        """E[y | f] = mu."""
        return self._split(f)[0].copy()

    def variance(self, f):
        """Var[y | f] = e^s."""
        return array_module(f).exp(self._split(f)[1])


LIKELIHOODS = {"gaussian": Gaussian, "mse": Gaussian, "bernoulli": Bernoulli, "categorical": Categorical,
               "heteroscedastic": HeteroscedasticGaussian}


def get_likelihood(name, **kwargs):
    """Likelihood by name: 'gaussian' | 'mse' (both Gaussian(sigma)), 'bernoulli', 'categorical', 'heteroscedastic'."""
    if isinstance(name, Likelihood):
        return name
    if not isinstance(name, str):
        raise TypeError(f"likelihood name must be a string, got {type(name).__name__}")
    key = name.lower()
    if key not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {name!r}; choose one of {', '.join(sorted(LIKELIHOODS))}")
    return LIKELIHOODS[key](**kwargs)
