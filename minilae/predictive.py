"""Predictive uncertainty: push K networks theta_k ~ q(theta) through the autoencoder.

For every input x and K sampled networks (default 100):

  z_k = encoder(x; theta_k),   x_k = decoder(z_k; theta_k),
  mean and variance over k of z_k (latent code) and of x_k (reconstruction),
  log p(x) = 1/K sum_k log p(x | theta_k)       (the paper's per-sample-network likelihood),
  mse      = mean over pixels of (x - mean_k x_k)^2   (error of the mean reconstruction).

The variance is the population variance over the K networks (divide by K). It is accumulated
with Welford's update in float64, so it is >= 0 by construction and free of the cancellation
of E[x^2] - E[x]^2. Networks are the outer loop (set the parameters once per sample) and the
batches of inputs the inner loop, so the same K networks serve every input.

Device memory: the inputs of a chunk and their running statistics live on the backend, batch by
batch; a chunk is all N inputs when their statistics fit in the memory budget (by default
BUDGET_FRACTION of the free device memory, as for the Hessian engine), else as many as fit, with
the same K networks replayed (from one seed) for every chunk. Inputs are never moved to the
device all at once unless they fit.

With ``posterior=None`` (a plain AE) there is one deterministic network and the variances are 0.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

from .backend import array_module, asarray, to_numpy, xp
from .hessian.chain import MemoryBudgetError, format_bytes, resolve_budget
from .losses import Gaussian, get_likelihood
from .validation import positive_int

__all__ = ["Prediction", "predict", "predict_decoder"]


class _Moments:
    """Running mean and sum of squared deviations over networks k = 1..K of N inputs (Welford), by batch."""

    def __init__(self, n, shape):
        self.k = 0
        self.mean = xp().zeros((n,) + tuple(shape), dtype=xp().float64)
        self.m2 = xp().zeros_like(self.mean)

    def add(self, k, rows, a):
        """Network k (1, 2, ...) on inputs `rows`: mean += d / k;  M2 += d^2 (k - 1) / k,  d = a - mean."""
        delta = a.astype(xp().float64) - self.mean[rows]
        self.mean[rows] += delta / k
        self.m2[rows] += delta * delta * ((k - 1) / k)
        self.k = k

    @property
    def variance(self):
        """M2 / K."""
        return self.m2 / self.k


@dataclass
class Prediction:
    """Per-input predictive statistics (leading axis = input): backend arrays, or host arrays when the
    inputs were processed in chunks because their statistics did not fit in device memory."""

    z_mean: object  # (N, latent)
    z_var: object  # (N, latent)
    x_mean: object  # (N, *image)
    x_var: object  # (N, *image)
    log_px: object  # (N,)  1/K sum_k log p(x | theta_k)
    mse: object  # (N,)  per-pixel MSE of the mean reconstruction
    n_samples: int

    def summary(self):
        """Host floats averaged over inputs: mse, log_px, mean x_var and z_var."""
        return {"mse": float(self.mse.mean()), "log_px": float(self.log_px.mean()),
                "x_var": float(self.x_var.mean()), "z_var": float(self.z_var.mean()),
                "n_images": int(self.mse.shape[0]), "n_samples": self.n_samples}

    def to_numpy(self):
        """The same Prediction with host arrays."""
        return Prediction(*(to_numpy(getattr(self, k)) for k in _FIELDS), self.n_samples)


_FIELDS = ("z_mean", "z_var", "x_mean", "x_var", "log_px", "mse")


def _network_seed(rng):
    """The seed every chunk draws its K networks from: rng itself if an int (None: 0), else one draw of it."""
    if rng is None or isinstance(rng, numbers.Integral):
        return 0 if rng is None else int(rng)
    return int(rng.integers(0, 2**31 - 1))  # one device -> host scalar per prediction


def _networks(model, posterior, n_samples, seed):
    """Yield k = 1..K after setting the sampled theta_k into the model (k = 1 only, unchanged, without a posterior)."""
    if posterior is None:
        yield 1
        return
    rng = xp().random.default_rng(seed)
    for k in range(1, int(n_samples) + 1):
        model.set_params(posterior.sample(1, rng)[0])
        yield k


def _check_inputs(n_samples, batch_size):
    positive_int(n_samples, "n_samples")
    positive_int(batch_size, "batch_size")


def _chunk_size(n, per_input, memory_budget, what):
    """Inputs whose device state (per_input bytes each) fits the budget: all n, or fewer; refuse if not one."""
    budget = resolve_budget(memory_budget, xp())
    if per_input > budget:
        raise MemoryBudgetError(f"{what} needs {format_bytes(per_input)} per input, more than the memory budget "
                                f"of {format_bytes(budget)}; pass a larger memory_budget")
    return int(min(n, budget // per_input))


def _batches(n, batch_size):
    return [slice(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def _predict_chunk(model, x, posterior, n_samples, seed, batch_size, likelihood, dtype):
    """All statistics of the inputs x (one chunk) on the backend."""
    x = asarray(x, dtype=dtype)  # the chunk fits: one transfer
    n, rows = x.shape[0], _batches(x.shape[0], batch_size)
    z_mom, x_mom = _Moments(n, (model.latent_size,)), _Moments(n, x.shape[1:])
    log_px = xp().zeros(n, dtype=xp().float64)
    for k in _networks(model, posterior, n_samples, seed):
        for sl in rows:
            z = model.encode(x[sl])
            f = model.decode(z)
            z_mom.add(k, sl, z)
            x_mom.add(k, sl, f)
            log_px[sl] -= likelihood.nll(f, x[sl])
    K = x_mom.k
    mse = ((x.astype(xp().float64) - x_mom.mean) ** 2).reshape(n, -1).mean(axis=1)
    return Prediction(z_mom.mean, z_mom.variance, x_mom.mean, x_mom.variance, log_px / K, mse, K)


def predict(model, x, posterior=None, n_samples=100, rng=None, batch_size=500, likelihood=None, memory_budget=None):
    """Predictive mean/variance of z and x_hat, log p(x) and MSE of the mean, for host images x.

    rng: an int seed or a backend Generator (one seed is drawn from it); the K networks come from
    xp().random.default_rng(seed). memory_budget: bytes of device memory for the inputs' statistics
    (default: BUDGET_FRACTION of the free memory); more inputs than fit are processed in chunks.
    """
    _check_inputs(n_samples, batch_size)
    likelihood = get_likelihood(likelihood) if likelihood is not None else Gaussian(1.0)
    if getattr(x, "ndim", 0) < 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty batch of images (N, *shape), got shape {getattr(x, 'shape', None)}")
    theta0 = model.get_params()
    dtype = theta0.dtype
    d = int(x[0].size)
    # per input: the image, mean and M2 of x and z (float64), log p(x) and mse (float64)
    per_input = d * dtype.itemsize + 16 * (d + model.latent_size) + 16
    chunk = _chunk_size(x.shape[0], per_input, memory_budget, "the predictive statistics")
    seed = _network_seed(rng)
    try:
        if chunk == x.shape[0]:
            return _predict_chunk(model, x, posterior, n_samples, seed, batch_size, likelihood, dtype)
        parts = [_predict_chunk(model, x[s:s + chunk], posterior, n_samples, seed, batch_size, likelihood,
                                dtype).to_numpy() for s in range(0, x.shape[0], chunk)]
    finally:
        model.set_params(theta0)
    host = array_module(parts[0].mse)
    return Prediction(*(host.concatenate([getattr(p, k) for p in parts]) for k in _FIELDS), parts[0].n_samples)


def predict_decoder(model, z, posterior=None, n_samples=100, rng=None, batch_size=500):
    """(mean, variance) over sampled decoders of decoder(z; theta_k) for latent codes z (N, latent).

    rng: an int seed or a backend Generator, as for predict.
    """
    _check_inputs(n_samples, batch_size)
    theta0 = model.get_params()
    z = asarray(z, dtype=theta0.dtype)
    if z.ndim != 2 or z.shape[1] != model.latent_size:
        raise ValueError(f"z must have shape (N, {model.latent_size}), got {z.shape}")
    mom = _Moments(z.shape[0], model.input_shape)
    try:
        for k in _networks(model, posterior, n_samples, _network_seed(rng)):
            for sl in _batches(z.shape[0], batch_size):
                mom.add(k, sl, model.decode(z[sl]))
    finally:
        model.set_params(theta0)
    return mom.mean, mom.variance
