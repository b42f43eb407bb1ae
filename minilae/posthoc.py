"""Post-hoc Laplace (paper Sec. 2.1, the baseline the online LAE improves on).

Three steps after training the autoencoder to a MAP estimate theta* (:class:`MAPTrainer` with the
prior: mean_b -log p(x_b | theta) + lambda_0 / (2N) ||theta||^2, so theta* is the mode under the
starting prior precision lambda_0 that the evidence below assumes):

  1. G = sum_n diag(J_n^T H_out J_n) at theta*, over the *whole* training set (no scaling needed:
     it is the data term of the precision by definition);
  2. q(theta) = N(theta*, (G + lambda)^-1)  (:class:`DiagonalLaplace`);
  3. lambda chosen by maximising the Laplace marginal likelihood
     log p(D | lambda) = log p(D | theta*) - lambda/2 ||theta*||^2 + P/2 log lambda - 1/2 sum log(G + lambda).

With ``method='kfac'`` (or 'kfac-approx') step 1 sums the Kronecker factors A and G of every layer over
the training set instead (:func:`minilae.hessian.ggn_kfac`) and step 2 is a :class:`KroneckerLaplace`;
the evidence is the same formula on the KFAC GGN's eigenvalues.

The evidence is evaluated at the mode for lambda_0 while lambda moves (as in MacKay's iteration, of
which this is one step; the mode itself is not retrained): for a lambda / N as small as 1 / 60000 the
mode barely depends on lambda.
"""
from __future__ import annotations

import sys

from . import distributed
from .backend import array_module, asarray
from .data import batches, n_batches
from .hessian import ggn_diagonal, ggn_kfac
from .kfac import KFAC_METHODS, KronBlock, KroneckerLaplace
from .laplace import DiagonalLaplace
from .losses import Gaussian, get_likelihood
from .training import check_finite

__all__ = ["dataset_ggn", "dataset_kfac", "fit_posthoc"]


def dataset_ggn(model, x, likelihood=None, method="approx", threshold=None, batch_size=256, progress=False):
    """(G, log p(D | theta)): G = sum over all images of the diagonal GGN at the model's parameters.

    x is a host array (N, C, H, W); each batch is moved to the backend, run forward once, and
    that forward serves both the log-likelihood and the Hessian engine (``f=f``). Data parallel
    (:mod:`minilae.distributed`): each rank sums over its contiguous shard of x, then G and log p are
    summed over the ranks.
    """
    def batch_ggn(lik, xb, f, i):
        G_b = ggn_diagonal(model, lik, xb, xb, method=method, threshold=threshold, f=f)
        check_finite(f"the GGN of batch {i}", G_b, i)
        return G_b

    G, log_lik = _sum_over_shard(model, x, likelihood, batch_size, progress, "GGN over the training set", batch_ggn)
    comm = distributed.current()
    return comm.allreduce_sum(G), comm.allreduce_sum(log_lik)


def dataset_kfac(model, x, likelihood=None, method="kfac", batch_size=256, progress=False):
    """([KronBlock] with A, G and n summed over all images, log p(D | theta)), batch by batch as dataset_ggn
    (data parallel too: each rank sums its shard, then A, G, n and log p are summed over the ranks)."""
    def batch_factors(lik, xb, f, i):
        blocks = ggn_kfac(model, lik, xb, xb, method=method, f=f)
        for blk in blocks:
            check_finite(f"the KFAC factor G of batch {i}", blk.G, i)
            check_finite(f"the KFAC factor A of batch {i}", blk.A, i)
        return blocks

    blocks, log_lik = _sum_over_shard(model, x, likelihood, batch_size, progress, "KFAC factors over the training set",
                                      batch_factors, add=lambda s, t: [a + b for a, b in zip(s, t, strict=True)])
    comm = distributed.current()
    blocks = [KronBlock(comm.allreduce_sum(b.A), comm.allreduce_sum(b.G), comm.allreduce_sum(b.n), b.offset, b.bias)
              for b in blocks]
    return blocks, comm.allreduce_sum(log_lik)


def _sum_over_shard(model, x, likelihood, batch_size, progress, desc, curvature, add=lambda s, t: s + t):
    """(sum_batches curvature(likelihood, xb, f, i), log p(shard | theta)) over this rank's shard of x, one forward
    per batch serving both; i counts the batches from 1 (for the messages)."""
    likelihood = get_likelihood(likelihood) if likelihood is not None else Gaussian(1.0)
    dtype = model.get_params().dtype
    x = x[distributed.current().shard(len(x))]
    it = batches(x, batch_size, shuffle=False)
    if progress and sys.stderr.isatty():
        from tqdm import tqdm  # noqa: PLC0415

        it = tqdm(it, total=n_batches(len(x), batch_size), desc=desc, leave=False)
    total, log_lik = None, 0.0
    for i, xb in enumerate(it, start=1):
        xb = asarray(xb, dtype=dtype)
        f = model.forward(xb)
        log_lik -= float(likelihood.nll(f, xb).sum())
        term = curvature(likelihood, xb, f, i)
        total = term if total is None else add(total, term)
    return total, log_lik


def fit_posthoc(model, x_train, likelihood=None, method="approx", threshold=None, batch_size=256,
                prior_precision=1.0, optimize_prior=True, progress=False):
    """Laplace at the model's current (MAP) parameters: returns (DiagonalLaplace or KroneckerLaplace for a
    KFAC method, info dict).

    info holds the training-set log-likelihood, the prior precision and the log marginal
    likelihood at that prior precision (after optimising it when ``optimize_prior``).
    """
    if method in KFAC_METHODS:
        blocks, log_lik = dataset_kfac(model, x_train, likelihood, method, batch_size, progress)
        posterior = KroneckerLaplace(model.get_params(), blocks, prior_precision)
    else:
        G, log_lik = dataset_ggn(model, x_train, likelihood, method, threshold, batch_size, progress)
        # ggn >= 0 is a property of the GGN; clip round-off of the 'mixed' engine like the online trainer
        G = array_module(G).maximum(G, 0)
        posterior = DiagonalLaplace(model.get_params(), G, prior_precision)
    if optimize_prior:
        posterior.optimize_prior_precision()
    info = {"log_likelihood": log_lik, "prior_precision": posterior.prior_precision,
            "log_marginal_likelihood": posterior.log_marginal_likelihood(log_lik),
            "hessian": method, "n_train": int(len(x_train))}
    return posterior, info
