"""The online Laplacian autoencoder (paper Sec. 2, eq. 10-11; appendix D.5).

The LAE never trains a point estimate first: the variational distribution is a diagonal Laplace
approximation q_t(theta) = N(theta | theta_t, (H_t + lambda)^-1) that moves along with training.
Per minibatch x (B images of a training set of N):

  1. sample theta_s ~ q_t                                   (one sample by default, ``n_samples``)
  2. theta_{t+1} = theta_t - Adam(g_t),                                                     (eq. 10)
       g_t = grad_theta mean_b -log p(x_b | theta) at theta_s  +  (lambda / N) theta_t
  3. H_{t+1}     = (1 - alpha) H_t + (N / B) G_t,  G_t = diag GGN of the batch at theta_s  (eq. 11)

Design choices, and why:

* **Where the GGN is evaluated: at the sampled weights theta_s.** Eq. 11 asks for the expected
  curvature E_{q_t}[GGN]; one sample is its Monte Carlo estimate (the average with
  ``n_samples > 1``). It also costs no extra forward pass: the Hessian engine reuses the caches
  of the forward pass that produced the reconstruction for the gradient (``ggn_diagonal(..., f=f)``).

* **How the batch term is scaled to the data set: by N / B.** G_t sums over the B images of the
  batch, so (N / B) G_t is an unbiased estimate of the GGN of the whole training set (at theta_s);
  the factor uses the actual size of each batch, so a short last batch is scaled correctly.

* **The default alpha = 1e-3, and what it means.** The recursion is an exponentially weighted
  sum, so its stationary value is H = GGN(all data) / alpha: every image is counted about
  1 / alpha times, i.e. the posterior is *tempered* (made narrower) by the factor alpha, and the
  memory is about 1 / alpha steps. alpha = 1 keeps only the current batch (no memory, plain
  Laplace precision, noisy); the paper sets alpha to the learning rate, 1e-3 (the authors' code
  calls 1 - alpha = 0.999 the "hessian memory factor"), which is our default. The tempering is what
  makes the method work with the unit-variance Gaussian likelihood (plain MSE): that likelihood
  assumes a pixel noise far larger than the real reconstruction error, so the untempered posterior
  is much too wide - decoders sampled from it reconstruct visibly worse than the mean network and
  training converges to a worse mean. ``benchmarks/table2.py --methods online --alphas 1 0.1 0.01 0.001``
  measures it.

* **How the prior keeps the precision positive.** The posterior precision is H_t + lambda with
  the prior precision lambda > 0 (default 1, as in the paper). H_0 >= 0, every G_t >= 0 (a
  diagonal of J^T H_out J with H_out PSD) and 0 < 1 - alpha < 1, so H_t >= 0 for all t and
  the precision is >= lambda > 0: every variance lies in (0, 1 / lambda], never negative or
  infinite. Weights that no data constrain (e.g. first-layer weights of always-black MNIST border
  pixels) keep the prior variance 1 / lambda - the source of the large output variance on
  out-of-distribution images. Each step checks that G_t is finite and >= 0 (round-off in the
  'mixed' engine may give tiny negative entries, which are clipped; anything larger is a bug and
  raises), and stops with :class:`TrainingDivergedError` naming the step on any nan/inf.

* **Start of the recursion.** With H_0 = 0 the first samples would come from the prior alone
  (standard deviation 1 / sqrt(lambda) = 1 per weight, far larger than the weights themselves),
  wrecking the first updates. Instead H_0 = (N / B) G_0 / alpha with G_0 the GGN of the first
  batch at the initial mean: the recursion's stationary value for that batch, so q_0 is already a
  (tempered) Laplace approximation at theta_0 and H_t needs no warm-up.

* **The prior in the mean's step: weight decay lambda / N.** The precision H_t + lambda is the
  Hessian of -log p(D | theta) - log p(theta), so the mean must follow the gradient of the same
  objective, or it would drift to the mode of the likelihood alone while the precision holds the
  prior. Divided by N to keep the per-image scale of the plain AE's step, the objective is
  E_q[mean_b -log p(x_b | theta)] + lambda / (2N) ||theta_t||^2 (the Gaussian prior's expectation under
  q is lambda/2 (||theta_t||^2 + tr Sigma), whose gradient in the mean is exactly lambda theta_t): the
  batch term is estimated at the sample theta_s, the prior term is exact at the mean theta_t.
"""
from __future__ import annotations

from . import distributed
from .backend import array_module, asarray
from .hessian import ggn_diagonal
from .laplace import DiagonalLaplace, check_rng, in_dtype, sample_diagonal
from .losses import Gaussian, get_likelihood
from .optim import Adam
from .training import (
    CheckpointError,
    TrainingDivergedError,
    check_finite,
    reconstruction_stats,
)
from .hessian.cost import check_threshold
from .validation import all_finite, positive, positive_int

__all__ = ["OnlineLaplace", "DEFAULT_ALPHA", "HESSIAN_METHODS"]

HESSIAN_METHODS = ("exact", "approx", "mixed", "sqrt")
DEFAULT_ALPHA = 1e-3
"""The paper's forgetting rate: alpha = the learning rate of Adam, 1e-3."""


def _check_alpha(alpha):
    alpha = float(alpha)
    if not (0 < alpha <= 1):
        raise ValueError(f"alpha must lie in (0, 1], got {alpha}")
    return alpha


class OnlineLaplace:
    """Online LAE trainer: theta_t (model parameters) and H_t (running diagonal GGN), eq. 10-11."""

    method = "online"

    def __init__(self, model, n_data, alpha=DEFAULT_ALPHA, prior_precision=1.0, hessian="approx", threshold=None,
                 n_samples=1, optimizer=None, likelihood=None):
        if hessian not in HESSIAN_METHODS:
            raise ValueError(f"unknown Hessian method {hessian!r}; choose one of {', '.join(HESSIAN_METHODS)}")
        if threshold is not None:
            check_threshold(threshold)  # refused now, not at the first 'mixed' step
        self.model = model
        self.n_data = positive_int(n_data, "n_data (the training-set size N)")
        self.alpha = _check_alpha(alpha)
        self.prior_precision = positive(prior_precision, "prior_precision")
        self.hessian, self.threshold = hessian, threshold
        self.n_samples = positive_int(n_samples, "n_samples")
        self.optimizer = optimizer if optimizer is not None else Adam(lr=1e-3)
        self.likelihood = get_likelihood(likelihood) if likelihood is not None else Gaussian(1.0)
        self.theta = model.get_params()
        self.H = None  # H_t, the data term of the precision; set from the first batch
        self.t = 0
        self._thetas = None  # the step's samples theta_s, (n_samples, P), reused across steps

    def posterior(self):
        """q_t = N(theta_t, (H_t + lambda)^-1) as a DiagonalLaplace of copies: later steps leave it as it is."""
        H = self.H.copy() if self.H is not None else array_module(self.theta).zeros_like(self.theta)
        return DiagonalLaplace(self.theta.copy(), H, self.prior_precision)

    def _add_prior_grad(self, grad):
        """grad += (lambda / N) theta_t, the gradient of the prior's share lambda / (2N) ||theta_t||^2 of the
        objective; the product is formed in the sample buffer (free once the sampled weights are used)."""
        work = self._thetas[0]
        array_module(grad).multiply(self.theta, self.prior_precision / self.n_data, out=work)
        grad += work

    def batch_ggn(self, x, f, n_batch=None):
        """(N / B) G, G = diag sum_b J_b^T H_out J_b at the model's current parameters (last forward gave f).

        n_batch: B, the images of the whole batch when x is one rank's shard (default x.shape[0]); the sum over
        the ranks' shards is the caller's all-reduce."""
        scale = self.n_data / (x.shape[0] if n_batch is None else n_batch)  # on H_out: no pass over G
        G = ggn_diagonal(self.model, self.likelihood, x, x, method=self.hessian, threshold=self.threshold, f=f,
                         scale=scale)
        # one pass over G: its min is nan where an entry is nan, and negative where the diagonal of a PSD matrix
        # would not be (round-off allowed, relative to the largest |entry|); a +inf is named by the check of the
        # precision it flows into (step)
        low = float(G.min()) if G.size else 0.0
        if not low >= 0:  # only then the second pass over G: the finite check, the max, and the clip
            check_finite("the batch GGN", G, self.t + 1)
            high = float(G.max())
            if low < -1e-6 * max(high, -low):
                raise TrainingDivergedError(
                    f"at step {self.t + 1} the batch GGN has a negative diagonal entry ({low:.3e}) "
                    "beyond round-off: the Hessian engine returned a non-PSD matrix")
            array_module(G).maximum(G, 0, out=G)  # G is the engine's fresh array
        return G

    def _initial_precision(self, x):
        """H_0 = (N / B) G_0 / alpha: the stationary value of eq. 11 for the first batch, at the initial mean."""
        f = self.model.forward(x)
        check_finite("the reconstruction", f, self.t + 1)
        comm = distributed.current()
        return comm.allreduce_sum(self.batch_ggn(x, f, comm.allreduce_sum(x.shape[0]))) / self.alpha

    def step(self, x, rng):
        """One minibatch of eq. 10-11: sample, Adam step on the mean, precision update; host stats.

        rng: a Generator of the backend (e.g. minilae.backend.xp().random.default_rng(seed)) for theta_s.
        Data parallel (:mod:`minilae.distributed`): x is this rank's shard of the batch and rng the same
        generator on every rank, so all ranks draw the same theta_s; the gradient and G are summed over the
        ranks before the step.
        """
        check_rng(rng)  # before H_0 is computed: a refused step changes nothing
        if self.H is None:
            self.H = self._initial_precision(x)
        comm = distributed.current()
        B = comm.allreduce_sum(x.shape[0])
        # theta_s drawn into one array kept across steps: a fresh P-long array costs its page faults every step
        if self._thetas is None or self._thetas.shape != (self.n_samples,) + self.theta.shape:
            self._thetas = array_module(self.theta).empty((self.n_samples,) + self.theta.shape, self.theta.dtype)
        thetas = sample_diagonal(self.theta, self.H, in_dtype(self.prior_precision, self.theta), self.n_samples, rng,
                                 out=self._thetas)
        grad = G = None
        stats = {}
        for theta_s in thetas:
            # finite without a check: theta_t and H_t passed theirs at the end of the last step, so
            # H_t + lambda >= lambda > 0 and theta_s = theta_t + eps / sqrt(H_t + lambda) (an overflow to inf
            # would show in the reconstruction's check below)
            self.model.set_params(theta_s, check_finite=False, share=True)  # views: no P-long copy
            f = self.model.forward(x)
            check_finite("the reconstruction at the sampled weights", f, self.t + 1)
            nll = self.likelihood.nll(f, x)
            g_s = self.model.vjp_params(self.likelihood.grad(f, x) / B)
            check_finite("the gradient", g_s, self.t + 1)
            G_s = self.batch_ggn(x, f, B)
            grad = g_s if grad is None else grad + g_s
            G = G_s if G is None else G + G_s
            for k, v in reconstruction_stats(f, x, nll).items():
                stats[k] = stats.get(k, 0.0) + v / self.n_samples
        # the model back on theta_t (views, no copy) before the samples' buffer serves as the prior's scratch; the
        # optimiser's in-place update below then reaches the model, and no cache was taken since this new stamp
        self.model.set_params(self.theta, check_finite=False, share=True)
        grad = comm.allreduce_sum(grad)
        G = comm.allreduce_sum(G)
        if self.n_samples > 1:
            grad /= self.n_samples
            G /= self.n_samples
        self._add_prior_grad(grad)
        self.optimizer.step(self.theta, grad)
        # eq. 11, in place: H <- (1 - alpha) H + (N / B) G
        self.H *= 1 - self.alpha
        self.H += G
        self.t += 1
        check_finite("the parameters", self.theta, self.t)
        if not all_finite(self.H):  # name the batch GGN where it brought the inf (batch_ggn caught any nan)
            check_finite("the batch GGN", G, self.t)
            check_finite("the precision", self.H, self.t)
        return stats

    def snapshot(self):
        """Copies of theta and H: together they define the posterior."""
        return {"theta": self.theta.copy(), "H": None if self.H is None else self.H.copy()}

    def restore(self, snap):
        """Put a snapshot back into the trainer and the model."""
        self.theta = asarray(snap["theta"], dtype=self.theta.dtype).copy()
        self.H = None if snap.get("H") is None else asarray(snap["H"], dtype=self.theta.dtype).copy()
        self.model.set_params(self.theta)

    def state_dict(self):
        """theta, H, step count, alpha, N and optimiser state."""
        return {"theta": self.theta.copy(), "H": None if self.H is None else self.H.copy(), "t": self.t,
                "alpha": self.alpha, "n_data": self.n_data, "prior_precision": self.prior_precision,
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, d):
        """Restore from state_dict (arrays moved to the current backend)."""
        theta = asarray(d["theta"], dtype=self.theta.dtype)
        if theta.shape != self.theta.shape:
            raise CheckpointError(f"checkpoint holds {theta.shape[0]} parameters, the model has {self.theta.shape[0]}")
        self.restore({"theta": theta, "H": d.get("H")})
        self.t = int(d["t"])
        self.alpha = _check_alpha(d["alpha"])
        self.n_data = int(d["n_data"])
        self.prior_precision = float(d["prior_precision"])
        self.optimizer.load_state_dict(d["optimizer"])

