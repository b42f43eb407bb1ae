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

The same accumulation serves every method (:mod:`minilae.methods`) through *draws*: ``draws(seed)``
yields K objects, each one stochastic network (a sampled theta_k, a dropout mask, an ensemble
member, a sampled code of a VAE) with ``reconstruct(x) -> Pass`` and ``decode(z) -> (mean, var)``.
A draw may also predict a variance of its own (the aleatoric variance of a learned-variance
decoder, the encoder variance of a VAE); the reported variance is then the law of total variance,

  Var[x] = Var_k[E[x | k]] + E_k[Var[x | k]],

the first term by Welford, the second as a running mean. ``draws(seed)`` must give the same draws
for the same seed: chunks of inputs replay it.

Data parallel (:mod:`minilae.distributed`): :func:`predict_draws` splits the K draws over the ranks (rank r
evaluates draws r, r + R, ...; every rank runs the whole sequence, so shared generators stay in step) and merges
the ranks' moments; :func:`decode_draws` (the latent figure, drawn on rank 0 alone) is not split.
"""
from __future__ import annotations

import numbers
from collections import namedtuple
from dataclasses import dataclass

from . import distributed
from .backend import array_module, asarray, to_numpy, xp
from .hessian.chain import MemoryBudgetError, format_bytes, resolve_budget
from .losses import Gaussian, get_likelihood
from .validation import positive_int

__all__ = ["Prediction", "Pass", "predict", "predict_decoder", "predict_draws", "decode_draws", "network_seed",
           "ModelDraw", "laplace_draws"]


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

    def reduce(self, comm, K):
        """The moments of all K networks from each rank's: mean = sum_r k_r mean_r / K,
        M2 = sum_r M2_r + k_r (mean_r - mean)^2 (Chan et al.'s pairwise update)."""
        mean = comm.allreduce_sum(self.mean * self.k) / K
        self.m2 = comm.allreduce_sum(self.m2 + self.k * (self.mean - mean) ** 2)
        self.mean, self.k = mean, K

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


Pass = namedtuple("Pass", "z z_var x x_var nll")
Pass.__doc__ = """One draw on a batch: code z, its own variance (or None), mean reconstruction x, its own variance
(or None) and -log p(x | draw) per input."""


def network_seed(rng):
    """The seed every chunk draws its K networks from: rng itself if an int (None: 0), else one draw of it."""
    if rng is None or isinstance(rng, numbers.Integral):
        return 0 if rng is None else int(rng)
    return int(rng.integers(0, 2**31 - 1))  # one device -> host scalar per prediction


class ModelDraw:
    """One network as a draw: z = encode(x), f = decode(z), x = mean(f), -log p(x | f) by the likelihood."""

    def __init__(self, model, likelihood):
        self.model, self.likelihood = model, likelihood

    def encode(self, x):
        """z = encode(x)."""
        return self.model.encode(x)

    def reconstruct(self, x):
        """Pass(z, None, mean(f), None, nll(f, x)) at the model's current parameters."""
        z = self.model.encode(x)
        f = self.model.decode(z)
        return Pass(z, None, self.likelihood.mean(f), None, self.likelihood.nll(f, x))

    def decode(self, z):
        """(mean(decode(z)), None)."""
        return self.likelihood.mean(self.model.decode(z)), None


def laplace_draws(model, posterior, draw, n_samples, seed):
    """Yield draw after setting theta_k ~ q(theta), k = 1..K (from xp().random.default_rng(seed)), into the model;
    without a posterior once, the model unchanged. The original parameters are put back when the draws end."""
    if posterior is None:
        yield draw
        return
    theta0, rng = model.get_params(), xp().random.default_rng(seed)
    try:
        for _ in range(int(n_samples)):
            model.set_params(posterior.sample(1, rng)[0])
            yield draw
    finally:
        model.set_params(theta0)


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


class _Mean:
    """Running mean over draws of a draw's own variance (stays 0 while no draw reports one)."""

    def __init__(self, n, shape):
        self.mean = xp().zeros((n,) + tuple(shape), dtype=xp().float64)

    def add(self, k, rows, a):
        """mean += (a - mean) / k (a = None: a draw without its own variance, i.e. 0)."""
        a = 0.0 if a is None else a.astype(xp().float64)
        self.mean[rows] += (a - self.mean[rows]) / k

    def reduce(self, comm, k, K):
        """The mean over all K networks from each rank's mean over its k: sum_r k_r mean_r / K."""
        self.mean = comm.allreduce_sum(self.mean * k) / K


def _run_draws(iterator, step, comm=distributed.SingleProcess()):
    """step(k, draw) for k = 1, 2, ... over this rank's draws (draw i of the iterator belongs to rank i mod R;
    every rank runs the whole iterator, so a shared generator draws the same networks everywhere); the
    iterator is closed even on an error (so a generator puts the model's parameters back at once).
    Returns (k, K): this rank's draws and all ranks'."""
    k = 0
    try:
        for i, draw in enumerate(iterator):
            if i % comm.size == comm.rank:
                k += 1
                step(k, draw)
    finally:
        getattr(iterator, "close", lambda: None)()
    K = comm.allreduce_sum(k)
    if K == 0:
        raise ValueError("the draws yielded no network")
    return k, K


def _predict_chunk(draws, x, latent_size, batch_size, dtype):
    """All statistics of the inputs x (one chunk) on the backend."""
    x = asarray(x, dtype=dtype)  # the chunk fits: one transfer
    n, rows = x.shape[0], _batches(x.shape[0], batch_size)
    z_mom, x_mom = _Moments(n, (latent_size,)), _Moments(n, x.shape[1:])
    z_own, x_own = _Mean(n, (latent_size,)), _Mean(n, x.shape[1:])
    log_px = xp().zeros(n, dtype=xp().float64)

    def step(k, draw):
        for sl in rows:
            p = draw.reconstruct(x[sl])
            z_mom.add(k, sl, p.z)
            x_mom.add(k, sl, p.x)
            z_own.add(k, sl, p.z_var)
            x_own.add(k, sl, p.x_var)
            log_px[sl] -= p.nll

    comm = distributed.current()  # data parallel: the K networks are split over the ranks
    k, K = _run_draws(draws(), step, comm)
    if comm.size > 1:
        z_mom.reduce(comm, K)
        x_mom.reduce(comm, K)
        z_own.reduce(comm, k, K)
        x_own.reduce(comm, k, K)
        log_px = comm.allreduce_sum(log_px)
    mse = ((x.astype(xp().float64) - x_mom.mean) ** 2).reshape(n, -1).mean(axis=1)
    return Prediction(z_mom.mean, z_mom.variance + z_own.mean, x_mom.mean, x_mom.variance + x_own.mean,
                      log_px / K, mse, K)


def predict_draws(draws, x, latent_size, dtype, batch_size=500, memory_budget=None):
    """Prediction over host images x of the draws draws() (a fresh, identical sequence at every call).

    z_var = Var_k z_k + E_k z_var_k,  x_var = Var_k x_k + E_k x_var_k,  log p(x) = 1/K sum_k log p(x | k).
    memory_budget: bytes of device memory for the inputs' statistics (default: BUDGET_FRACTION of the free
    memory); more inputs than fit are processed in chunks, each replaying draws().
    """
    positive_int(batch_size, "batch_size")
    if getattr(x, "ndim", 0) < 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty batch of images (N, *shape), got shape {getattr(x, 'shape', None)}")
    d = int(x[0].size)
    # per input: the image, mean, M2 and own variance of x and z (float64), log p(x) and mse (float64)
    per_input = d * dtype.itemsize + 24 * (d + latent_size) + 16
    chunk = _chunk_size(x.shape[0], per_input, memory_budget, "the predictive statistics")
    if chunk == x.shape[0]:
        return _predict_chunk(draws, x, latent_size, batch_size, dtype)
    parts = [_predict_chunk(draws, x[s:s + chunk], latent_size, batch_size, dtype).to_numpy()
             for s in range(0, x.shape[0], chunk)]
    host = array_module(parts[0].mse)
    return Prediction(*(host.concatenate([getattr(p, k) for p in parts]) for k in _FIELDS), parts[0].n_samples)


def decode_draws(draws, z, latent_size, out_shape, dtype, batch_size=500):
    """(mean, variance) over the draws of the decoded images of codes z (N, latent): Var_k + E_k of own variance."""
    positive_int(batch_size, "batch_size")
    z = asarray(z, dtype=dtype)
    if z.ndim != 2 or z.shape[1] != latent_size:
        raise ValueError(f"z must have shape (N, {latent_size}), got {z.shape}")
    mom, own = _Moments(z.shape[0], out_shape), _Mean(z.shape[0], out_shape)

    def step(k, draw):
        for sl in _batches(z.shape[0], batch_size):
            mean, var = draw.decode(z[sl])
            mom.add(k, sl, mean)
            own.add(k, sl, var)

    _run_draws(draws(), step)
    return mom.mean, mom.variance + own.mean


def predict(model, x, posterior=None, n_samples=100, rng=None, batch_size=500, likelihood=None, memory_budget=None):
    """Predictive mean/variance of z and x_hat, log p(x) and MSE of the mean, for host images x.

    rng: an int seed or a backend Generator (one seed is drawn from it); the K networks come from
    xp().random.default_rng(seed). memory_budget: bytes of device memory for the inputs' statistics
    (default: BUDGET_FRACTION of the free memory); more inputs than fit are processed in chunks.
    """
    _check_inputs(n_samples, batch_size)
    likelihood = get_likelihood(likelihood) if likelihood is not None else Gaussian(1.0)
    seed, draw = network_seed(rng), ModelDraw(model, likelihood)
    return predict_draws(lambda: laplace_draws(model, posterior, draw, n_samples, seed), x, model.latent_size, model.get_params().dtype,
                         batch_size, memory_budget)


def predict_decoder(model, z, posterior=None, n_samples=100, rng=None, batch_size=500, likelihood=None):
    """(mean, variance) over sampled decoders of decoder(z; theta_k) for latent codes z (N, latent).

    rng: an int seed or a backend Generator, as for predict.
    """
    _check_inputs(n_samples, batch_size)
    likelihood = get_likelihood(likelihood) if likelihood is not None else Gaussian(1.0)
    seed, draw = network_seed(rng), ModelDraw(model, likelihood)
    return decode_draws(lambda: laplace_draws(model, posterior, draw, n_samples, seed), z, model.latent_size, model.input_shape,
                        model.get_params().dtype, batch_size)
