"""KFAC: the GGN block of each Linear / Conv2d layer as a Kronecker product, and its Laplace posterior.

For a layer with W~ = [W | b] of shape (n_out, n_in) (n_in counts the bias column) and inputs a_bt
(t over the T positions of a convolution, T = 1 for Linear), the GGN block of the batch is

    H = sum_b sum_{t, t'} kron(M_b[t, t'], a_bt a_bt'^T)     (rows of W~ in C order, `kron_order`)

where M_b[t, t'] is the (n_out x n_out) block of the output curvature between positions t and t'.
KFAC (Martens & Grosse 2015; KFC for convolutions, Grosse & Martens 2016) keeps t = t' and replaces
the sum of products by the product of the sums:

    H ~ kron(G, A) / n,   A = sum_{b,t} a_bt a_bt^T,   G = sum_{b,t} M_b[t, t],   n = N T.

**The 1/n scaling is stated in one place**, :attr:`KronBlock.scale`, which every operation below uses:
the engine and the layers return the plain sums A, G and the count n = N T of their terms, so factors of
several batches are added before scaling. With means E[A] = A / n and E[G] = G / n this is the usual n E[G] (x) E[A].
It is exact when one term is summed (one sample of a Linear layer) and whenever M_b[t, t] is the same
for every term (a deep linear network under a Gaussian likelihood): then G = n M and H = kron(M, A).

(The paper writes A (x) G, with the column-stacking vec; our flat vector stacks the rows of W~, in
which the same matrix is kron(G, A).)

The posterior (:class:`KroneckerLaplace`) has the precision Lambda = kron(G, A) / n + lambda I per
layer. With the eigendecompositions G = U_G diag(g) U_G^T and A = U_A diag(a) U_A^T,
    Lambda = (U_G (x) U_A) diag(D) (U_G (x) U_A)^T,   D[i, j] = g_i a_j / n + lambda,
so every operation is one pair of small matrix products per layer:
  mat-vec     Lambda vec(V) = vec(G V A) / n + lambda vec(V);
  sampling    theta = mean + vec(U_G (E / sqrt(D)) U_A^T), E ~ N(0, I) (matrix-normal when lambda = 0);
  log det     sum log D;
  variances   diag(Lambda^-1) = (U_G * U_G) (1 / D) (U_A * U_A)^T.
The Laplace evidence depends on the GGN only through its eigenvalues g_i a_j / n, so the diagonal
posterior's formula (:func:`minilae.laplace.log_marginal_likelihood`) applies to them unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .backend import array_module, asarray, xp
from .laplace import GaussianPosterior, check_mean, check_rng, log_marginal_likelihood, optimize_prior_precision
from .sampling import standard_normal
from .validation import all_finite, positive, positive_int

__all__ = ["KronBlock", "KroneckerLaplace", "kron_order", "kron_matvec", "kron_diagonal", "KFAC_METHODS"]

KFAC_METHODS = ("kfac", "kfac-approx")
"""The KFAC structures: 'kfac' reads G off the exact M (full or square-root factor, as 'sqrt' walks);
'kfac-approx' off the diagonal M that 'approx' walks (G diagonal, exact only where M is)."""


def kron_order(n_out: int, n_in: int, bias: bool):
    """Indices into a layer's flat slice (W (n_out, n_in - bias) rows, then b) in the order of the rows of
    W~ = [W | b]: theta_kron = theta_layer[kron_order(...)]."""
    xp_ = xp()
    n_w = n_in - int(bias)
    idx = xp_.arange(n_out * n_w).reshape(n_out, n_w)
    if bias:
        idx = xp_.concatenate([idx, (n_out * n_w + xp_.arange(n_out))[:, None]], axis=1)
    return idx.ravel()


def kron_matvec(G, A, V):
    """kron(G, A) vec(V) = vec(G V A^T) for V (..., n_out, n_in) (rows of V stacked)."""
    return G @ V @ A.T


def kron_diagonal(blocks, like):
    """diag(kron(G, A) / n) of every block, in the flat parameter order: diag(G)_i diag(A)_j / n (P,).
    like: an array of the parameters' backend and dtype."""
    xp_ = array_module(like)
    out = xp_.empty(sum(blk.size for blk in blocks), dtype=like.dtype)
    for blk in blocks:
        d = xp_.diagonal(blk.G)[:, None] * xp_.diagonal(blk.A)[None, :] * blk.scale
        out[blk.offset + kron_order(*blk.shape, blk.bias)] = d.ravel()
    return out


@dataclass
class KronBlock:
    """One layer's factors: A (n_in, n_in) and G (n_out, n_out) as sums over n terms; its parameters are
    the flat slice [offset, offset + n_out n_in), W then b (`bias`)."""

    A: object
    G: object
    n: int
    offset: int
    bias: bool

    @property
    def shape(self):
        """(n_out, n_in) of W~."""
        return int(self.G.shape[0]), int(self.A.shape[0])

    @property
    def size(self) -> int:
        """Number of parameters of the layer, n_out n_in."""
        return self.shape[0] * self.shape[1]

    @property
    def scale(self) -> float:
        """1 / n: the GGN block is kron(G, A) * scale (the module docstring says why)."""
        return 1.0 / self.n

    def matrix(self):
        """The KFAC block kron(G, A) / n in the rows-of-W~ order (dense: small layers, tests and plots)."""
        return array_module(self.A).kron(self.G, self.A) * self.scale

    def __add__(self, other):
        """The factors of two batches: A, G and n add (the scaling is applied once, at the end)."""
        if (self.offset, self.bias, self.shape) != (other.offset, other.bias, other.shape):
            raise ValueError(f"cannot add the factors of different layers: {self.shape} at {self.offset} and "
                             f"{other.shape} at {other.offset}")
        return KronBlock(self.A + other.A, self.G + other.G, self.n + other.n, self.offset, self.bias)


def _eigh_psd(S):
    """(eigenvalues >= 0, eigenvectors) of a symmetric PSD factor; round-off negatives are set to 0."""
    xp_ = array_module(S)
    lam, U = xp_.linalg.eigh((S + S.T) / 2)
    return xp_.maximum(lam, 0), U


class KroneckerLaplace(GaussianPosterior):
    """q(theta) = N(mean, Lambda^-1), Lambda = blockdiag(kron(G_l, A_l) / n_l) + lambda I (see the module)."""

    structure = "kfac"

    def __init__(self, mean, blocks, prior_precision=1.0):
        check_mean(mean)
        self.mean, self.blocks = mean, list(blocks)
        self._check_cover()
        self._eig = []
        for blk in self.blocks:
            for name, S in (("A", blk.A), ("G", blk.G)):
                if not all_finite(S):
                    raise ValueError(f"factor {name} of the layer at offset {blk.offset} has non-finite entries")
            (g, U_G), (a, U_A) = _eigh_psd(blk.G.astype(mean.dtype)), _eigh_psd(blk.A.astype(mean.dtype))
            self._eig.append((g[:, None] * a[None, :] * blk.scale, U_G, U_A))
        self.prior_precision = prior_precision

    def _check_cover(self):
        """Every parameter belongs to exactly one block: the blocks tile [0, P) in order."""
        start = 0
        for blk in self.blocks:
            if blk.offset != start or blk.n < 1:
                raise ValueError(f"the Kronecker blocks must tile the parameter vector in order with n >= 1; a block "
                                 f"starts at {blk.offset} (n={blk.n}) where {start} was expected")
            start += blk.size
        if start != self.num_params:
            raise ValueError(f"the Kronecker blocks cover {start} parameters, the mean has {self.num_params}")

    def __repr__(self):
        return f"KroneckerLaplace(P={self.num_params}, layers={len(self.blocks)}, " \
               f"prior_precision={self.prior_precision:.4g})"

    # ---- the flat vector <-> per-layer matrices W~ ------------------------------------------------
    def _orders(self):
        return [blk.offset + kron_order(*blk.shape, blk.bias) for blk in self.blocks]

    def _split(self, v):
        """Per block, v (..., P) as (..., n_out, n_in) matrices in the rows-of-W~ order."""
        return [v[..., idx].reshape(v.shape[:-1] + blk.shape) for blk, idx in zip(self.blocks, self._orders())]

    def _join(self, parts, lead):
        """The inverse of _split: per-block (..., n_out, n_in) matrices into one flat (..., P)."""
        out = array_module(self.mean).empty(tuple(lead) + (self.num_params,), dtype=self.mean.dtype)
        for idx, part in zip(self._orders(), parts):
            out[..., idx] = part.reshape(tuple(lead) + (-1,))
        return out

    def _D(self, e):
        return e + self.prior_precision

    # ---- the Gaussian ------------------------------------------------------------------------
    @property
    def eigenvalues(self):
        """The GGN's eigenvalues g_i a_j / n of every block, flat (P,) (in the eigenbasis, not parameter order)."""
        return array_module(self.mean).concatenate([e.ravel() for e, _, _ in self._eig])

    def matvec(self, v):
        """Lambda v = vec(G V A) / n + lambda v, per block, for v (P,) or (k, P)."""
        parts = [kron_matvec(blk.G, blk.A, V) * blk.scale for blk, V in zip(self.blocks, self._split(v))]
        return self._join(parts, v.shape[:-1]) + self.prior_precision * v

    @property
    def precision(self):
        """The diagonal of Lambda: diag(G)_i diag(A)_j / n + lambda (the dense Lambda is never formed)."""
        return kron_diagonal(self.blocks, self.mean) + self.prior_precision

    @property
    def variance(self):
        """Marginal variances diag(Lambda^-1) = (U_G * U_G) (1 / D) (U_A * U_A)^T per block, each in (0, 1/lambda]."""
        parts = [(U_G ** 2) @ (1.0 / self._D(e)) @ (U_A ** 2).T for e, U_G, U_A in self._eig]
        return self._join(parts, ())

    @property
    def std(self):
        """Marginal standard deviations sqrt(diag(Lambda^-1))."""
        return array_module(self.mean).sqrt(self.variance)

    def log_det_precision(self) -> float:
        """log det Lambda = sum over blocks of sum_ij log(g_i a_j / n + lambda)."""
        xp_ = array_module(self.mean)
        return float(sum(xp_.log(self._D(e).astype(xp_.float64)).sum() for e, _, _ in self._eig))

    def sample(self, n_samples, rng):
        """theta_k = mean + vec(U_G (E_k / sqrt(D)) U_A^T) per block, E_k ~ N(0, I): (n_samples, P)."""
        n_samples = positive_int(n_samples, "n_samples")
        check_rng(rng)
        parts = []
        for (e, U_G, U_A), blk in zip(self._eig, self.blocks):
            E = standard_normal(rng, (n_samples,) + blk.shape, self.mean.dtype)
            parts.append(U_G @ (E / array_module(e).sqrt(self._D(e))) @ U_A.T)
        return self.mean + self._join(parts, (n_samples,))

    def log_density(self, theta):
        """log q(theta) = -1/2 (theta - mean)^T Lambda (theta - mean) + 1/2 log det Lambda - P/2 log 2 pi."""
        if getattr(theta, "shape", (None,))[-1:] != (self.num_params,) or theta.ndim not in (1, 2):
            raise ValueError(f"theta must have shape ({self.num_params},) or (n, {self.num_params}), "
                             f"got {getattr(theta, 'shape', None)}")
        d = theta - self.mean
        out = -0.5 * (d * self.matvec(d)).sum(axis=-1) + 0.5 * self.log_det_precision() \
            - 0.5 * self.num_params * math.log(2 * math.pi)
        return float(out) if theta.ndim == 1 else out

    # ---- the evidence ------------------------------------------------------------------------
    def log_marginal_likelihood(self, log_likelihood=0.0, prior_precision=None):
        """Laplace evidence with the KFAC GGN: the diagonal formula on its eigenvalues g_i a_j / n."""
        lam = self.prior_precision if prior_precision is None else positive(prior_precision, "prior_precision")
        return log_marginal_likelihood(math.log(lam), self.mean, self.eigenvalues, log_likelihood)

    def optimize_prior_precision(self, **kwargs):
        """Set lambda to the maximiser of the evidence (concave in log lambda, as for the diagonal); return it."""
        self.prior_precision = optimize_prior_precision(self.mean, self.eigenvalues, init=self.prior_precision,
                                                        **kwargs)
        return self.prior_precision

    # ---- checkpoints -------------------------------------------------------------------------
    def to_state(self) -> dict:
        """What a checkpoint stores: the mean, the prior, and each block's sums A, G with n, offset, bias."""
        return {"structure": self.structure, "mean": self.mean, "prior_precision": self.prior_precision,
                "blocks": [{"A": b.A, "G": b.G, "n": int(b.n), "offset": int(b.offset), "bias": bool(b.bias)}
                           for b in self.blocks]}

    @classmethod
    def from_state(cls, p, dtype):
        """The posterior of a checkpoint's `to_state` dict, on the backend in dtype."""
        blocks = [KronBlock(asarray(b["A"], dtype=dtype), asarray(b["G"], dtype=dtype), int(b["n"]),
                            int(b["offset"]), bool(b["bias"])) for b in p["blocks"]]
        return cls(asarray(p["mean"], dtype=dtype), blocks, p["prior_precision"])
