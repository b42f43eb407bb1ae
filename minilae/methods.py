"""Every trained autoencoder, whatever its method, seen through one interface: the Predictor.

A Predictor turns host images into a :class:`~minilae.predictive.Prediction` (latent and output
mean/variance, log p(x), MSE of the mean) by the accumulation of :mod:`minilae.predictive` over K
*draws*, one stochastic network each:

  =============  ============================================  ========================================
  method         draw k                                        K in ``predict``
  =============  ============================================  ========================================
  ae             the MAP network (deterministic)               1
  ae-var         the MAP network; x_var = e^s, its decoded     1
                 per-pixel variance; log p(x) with it
  posthoc,       theta_k ~ q(theta), the diagonal Laplace      n_samples
  online         posterior
  mc-dropout     dropout kept on: fresh masks for every pass   n_samples
  vae            z_k ~ q(z | x) decoded; z_var = e^logvar      n_samples
                 (the encoder's), log p(x) = 1/K sum_k log
                 N(x | decode(z_k), I)
  ensemble       member k                                      the number of members
  =============  ============================================  ========================================

The output variance is Var_k E[x | k] + E_k Var[x | k]: the spread over draws plus a draw's own
(aleatoric) variance, which only ae-var predicts. ``rng`` (an int seed or a backend Generator) fixes
the draws: the same rng gives the same prediction.

:func:`load_run` reads the run folder of ``python -m minilae.train`` back as its Predictor.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np  # host side: seeds and member orders

from . import backend
from .backend import asarray, xp
from .kfac import KroneckerLaplace
from .laplace import DiagonalLaplace
from .losses import Gaussian, get_likelihood
from .models import build_model
from .predictive import ModelDraw, Pass, Prediction, decode_draws, laplace_draws, network_seed, predict_draws
from .training import CheckpointError, check_signature, load_checkpoint, model_signature
from .validation import positive_int

__all__ = ["METHODS", "CHECKPOINT", "Predictor", "NetworkPredictor", "DropoutPredictor", "EnsemblePredictor",
           "VAEPredictor", "Prediction", "load_run", "build_network", "method_likelihood", "member_seed",
           "make_predictor", "predictor_from_state", "stored_posterior"]

METHODS = ("ae", "posthoc", "online", "ae-var", "vae", "mc-dropout", "ensemble")
CHECKPOINT = "checkpoint.npz"


# ----------------------------------------------------------------------------------------------
# the networks of each method

def method_likelihood(method):
    """p(x | f): the heteroscedastic Gaussian N(mu, e^s) for ae-var, else the unit Gaussian N(f, I)."""
    return get_likelihood("heteroscedastic") if method == "ae-var" else Gaussian(1.0)


def build_network(method, name, input_shape, latent_size, seed, dropout=0.0):
    """The untrained network of a method: the AE (ae-var: decoder of mean and log-variance, mc-dropout: with
    dropout p between the trainable layers) or the VAE."""
    if method == "vae":
        from .vae import build_vae  # noqa: PLC0415 - the VAE module is only needed by VAE runs

        return build_vae(name, input_shape, latent_size, seed=seed)
    options = {}
    if method == "ae-var":
        options["output"] = "mean_logvar"
    if method == "mc-dropout":
        options["dropout"] = dropout
    return build_model(name, input_shape, latent_size, seed=seed, **options)


def member_seed(seed, member):
    """The seed of ensemble member m (weights and shuffling), derived from (seed, m) by SeedSequence."""
    return int(np.random.SeedSequence([int(seed), int(member)]).generate_state(1)[0] >> 1)


# ----------------------------------------------------------------------------------------------
# draws of the new families (the Laplace draws live in minilae.predictive)

class _VarianceDraw(ModelDraw):
    """A network that predicts its own output variance: x = mean(f), x_var = variance(f) (ae-var: e^s)."""

    def reconstruct(self, x):
        """Pass(z, None, mu, e^s, nll) of one encode-decode."""
        z = self.model.encode(x)
        f = self.model.decode(z)
        return Pass(z, None, self.likelihood.mean(f), self.likelihood.variance(f), self.likelihood.nll(f, x))

    def decode(self, z):
        """(mu, e^s) of decode(z)."""
        f = self.model.decode(z)
        return self.likelihood.mean(f), self.likelihood.variance(f)


class _VAEDraw:
    """One sampled code per input: z = mu + e^{s/2} eps, eps ~ N(0, I) from the draws' backend Generator."""

    def __init__(self, vae, likelihood, rng):
        self.vae, self.likelihood, self.rng = vae, likelihood, rng

    def sample(self, x):
        """(mu, e^s, z ~ q(z | x))."""
        mu, logvar = self.vae.encode_stats(x)
        eps = self.rng.standard_normal(mu.shape).astype(mu.dtype, copy=False)  # as VAE.sample_latent draws it
        return mu, xp().exp(logvar), mu + xp().exp(0.5 * logvar) * eps

    def encode(self, x):
        """z ~ q(z | x)."""
        return self.sample(x)[2]

    def reconstruct(self, x):
        """Pass(mu, e^s, decode(z), None, -log N(x | decode(z), I)) at one sampled code z."""
        mu, var, z = self.sample(x)
        f = self.vae.decode(z)
        return Pass(mu, var, self.likelihood.mean(f), None, self.likelihood.nll(f, x))

    def decode(self, z):
        """(decode(z), None): the decoder is deterministic."""
        return self.likelihood.mean(self.vae.decode(z)), None


# ----------------------------------------------------------------------------------------------
# the interface

class Predictor:
    """A trained autoencoder of any method seen through one interface (base class; one subclass per method family).

    Subclasses set ``stochastic`` and ``decoder_variance`` (whether predict_decoder's variance means anything:
    False for ae and vae, whose decoders are deterministic) and implement ``_draws(n_samples, seed)``, an
    iterator of draws with ``encode(x)``, ``reconstruct(x) -> Pass`` and ``decode(z) -> (mean, var)``,
    identical for the same seed.
    """

    stochastic = True
    decoder_variance = True

    def __init__(self, method, config, network, likelihood=None):
        self.method, self.config, self.network = method, dict(config), network
        self.likelihood = likelihood if likelihood is not None else Gaussian(1.0)
        self.input_shape = tuple(network.input_shape)
        self.latent_size = int(network.latent_size)
        self.dtype = network.get_params().dtype

    def __repr__(self):
        return f"{type(self).__name__}(method={self.method!r}, latent_size={self.latent_size})"

    def _draws(self, n_samples, seed):
        raise NotImplementedError

    def n_draws(self, n_samples):
        """K of predict: n_samples for a stochastic method, 1 for a deterministic one."""
        n_samples = positive_int(n_samples, "n_samples")
        return n_samples if self.stochastic else 1

    def _sampled_draws(self, n_samples, seed):
        """The draws of sample_codes / sample_reconstructions (K = n_samples, 1 if not stochastic)."""
        return self._draws(self.n_draws(n_samples), seed)

    def predict(self, x, n_samples=100, rng=None, batch_size=500, memory_budget=None) -> Prediction:
        """Predictive statistics of host images x (N, *input_shape); for a non-stochastic method n_samples is
        ignored (K = 1) and z_var = 0 (ae-var: x_var is its decoded aleatoric variance)."""
        K, seed = self.n_draws(n_samples), network_seed(rng)
        return predict_draws(lambda: self._draws(K, seed), self._check_images(x), self.latent_size, self.dtype,
                             batch_size, memory_budget)

    def predict_decoder(self, z, n_samples=100, rng=None, batch_size=500):
        """(mean, variance) of decoded images for latent codes z (N, latent) (backend arrays)."""
        K, seed = self.n_draws(n_samples), network_seed(rng)
        return decode_draws(lambda: self._draws(K, seed), z, self.latent_size, self.input_shape, self.dtype,
                            batch_size)

    def sample_codes(self, x, n_samples, rng=None, batch_size=500):
        """Backend array (K, N, latent) of K stochastic encodings of host images x (K = 1 if not stochastic)."""
        return self._per_draw(x, n_samples, rng, batch_size, lambda draw, xb: draw.encode(xb))

    def sample_reconstructions(self, x, n_samples, rng=None, batch_size=500):
        """Backend array (K, N, *input_shape): K stochastic encode-decode passes of x, pass k using one draw
        for all N inputs (K = 1 if not stochastic)."""
        return self._per_draw(x, n_samples, rng, batch_size, lambda draw, xb: draw.reconstruct(xb).x)

    def _per_draw(self, x, n_samples, rng, batch_size, apply):
        """Stack over draws k of apply(draw_k, batch) concatenated over the batches of x."""
        positive_int(batch_size, "batch_size")
        x = self._check_images(x)
        batches = [asarray(x[s:s + batch_size], dtype=self.dtype) for s in range(0, len(x), batch_size)]
        out, iterator = [], self._sampled_draws(n_samples, network_seed(rng))
        try:
            for draw in iterator:
                out.append(xp().concatenate([apply(draw, xb) for xb in batches]))
        finally:
            iterator.close()
        return xp().stack(out)

    def _check_images(self, x):
        if getattr(x, "ndim", 0) < 2 or x.shape[0] == 0 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"x must be a non-empty batch of images (N, {', '.join(map(str, self.input_shape))}), "
                             f"got shape {getattr(x, 'shape', None)}")
        return x


class NetworkPredictor(Predictor):
    """ae, ae-var, posthoc, online: one network, and an optional diagonal Laplace posterior to sample it from."""

    def __init__(self, method, config, model, posterior=None, likelihood=None):
        super().__init__(method, config, model, likelihood)
        self.model, self.posterior = model, posterior
        self.stochastic = posterior is not None
        self.decoder_variance = posterior is not None or method == "ae-var"
        self._draw = (_VarianceDraw if method == "ae-var" else ModelDraw)(model, self.likelihood)

    def _draws(self, n_samples, seed):
        """theta_k ~ q(theta), k = 1..K, set into the model (the MAP network once without a posterior)."""
        return laplace_draws(self.model, self.posterior, self._draw, n_samples, seed)


class DropoutPredictor(Predictor):
    """mc-dropout: the network with its dropout kept on; every pass (and every input) draws fresh masks from the
    layers' backend generators, which are reseeded from the seed first, so the same rng repeats the masks."""

    def __init__(self, method, config, model, likelihood=None):
        super().__init__(method, config, model, likelihood)
        self.model = model
        self._draw = ModelDraw(model, self.likelihood)

    def _draws(self, n_samples, seed):
        """K passes in training mode (masks drawn at each forward); the model's mode is put back afterwards."""
        was_training, rng = self.model.training, xp().random.default_rng(seed)
        self.model.reseed_dropout(rng)
        self.model.train(True)
        try:
            for _ in range(n_samples):
                yield self._draw
        finally:
            self.model.train(was_training)


class EnsemblePredictor(Predictor):
    """ensemble: M networks of one architecture, theta_m set into one model in turn. predict uses every member
    once (K = M, n_samples ignored); sample_codes / sample_reconstructions use K = n_samples members, cycling
    through a random order of the M members drawn from rng (all M once each when K = M)."""

    def __init__(self, method, config, model, thetas):
        super().__init__(method, config, model, Gaussian(1.0))
        if len(thetas) < 1:
            raise ValueError("an ensemble needs at least one member")
        self.model, self.thetas = model, [asarray(t, dtype=self.dtype) for t in thetas]
        self._draw = ModelDraw(model, self.likelihood)
        self.stochastic = len(self.thetas) > 1

    def n_draws(self, n_samples):
        """K = M members."""
        positive_int(n_samples, "n_samples")
        return len(self.thetas)

    def _members(self, order):
        theta0 = self.model.get_params()
        try:
            for m in order:
                self.model.set_params(self.thetas[m])
                yield self._draw
        finally:
            self.model.set_params(theta0)

    def _draws(self, n_samples, seed):
        """Every member once, in order (predict, predict_decoder)."""
        return self._members(range(len(self.thetas)))

    def _sampled_draws(self, n_samples, seed):
        """K = n_samples members: a random order of the M members (host, from the seed), cycled."""
        K = positive_int(n_samples, "n_samples")
        order = np.random.default_rng(seed).permutation(len(self.thetas))
        return self._members([int(order[k % len(order)]) for k in range(K)])


class VAEPredictor(Predictor):
    """vae: z_mean, z_var = mu, e^s of q(z|x); x mean/variance over K codes z_k ~ q(z|x) decoded;
    log p(x) = 1/K sum_k log N(x | decode(z_k), I)."""

    decoder_variance = False  # the decoder is deterministic

    def __init__(self, method, config, vae):
        super().__init__(method, config, vae, Gaussian(1.0))
        self.vae = vae

    def _draws(self, n_samples, seed):
        """K draws sharing one backend Generator (so the sequence of codes repeats for the same seed)."""
        draw = _VAEDraw(self.vae, self.likelihood, xp().random.default_rng(seed))
        for _ in range(n_samples):
            yield draw


# ----------------------------------------------------------------------------------------------
# run folders

def stored_posterior(p, dtype):
    """The post-hoc posterior a checkpoint stores ({"mean", "ggn", "prior_precision"}, or a KFAC posterior's
    `to_state` with "structure": "kfac") on the backend."""
    if p.get("structure") == KroneckerLaplace.structure:
        return KroneckerLaplace.from_state(p, dtype)
    return DiagonalLaplace(asarray(p["mean"], dtype=dtype), asarray(p["ggn"], dtype=dtype), p["prior_precision"])


def make_predictor(method, config, network, posterior=None, thetas=None):
    """The Predictor of a trained network (its parameters set) of a method; thetas: the ensemble's members."""
    if method == "ensemble":
        return EnsemblePredictor(method, config, network, thetas)
    if method == "vae":
        return VAEPredictor(method, config, network)
    if method == "mc-dropout":
        return DropoutPredictor(method, config, network)
    return NetworkPredictor(method, config, network, posterior, method_likelihood(method))


def predictor_from_state(state, args, signature, path="checkpoint"):
    """The Predictor of a run's checkpoint state (finished or interrupted), built as the run built it."""
    method = args["method"]
    seed = member_seed(args["seed"], 0) if method == "ensemble" else args["seed"]
    net = build_network(method, signature["model"], tuple(signature["input_shape"]), int(signature["latent_size"]),
                        seed, args.get("dropout", 0.0))
    check_signature(signature, model_signature(net, signature["model"]), path)
    dtype = net.get_params().dtype
    if method == "ensemble":
        members = [m["trainer"]["theta"] for m in state["members"]]
        if not members and state.get("current") is not None:  # interrupted inside the first member
            members = [state["current"]["state"]["trainer"]["theta"]]
        if not members:
            raise CheckpointError(f"{path} holds no trained ensemble member yet")
        return make_predictor(method, args, net, thetas=members)
    trainer = state["trainer"]
    net.set_params(asarray(trainer["theta"], dtype=dtype))
    posterior = None
    if state.get("posterior") is not None:  # post-hoc
        posterior = stored_posterior(state["posterior"], dtype)
    elif trainer.get("H") is not None:  # online: the trainer's q_t
        posterior = DiagonalLaplace(net.get_params(), asarray(trainer["H"], dtype=dtype), trainer["prior_precision"])
    return make_predictor(method, args, net, posterior)


def load_run(run_dir, method=None) -> Predictor:
    """Any finished (or interrupted) run folder of `python -m minilae.train`, as its Predictor.

    method: the method the caller expects; a run of another method is a ValueError naming both. An interrupted
    run gives its last finished epoch (an interrupted ensemble: its finished members). Sets the backend's default
    dtype to the run's. Also re-exported as `minilae.train.load_run`.
    """
    if method is not None and method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    path = Path(run_dir) / CHECKPOINT
    state, stored = load_checkpoint(path)
    args, signature = stored.get("args"), stored.get("signature")
    if not isinstance(args, dict) or not isinstance(signature, dict) or args.get("method") not in METHODS:
        raise CheckpointError(f"{path} holds no run configuration of a known method; it was not written by "
                              "minilae.train")
    if method is not None and args["method"] != method:
        raise ValueError(f"{run_dir} holds a run of method {args['method']!r}, not {method!r}; load it without "
                         f"method= or give the folder of a {method!r} run")
    backend.set_default_dtype(np.dtype(args["dtype"]))
    return predictor_from_state(state, args, signature, path)
