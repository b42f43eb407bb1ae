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
    likelihood = get_likelihood(likelihood) if likelihood is not None else Gaussian(1.0)
    dtype = model.get_params().dtype
    G, log_lik = None, 0.0
    comm = distributed.current()
    x = x[comm.shard(len(x))]
    for i, xb in enumerate(_batches(x, batch_size, progress, "GGN over the training set")):
        xb = asarray(xb, dtype=dtype)
        f = model.forward(xb)
        log_lik -= float(likelihood.nll(f, xb).sum())
        G_b = ggn_diagonal(model, likelihood, xb, xb, method=method, threshold=threshold, f=f)
        check_finite(f"the GGN of batch {i + 1}", G_b, i + 1)
        G = G_b if G is None else G + G_b
    return comm.allreduce_sum(G), comm.allreduce_sum(log_lik)


def dataset_kfac(model, x, likelihood=None, method="kfac", batch_size=256, progress=False):
    """([KronBlock] with A, G and n summed over all images, log p(D | theta)), batch by batch as dataset_ggn
    (data parallel too: each rank sums its shard, then A, G, n and log p are summed over the ranks)."""
    likelihood = get_likelihood(likelihood) if likelihood is not None else Gaussian(1.0)
    dtype = model.get_params().dtype
    blocks, log_lik = None, 0.0
    comm = distributed.current()
    x = x[comm.shard(len(x))]
    for i, xb in enumerate(_batches(x, batch_size, progress, "KFAC factors over the training set")):
        xb = asarray(xb, dtype=dtype)
        f = model.forward(xb)
        log_lik -= float(likelihood.nll(f, xb).sum())
        batch_blocks = ggn_kfac(model, likelihood, xb, xb, method=method, f=f)
        for blk in batch_blocks:
            check_finite(f"the KFAC factor G of batch {i + 1}", blk.G, i + 1)
            check_finite(f"the KFAC factor A of batch {i + 1}", blk.A, i + 1)
        blocks = batch_blocks if blocks is None else [a + b for a, b in zip(blocks, batch_blocks)]
    blocks = [KronBlock(comm.allreduce_sum(b.A), comm.allreduce_sum(b.G), comm.allreduce_sum(b.n), b.offset, b.bias)
              for b in blocks]
    return blocks, comm.allreduce_sum(log_lik)


def _batches(x, batch_size, progress, desc):
    """The batches of x in order, under a progress bar when asked and stderr is a terminal."""
    it = batches(x, batch_size, shuffle=False)
    if progress and sys.stderr.isatty():
        from tqdm import tqdm  # noqa: PLC0415

        it = tqdm(it, total=n_batches(len(x), batch_size), desc=desc, leave=False)
    return it


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
