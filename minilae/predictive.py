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

With ``posterior=None`` (a plain AE) there is one deterministic network and the variances are 0.
"""
from __future__ import annotations

from dataclasses import dataclass

from .backend import asarray, to_numpy, xp
from .losses import Gaussian, get_likelihood
from .validation import positive_int

__all__ = ["Prediction", "predict", "predict_decoder"]


class _Moments:
    """Running mean and sum of squared deviations over samples k = 1..K (Welford)."""

    def __init__(self):
        self.k, self.mean, self.m2 = 0, None, None

    def add(self, a):
        """mean_k = mean_{k-1} + d / k;  M2_k = M2_{k-1} + d^2 (k - 1) / k,  d = a - mean_{k-1}."""
        a = a.astype(xp().float64)
        self.k += 1
        if self.mean is None:
            self.mean, self.m2 = a.copy(), xp().zeros_like(a)
            return
        delta = a - self.mean
        self.mean += delta / self.k
        self.m2 += delta * delta * ((self.k - 1) / self.k)

    @property
    def variance(self):
        """M2 / K."""
        return self.m2 / self.k


@dataclass
class Prediction:
    """Per-input predictive statistics (backend arrays; leading axis = input)."""

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
        return Prediction(*(to_numpy(getattr(self, k)) for k in
                            ("z_mean", "z_var", "x_mean", "x_var", "log_px", "mse")), self.n_samples)


def _networks(model, posterior, n_samples, rng):
    """Yield after setting each sampled theta_k into the model (just once, unchanged, without a posterior)."""
    if posterior is None:
        yield
        return
    if rng is None:
        rng = xp().random.default_rng(0)
    for _ in range(int(n_samples)):
        model.set_params(posterior.sample(1, rng)[0])
        yield


def _check_inputs(n_samples, batch_size):
    positive_int(n_samples, "n_samples")
    positive_int(batch_size, "batch_size")


def predict(model, x, posterior=None, n_samples=100, rng=None, batch_size=500, likelihood=None):
    """Predictive mean/variance of z and x_hat, log p(x) and MSE of the mean, for host images x."""
    _check_inputs(n_samples, batch_size)
    likelihood = get_likelihood(likelihood) if likelihood is not None else Gaussian(1.0)
    theta0 = model.get_params()
    dtype = theta0.dtype
    x = asarray(x, dtype=dtype)
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty batch of images (N, *shape), got shape {x.shape}")
    z_mom, x_mom = _Moments(), _Moments()
    log_px = xp().zeros(x.shape[0], dtype=xp().float64)
    try:
        for _ in _networks(model, posterior, n_samples, rng):
            zs, fs = [], []
            for start in range(0, x.shape[0], batch_size):
                xb = x[start:start + batch_size]
                zs.append(model.encode(xb))
                fs.append(model.decode(zs[-1]))
            z, f = xp().concatenate(zs), xp().concatenate(fs)
            z_mom.add(z)
            x_mom.add(f)
            log_px -= likelihood.nll(f, x)
    finally:
        model.set_params(theta0)
    K = x_mom.k
    mse = ((x.astype(xp().float64) - x_mom.mean) ** 2).reshape(x.shape[0], -1).mean(axis=1)
    return Prediction(z_mom.mean, z_mom.variance, x_mom.mean, x_mom.variance, log_px / K, mse, K)


def predict_decoder(model, z, posterior=None, n_samples=100, rng=None, batch_size=500):
    """(mean, variance) over sampled decoders of decoder(z; theta_k) for latent codes z (N, latent)."""
    _check_inputs(n_samples, batch_size)
    theta0 = model.get_params()
    z = asarray(z, dtype=theta0.dtype)
    if z.ndim != 2 or z.shape[1] != model.latent_size:
        raise ValueError(f"z must have shape (N, {model.latent_size}), got {z.shape}")
    mom = _Moments()
    try:
        for _ in _networks(model, posterior, n_samples, rng):
            mom.add(xp().concatenate([model.decode(z[s:s + batch_size]) for s in range(0, z.shape[0], batch_size)]))
    finally:
        model.set_params(theta0)
    return mom.mean, mom.variance
